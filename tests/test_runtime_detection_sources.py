"""Detection (pure, offline) and audio sources (ring buffer, file, folder, stdin)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from edgeprop.errors import AudioError, ConfigError, DeviceError
from edgeprop.network import KWS_LABELS
from runtime.detection import Detector, DetectorConfig, Event, score_detections
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


def test_scoring_counts_hits_and_false_alarms():
    ev = [Event(1.0, 1.6, "yes"), Event(3.0, 3.5, "no"), Event(5.0, 5.5, "_unknown_")]
    s = score_detections(ev, [(1.9, "yes"), (3.2, "go"), (5.2, "up"), (8.0, "yes")],
                         KWS_LABELS[:10])
    assert s == {"keyword_utterances": 2, "detected": 1, "accuracy": 0.5, "false_alarms": 3}


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
