"""Real learner subprocesses: kill -9 and resume, SIGINT, a broker with two workers, run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_support import control, feed_stream, frontend_for, make_checkpoint, real_clip_stream

from edgeprop.checkpoint import load_checkpoint, params_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "m.ckpt")


@pytest.fixture(scope="module")
def stream(data_dir):
    return real_clip_stream(data_dir, per_label=1, seed=3)


def _serve(tmp: Path, *extra: str) -> tuple[subprocess.Popen, dict]:
    ready = tmp / "ready.json"
    if ready.exists():
        ready.unlink()
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--ready-file", str(ready),
           "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "serve did not come up"
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def _wait_for(pred, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kill9_then_restart_resumes_from_the_last_checkpoint(model, stream, tmp_path):
    ck_dir = tmp_path / "ck"
    args = ["--model", str(model), "--backend", "reference", "--bind",
            f"ipc://{tmp_path}/data", "--control", f"ipc://{tmp_path}/ctl",
            "--checkpoint-dir", str(ck_dir), "--checkpoint-every", "0.2", "--apply-delay", "0"]
    proc, ep = _serve(tmp_path, *args)
    fe = frontend_for(load_checkpoint(model), ep["data_router"], stream="k")
    try:
        fe.start()
        n = feed_stream(fe, stream, limit_s=8)
        _wait_for(lambda: control(ep["control_rep"], "stats").result["counts"].get(
            "frames", 0) >= n)
        before = control(ep["control_rep"], "stats").result
        assert before["updates"] >= 3
        time.sleep(0.6)  # > the checkpoint interval
        t_kill = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        ck = load_checkpoint(ck_dir / "learner.ckpt")  # atomic: never half-written
        rt = ck.extra["runtime"]
        assert rt["updates"] == before["updates"]  # lost nothing older than the interval
        assert t_kill - rt["saved_unix"] < 0.2 + 1.0
        assert params_hash(ck.params) == before["params_hash"]

        proc, ep = _serve(tmp_path, *args)  # same command: resumes from ck_dir
        after = control(ep["control_rep"], "stats").result
        assert after["params_hash"] == before["params_hash"]
        assert after["updates"] == before["updates"]
        # the same frontend carries on: the new learner has no session, so it says hello
        feed_stream(fe, stream, limit_s=1)
        _wait_for(lambda: fe.rehellos >= 1 and fe._hello_reply is not None)
        feed_stream(fe, stream, limit_s=5)
        st = fe.finish(timeout_s=30)
        assert st["eos_confirmed"] and fe.rehellos >= 1
        assert control(ep["control_rep"], "stats").result["updates"] > before["updates"]
    finally:
        fe.close()
        proc.kill()
        proc.wait(10)


def test_a_frontend_stops_waiting_for_a_learner_that_died(model, stream, tmp_path):
    """Replay mode waits for a slow learner, but a killed one is said in one error, not
    waited for for ever."""
    from edgeprop.errors import EdgepropError

    proc, ep = _serve(tmp_path, "--model", str(model), "--backend", "reference", "--bind",
                      f"ipc://{tmp_path}/data", "--control", "")
    fe = frontend_for(load_checkpoint(model), ep["data_router"], stream="d", silent_peer_s=2)
    try:
        fe.start()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(EdgepropError, match="sent nothing for [23] s while frames waited"):
            feed_stream(fe, stream)
        assert time.monotonic() - t0 < 15
    finally:
        fe.close()
        proc.kill()
        proc.wait(10)


def _stream_5s(model: Path, ep: dict, stream, name: str) -> None:
    """5 s of labelled clips into a learner subprocess, to the confirmed end."""
    fe = frontend_for(load_checkpoint(model), ep["data_router"], stream=name)
    fe.start()
    feed_stream(fe, stream, limit_s=5)
    assert fe.finish()["eos_confirmed"]
    fe.close()


def test_sigint_checkpoints_and_exits_cleanly(model, stream, tmp_path):
    ck_dir = tmp_path / "ck"
    proc, ep = _serve(tmp_path, "--model", str(model), "--backend", "reference", "--bind",
                      "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                      "--checkpoint-dir", str(ck_dir), "--checkpoint-every", "1000")
    try:
        _stream_5s(model, ep, stream, "i")
        stats = control(ep["control_rep"], "stats").result
        assert stats["updates"] >= 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "SIGINT received" in err and "Traceback" not in err
        ck = load_checkpoint(ck_dir / "learner.ckpt")
        assert params_hash(ck.params) == stats["params_hash"]  # no committed weight lost
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_full_disk_costs_no_learned_weights(model, stream, tmp_path, full_dir):
    """Checkpoints that cannot be written are retried while serving goes on; the final one
    goes to a rescue folder that serve names, and it exits 1, not 0."""
    import shutil

    proc, ep = _serve(tmp_path, "--model", str(model), "--backend", "reference", "--bind",
                      "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                      "--checkpoint-dir", str(full_dir), "--checkpoint-every", "0.2",
                      "--apply-delay", "0")
    rescue = None
    try:
        _stream_5s(model, ep, stream, "d")
        _wait_for(lambda: control(ep["control_rep"], "stats").result["counts"].get(
            "checkpoint_failed", 0) >= 1)
        stats = control(ep["control_rep"], "stats").result
        assert stats["updates"] >= 2 and control(ep["control_rep"], "ping").result["pong"]
        asked = control(ep["control_rep"], "checkpoint")  # asked for: told why not
        assert not asked.ok and "No space left" in asked.error
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 1
        err = proc.stderr.read()
        assert "Traceback" not in err and "No space left" in err
        rescue = Path(re.search(r"resume with --checkpoint-dir (\S+?),", err).group(1))
        assert f"or copy learner.ckpt back into {full_dir} once it has room" in err
        ck = load_checkpoint(rescue / "learner.ckpt")
        assert params_hash(ck.params) == stats["params_hash"]  # nothing learned was lost
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if rescue is not None:
            shutil.rmtree(rescue, ignore_errors=True)


def test_two_workers_behind_the_broker_share_the_sessions(model, stream, tmp_path):
    proc, ep = _serve(tmp_path, "--workers", "2", "--model", str(model), "--backend",
                      "reference", "--bind", f"ipc://{tmp_path}/broker")
    nodes = []
    try:
        assert ep["workers"] == 2
        ck = load_checkpoint(model)
        for name in ("a", "b", "c", "d"):
            node = frontend_for(ck, ep["clients_router"], stream=name)
            nodes.append((node, node.start()))
        assert {r.session for _, r in nodes} == {"worker-0", "worker-1"}
        for node, _ in nodes:
            n = feed_stream(node, stream, limit_s=2)
        for node, _ in nodes:
            st = node.finish(timeout_s=30)
            assert st["eos_confirmed"] and st["posterior_frames"] == n
    finally:
        for node, _ in nodes:
            node.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_edgeprop_run_default_job_exits_0_with_the_summary():
    env = dict(os.environ, EDGEPROP_DATA="/nonexistent")  # the job needs no ../shared
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--speed", "0",
                          "--json", "--quiet"], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    for key in ("frames", "dropped", "detections", "accuracy", "latency_p50_ms",
                "latency_p99_ms", "realtime_factor"):
        assert key in res
    assert res["frames"] > 3000 and res["dropped"] == 0 and res["eos_confirmed"]
    assert res["backend"] == "emulator" and res["updates"] >= 30
    assert res["params_hash_after"] != res["params_hash_before"]


def test_run_says_when_it_cannot_keep_the_pacing_asked_for():
    """x1000 real time is out of reach of live feature extraction on any machine here:
    the latencies then include a backlog, and the user is told so."""
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--speed", "1000",
                          "--seconds", "2", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert 0 < res["achieved_speed"] < 900
    assert "warning: the stream was paced at x1000 but went out at" in out.stderr


def test_listen_record_and_replay_commands_round_trip(model, data_dir, tmp_path):
    proc, ep = _serve(tmp_path, "--model", str(model), "--backend", "reference", "--bind",
                      f"ipc://{tmp_path}/d", "--control", "")
    try:
        clip = sorted((data_dir / "left").glob("*.wav"))[0]
        rec = tmp_path / "left.rec"
        out = subprocess.run([sys.executable, "-m", "runtime.cli", "record", str(rec), "--file",
                              str(clip), "--label", "left", "--endpoint", ep["data_router"],
                              "--model", str(model), "--json"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        listened = json.loads(out.stdout)
        assert listened["frames"] == 100 and listened["eos_confirmed"]
        assert "record: 100 frames" in out.stderr  # its lines name the command typed
        out = subprocess.run([sys.executable, "-m", "runtime.cli", "replay", str(rec),
                              "--model", str(model), "--json"], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        res = json.loads(out.stdout)
        assert res["identical"] and res["frames"] == 100 and res["updates"] == 1
        bad = subprocess.run([sys.executable, "-m", "runtime.cli", "listen", "--file",
                              str(clip), "--label", "banana", "--model", str(model)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "unknown label" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
