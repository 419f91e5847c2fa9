"""Detection (pure, offline) and audio sources (ring buffer, file, folder, stdin)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprop.errors import AudioError, ConfigError, DeviceError
from edgeprop.losses import softmax
from edgeprop.network import KWS_LABELS
from runtime.detection import Detector, DetectorConfig, Event, score_detections
from runtime.recording import Recording, recorded_settings
from runtime.sources import (
    FileSource,
    FolderSource,
    MicrophoneSource,
    RingBuffer,
    StdinSource,
    list_devices,
)
from runtime.stream import build_stream, embedded_clips, folder_clips


def _logits(k: int, n: int, strength: float = 4.0) -> np.ndarray:
    y = np.zeros((n, len(KWS_LABELS)))
    y[:, k] = strength
    return y


def test_detector_smooths_thresholds_and_suppresses_repeats():
    det = Detector(KWS_LABELS, DetectorConfig(window=10, threshold=0.7, refractory=100))
    silence = _logits(KWS_LABELS.index("_silence_"), 30)
    yes = _logits(0, 80)
    _, hits = det.run(np.concatenate([silence, yes, silence, yes]))
    # one hit per burst: the refractory period swallows the rest of the first burst
    assert [h.label for h in hits] == ["yes", "yes"]
    assert hits[0].seq >= 30 + 3  # smoothing delays the first hit past the onset
    assert hits[1].seq - hits[0].seq >= 100


def test_detector_never_fires_on_ignored_classes_or_below_threshold():
    det = Detector(KWS_LABELS, DetectorConfig(window=5, threshold=0.99, refractory=0))
    _, hits = det.run(_logits(KWS_LABELS.index("_unknown_"), 50, 20.0))
    assert hits == []
    _, hits = det.run(_logits(1, 50, 1.0))  # p(no) about 0.2 < 0.99
    assert hits == []
    with pytest.raises(ConfigError):
        DetectorConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="hold"):
        DetectorConfig(hold=0)
    with pytest.raises(ConfigError, match=r"window must be 1-1000 frames \(10 ms each\), got "
                                          "100000"):
        DetectorConfig(window=100_000)  # 1000 s of smoothing: it would never fire


def test_the_first_frames_are_averaged_with_the_readout_at_rest():
    """Averaged alone, a stream's first 0.2 s decided: a brief lead in near-silence
    fired (and its refractory period blocked the real word). Frames before the stream
    count as 0, the readout at rest."""
    cfg = DetectorConfig()  # window 50, threshold 0.6, hold 20
    up, yes = KWS_LABELS.index("up"), KWS_LABELS.index("yes")
    ys = np.concatenate([_logits(up, 25, 2.0), np.zeros((30, len(KWS_LABELS))),
                         _logits(yes, 60, 4.0)])
    probs, hits = Detector(KWS_LABELS, cfg).run(ys)
    assert [h.label for h in hits] == ["yes"]
    first = Detector(KWS_LABELS, cfg).push(ys[0], 0, 0.0)[0]
    np.testing.assert_allclose(first, softmax(ys[0] / cfg.window), rtol=1e-6)


def test_hold_lets_a_brief_lead_pass_and_fires_the_word_that_stays():
    """"le-" of left looks like yes for a few frames: with a hold only the word that
    stays on top above threshold fires, `hold` frames after it got there."""
    cfg = DetectorConfig(window=1, threshold=0.6, hold=10, refractory=100)
    yes, left = KWS_LABELS.index("yes"), KWS_LABELS.index("left")
    ys = np.concatenate([_logits(yes, 6), _logits(left, 40)])
    _, hits = Detector(KWS_LABELS, cfg).run(ys)
    assert [(h.label, h.seq) for h in hits] == [("left", 6 + 10 - 1)]
    _, hits = Detector(KWS_LABELS, DetectorConfig(window=1, hold=1)).run(ys)
    assert [(h.label, h.seq) for h in hits] == [("yes", 0)]  # without a hold: the lead
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg


def _fires_without_hold(ys: np.ndarray, cfg: DetectorConfig) -> list[tuple[int, str]]:
    """The rule before the hold, written out: the top keyword fires at p >= threshold."""
    fire = np.array([lab not in cfg.ignore for lab in KWS_LABELS])
    out, last = [], None
    for t in range(len(ys)):
        lo = max(0, t - cfg.window + 1)
        z = ys[lo:t + 1].sum(axis=0) / cfg.window  # zeros before the stream
        p = np.exp(z - z.max())
        p /= p.sum()
        k = int(np.argmax(np.where(fire, p, -1.0)))
        if p[k] >= cfg.threshold and (last is None or t - last >= cfg.refractory):
            out.append((t, KWS_LABELS[k]))
            last = t
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12), st.floats(0.2, 0.9),
       st.integers(0, 30))
def test_hold_one_is_the_rule_without_a_hold(seed, window, threshold, refractory):
    cfg = DetectorConfig(window=window, threshold=threshold, hold=1, refractory=refractory)
    ys = np.random.default_rng(seed).normal(0.0, 3.0, (80, len(KWS_LABELS)))
    _, hits = Detector(KWS_LABELS, cfg).run(ys)
    assert [(h.seq, h.label) for h in hits] == _fires_without_hold(ys, cfg)


def test_a_recording_from_before_the_hold_replays_with_hold_one():
    from runtime import protocol as P

    header = P.RecordingHeader(0.0, "", {}, "", {}, "", list(KWS_LABELS), {},
                               runtime={"detector": {"window": 50, "threshold": 0.6,
                                                     "refractory": 100}})
    assert recorded_settings(Recording(header, []))["detector"]["hold"] == 1
    header.runtime["detector"]["hold"] = 7
    assert recorded_settings(Recording(header, []))["detector"]["hold"] == 7


def test_scoring_counts_hits_and_false_alarms():
    ev = [Event(1.0, 1.6, "yes"), Event(3.0, 3.5, "no"), Event(5.0, 5.5, "_unknown_")]
    s = score_detections(ev, [(1.9, "yes"), (3.2, "go"), (5.2, "up"), (8.0, "yes")],
                         KWS_LABELS[:10])
    assert s == {"keyword_utterances": 2, "detected": 1, "accuracy": 0.5, "false_alarms": 3,
                 "false_alarm_kinds": {"repeat": 0, "wrong_keyword": 1, "non_keyword": 1,
                                       "outside_words": 1},
                 "delays_s": [pytest.approx(0.3)], "median_delay_s": pytest.approx(0.3)}
    again = score_detections(ev, [(1.7, "yes"), (1.9, "yes")], KWS_LABELS[:10])
    assert again["detected"] == 1 and again["false_alarm_kinds"]["repeat"] == 1


def test_ring_buffer_overwrites_oldest_and_counts_overruns():
    rb = RingBuffer(100)
    rb.write(np.arange(60, dtype=np.float32))
    assert np.array_equal(rb.read(10), np.arange(10))
    rb.write(np.arange(60, 130, dtype=np.float32))  # 120 unread > 100: 20 oldest lost
    assert rb.overruns == 20
    assert np.array_equal(rb.read(100), np.arange(30, 130))
    assert rb.read(1, timeout=0.01) is None


def test_microphone_without_input_device_says_to_replay():
    if list_devices():
        pytest.skip("this machine has an input device")
    with pytest.raises(DeviceError, match="replay"):
        MicrophoneSource()


def test_file_source_replays_all_samples_paced_or_fast(data_dir):
    path = sorted((data_dir / "yes").glob("*.wav"))[0]
    fast = list(FileSource(path, block_ms=10).blocks())
    assert sum(len(b.samples) for b in fast) == 16000 and len(fast) == 100
    t0 = time.perf_counter()
    paced = list(FileSource(path, block_ms=100, realtime=True, label=0).blocks())
    assert time.perf_counter() - t0 >= 0.85  # ten 100 ms blocks, the first at once
    assert {b.label for b in paced} == {0}


def test_folder_source_labels_files_by_their_folder(data_dir, tmp_path):
    import shutil

    for word in ("yes", "bed"):
        (tmp_path / word).mkdir()
        src = sorted((data_dir / ("yes" if word == "yes" else "_unknown_")).glob("*.wav"))[0]
        shutil.copy(src, tmp_path / word / src.name)
    blocks = list(FolderSource(tmp_path, gap_s=0.1).blocks())
    labels = {b.label for b in blocks}
    assert KWS_LABELS.index("yes") in labels and -1 in labels  # "bed" is not a class folder


def test_stdin_source_reads_raw_int16_pcm():
    x = (np.sin(np.arange(1600) / 5) * 10000).astype("<i2")
    blocks = list(StdinSource(stream=io.BytesIO(x.tobytes())).blocks())
    got = np.concatenate([b.samples for b in blocks])
    assert np.allclose(got, x / 32768.0)


def test_default_stream_is_real_clips_with_gaps_and_noise():
    s = build_stream(embedded_clips(), seed=1)
    assert len(s.events) >= 30
    assert all(b.t_start >= a.t_end for a, b in zip(s.events, s.events[1:], strict=False))
    lab, win = s.frame_labels()
    assert (lab == -1).sum() > 0.2 * len(lab)  # gaps between utterances
    assert set(np.unique(win[win >= 0])) == set(range(len(s.events)))
    gap = s.audio[: int(s.events[0].t_start * 16000)]
    assert np.abs(gap).max() > 0  # background noise under the gaps


def test_stream_clips_go_through_the_one_audio_loader(tmp_path, data_dir):
    """`run --clips` reads with edgeprop.audio.load_wav: a truncated clip is an error
    naming it, not a silently shorter utterance."""
    data = sorted((data_dir / "yes").glob("*.wav"))[0].read_bytes()
    bad = tmp_path / "yes" / "abcdef12_nohash_0.wav"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])  # the header still declares the full length
    with pytest.raises(AudioError, match=r"abcdef12_nohash_0\.wav.*truncated"):
        build_stream(folder_clips(tmp_path, per_label=1))


def _bench_detector(*argv: str):
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "detector", *argv,
                          "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    return res, (json.loads(res.stdout) if res.returncode == 0 else None)


def test_bench_detector_scores_streams_of_unseen_speakers_per_hold(data_dir):
    args = ("--data", str(data_dir), "--streams", "2", "--clips-per-stream", "15",
            "--holds", "1,20", "--hold", "7")
    res, out = _bench_detector(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out["speakers"] == "not seen in pretraining" and out["streams"] == 2
    assert out["utterances"] == 30 and 0 < out["keyword_utterances"] <= 30
    rows = {(r["hold"], r["pause_reset"]): r for r in out["by_hold"]}
    # --hold is always measured; each hold with and without the pause resets
    assert sorted(rows) == [(h, pr) for h in (1, 7, 20) for pr in (False, True)]
    for r in rows.values():
        assert r["accuracy"] == r["detected"] / out["keyword_utterances"]
        assert r["false_alarms_per_stream"] == r["false_alarms"] / 2
    assert out["accuracy"] == rows[7, True]["accuracy"] and out["detector"]["hold"] == 7
    assert out["accuracy_without_pause_reset"] == rows[7, False]["accuracy"]
    assert sum(out["false_alarm_kinds"].values()) == rows[7, True]["false_alarms"]
    assert out["pauses"] > 0 and 0 <= out["words_with_a_pause_inside"] <= out["utterances"]
    assert 0.0 <= out["oracle_window_accuracy"] <= 1.0
    assert _bench_detector(*args)[1] == out  # deterministic for a seed
    bad, _ = _bench_detector("--data", str(data_dir), "--holds", "0,20")
    assert bad.returncode == 2 and "every hold must be 1-1000 frames" in bad.stderr
    assert bad.stderr.strip().count("\n") <= 2  # argparse usage + the message, no traceback


class _Device:
    """What PortAudio says of one input device. No device on this machine refuses 16 kHz
    or mono (the virtual microphone's ALSA null plugin takes any), so the choice between
    settings is checked against devices described here; tests/test_demo_live.py opens
    the virtual microphone at 48 kHz stereo for real."""

    def __init__(self, rates, channels, default_rate):
        self.rates, self.channels, self.default = rates, channels, default_rate

    def query_devices(self, device, kind):
        return {"default_samplerate": float(self.default)}

    def check_input_settings(self, device, channels, dtype, samplerate):
        if samplerate not in self.rates or channels not in self.channels:
            raise ValueError("Invalid sample rate or number of channels")


@pytest.mark.parametrize("rates, channels, default, forced, want", [
    ((16000, 48000), (1, 2), 48000, (None, None), (16000, 1)),  # takes 16 kHz mono
    ((44100, 48000), (1, 2), 44100, (None, None), (44100, 1)),  # USB mic: 44.1 kHz only
    ((48000,), (2,), 48000, (None, None), (48000, 2)),          # stereo-only codec
    ((16000,), (1, 2), 16000, (48000, None), (48000, 1)),       # --mic-rate is obeyed
    ((8000,), (4,), 8000, (None, None), (8000, 1)),             # nothing fits: InputStream
])                                                              # says why, naming them
def test_capture_settings_fall_back_to_the_device_rate_then_stereo(rates, channels, default,
                                                                    forced, want):
    from runtime.sources import _capture_settings

    assert _capture_settings(_Device(rates, channels, default), None, 16000, *forced) == want
