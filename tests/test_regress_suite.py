"""`edgeprop regress`: recordings replayed on real sockets and compared with goldens.

The first test runs the real command on the shipped recordings, exactly as CI does.
The others build recordings from speech_commands_dev into a temp folder with a small
real checkpoint, and check that the suite passes on a faithful replay, fails (exit 1)
on a changed golden or a changed checkpoint, and that the tolerant tier accepts small
float differences and catches real ones.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import protocol as P
from runtime import regress as R
from runtime.bench_report import extract_last_json

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A real, valid model: seeded init weights, the frontend normalised on the shipped
    clips (so the features have the scale a trained model sees), the current encoder."""
    from edgeprop.checkpoint import save_checkpoint
    from edgeprop.encoders import make_encoder
    from edgeprop.frontend import FrontendConfig, features
    from edgeprop.network import KWS_LABELS, ModelConfig, init_params
    from runtime.stream import build_stream, embedded_clips

    fe = FrontendConfig()
    f = features(build_stream(embedded_clips()[:8], seed=seed).audio, fe)
    fe = fe.with_normalization(f.mean(axis=0), np.maximum(f.std(axis=0), 1e-3))
    cfg = ModelConfig()
    save_checkpoint(path, cfg, init_params(cfg, seed), frontend=fe.to_dict(),
                    encoder=make_encoder("current", fe.n_features).to_dict(),
                    labels=list(KWS_LABELS))
    return path


def edgeprop(*args: str, timeout: float = 300) -> tuple[int, dict | None, str]:
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, extract_last_json(proc.stdout), proc.stderr


def _shipped_ready() -> str | None:
    try:
        from edgeprop.shipped import load_shipped

        load_shipped()
    except Exception as exc:
        return f"no shipped model: {exc}"
    if not any(R.RECORDINGS_DIR.glob("*.golden.json")):
        return "no shipped recordings with goldens"
    return None


def test_regress_command_passes_on_the_shipped_recordings():
    why = _shipped_ready()
    if why:
        pytest.skip(why)
    rc, out, err = edgeprop("regress", "--json", "--quiet")
    assert out is not None, err
    assert rc == 0 and out["failed"] == 0, [
        (r["name"], r.get("reason")) for r in out["recordings"] if not r["passed"]]
    assert out["passed"] == len(out["recordings"]) >= 9
    assert out["seconds"] < 120
    for r in out["recordings"]:
        assert r["lost_frames"] == 0 and r["tier"] in ("exact", "tolerant")


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir):
    """Recordings + goldens built by the real command from speech_commands_dev."""
    tmp = tmp_path_factory.mktemp("regress")
    ckpt = make_checkpoint(tmp / "model.ckpt", seed=0)
    recs = tmp / "recordings"
    rc, out, err = edgeprop("regress", "--build-recordings", "--data", str(data_dir),
                            "--model", str(ckpt), "--recordings", str(recs), "--backend",
                            "reference", "--json", "--quiet")
    assert rc == 0 and out is not None, err
    return {"ckpt": ckpt, "recs": recs, "build": out, "tmp": tmp}


def test_build_writes_small_recordings_with_goldens(built):
    names = {p.stem for p in R.list_recordings(built["recs"])}
    assert {"clean_speech", "silence", "long_stream"} <= names
    assert len([n for n in names if n.startswith("noise_")]) == 6  # one per noise file
    total = sum(p.stat().st_size for p in built["recs"].iterdir())
    assert total < 1.5e6
    for p in R.list_recordings(built["recs"]):
        g = R.read_goldens(p)["reference"]
        assert g["frames"] > 0 and g["learned_windows"] > 0
        assert len(g["final_params_hash"]) == 64
    long = R.load_any(built["recs"] / "long_stream.npz")
    assert long.n_frames > 5000 and len(long.label_windows()) == 60
    assert "changes" in built["build"]["recordings"][0]


