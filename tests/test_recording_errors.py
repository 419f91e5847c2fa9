"""Recordings that cannot be written or replayed fail with one clear line, never a
traceback, and a failed recording leaves nothing behind.

Real learners (in a thread, or `edgeprop serve` as a process) on loopback TCP, real
files; the bad recordings are written by the project's own writer, then edited. A full
disk is a real one: /dev/full, or a file-size limit (RLIMIT_FSIZE) the kernel enforces
on the recording process, so no root and no tmpfs are needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import soundfile as sf
from runtime_support import control, frontend_for, raw_dealer, start_learner

from edgeprop.errors import ConfigError
from runtime import cli
from runtime import protocol as P
from runtime.commands.replay import _over_wire
from runtime.recording import RecordingWriter, header_for, read_recording
from runtime.stream import build_stream, embedded_clips

try:
    import resource  # RLIMIT_FSIZE: POSIX
except ImportError:
    resource = None

REPO = Path(__file__).resolve().parents[1]
needs_rlimit = pytest.mark.skipif(resource is None, reason="needs POSIX RLIMIT_FSIZE")


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    """1 s of real speech: embedded clips as the default stream builds them."""
    return build_stream(embedded_clips()[:2], seed=1).audio[:16000]


@pytest.fixture(scope="module")
def learner(ckpt):
    node = start_learner(ckpt)
    yield node
    node.stop()
    node.core.close()


@pytest.fixture(scope="module")
def recording(ckpt, learner, audio, tmp_path_factory) -> Path:
    """A frontend-side recording of `audio`, replayable IDENTICAL with the test model."""
    path = tmp_path_factory.mktemp("rec") / "good.rec"
    _stream(ckpt, learner.endpoints["data_router"], audio, "r",
            RecordingWriter(path, header_for(ckpt, note="test")))
    return path


def _stream(ckpt, endpoint: str, audio: np.ndarray, stream: str, writer=None) -> dict:
    fe = frontend_for(ckpt, endpoint, stream=stream, recorder=writer, connect_timeout_s=20)
    try:
        assert fe.start().accepted
        hop = fe.fcfg.hop
        for k in range(len(audio) // hop):
            fe.feed(audio[k * hop:(k + 1) * hop])
        stats = fe.finish()
        assert stats["eos_confirmed"]
        return stats
    finally:
        fe.close()
        if writer is not None:
            writer.close()


def _edgeprop(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _rewrite(src: Path, dst: Path, header=None, edit=None) -> Path:
    """dst: src written again by RecordingWriter, with another header and/or each entry
    passed through edit(index, entry) -> list of entries."""
    rec = read_recording(src)
    with RecordingWriter(dst, header or rec.header) as w:
        for i, e in enumerate(rec.entries):
            for e2 in (edit(i, e) if edit else [e]):
                w.write(e2.direction, e2.payload, e2.t_ns)
    return dst


def _index(path: Path, kind: type, k: int = 0) -> int:
    """Index of the k-th inbound entry of this message type."""
    found = [i for i, e in enumerate(read_recording(path).entries)
             if e.direction == "in" and isinstance(e.message(), kind)]
    return found[k]


def _fsize_limit(n_bytes: int):
    """preexec_fn: no file of the child may grow past n_bytes (writes fail with EFBIG;
    Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                      (n_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


# ---------------------------------------------------------------- writing fails


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_named_and_leaves_no_part_file(ckpt, model_path, learner, audio,
                                                      tmp_path, capsys):
    out = tmp_path / "x.rec"
    part = tmp_path / "x.rec.part"
    part.symlink_to("/dev/full")  # the writer opens its .part: a disk that is full
    with pytest.raises(OSError) as exc:
        RecordingWriter(out, header_for(ckpt))
    assert exc.value.filename == str(out) and "(disk full?)" in exc.value.strerror
    assert not part.is_symlink() and Path("/dev/full").exists()  # the link, not the device
    # and `edgeprop record` says so in one line
    wav = tmp_path / "a.wav"
    sf.write(wav, audio, 16000)
    part.symlink_to("/dev/full")
    code, err = _edgeprop(capsys, "record", out, "--model", model_path, "--file", wav,
                          "--endpoint", learner.endpoints["data_router"])
    assert code == 2
    assert (f"edgeprop record: error: {out}: cannot write the recording: No space left on "
            "device (disk full?)") in err
    assert not out.exists() and not part.is_symlink()


@needs_rlimit
def test_record_out_of_space_mid_stream_fails_and_leaves_nothing(ckpt, model_path, learner,
                                                                 audio, tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, audio, 16000)
    out = tmp_path / "x.rec"
    room = len(P.encode(header_for(ckpt, note="edgeprop record"))) + 4000  # a few entries
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "record", str(out), "--model", str(model_path),
         "--file", str(wav), "--endpoint", learner.endpoints["data_router"]],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        preexec_fn=_fsize_limit(room))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"edgeprop record: error: {out}: cannot write the recording: File too large" \
        in proc.stderr
    assert "record: 100 frames" not in proc.stderr  # no summary of a failed record
    assert sorted(os.listdir(tmp_path)) == ["a.wav"]


