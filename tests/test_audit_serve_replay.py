"""What a user of serve, its control socket, replay and regress stumbles on, fixed.

Real parts only: learners on loopback TCP (in-process nodes or `edgeprop serve`
subprocesses), REQ clients on their control sockets, recordings written by a learner.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_support import (
    broker_with_workers,
    control,
    feed_stream,
    frontend_for,
    raw_dealer,
    small_checkpoint,
    start_learner,
)

from runtime import protocol as P
from runtime.cli import main
from runtime.learner_node import LearnerCore, Model, resume_path
from runtime.recording import (
    RecordingWriter,
    compare_replay,
    header_for,
    read_recording,
    replay_recording,
)
from runtime.stream import build_stream, embedded_clips


def _serve(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", "serve",
                           "--bind", "tcp://127.0.0.1:*", *args],
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- a learner-side recording

@pytest.fixture(scope="module")
def recording(ckpt, tmp_path_factory):
    """Two streams recorded at the learner, with reset and learning-off sent on its
    control socket half-way (as a user's tool would)."""
    path = tmp_path_factory.mktemp("rec") / "two.rec"
    settings = LearnerCore(ckpt, backend="reference", apply_delay=0).settings()
    node = start_learner(ckpt, recorder=RecordingWriter(path, header_for(ckpt, runtime=settings)),
                         apply_delay=0)
    stream = build_stream(embedded_clips()[:3], seed=0)
    try:
        fes = [frontend_for(ckpt, node.endpoints["data_router"], stream=s) for s in "ab"]
        for fe in fes:
            fe.start()
            feed_stream(fe, stream, limit_s=1.0)
        time.sleep(0.3)  # let the learner take them (not needed for determinism)
        ep = node.endpoints["control_rep"]
        assert control(ep, "reset", stream="a").ok
        assert control(ep, "learning", on=False).ok
        for fe in fes:
            feed_stream(fe, stream, limit_s=2.0)
            assert fe.finish()["eos_confirmed"]
            fe.close()
    finally:
        node.stop()  # closes the recorder
        node.core.close()
    return path


def test_control_socket_commands_are_recorded_so_the_replay_is_identical(recording, ckpt):
    rec = read_recording(recording)
    cmds = [m.cmd for m in rec.inputs() if isinstance(m, P.ControlRequest)]
    assert cmds == ["reset", "learning"]
    cmp = compare_replay(rec, replay_recording(rec, ckpt))
    assert cmp["identical"], cmp
    assert cmp["frames_compared"] == 600


def test_replay_against_another_model_names_the_recording(recording, capsys):
    assert main(["replay", str(recording)]) == 2  # the shipped model: other frontend
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edgeprop replay: error: {recording}: recorded with another "
                          "frontend config") and len(err.splitlines()) == 1, err


def test_replay_with_renamed_outputs_warns(recording, ckpt, tmp_path, capsys):
    """Same weights and frontend, outputs named otherwise: the posteriors match, the
    detections carry other names, and the user is told before the verdict."""
    from edgeprop.checkpoint import save_checkpoint

    renamed = list(ckpt.labels)
    renamed[0], renamed[1] = renamed[1], renamed[0]
    other = tmp_path / "renamed.ckpt"
    save_checkpoint(other, ckpt.cfg, ckpt.params, frontend=ckpt.frontend,
                    encoder=ckpt.encoder, labels=renamed)
    assert main(["replay", str(recording), "--model", str(other)]) == 0
    err = capsys.readouterr().err
    assert "warning: the recording's model named its outputs" in err
    assert "its detections will carry other names" in err