def test_audio_recording_goes_through_the_frontend_to_the_same_frames(built):
    from edgeprop.checkpoint import load_checkpoint

    ck = load_checkpoint(built["ckpt"])
    audio = R.load_any(built["recs"] / "clean_speech_audio.npz")
    frames = R.load_any(built["recs"] / "clean_speech.npz")
    assert audio.audio is not None and audio.audio.dtype == np.float32
    live = R.materialize(audio, ck)
    assert live.frames.shape == frames.frames.shape
    np.testing.assert_array_equal(live.labels, frames.labels)
    np.testing.assert_array_equal(live.windows, frames.windows)
    step = np.abs(live.frames).max(axis=(0, 1)) / 127  # the frames file is int8-quantised
    assert np.all(np.abs(live.frames - frames.frames) <= step / 2 + 1e-3)


def test_regress_passes_then_fails_on_a_changed_golden(built, tmp_path):
    rc, out, err = edgeprop("regress", "--model", str(built["ckpt"]), "--recordings",
                            str(built["recs"]), "--only", "clean_speech,silence", "--backend",
                            "reference", "--json")
    assert rc == 0 and out["failed"] == 0, err
    assert {r["tier"] for r in out["recordings"]} == {"exact"}
    assert "clean_speech" in err and "ok" in err  # the human table on stderr
    # a copy whose golden says the weights ended elsewhere must fail with exit 1
    work = tmp_path / "recs"
    work.mkdir()
    for name in ("clean_speech.npz", "clean_speech.golden.json"):
        (work / name).write_bytes((built["recs"] / name).read_bytes())
    gp = work / "clean_speech.golden.json"
    d = json.loads(gp.read_text())
    d["by_backend"]["reference"]["final_params_hash"] = "0" * 64
    gp.write_text(json.dumps(d))
    rc, out, err = edgeprop("regress", "--model", str(built["ckpt"]), "--recordings",
                            str(work), "--backend", "reference", "--json", "--quiet")
    assert rc == 1 and out["failed"] == 1
    assert "final_params_hash" in out["recordings"][0]["reason"]


def test_a_broken_recording_fails_its_row_and_the_others_still_run(built, tmp_path):
    work = tmp_path / "recs"
    work.mkdir()
    for name in ("silence.npz", "silence.golden.json", "clean_speech.npz"):
        (work / name).write_bytes((built["recs"] / name).read_bytes())
    (work / "clean_speech.golden.json").write_text("{not json")  # a corrupt golden
    (work / "aaa_corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    rc, out, err = edgeprop("regress", "--model", str(built["ckpt"]), "--recordings",
                            str(work), "--backend", "reference", "--json", "--quiet")
    assert rc == 1 and out["passed"] == 1 and out["failed"] == 2
    rows = {r["name"]: r for r in out["recordings"]}
    assert rows["silence"]["passed"] and rows["silence"]["tier"] == "exact"
    assert "unreadable recording" in rows["aaa_corrupt"]["reason"]
    assert "unreadable golden" in rows["clean_speech"]["reason"]
    assert "aaa_corrupt" in err and "Traceback" not in err


def test_regress_reports_a_changed_checkpoint(built, tmp_path):
    from edgeprop.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(built["ckpt"])  # same frontend and encoder, one weight changed
    ck.params.w_out[0, 0] += 0.01
    other = tmp_path / "other.ckpt"
    save_checkpoint(other, ck.cfg, ck.params, frontend=ck.frontend, encoder=ck.encoder,
                    labels=ck.labels)
    rc, out, _ = edgeprop("regress", "--model", str(other), "--recordings", str(built["recs"]),
                          "--only", "silence", "--backend", "reference", "--json", "--quiet")
    assert rc == 1
    assert "checkpoint changed" in out["recordings"][0]["reason"]


def _golden_and_rerun(built, name: str) -> tuple[dict, dict]:
    from edgeprop.checkpoint import load_checkpoint, params_hash

    path = built["recs"] / f"{name}.npz"
    ck = load_checkpoint(built["ckpt"])
    rec = R.load_any(path)
    res = R.replay_over_sockets(rec, ck, "reference")
    return R.read_goldens(path)["reference"], R.make_golden(rec, path, res, "reference",
                                                             params_hash(ck.params))


def test_replay_on_sockets_is_bitwise_deterministic(built):
    golden, again = _golden_and_rerun(built, "noise_white_noise")
    v = R.compare(golden, again)
    assert v["passed"] and v["tier"] == "exact", v
    assert again["posteriors"]["sha256"] == golden["posteriors"]["sha256"]