@needs_rlimit
def test_serve_keeps_serving_when_its_recording_fails(ckpt, model_path, audio, tmp_path):
    rec, ready = tmp_path / "srv.rec", tmp_path / "ready.json"
    room = len(P.encode(header_for(ckpt))) + 6000
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--model", str(model_path),
         "--backend", "reference", "--bind", "tcp://127.0.0.1:*", "--control",
         "tcp://127.0.0.1:*", "--record", str(rec), "--ready-file", str(ready),
         "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_fsize_limit(room))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.05)
        ep = json.loads(ready.read_text())
        for stream in ("a", "b"):  # the recording fails in the first; both are served
            assert _stream(ckpt, ep["data_router"], audio, stream)["frames_sent"] == 100
        stats = control(ep["control_rep"], "stats").result
        assert stats["counts"]["recording_failed"] == 1 and stats["counts"]["frames"] == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("recording stopped") == 1
    assert f"recording stopped: {rec}: cannot write the recording: File too large" in err
    assert not rec.exists() and not rec.with_name("srv.rec.part").exists()


# ---------------------------------------------------------------- replaying fails


@pytest.mark.parametrize("runtime, said", [
    ({"lr": "fast"}, "setting 'lr' (header runtime) is 'fast', not a number"),
    ({"learning": "maybe"}, "setting 'learning' (header runtime) is 'maybe', not true or false"),
    ({"apply_delay": True}, "setting 'apply_delay' (header runtime) is True, not a whole"),
    ({"lr": -1.0}, "setting 'lr' (header runtime) is -1.0, not a number > 0"),
    ({"apply_delay": -5}, "setting 'apply_delay' (header runtime) is -5, not a whole number "
                          "of frames >= 0"),
    ({"backend": "gpu"}, "setting 'backend' (header runtime) is 'gpu', not 'emulator' or "
                         "'reference'"),
    ({"detector": "x"}, "setting 'detector' (header runtime): detector settings must be a map"),
    ({"detector": {"window": "big"}}, "detector window must be a whole number of frames, "
                                      "got 'big'"),
])
def test_recorded_settings_of_the_wrong_type_name_the_recording_and_field(
        recording, model_path, tmp_path, capsys, runtime, said):
    header = dataclasses.replace(read_recording(recording).header, runtime=runtime)
    bad = _rewrite(recording, tmp_path / "rt.rec", header=header)
    code, err = _edgeprop(capsys, "replay", "--quiet", bad, "--model", model_path)
    assert code == 2 and f"edgeprop replay: error: {bad}: recorded learner " in err, err
    assert said in err, err


def test_a_partial_runtime_block_is_completed_from_the_hello_reply(recording, tmp_path):
    """A header that names some settings takes the rest from what the recorded learner
    announced in its hello_reply, not from the replay's defaults."""
    from runtime.recording import first_hello_reply, recorded_settings

    rec = read_recording(recording)
    announced = first_hello_reply(rec.outputs()).settings
    header = dataclasses.replace(rec.header, runtime={"lr": 0.5})
    rt = recorded_settings(read_recording(_rewrite(recording, tmp_path / "part.rec",
                                                   header=header)))
    assert rt["lr"] == 0.5
    for key in ("backend", "apply_delay", "learning", "detector"):
        assert rt[key] == announced[key], key


def test_a_rejected_hello_stops_the_replay_with_its_reason(recording, model_path, learner,
                                                           tmp_path, capsys):
    i_hello = _index(recording, P.Hello)

    def other_encoder(i, e):
        if i != i_hello:
            return [e]
        hello = dataclasses.replace(e.message(), encoder_id="current-000000000000")
        return [P.RecordEntry(e.direction, e.t_ns, P.encode(hello))]

    bad = _rewrite(recording, tmp_path / "hello.rec", edit=other_encoder)
    code, err = _edgeprop(capsys, "replay", "--quiet", bad, "--model", model_path)
    assert code == 2, err
    assert (f"error: {bad}: the replay's learner rejected stream 'r': encoder "
            "current-000000000000 != model's") in err
    assert "without hello" not in err and "DIFFERENT" not in err
    # over the wire the same rule answers
    with pytest.raises(ConfigError, match="rejected stream 'r': encoder current-0000"):
        _over_wire(read_recording(bad), learner.endpoints["data_router"])


def test_a_hello_the_recorded_learner_rejected_too_replays_identical(ckpt, model_path, audio,
                                                                     tmp_path, capsys):
    """A recording made at the learner holds the hellos it rejected: that is no error."""
    path = tmp_path / "learner.rec"
    writer = RecordingWriter(path, header_for(ckpt, note="learner side"))
    node = start_learner(ckpt, recorder=writer)
    try:
        wrong = raw_dealer(node.endpoints["data_router"])
        try:
            wrong.send(P.encode(P.Hello("w", "f", "e", 80)))
            assert not P.decode(wrong.recv()).accepted
        finally:
            wrong.close(0)
        _stream(ckpt, node.endpoints["data_router"], audio[:8000], "ok")
    finally:
        node.stop()  # closes the writer
        node.core.close()
    code, err = _edgeprop(capsys, "replay", path, "--model", model_path)
    assert code == 0 and "IDENTICAL" in err and "rejected" not in err, err


