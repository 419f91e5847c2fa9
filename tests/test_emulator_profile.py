"""`edgeprop profile`: reproducible figures, memory target, typed errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from edgeprop.network import ModelConfig, init_params
from firmware_model import DEFAULT_PRECISION, EmulatedLearner
from runtime.commands import profile as profile_cmd


def _args(*argv):
    p = argparse.ArgumentParser()
    profile_cmd.add_arguments(p)
    return p.parse_args(list(argv))


def test_profile_figures_are_reproducible(data_dir):
    a = profile_cmd.run_profile(_args("--samples", "1", "--quiet", "--data", str(data_dir)))
    b = profile_cmd.run_profile(_args("--samples", "1", "--quiet", "--data", str(data_dir)))
    for k in profile_cmd.WALL_FIELDS:
        assert a.pop(k) is not None and b.pop(k) is not None
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                    default=str)
    for k in ("pes", "memory_total_bytes", "memory_max_pe_bytes", "step_time_us",
              "realtime_margin", "energy_per_sample_uj", "packets_per_step"):
        assert a[k] is not None and a[k] > 0, k
    assert a["pes"] == 12 and len(a["placement"]) == 12
    assert sum(pe["bytes_total"] for pe in a["placement"]) == a["memory_total_bytes"]
    assert a["realtime_margin"] > 1.0  # real time at 150 MHz


def test_default_precision_fits_340KiB_while_training():
    cfg = ModelConfig()
    emu = EmulatedLearner(cfg, init_params(cfg, 0))
    assert emu.precision.name == DEFAULT_PRECISION
    x = (np.random.default_rng(0).random((5, cfg.n_in)) < 0.2).astype(np.float32)
    emu.train_sample(x, 3)
    emu.apply()
    mem = emu.memory()
    assert cfg.n_weights == 25_440
    assert mem["total"] <= 348_160, mem
    assert mem["max_pe"] <= 128 * 1024


def test_cli_rejects_mapping_that_does_not_fit():
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "profile", "--pes", "1",
                        "--precision", "fp32", "--samples", "1", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "overflows" in r.stderr and "PE 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_variants_on_too_few_pes_say_so_before_any_work(data_dir):
    """It failed after the features, with the overflow's advice (--precision) that
    --variants refuses."""
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "profile", "--variants",
                        "--pes", "3", "--train-clips", "1", "--val-clips", "100", "--data",
                        str(data_dir)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "on --pes 3 fp32 does not fit a PE's SRAM; use more PEs" in r.stderr
    assert "features:" not in r.stderr and "--precision" not in r.stderr


def test_variants_on_a_handful_of_clips_warn_that_the_numbers_are_chance(data_dir, capsys):
    out = profile_cmd.run_variants(_args("--variants", "--train-clips", "3", "--val-clips",
                                         "4", "--quiet", "--data", str(data_dir)))
    assert out["val_clips"] == 4 and out["accuracy_step_points"] == 25.0
    assert len(out["variants"]) >= 2 and out["recommended"]
    assert "warning: with 4 validation clips an accuracy moves in steps of 25.0 points" in \
        capsys.readouterr().err


def test_variants_say_when_the_split_holds_fewer_clips_than_asked(data_dir, tmp_path, capsys):
    for word in ("yes", "no"):  # a small folder: 12 clips of each word
        (tmp_path / word).mkdir()
        for f in sorted((data_dir / word).glob("*.wav"))[:12]:
            (tmp_path / word / f.name).symlink_to(f)
    out = profile_cmd.run_variants(_args("--variants", "--train-clips", "500", "--quiet",
                                         "--data", str(tmp_path)))
    assert out["train_clips"] < 500
    assert "the split holds fewer than --train-clips 500" in capsys.readouterr().err
