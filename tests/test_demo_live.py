"""The live demo and the microphone session, driven through a real virtual microphone.

The virtual microphone (runtime/virtual_mic.py) is an ALSA `file` PCM whose input is a
FIFO this test process writes real clips into, paced in real time. The demo runs as a
subprocess and opens it through sounddevice/PortAudio like any microphone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Clips of speakers held out from pretraining, which the shipped model spots in replay.
SPOKEN = [("yes", "yes/837a0f64_nohash_0.wav"), ("up", "up/837a0f64_nohash_0.wav"),
          ("right", "right/97f4c236_nohash_0.wav"), ("on", "on/837a0f64_nohash_0.wav")]


def _alsa_ok() -> bool:
    try:
        import sounddevice  # noqa: F401
    except OSError:
        return False
    return Path("/usr/share/alsa/alsa.conf").is_file()


pytestmark = pytest.mark.skipif(not _alsa_ok(), reason="no ALSA / PortAudio on this machine")


@pytest.fixture(scope="module")
def shipped_path():
    from edgeprop.shipped import SHIPPED_MODEL

    if not SHIPPED_MODEL.is_file():
        pytest.skip("shipped model not built yet (edgeprop pretrain)")
    return SHIPPED_MODEL


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", *args]


def _load(data_dir: Path, rel: str, rate: int = 16000) -> np.ndarray:
    from edgeprop.audio import load_wav

    return np.asarray(load_wav(data_dir / rel, rate), np.float32)


def test_virtual_microphone_delivers_every_sample_in_real_time():
    import sounddevice as sd

    from runtime.virtual_mic import VirtualMicrophone

    ramp = ((np.arange(16000) % 20000) / 32768 + 1 / 32768).astype(np.float32)
    with VirtualMicrophone(dtype="float32") as vm:
        names = [d["name"] for d in sd.query_devices()]
        assert vm.name in names
        blocks, times = [], []

        def cb(indata, frames, t, status):
            blocks.append(indata[:, 0].copy())
            times.append(time.monotonic())

        with sd.InputStream(device=vm.name, samplerate=16000, channels=1, dtype="float32",
                            blocksize=160, callback=cb):
            t0 = time.monotonic()
            vm.play(ramp)
            assert vm.wait_played(5.0)
            played_s = time.monotonic() - t0
            time.sleep(0.4)
    x = np.concatenate(blocks)
    start = int(np.flatnonzero(x != 0)[0])
    np.testing.assert_array_equal(x[start:start + ramp.size], ramp)  # exact, in order
    assert all(b.size == 160 for b in blocks)
    assert 0.7 < played_s < 1.6  # 1 s of audio took about 1 s: paced, not dumped
    # after the context the device is gone again
    assert vm.name not in [d["name"] for d in sd.query_devices()]


def test_a_48_khz_stereo_microphone_reaches_the_frontend_as_16_khz_mono():
    from runtime.sources import MicrophoneSource
    from runtime.virtual_mic import VirtualMicrophone

    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000)).astype(np.float32)
    with VirtualMicrophone(samplerate=48000, channels=2) as vm:
        src = MicrophoneSource(device=vm.name, capture_rate=48000, capture_channels=2)
        assert (src.capture_rate, src.capture_block, src.sample_rate) == (48000, 480, 16000)
        assert src.channels == 2
        vm.play(tone)
        got, stamps, t0 = [], [], time.monotonic()
        try:
            for b in src.blocks():
                got.append(b.samples)
                stamps.append((b.t_in_ns, time.monotonic_ns()))
                if time.monotonic() - t0 > 2.5:  # settle 0.3 s + 1 s tone + slack
                    break
        finally:
            src.close()
    assert {g.size for g in got} == {160}  # 10 ms blocks at 16 kHz, as from any source
    # stamped when their last sample was captured: in order, never after they were yielded
    assert all(a[0] <= b[0] for a, b in zip(stamps, stamps[1:], strict=False))
    assert all(t_in <= t_out for t_in, t_out in stamps)
    x = np.concatenate(got)
    on = np.flatnonzero(np.abs(x) > 0.05)
    assert abs((on[-1] - on[0]) - 16000) < 40  # 1 s of 48 kHz audio -> 16000 samples
    seg = x[on[0] + 800:on[-1] - 800]
    peak = np.argmax(np.abs(np.fft.rfft(seg))) * 16000 / seg.size
    assert abs(peak - 440) < 2 and abs(seg.std() - 0.3 / np.sqrt(2)) < 0.01
    assert src.overruns == 0


def test_list_devices_says_how_each_input_will_be_captured():
    from runtime.virtual_mic import VirtualMicrophone

    with VirtualMicrophone() as vm:
        res = subprocess.run(_cmd("demo", "live", "--list-devices", "--json"), env=vm.env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    dev = next(d for d in json.loads(res.stdout)["devices"] if d["name"] == vm.name)
    assert (dev["capture_rate"], dev["capture_channels"]) == (16000, 1)  # it takes 16 kHz
    assert f"{vm.name}  (" in res.stderr and "captured as 16 kHz mono" in res.stderr


@pytest.mark.parametrize("rate", [16000, 48000])
def test_live_demo_spots_keywords_spoken_into_the_virtual_microphone(shipped_path, data_dir,
                                                                     rate):
    from runtime.virtual_mic import VirtualMicrophone

    with VirtualMicrophone(dtype="float32", samplerate=rate) as vm:
        from runtime.sources import list_devices

        assert vm.name in [d["name"] for d in list_devices()]  # what --list-devices prints
        # the virtual device takes any rate, so a 48 kHz-only microphone is --mic-rate
        rate_flag = [] if rate == 16000 else ["--mic-rate", str(rate)]
        proc = subprocess.Popen(_cmd("demo", "live", "--device", vm.name, "--seconds", "9",
                                     "--json", "--no-ui", *rate_flag), env=vm.env, cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(2.5)  # model load + stream open; the mic plays silence meanwhile
            for _, rel in SPOKEN:
                vm.play(_load(data_dir, rel, rate))
                vm.play(np.zeros(rate // 2, np.float32))
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["source"] == "microphone" and res["frames"] > 500
    assert res["mic_rate"] == rate and res["mic_channels"] == 1
    assert res["dropped_frames"] == 0
    assert res["level_dbfs_max"] > -40  # the words were heard, not silence
    got = [d["label"] for d in res["detections"]]
    want = [w for w, _ in SPOKEN]
    hits = sum(1 for w in want if w in got)
    assert hits >= 3, f"spoke {want}, detected {got}"
    assert len(got) <= len(want) + 1, f"spoke {want}, detected {got}"


def test_replay_feeds_a_file_as_if_it_were_the_microphone(shipped_path, data_dir, tmp_path,
                                                         capsys):
    import soundfile as sf

    from runtime.cli import main

    audio = np.concatenate([np.zeros(4000, np.float32), _load(data_dir, SPOKEN[2][1]),
                            np.zeros(4000, np.float32)])
    wav = tmp_path / "right.wav"
    sf.write(wav, audio, 16000)
    assert main(["demo", "live", "--replay", str(wav), "--json", "--backend", "reference"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "replay" and res["dropped_frames"] == 0
    got = [(d["label"], round(d["t"], 2)) for d in res["detections"]]
    # the same audio (+ the demo's 0.5 s tail) through the model and detector offline
    from edgeprop.evaluation import checkpoint_frontend, encode_batch
    from edgeprop.frontend import features
    from edgeprop.network import init_state, step
    from edgeprop.pauses import PauseDetector
    from edgeprop.shipped import load_shipped
    from runtime.detection import Detector

    ck = load_shipped()
    fcfg = checkpoint_frontend(ck)
    feats = features(np.concatenate([audio, np.zeros(8000, np.float32)])[None], fcfg)
    x = encode_batch(ck, feats)[0]
    pauses = PauseDetector(fcfg).run(feats[0])
    assert pauses.any()  # the silence after the word ends a pause
    st, ys = init_state(ck.cfg), []
    for xt, pause in zip(x, pauses, strict=True):
        st, y = step(ck.cfg, ck.params, st, xt)
        ys.append(y)
        if pause:  # the learner zeroes the state after a frame that ends a pause
            st = init_state(ck.cfg)
    _, hits = Detector(list(ck.labels)).run(np.array(ys))
    assert got == [(h.label, round(h.t, 2)) for h in hits]
    assert got and got[0][0] == "right"  # the word itself is spotted first
    assert main(["demo", "live", "--replay", str(tmp_path / "missing.wav")]) == 2
    err = capsys.readouterr().err
    assert "no such audio file" in err and "Traceback" not in err


def test_microphone_session_adapts_and_leaves_the_base_untouched(shipped_path, data_dir,
                                                                 tmp_path):
    from runtime.virtual_mic import VirtualMicrophone

    h0 = hashlib.sha256(shipped_path.read_bytes()).hexdigest()
    takes = {"left": ["left/837a0f64_nohash_0.wav", "left/837a0f64_nohash_1.wav"],
             "go": ["go/837a0f64_nohash_0.wav", "go/837a0f64_nohash_1.wav"]}
    out = tmp_path / "me.npz"
    with VirtualMicrophone(dtype="float32", noise_dbfs=-70) as vm:
        env = vm.env | {"EDGEPROP_HOME": str(tmp_path / "home")}
        proc = subprocess.Popen(
            _cmd("personalize", "--interactive", "--device", vm.name, "--keywords", "left,go",
                 "--takes", "2", "--holdout", "1", "--passes", "1", "--rehearsal", "2",
                 "--skip-above", "0", "--out", str(out), "--json"), env=env, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            vm.play(np.zeros(24000, np.float32))  # the session measures the noise first
            for word in ("left", "go"):
                for rel in takes[word]:
                    vm.play(_load(data_dir, rel))
                    vm.play(np.zeros(10000, np.float32))
            stdout, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    res = json.loads(stdout)
    assert res["n_adapt"] == 2 and res["n_test"] == 2 and res["n_learned"] > 0
    assert res["keywords"] == ["left", "go"]
    assert 0.0 <= res["before"] <= 1.0 and 0.0 <= res["after"] <= 1.0
    assert res["out"] == str(out) and out.is_file()
    assert hashlib.sha256(shipped_path.read_bytes()).hexdigest() == h0
    # the personalised model carries the user's frontend, and the live demo reads through it
    from edgeprop.checkpoint import load_checkpoint
    from edgeprop.shipped import load_shipped

    assert res["frontend_moved"]
    assert load_checkpoint(out).frontend != load_shipped().frontend
    demo = subprocess.run(_cmd("demo", "live", "--replay", str(data_dir / takes["left"][1]),
                               "--model", str(out), "--backend", "reference", "--json"),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert demo.returncode == 0, demo.stderr
    assert json.loads(demo.stdout)["frames"] > 0


def test_virtual_mic_command_stays_open_until_sigterm_then_cleans_up(data_dir):
    """`python -m runtime.virtual_mic` must not vanish under a reader (it would spin on
    end-of-file); SIGTERM closes it and removes its FIFO folder."""
    import signal

    wav = sorted((data_dir / "yes").glob("*.wav"))[0]
    proc = subprocess.Popen([sys.executable, "-m", "runtime.virtual_mic", str(wav),
                             "--gap", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        conf = Path(line.split("=", 1)[1].split()[0])
        assert line.startswith("export ALSA_CONFIG_PATH=") and conf.is_file()
        time.sleep(1.5)
        assert proc.poll() is None and conf.is_file()  # still open after the file
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert not conf.parent.exists()