def test_rejected_frames_are_reported_not_called_cut_short(recording, model_path, tmp_path,
                                                           capsys):
    i_frames = _index(recording, P.Frames, 3)
    frames = read_recording(recording).frames()  # Frames messages

    def half_the_channels(only=None):
        def edit(i, e):
            if not isinstance(e.message(), P.Frames) or only is not None and i != only:
                return [e]
            f = e.message()
            narrow = dataclasses.replace(f, spikes=np.ascontiguousarray(f.spikes[:, :, :40]))
            return [P.RecordEntry(e.direction, e.t_ns, P.encode(narrow))]
        return edit

    bad = _rewrite(recording, tmp_path / "shape.rec", edit=half_the_channels())
    n_in = sum(e.direction == "in" for e in read_recording(bad).entries)
    code, err = _edgeprop(capsys, "replay", "--quiet", bad, "--model", model_path)
    assert code == 2, err
    assert (f"error: {bad}: nothing to compare: the learner rejected {len(frames)} of the "
            f"recording's {n_in} inbound messages (first: shape: want [n, 1, 80])") in err
    assert "cut short" not in err and "DIFFERENT" not in err

    # one message rejected: the frames after it are still matched by seq (not shifted
    # onto the recorded ones before them), and differ because the network missed a piece
    one = _rewrite(recording, tmp_path / "one.rec", edit=half_the_channels(i_frames))
    assert cli.main(["replay", "--quiet", str(one), "--model", str(model_path), "--json"]) == 0
    said = capsys.readouterr()
    res = json.loads(said.out)
    lost = read_recording(recording).entries[i_frames].message().n
    n = sum(f.n for f in frames) - lost
    assert res["rejected"] == 1 and res["frames"] == res["frames_replayed"] == n
    assert "warning: the learner rejected 1 of the recording's" in said.err
    assert "DIFFERENT" in said.err and "cut short" not in said.err

    # a rejected message the rest of the replay lines up without: a warning, still compared
    def one_more(i, e):
        return [e, P.RecordEntry("in", e.t_ns, b"\xc1")] if i == i_frames else [e]

    extra = _rewrite(recording, tmp_path / "extra.rec", edit=one_more)
    code, err = _edgeprop(capsys, "replay", "--quiet", extra, "--model", model_path)
    assert code == 0, err
    assert "replay: warning: the learner rejected 1 of the recording's" in err
    assert "(first: malformed: " in err and "cut short" not in err and "IDENTICAL" in err
    # the learner's per-fault log line, which --quiet leaves out (a real process: pytest
    # captures logging in this one)
    for quiet, logged in (([], True), (["--quiet"], False)):
        out = subprocess.run([sys.executable, "-m", "runtime.cli", "replay", str(extra),
                              "--model", str(model_path), *quiet], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and ("survived" in out.stderr) == logged, out.stderr


def test_a_newer_format_and_a_damaged_entry_say_so(recording, tmp_path, capsys):
    data = recording.read_bytes()
    n_header = len(P.encode(read_recording(recording).header))
    newer = msgpack.unpackb(data[:n_header], raw=False)
    newer["v"] = 99
    v99 = tmp_path / "v99.rec"
    v99.write_bytes(msgpack.packb(newer, use_bin_type=True) + data[n_header:])
    code, err = _edgeprop(capsys, "replay", v99)
    assert code == 2 and "another format version (protocol version 99" in err, err
    assert "newer edgeprop" in err and "no complete recording header" not in err

    damaged = tmp_path / "damaged.rec"  # a map with an int key after the header
    damaged.write_bytes(data[:n_header] + msgpack.packb({1: 1}) + data[n_header:])
    code, err = _edgeprop(capsys, "replay", damaged)
    assert code == 2 and f"{damaged}: damaged after entry 0 (" in err, err
    assert "strict_map_key" not in err and "ValueError" not in err

    # one flipped bit inside a recorded frame (msgpack still reads it): the checksum
    # says so, rather than the replay calling the model DIFFERENT
    rec = read_recording(recording)
    i = _index(recording, P.Frames)
    payload = rec.entries[i].payload
    at = data.index(payload) + len(payload) // 2
    flipped = tmp_path / "flipped.rec"
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    code, err = _edgeprop(capsys, "replay", flipped)
    assert code == 2 and f"{flipped}: damaged after entry {i} (its checksum does not " \
                         "match its message" in err, err
    # an entry recorded before entries had a checksum is read as it is
    old = msgpack.packb({"v": 1, "type": "record", "dir": "in", "t_ns": 1, "msg": payload},
                        use_bin_type=True)
    no_crc = tmp_path / "no_crc.rec"
    no_crc.write_bytes(data[:n_header] + old)
    assert read_recording(no_crc).entries[0].payload == payload