def test_tolerant_tier_accepts_float_noise_and_catches_changes(built):
    golden, again = _golden_and_rerun(built, "clean_speech")
    other_machine = copy.deepcopy(golden)
    other_machine["fingerprint"]["numpy"] = "0.0-other"
    other_machine["posteriors"]["sha256"] = "f" * 64   # float order differs elsewhere
    other_machine["final_params_hash"] = "e" * 64
    other_machine["posteriors"]["mean"] = [m + 1e-4 for m in golden["posteriors"]["mean"]]
    v = R.compare(other_machine, again)
    assert v["tier"] == "tolerant" and v["passed"], v
    broken = copy.deepcopy(other_machine)
    broken["posteriors"]["mean"][0] += 0.05
    broken["weights"]["w_rec"] *= 1.01
    v = R.compare(broken, again)
    assert not v["passed"]
    assert "posterior_mean" in v["reason"] and "weight_norms" in v["reason"]


def test_compact_recording_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    header = P.RecordingHeader(0.0, "fh", {}, "enc", {}, "ph", ["a", "b"], {})
    labels = rng.integers(-1, 2, size=37)
    windows = np.where(labels >= 0, np.arange(37) // 5, -1)
    for frames in ((rng.random((37, 2, 80)) < 0.2).astype(np.uint8),
                   rng.standard_normal((37, 1, 80)).astype(np.float32)):
        rec = R.StreamRecording("x", header, frames, labels, windows, meta={"k": 1})
        a = R.load_compact(R.save_compact(rec, tmp_path / "a.npz"))
        b = R.load_compact(R.save_compact(a, tmp_path / "b.npz"))
        assert a.frames.dtype == frames.dtype and a.frames.shape == frames.shape
        if frames.dtype == np.uint8:
            np.testing.assert_array_equal(a.frames, frames)  # bit-packed: lossless
        else:  # int8 per channel: within half a step of the recorded value
            step = np.abs(frames).max(axis=(0, 1)) / 127
            assert np.all(np.abs(a.frames - frames) <= step / 2 + 1e-6)
        np.testing.assert_array_equal(b.frames, a.frames)  # and stable from then on
        np.testing.assert_array_equal(a.labels, labels)
        np.testing.assert_array_equal(a.windows, windows)
        assert a.header == header and a.meta["k"] == 1


def test_unreadable_recording_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(P.ProtocolError, match="unreadable recording"):
        R.load_compact(bad)
    rc, _, err = edgeprop("regress", "--recordings", str(tmp_path / "nope"))
    assert rc == 2 and "no recordings folder" in err and "Traceback" not in err


def test_a_recording_from_edgeprop_record_joins_the_suite(built, data_dir, tmp_path):
    """`edgeprop record` (real learner process, real clip) -> a .rec the suite replays."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = tmp_path / "ready.json"
    serve = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "serve", "--backend", "reference", "--model",
         str(built["ckpt"]), "--bind", f"tcp://127.0.0.1:{port}", "--control", "",
         "--ready-file", str(ready), "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and serve.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), "edgeprop serve did not come up"
        recs = tmp_path / "recs"
        recs.mkdir()
        clip = next(iter(sorted((data_dir / "yes").glob("*.wav"))))
        rc, _, err = edgeprop("record", str(recs / "yes_clip.rec"), "--file", str(clip),
                              "--label", "yes", "--endpoint", f"tcp://127.0.0.1:{port}",
                              "--model", str(built["ckpt"]), "--quiet", timeout=120)
        assert rc == 0, err
    finally:
        serve.terminate()
        serve.wait(30)
    rec = R.load_any(recs / "yes_clip.rec")
    assert rec.n_frames == 100 and len(rec.label_windows()) == 1
    args = ("regress", "--model", str(built["ckpt"]), "--recordings", str(recs), "--backend",
            "reference", "--json", "--quiet")
    rc, out, err = edgeprop(*args, "--update")
    assert rc == 0, err
    rc, out, err = edgeprop(*args)
    assert rc == 0 and out["passed"] == 1 and out["recordings"][0]["learned_windows"] == 1, err


def test_a_corrupt_npz_is_named_without_numpys_unsafe_advice(tmp_path):
    bad = tmp_path / "foo.npz"
    bad.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(P.ProtocolError, match=r"foo\.npz: unreadable recording") as exc:
        R.load_compact(bad)
    assert "allow_pickle" not in str(exc.value)