def test_replay_with_the_same_weights_under_another_neuron_model_warns(recording, ckpt,
                                                                      tmp_path, capsys):
    """The weights hash alike, so the warning that compares hashes said nothing."""
    import dataclasses

    from edgeprop.checkpoint import save_checkpoint

    other = "lif" if ckpt.cfg.neuron == "alif" else "alif"
    path = tmp_path / "other.ckpt"
    save_checkpoint(path, dataclasses.replace(ckpt.cfg, neuron=other), ckpt.params,
                    frontend=ckpt.frontend, encoder=ckpt.encoder, labels=ckpt.labels)
    assert main(["replay", str(recording), "--model", str(path)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: the recording's model had neuron {ckpt.cfg.neuron!r} (this model: "
            f"{other!r}): outputs will differ") in err


def test_replay_refuses_offline_options_with_endpoint(recording, capsys):
    argv = ["replay", str(recording), "--endpoint", "tcp://127.0.0.1:9", "--save",
            str(recording.with_name("w.ckpt")), "--hold", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --save, --hold: not used with --endpoint" in err
    assert not recording.with_name("w.ckpt").exists()


def test_regress_refuses_a_recording_of_several_streams(recording, tmp_path, capsys):
    folder = tmp_path / "recs"
    folder.mkdir()
    (folder / "two.rec").write_bytes(recording.read_bytes())
    assert main(["regress", "--recordings", str(folder), "--backend", "reference",
                 "--quiet"]) == 1
    assert "holds 2 streams ('a', 'b'); regress replays one stream" in capsys.readouterr().err


def test_regress_only_with_unknown_names_lists_the_recordings(capsys):
    assert main(["regress", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no recording named nope in" in err and "it holds: clean_speech," in err


# ---------------------------------------------------------------- checkpoints

def _learn_one_window(core: LearnerCore) -> None:
    m = Model.from_checkpoint(small_checkpoint())
    core.handle(P.Hello("s", m.frontend_hash, m.encoder_id, m.cfg.n_in, m.substeps))
    x = np.full((5, m.substeps, m.cfg.n_in), 0.5, np.float32)
    core.handle(P.Frames("s", 0, 0.0, 0.01, m.encoder_id, x, labels=[3] * 5, windows=[0] * 5))
    core.handle(P.EndOfStream("s", 4))
    assert core.updates == 1


def test_a_checkpoint_to_another_path_does_not_put_off_learner_ckpt(tmp_path):
    """Else a kill -9 after `checkpoint {path}` would lose the updates on resume."""
    core = LearnerCore(small_checkpoint(), backend="reference", apply_delay=0,
                       checkpoint_dir=tmp_path / "d", checkpoint_every=0.0)
    try:
        _learn_one_window(core)
        reply = core.control(P.ControlRequest("checkpoint", args={"path": str(tmp_path / "c")}))
        assert reply.ok, reply.error
        core.tick()
        from edgeprop.checkpoint import load_checkpoint

        resumed = load_checkpoint(resume_path(tmp_path / "d"))
        assert resumed.extra["runtime"]["updates"] == 1
    finally:
        core.close()


def test_checkpoint_request_path_errors_are_words_and_the_path_comes_back_absolute(tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    node = start_learner(small_checkpoint())
    ep = node.endpoints["control_rep"]
    try:
        empty = control(ep, "checkpoint", path="")
        assert not empty.ok and empty.error.startswith("argument 'path' is empty")
        folder = control(ep, "checkpoint", path=str(tmp_path))
        assert not folder.ok and folder.error == (f"argument 'path': {tmp_path} is a folder; "
                                                  "give a file name")
        ok = control(ep, "checkpoint", path="rel.ckpt")
        assert ok.ok and ok.result["path"] == str(tmp_path / "rel.ckpt")
        assert (tmp_path / "rel.ckpt").is_file()
    finally:
        node.stop()
        node.core.close()


def test_a_damaged_learner_ckpt_is_called_damaged_not_another_model(tmp_path, capsys):
    resume_path(tmp_path).write_bytes(b"junk")
    assert main(["serve", "--checkpoint-dir", str(tmp_path), "--control", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeprop serve: error: cannot resume: ") and "another model" \
        not in err and f"move {resume_path(tmp_path)} away" in err, err


# ---------------------------------------------------------------- serve options, the broker

def test_negative_apply_delay_is_a_usage_error_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--apply-delay", "-1"])
    assert exc.value.code == 2
    assert "argument --apply-delay: -1: must be >= 0" in capsys.readouterr().err


def test_workers_refuse_record_instead_of_ignoring_it(tmp_path, capsys):
    assert main(["serve", "--workers", "1", "--record", str(tmp_path / "x.rec")]) == 2
    assert "--record is not served with --workers" in capsys.readouterr().err


def test_workers_with_a_bad_model_fail_once_before_starting_any(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("junk")
    assert main(["serve", "--workers", "2", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not an edgeprop checkpoint" in err and len(err.splitlines()) == 1, err


def test_broker_stops_on_a_worker_that_meets_a_user_error_instead_of_restarting_it(tmp_path):
    (tmp_path / "worker-1").mkdir()
    resume_path(tmp_path / "worker-1").write_bytes(b"junk")
    t0 = time.monotonic()
    res = _serve("--workers", "2", "--checkpoint-dir", str(tmp_path), "--quiet")
    assert res.returncode == 2, res.stderr
    assert time.monotonic() - t0 < 20
    assert "error: worker-1 stopped on an error (exit 2" in res.stderr
    assert "); restarting it" not in res.stderr
    assert " INFO " not in res.stderr  # --quiet reached the workers


def test_broker_stops_its_workers_when_the_ready_file_cannot_be_written(tmp_path):
    (tmp_path / "r.json.tmp").mkdir()  # the ready file's temp name: writing it fails
    res = _serve("--workers", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                 "--ready-file", str(tmp_path / "r.json"), "--quiet")
    assert res.returncode == 2, res.stderr
    assert "r.json.tmp: Is a directory" in res.stderr
    assert resume_path(tmp_path / "ck" / "worker-0").is_file()  # stopped, not orphaned


def test_sigint_stops_the_broker_and_its_workers_cleanly(tmp_path):
    import json
    import signal

    ready = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--workers", "1",
                             "--bind", "tcp://127.0.0.1:*", "--checkpoint-dir",
                             str(tmp_path / "ck"), "--ready-file", str(ready)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(ready.read_text())["workers"] == 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "broker: SIGINT received: stopping the workers" in err  # not "final checkpoint"
    assert resume_path(tmp_path / "ck" / "worker-0").is_file()


# ---------------------------------------------------------------- control through a broker

def test_a_control_request_through_the_broker_reaches_the_worker_of_its_stream(ckpt):
    """A stream's control request goes to the worker holding that stream, whichever
    client sends it; one naming no stream would reach one worker of several, so the
    broker answers ping and stats itself and refuses the rest with the reason."""
    cores = [LearnerCore(ckpt, backend="reference", name=f"worker-{k}") for k in range(2)]
    with broker_with_workers(cores) as broker:
        clients = broker.endpoints["clients_router"]
        fes, sock = [], raw_dealer(clients)
        try:
            stream = build_stream(embedded_clips()[:1], seed=0)
            for name in "ab":
                fe = frontend_for(ckpt, clients, stream=name)
                fes.append(fe)
                assert fe.start().accepted
                feed_stream(fe, stream, labelled=False, limit_s=0.5)
            held = {c.name: set(c.sessions) for c in cores}
            assert sorted(map(sorted, held.values())) == [["a"], ["b"]]  # one each

            def ask(cmd, stream="", **args):
                sock.send(P.encode(P.ControlRequest(cmd, stream, args)))
                return P.decode(sock.recv())

            for name in "ab":  # from a client that opened neither stream
                rep = ask("reset", stream=name)
                assert rep.ok and rep.result["reset"] == [name], rep
                rep = ask("reset", **{"stream": name})
                assert rep.ok and rep.result["reset"] == [name], rep
            rep = ask("reset", stream="zz")
            assert not rep.ok and "no worker holds stream 'zz'" in rep.error
            rep = ask("stats")
            assert rep.ok and rep.result["broker"] and rep.result["n_workers"] == 2
            assert rep.result["sessions"] == 2
            assert ask("ping").result["pong"]
            for cmd, args in (("learning", {"on": False}), ("reset", {}), ("checkpoint", {})):
                rep = ask(cmd, **args)
                assert not rep.ok and "would reach only one of the broker's 2 workers" in \
                    rep.error
            assert all(c.learning for c in cores)  # neither worker was told
        finally:
            sock.close(0)
            for fe in fes:
                fe.close()


def test_the_broker_holds_back_a_replay_a_busy_worker_cannot_take_yet(ckpt):
    """Replay is lossless end to end: when a worker's queue is full the broker stops
    reading clients (backpressure) instead of dropping frames and the end of stream."""
    core = LearnerCore(ckpt, backend="reference", name="busy", peer_timeout_s=60)
    handle = core.handle_bytes

    def busy(payload, route=b""):  # a loaded machine: 2 ms a message
        time.sleep(0.002)
        return handle(payload, route)

    core.handle_bytes = busy
    with broker_with_workers([core], hwm=50) as broker:
        fe = frontend_for(ckpt, broker.endpoints["clients_router"], stream="s", mode="replay")
        try:
            fe.start()
            n = 1500
            spikes = np.zeros((1, core.model.substeps, ckpt.cfg.n_in), np.float32)
            for _ in range(n):
                fe.send_spikes(spikes)
            st = fe.finish(timeout_s=120)
        finally:
            fe.close()
        assert st["eos_confirmed"] and st["dropped"] == 0
        assert st["posterior_frames"] == n and core.counts["frames"] == n
        assert core.counts["frames_missing"] == 0
        assert broker.counts["worker_backpressure"] > 0 and broker.counts["worker_drops"] == 0


def test_data_path_control_that_writes_files_is_neither_recorded_nor_replayed(ckpt, tmp_path):
    """A checkpoint or shutdown sent on the data path was recorded, and a replay sent it
    again: it rewrote the checkpoint file, or stopped the learner at --endpoint."""
    path = tmp_path / "d.rec"
    node = start_learner(ckpt, recorder=RecordingWriter(path, header_for(ckpt)),
                         apply_delay=0)
    mine = tmp_path / "mine.ckpt"
    sock = raw_dealer(node.endpoints["data_router"])
    try:
        fe = frontend_for(ckpt, node.endpoints["data_router"], stream="a")
        fe.start()
        feed_stream(fe, build_stream(embedded_clips()[:1], seed=0), limit_s=0.5)
        for cmd, args in (("checkpoint", {"path": str(mine)}), ("stats", {}),
                          ("reset", {"stream": "a"})):
            sock.send(P.encode(P.ControlRequest(cmd, "", args)))
            assert P.decode(sock.recv(), max_bytes=1 << 24).ok
        assert fe.finish()["eos_confirmed"]
        fe.close()
    finally:
        sock.close(0)
        node.stop()
        node.core.close()
    rec = read_recording(path)
    sent = [m.cmd for m in rec.inputs() if isinstance(m, P.ControlRequest)]
    replies = [m.cmd for m in rec.outputs() if isinstance(m, P.ControlReply)]
    assert sent == replies == ["reset"]
    # a recording made before this holds the checkpoint request: replay skips it
    older = tmp_path / "older.rec"
    with RecordingWriter(older, rec.header) as w:
        for e in rec.entries:
            w.write(e.direction, e.payload, e.t_ns)
        w.write("in", P.ControlRequest("checkpoint", "", {"path": str(mine)}))
        w.write("in", P.ControlRequest("shutdown"))
    mine.write_bytes(b"the user's own file")
    cmp = compare_replay(rec, replay_recording(read_recording(older), ckpt))
    assert cmp["identical"], cmp
    assert mine.read_bytes() == b"the user's own file"


# ---------------------------------------------------------------- personal weights kept

def _personal_stream(core, stream, k0=0, n=5):
    """A personal stream of n labelled utterances (40 frames each), fed to `core`."""
    m = core.model
    core.handle(P.Hello(stream, m.frontend_hash, m.encoder_id, core.cfg.n_in, m.substeps,
                        "live", True), b"R" + stream.encode())
    x = np.random.default_rng(0).random((40, m.substeps, core.cfg.n_in)).astype(np.float32)
    for k in range(k0, k0 + n):
        core.handle(P.Frames(stream, 40 * k, 0.4 * k, 0.01, m.encoder_id, x,
                             [k % core.cfg.n_out] * 40, [k] * 40), b"R" + stream.encode())
    return 40 * (k0 + n)


def test_personal_weights_survive_a_full_disk_on_eos_and_on_a_timeout(full_dir, caplog):
    """The stream's session was dropped before its weights were written: on a full disk
    an eos lost them (and answered bad_field), a peer timeout killed the learner."""
    import logging
    import re
    import shutil

    from edgeprop.checkpoint import load_checkpoint

    core = LearnerCore(small_checkpoint(), backend="reference", apply_delay=0,
                       checkpoint_dir=full_dir, peer_timeout_s=1.0, checkpoint_every=1e9)
    rescued = []
    try:
        with caplog.at_level(logging.ERROR, logger="edgeprop.learner"):
            end = _personal_stream(core, "alice")
            out = core.handle(P.EndOfStream("alice", end - 1), b"Ralice")
            assert [type(m).__name__ for m in out] == ["EndOfStream"]
            _personal_stream(core, "bob")
            core.tick(time.monotonic() + 5)  # bob vanished: timed out, nothing raised
        assert not core.sessions and core.counts["checkpoint_failed"] == 2
        rescued = [Path(p) for p in re.findall(r"saved to (\S+) instead", caplog.text)]
        assert [p.name for p in rescued] == ["personal-alice.ckpt", "personal-bob.ckpt"]
        for p in rescued:
            assert load_checkpoint(p).extra["runtime"]["windows"] >= 3
    finally:
        core.close()
        for p in rescued:
            shutil.rmtree(p.parent, ignore_errors=True)


def test_personal_learning_is_checkpointed_periodically(tmp_path):
    """Only the shared model's updates triggered the periodic checkpoint: a kill -9 lost
    every open personal stream's learning since its hello."""
    core = LearnerCore(small_checkpoint(), backend="reference", apply_delay=0,
                       checkpoint_dir=tmp_path, checkpoint_every=0.05)
    try:
        _personal_stream(core, "alice")
        time.sleep(0.1)
        core.tick()
        assert core.counts["personal_updates"] >= 3 and core.counts["checkpoints"] == 1
        assert (tmp_path / "personal-alice.ckpt").is_file()
        time.sleep(0.1)
        core.tick()  # nothing learned since: no second checkpoint
        assert core.counts["checkpoints"] == 1
    finally:
        core.close()


def test_the_broker_forgets_a_stream_its_worker_timed_out(ckpt):
    """A frontend that vanishes without eos: its worker closes the stream, and tells its
    route, so the broker's sessions (and its load balancing) no longer count it."""
    core = LearnerCore(ckpt, backend="reference", peer_timeout_s=0.5)
    with broker_with_workers([core]) as broker:
        m = core.model
        for k in range(3):  # say hello, then vanish (kill -9, a laptop lid)
            sock = raw_dealer(broker.endpoints["clients_router"])
            sock.send(P.encode(P.Hello(f"gone{k}", m.frontend_hash, m.encoder_id,
                                       ckpt.cfg.n_in, m.substeps)))
            assert P.decode(sock.recv()).accepted
            sock.close(0)
        assert len(broker.routes) == 3
        deadline = time.monotonic() + 10
        while (broker.routes or core.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert core.counts["peers_timed_out"] == 3 and not broker.routes
        assert core.counts["outputs_dropped"] == 0  # the notice to a vanished peer is not


def test_a_returning_personal_stream_finds_its_weights_on_any_worker(ckpt, tmp_path):
    """Each worker kept personal weights in its own folder: a user whose hello landed on
    another worker (someone else was streaming) silently started afresh."""
    import argparse

    from edgeprop.checkpoint import load_checkpoint, params_hash
    from runtime.commands.serve import _worker_cmd

    shared = tmp_path / "ck"
    cores = [LearnerCore(ckpt, backend="reference", apply_delay=0, name=f"worker-{k}",
                         checkpoint_dir=shared / f"worker-{k}", personal_dir=shared)
             for k in range(2)]  # as serve --workers 2 --checkpoint-dir ck starts them
    m = cores[0].model

    def talk(sock, msg):
        sock.send(P.encode(msg))
        return P.decode(sock.recv(), max_bytes=1 << 24)

    def hello(stream, personal):
        return P.Hello(stream, m.frontend_hash, m.encoder_id, ckpt.cfg.n_in, m.substeps,
                       "replay", personal)

    with broker_with_workers(cores) as broker:
        socks = [raw_dealer(broker.endpoints["clients_router"]) for _ in range(2)]
        try:
            first = talk(socks[0], hello("alice", True))
            x = np.random.default_rng(0).random((50, m.substeps, ckpt.cfg.n_in))
            talk(socks[0], P.Frames("alice", 0, 0.0, 0.01, m.encoder_id,
                                    x.astype(np.float32), [0] * 50, [1] * 50))
            talk(socks[0], P.EndOfStream("alice", 49))
            learned = params_hash(load_checkpoint(shared / "personal-alice.ckpt").params)
            assert learned != first.params_hash
            bob = talk(socks[1], hello("bob", False))
            assert bob.session == first.session  # bob now holds alice's first worker
            again = talk(socks[0], hello("alice", True))
            assert again.session != first.session and again.params_hash == learned
        finally:
            for sock in socks:
                sock.close(0)
    args = argparse.Namespace(backend="emulator", lr=1e-4, peer_timeout=10.0, log_level="INFO",
                              checkpoint_every=30.0, apply_delay=100, late_updates="wait",
                              model=None, checkpoint_dir=str(shared), personal_dir=None,
                              no_learning=False, quiet=False, window=None, threshold=None,
                              hold=None, refractory=None)
    cmd = _worker_cmd(args, "tcp://127.0.0.1:1", 1)
    assert cmd[cmd.index("--personal-dir") + 1] == str(shared)
    assert cmd[cmd.index("--checkpoint-dir") + 1] == str(shared / "worker-1")


def test_a_second_client_with_the_same_stream_id_is_counted_and_logged(caplog):
    """Two frontends with one --stream share one session; that is said, not silent."""
    import logging

    core = LearnerCore(small_checkpoint(), backend="reference")
    m = core.model
    hello = P.Hello("kitchen", m.frontend_hash, m.encoder_id, core.cfg.n_in, m.substeps)
    try:
        with caplog.at_level(logging.WARNING, logger="edgeprop.learner"):
            core.handle(hello, b"A")
            core.handle(hello, b"A")  # the same client again (a retry): not a clash
            assert core.counts["rehello"] == 1 and core.counts["stream_taken_over"] == 0
            core.handle(hello, b"B")
        assert core.counts["stream_taken_over"] == 1
        assert "two frontends with one stream id?" in caplog.text
    finally:
        core.close()


def test_frames_lost_across_a_learner_restart_are_counted_by_the_frontend():
    """A restarted learner never saw the frames sent while it was down, so its seq_gaps
    cannot count them: the frontend does (frames sent that got no posteriors)."""
    import socket

    from runtime.learner_node import LearnerNode

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ck = small_checkpoint()

    def learner():
        node = LearnerNode(LearnerCore(ck, backend="reference"), bind=endpoint)
        node.start()
        return node

    first = learner()
    fe = frontend_for(ck, endpoint, stream="s", mode="replay")
    fe.start()
    spikes = np.zeros((1, first.core.model.substeps, ck.cfg.n_in), np.float32)
    second = None
    try:
        for _ in range(200):
            fe.send_spikes(spikes)
        time.sleep(0.5)
        first.stop()
        for _ in range(200):  # nobody is listening
            fe.send_spikes(spikes)
        second = learner()
        for _ in range(300):
            fe.send_spikes(spikes)
            time.sleep(0.002)
        st = fe.finish(timeout_s=30)
        assert st["eos_confirmed"] and st["frames_sent"] == 700
        seen = first.core.counts["frames"] + second.core.counts["frames"]
        assert 0 < st["frames_unanswered"] == 700 - seen
    finally:
        fe.close()
        first.core.close()
        if second is not None:
            second.stop()
            second.core.close()


def test_finish_waits_for_a_busy_learner_while_its_outputs_keep_coming():
    """finish() gave up after a fixed time although a busy learner was still answering
    a backlog; its timeout is now the time with no output."""
    from runtime.learner_node import LearnerNode

    ck = small_checkpoint()
    core = LearnerCore(ck, backend="reference", peer_timeout_s=120)
    handle = core.handle_bytes

    def busy(payload, route=b""):  # 3 ms a message: ~3 s for the backlog below
        time.sleep(0.003)
        return handle(payload, route)

    core.handle_bytes = busy
    node = LearnerNode(core, bind="tcp://127.0.0.1:*")
    node.start()
    fe = frontend_for(ck, node.endpoints["data_router"], stream="s", mode="replay")
    try:
        fe.start()
        spikes = np.zeros((1, core.model.substeps, ck.cfg.n_in), np.float32)
        for _ in range(1000):
            fe.send_spikes(spikes)
        t0 = time.monotonic()
        st = fe.finish(timeout_s=1.0)
        assert st["eos_confirmed"] and st["frames_unanswered"] == 0
        assert time.monotonic() - t0 > 1.0  # it did wait past the timeout, for outputs
    finally:
        fe.close()
        node.stop()
        core.close()


def test_personal_weights_saved_under_earlier_names_are_found_by_their_own_stream(tmp_path):
    """Earlier versions named the file by the bare safe id (which "a b" and "a_b" shared)
    and, under serve --workers, kept it in the worker's folder: a returning stream finds
    its own weights there, and never another stream's."""
    from edgeprop.checkpoint import params_hash, save_checkpoint
    from edgeprop.network import Params

    ck = small_checkpoint()
    worker = tmp_path / "worker-0"
    worker.mkdir()

    def saved(folder, name, stream, scale):
        params = Params(*(a * scale for a in ck.params.arrays()))
        save_checkpoint(folder / f"personal-{name}.ckpt", ck.cfg, params,
                        extra={"runtime": {"stream": stream}})
        return params_hash(params)

    home = saved(tmp_path, "user_home", "user@home", 0.5)  # the old name of "user@home"
    a_space = saved(worker, "a_b", "a b", 0.25)  # an old worker's file, of "a b"
    core = LearnerCore(ck, backend="reference", checkpoint_dir=worker, personal_dir=tmp_path)
    try:
        assert params_hash(core._personal_backend("user@home").params) == home
        assert params_hash(core._personal_backend("a b").params) == a_space
        fresh = core._personal_backend("a_b")  # "a b"'s old file is not "a_b"'s
        assert params_hash(fresh.params) == params_hash(ck.params)
    finally:
        core.close()
    from runtime.learner_node import stream_file_part

    crafted = stream_file_part("a b")  # an id that looks like a hashed name is hashed too
    assert stream_file_part(crafted) != crafted


def test_a_recording_from_before_the_rest_warmup_replays_identical(ckpt, tmp_path):
    """Recordings made when the detector averaged only the frames seen so far have no
    `warmup` in their settings: their replay keeps that rule, or every one of them would
    replay DIFFERENT over its first window."""
    import dataclasses

    det = {"warmup": "seen"}  # the old rule, then the key removed as old files lack it
    core = LearnerCore(ckpt, backend="reference", apply_delay=0, detector=det)
    settings = core.settings()
    core.close()
    path = tmp_path / "new.rec"
    node = start_learner(ckpt, recorder=RecordingWriter(path, header_for(ckpt,
                                                                        runtime=settings)),
                         apply_delay=0, detector=det)
    try:
        fe = frontend_for(ckpt, node.endpoints["data_router"], stream="a")
        fe.start()
        feed_stream(fe, build_stream(embedded_clips()[:2], seed=0), limit_s=1.5)
        assert fe.finish()["eos_confirmed"]
        fe.close()
    finally:
        node.stop()
        node.core.close()
    rec = read_recording(path)

    def old(settings: dict) -> dict:
        return {**settings, "detector": {k: v for k, v in settings["detector"].items()
                                         if k != "warmup"}}

    header = dataclasses.replace(rec.header, runtime=old(rec.header.runtime))
    older = tmp_path / "old.rec"
    with RecordingWriter(older, header) as w:
        for e in rec.entries:
            m = e.message()
            if isinstance(m, P.HelloReply):
                m = dataclasses.replace(m, settings=old(m.settings))
            w.write(e.direction, m, e.t_ns)
    was = read_recording(older)
    assert "warmup" not in was.header.runtime["detector"]
    assert compare_replay(was, replay_recording(was, ckpt))["identical"]
    # the same recording replayed under the new rule differs in its first window only
    cmp = compare_replay(was, replay_recording(was, ckpt, detector={**old(settings)[
        "detector"], "warmup": "rest"}))
    assert not cmp["identical"]


def test_behind_a_broker_a_stream_id_in_use_stays_on_its_worker():
    """A second client (or a restarted frontend: a new socket) saying hello for a stream
    went to the least loaded worker: two workers held one stream, and the clash went
    unseen. It now reaches the worker that holds the stream."""
    ck = small_checkpoint()
    cores = [LearnerCore(ck, backend="reference", name=f"worker-{k}") for k in range(2)]
    m = cores[0].model
    hello = P.Hello("kitchen", m.frontend_hash, m.encoder_id, ck.cfg.n_in, m.substeps)
    with broker_with_workers(cores) as broker:
        socks = [raw_dealer(broker.endpoints["clients_router"]) for _ in range(2)]
        try:
            replies = []
            for sock in socks:
                sock.send(P.encode(hello))
                replies.append(P.decode(sock.recv()))
        finally:
            for sock in socks:
                sock.close(0)
        assert replies[0].session == replies[1].session
        assert sorted(c.counts["stream_taken_over"] for c in cores) == [0, 1]
