"""A wrong client never freezes a learner; record and replay fail with a clear message.

Real learners on loopback TCP, real ZeroMQ clients, real files; the CLI runs in-process
(`runtime.cli.main`), so what is checked is what a user sees on stderr.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from runtime_support import control, frontend_for, start_learner

from edgeprop.checkpoint import save_checkpoint
from edgeprop.errors import EdgepropError
from runtime import cli
from runtime import protocol as P
from runtime.commands.replay import _over_wire
from runtime.recording import RecordingWriter, header_for, read_recording
from runtime.stream import build_stream, embedded_clips


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """1.5 s of real speech: embedded clips as the default stream builds them."""
    return build_stream(embedded_clips()[:2], seed=1).audio[:24000]


def _edgeprop(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _record(ckpt, endpoint: str, path: Path, audio: np.ndarray) -> Path:
    """A frontend-side recording of `audio` streamed to the learner at endpoint."""
    writer = RecordingWriter(path, header_for(ckpt, note="test"))
    fe = frontend_for(ckpt, endpoint, stream="r", recorder=writer)
    try:
        fe.start()
        hop = fe.fcfg.hop
        for k in range(len(audio) // hop):
            fe.feed(audio[k * hop:(k + 1) * hop])
        assert fe.finish()["eos_confirmed"]
    finally:
        fe.close()
        writer.close()
    return path


def test_a_dealer_on_the_control_port_does_not_freeze_the_learner(ckpt, audio):
    node = start_learner(ckpt)
    ctl = node.endpoints["control_rep"]
    ctx = zmq.Context.instance()
    wrong = [ctx.socket(zmq.DEALER), ctx.socket(zmq.REQ)]
    try:
        for sock in wrong:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(ctl)
        # no REQ envelope: REP drops it; a blocking recv would then wait for ever
        wrong[0].send(P.encode(P.ControlRequest("ping")))
        deadline = time.monotonic() + 5
        while node.core.counts["malformed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        fe = frontend_for(ckpt, node.endpoints["data_router"], stream="ok",
                          connect_timeout_s=5)
        try:
            assert fe.start().accepted
            fe.feed(audio[:4800])
            assert fe.finish(timeout_s=10)["eos_confirmed"]
        finally:
            fe.close()
        # an envelope but a request of two parts: must be answered, not fatal
        wrong[1].send_multipart([P.encode(P.ControlRequest("ping")), b"extra"])
        assert wrong[1].poll(5000), "no answer to a two-part request"
        assert not P.decode(wrong[1].recv()).ok
        stats = control(ctl, "stats", timeout_ms=5000).result
        assert stats["counts"]["malformed"] >= 2
    finally:
        for sock in wrong:
            sock.close(0)
        t0 = time.monotonic()
        node.stop(timeout=5)
        node.core.close()
    assert not node._thread.is_alive() and time.monotonic() - t0 < 5
    assert node.error is None


def test_replay_to_an_endpoint_with_no_learner_gives_up(ckpt, tmp_path):
    path = tmp_path / "h.rec"
    with RecordingWriter(path, header_for(ckpt)) as w:
        w.write("in", P.Hello("s", "f", "e", 80, 1, "replay"))
    t0 = time.monotonic()
    with pytest.raises(EdgepropError, match="no reply from a learner at ipc://"):
        _over_wire(read_recording(path), f"ipc://{tmp_path}/nobody", connect_timeout_s=0.5)
    assert time.monotonic() - t0 < 3


def test_a_failed_record_leaves_no_recording(ckpt, model_path, audio, tmp_path, capsys):
    wav = tmp_path / "a.wav"
    sf.write(wav, audio, 16000)
    node = start_learner(ckpt)  # serves the test model; the shipped one is refused
    try:
        out = tmp_path / "x.rec"
        code, err = _edgeprop(capsys, "record", out, "--endpoint",
                              node.endpoints["data_router"], "--file", wav)
    finally:
        node.stop()
        node.core.close()
    assert code == 2 and "rejected" in err
    assert not out.exists() and not out.with_name("x.rec.part").exists()
    # failing before anything was recorded leaves a file already there alone
    out.write_bytes(b"an older recording")
    code, err = _edgeprop(capsys, "record", out, "--file", wav, "--label", "banana")
    assert code == 2 and "unknown label" in err
    assert out.read_bytes() == b"an older recording"


def test_replay_of_what_is_not_a_recording_says_so(ckpt, tmp_path, capsys):
    wav, npz, empty, folder = (tmp_path / n for n in ("a.wav", "b.npz", "c.rec", "d"))
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    np.savez(npz, x=np.zeros(3))
    empty.write_bytes(b"")
    folder.mkdir()
    for path, why in ((wav, "audio"), (npz, "edgeprop regress"), (empty, "empty"),
                      (folder, "is a folder, not a recording")):
        code, err = _edgeprop(capsys, "replay", path)
        assert code == 2 and why in err, err
        if path != folder:
            assert f"{path} is not an edgeprop recording" in err
    no_frames = tmp_path / "hello_only.rec"
    with RecordingWriter(no_frames, header_for(ckpt)) as w:
        w.write("in", P.Hello("s", "f", "e", 80, 1, "replay"))
    code, err = _edgeprop(capsys, "replay", no_frames)
    assert code == 2 and "holds no frames" in err
    damaged = tmp_path / "damaged.rec"
    damaged.write_bytes(no_frames.read_bytes() + b"\x01")
    code, err = _edgeprop(capsys, "replay", damaged)
    assert code == 2 and "damaged after entry 1" in err, err


def test_replay_compares_the_learners_own_weights_across_backends(ckpt, model_path, audio,
                                                                  tmp_path, capsys):
    """The emulator infers with its int8 copy of the checkpoint: its hello_reply hash is
    not the checkpoint file's. Same model, same backend: no warning, identical."""
    node = start_learner(ckpt, backend="emulator")
    try:
        rec = _record(ckpt, node.endpoints["data_router"], tmp_path / "e.rec", audio)
    finally:
        node.stop()
        node.core.close()
    code, err = _edgeprop(capsys, "replay", rec, "--model", model_path, "--backend", "emulator")
    assert code == 0 and "warning" not in err and "IDENTICAL" in err, err
    code, err = _edgeprop(capsys, "replay", rec, "--model", model_path)  # its own backend
    assert code == 0 and "warning" not in err and "IDENTICAL" in err, err
    code, err = _edgeprop(capsys, "replay", rec, "--model", model_path, "--backend",
                          "reference")
    assert code == 0 and "ran the emulator backend" in err and "--backend emulator" in err
    other = tmp_path / "other.ckpt"
    p = ckpt.params.copy()
    p.w_out[:] += 0.05
    save_checkpoint(other, ckpt.cfg, p, frontend=ckpt.frontend, encoder=ckpt.encoder,
                    labels=ckpt.labels)
    code, err = _edgeprop(capsys, "replay", rec, "--model", other, "--backend", "emulator")
    assert code == 0 and "warning: the learner had params" in err and "DIFFERENT" in err
    # cut short: frames sent, only some posteriors back; compared over what it holds
    entries = read_recording(rec).entries
    first_out = next(i for i, e in enumerate(entries)
                     if e.direction == "out" and isinstance(e.message(), P.Posteriors))
    for keep, what in ((first_out, "holds no posteriors"), (first_out + 5, "cut short")):
        cut = tmp_path / f"cut{keep}.rec"
        with RecordingWriter(cut, read_recording(rec).header) as w:
            for e in entries[:keep]:
                w.write(e.direction, e.payload, e.t_ns)
        code, err = _edgeprop(capsys, "replay", cut, "--model", model_path, "--backend",
                              "emulator")
        assert what in err, err
        assert code == (2 if what.startswith("holds") else 0)
    assert "IDENTICAL" in err
