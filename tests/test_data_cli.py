"""`edgeprop data info` and `edgeprop bench frontend` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

DEV_COUNTS = {"yes": 252, "no": 252, "up": 269, "down": 250, "left": 265, "right": 244,
              "on": 247, "off": 261, "stop": 260, "go": 253, "_silence_": 265,
              "_unknown_": 867}  # ../shared/data/speech_commands_dev/README.md


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def test_data_info_json_counts(data_dir):
    res = _cli("data", "info", str(data_dir), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["counts_by_label"] == DEV_COUNTS
    assert out["n_clips"] == 3685 and out["n_keyword_speakers"] == 135
    assert out["n_speakers_30_keyword_clips"] == 36
    assert out["skipped"] == []
    assert "per class" in res.stderr


def test_data_info_missing_folder_is_one_line_error(tmp_path):
    res = _cli("data", "info", str(tmp_path / "nothing"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no such folder" in res.stderr


def test_bench_frontend_smoke(data_dir):
    res = _cli("bench", "frontend", "--data", str(data_dir), "--clips", "6",
               "--timed-clips", "1", "--repeats", "1", "--json", "--quiet")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("stream_us_per_frame", "batch_ms_per_clip", "max_abs_err_stream_vs_batch",
                "max_abs_err_vs_librosa"):
        assert out[key] is not None
    assert out["max_abs_err_stream_vs_batch"] <= 1e-6
    assert out["max_abs_err_vs_librosa"] < 1e-4
    assert set(out["encoders"]) == {"current", "delta", "threshold"}
    for rate in ("44100", "48000"):  # a microphone without 16 kHz, block by block
        m = out["mic_resampling"][rate]
        assert m["max_abs_err_vs_whole_file"] == 0.0  # as load_wav resamples a file
        assert 0 < m["hold_ms_median"] <= m["hold_ms_max"] < 60  # well under the 200 ms hold
