"""Speech Commands loader: counts match the dev README, splits are speaker-disjoint,
layouts (dev, full download, Google's .wav.wav names) and skipped files are reported."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from edgeprop.datasets import (
    default_data_dir,
    load_clip,
    require_data_dir,
    scan_speech_commands,
    speaker_of,
    speaker_split,
    split_from_lists,
)
from edgeprop.errors import AudioError, DatasetError
from edgeprop.network import KWS_LABELS

# From ../shared/data/speech_commands_dev/README.md and its folder listing.
DEV_COUNTS = {"yes": 252, "no": 252, "up": 269, "down": 250, "left": 265, "right": 244,
              "on": 247, "off": 261, "stop": 260, "go": 253, "_silence_": 265,
              "_unknown_": 867}


def _wav(path: Path, n: int = 16000, sr: int = 16000, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).normal(0, 0.05, n).astype(np.float32)
    sf.write(path, x, sr, subtype="PCM_16")
    return path


def test_dev_counts_match_readme(data_dir):
    res = scan_speech_commands(data_dir)
    assert len(res.clips) == 3685
    assert res.counts_by_label() == DEV_COUNTS
    assert res.skipped == []
    # README: "135 speakers" and "36 speakers have 30 or more clips" count the test-set
    # portion; the 10 keywords alone give exactly those numbers.
    kw = Counter(c.speaker for c in res.clips if c.label not in ("_silence_", "_unknown_"))
    assert len(kw) == 135
    assert sum(n >= 30 for n in kw.values()) == 36
    # Google's _unknown_/<word>_<spk>_nohash_<n>.wav.wav names keep their word
    words = Counter(c.word for c in res.clips if c.label == "_unknown_")
    assert words["bed"] + words["cat"] + words["happy"] == 624


def test_speaker_split_is_disjoint_and_covers_every_class(data_dir):
    res = scan_speech_commands(data_dir)
    train, val = speaker_split(res.clips, 0.2, seed=3)
    assert len(train) + len(val) == len(res.clips)
    assert not {c.speaker for c in train} & {c.speaker for c in val}
    assert 0.15 < len(val) / len(res.clips) < 0.3
    assert set(c.label for c in val) == set(KWS_LABELS)  # silence split too
    assert speaker_split(res.clips, 0.2, seed=3) == (train, val)


def test_speaker_of():
    assert speaker_of("yes/0a7c2a8d_nohash_1.wav") == "0a7c2a8d"
    assert speaker_of("_unknown_/bed_0C540988_nohash_0.wav.wav") == "0c540988"
    with pytest.raises(DatasetError, match="1024.wav"):
        speaker_of("_silence_/1024.wav")


def test_missing_folder_and_no_class_folders(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        scan_speech_commands(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        scan_speech_commands(tmp_path / "empty")


def test_require_data_dir_names_the_missing_folder(tmp_path, data_dir):
    assert require_data_dir(str(tmp_path)) == tmp_path
    assert require_data_dir(None) == default_data_dir() and default_data_dir().is_dir()
    with pytest.raises(DatasetError, match=r"absent: no such folder.*--data"):
        require_data_dir(tmp_path / "absent")


def test_edgeprop_data_overrides_the_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPROP_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path and require_data_dir(None) == tmp_path
    monkeypatch.setenv("EDGEPROP_DATA", str(tmp_path / "absent"))
    assert default_data_dir() is None
    with pytest.raises(DatasetError, match=r"absent; pass --data"):
        require_data_dir(None)


def test_full_download_layout_lists_and_skips(tmp_path):
    root = tmp_path / "sc"
    _wav(root / "yes" / "aaaaaaaa_nohash_0.wav")
    _wav(root / "yes" / "bbbbbbbb_nohash_0.wav")
    _wav(root / "no" / "aaaaaaaa_nohash_1.wav")
    _wav(root / "marvin" / "cccccccc_nohash_0.wav")          # other word -> _unknown_
    _wav(root / "_unknown_" / "bed_dddddddd_nohash_0.wav.wav")  # Google's double suffix
    _wav(root / "_background_noise_" / "hum.wav", n=40000)
    _wav(root / "yes" / "not_a_speaker.wav")
    (root / "yes" / "notes.txt").write_text("x")
    _wav(root / "stray.wav")
    (root / "validation_list.txt").write_text(
        "yes/bbbbbbbb_nohash_0.wav\nbed/dddddddd_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("marvin/cccccccc_nohash_0.wav\n")
    res = scan_speech_commands(root, silence_per_noise_file=4)
    counts = res.counts_by_label()
    assert counts["yes"] == 2 and counts["no"] == 1 and counts["_unknown_"] == 2
    assert counts["_silence_"] == 4  # cut from the noise, no _silence_ folder
    reasons = dict(res.skipped)
    assert "speaker id" in reasons[str(root / "yes" / "not_a_speaker.wav")]
    assert "not a .wav" in reasons[str(root / "yes" / "notes.txt")]
    assert "outside any class folder" in reasons[str(root / "stray.wav")]
    # labels with no clips are reported, never dropped silently
    assert "has no clips" in reasons[str(root / "left")]
    unk = {c.word: c for c in res.clips if c.label == "_unknown_"}
    assert set(unk) == {"marvin", "bed"} and unk["bed"].speaker == "dddddddd"
    splits = split_from_lists(root, res.clips)
    names = {k: sorted(c.path.name for c in v if c.label != "_silence_")
             for k, v in splits.items()}
    assert names["validation"] == ["bbbbbbbb_nohash_0.wav", "bed_dddddddd_nohash_0.wav.wav"]
    assert names["testing"] == ["cccccccc_nohash_0.wav"]
    assert sum(len(v) for v in splits.values()) == len(res.clips)
    for c in res.clips:
        if c.label == "_silence_":
            assert 0 <= c.offset <= 40000 - 16000
            x = load_clip(c)
            assert x.shape == (16000,) and np.abs(x).max() > 0


def test_split_from_lists_needs_lists(data_dir):
    res = scan_speech_commands(data_dir)
    with pytest.raises(DatasetError, match="speaker_split"):
        split_from_lists(data_dir, res.clips[:5])


def test_load_clip_pads_short_and_centre_crops_long(tmp_path):
    root = tmp_path / "sc"
    _wav(root / "yes" / "aaaaaaaa_nohash_0.wav", n=8000)
    long = _wav(root / "no" / "aaaaaaaa_nohash_0.wav", n=20000)
    res = scan_speech_commands(root)
    by = {c.label: c for c in res.clips}
    short = load_clip(by["yes"])
    assert short.shape == (16000,) and np.all(short[8000:] == 0) and np.any(short[:8000])
    cropped = load_clip(by["no"])
    full, _ = sf.read(long, dtype="float32")
    np.testing.assert_array_equal(cropped, full[2000:18000])


def test_bad_file_in_dataset_names_it(tmp_path):
    root = tmp_path / "sc"
    p = root / "yes" / "aaaaaaaa_nohash_0.wav"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"RIFF garbage")
    res = scan_speech_commands(root)
    with pytest.raises(AudioError, match="aaaaaaaa_nohash_0.wav"):
        load_clip(res.clips[0])
