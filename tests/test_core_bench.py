"""`edgeprop bench eprop --json` runs as a real subprocess and reports sane values.

Not a timing test: speed is only checked to be positive; exactness and memory are
checked against their definitions.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_eprop_json_reports_exactness_memory_and_speed():
    cmd = [sys.executable, "-m", "runtime.cli", "bench", "eprop", "--json", "--quiet",
           "--repeats", "1", "--samples", "2", "--steps", "30"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_weights"] == 80 * 120 + 120 * 120 + 120 * 12
    assert out["grad_rel_err_vs_bptt"] < 1e-5
    assert out["grad_rel_err_per_step_loss"] < 1e-5
    assert 0.85 < out["cosine_vs_bptt_with_recurrence"] < 1.0
    assert out["bytes_per_synapse"] <= 24.0
    assert out["train_steps_per_s"] > 0
    assert out["realtime_factor"] == 0.01 * out["train_steps_per_s"]
    assert 0.005 < out["firing_rate"] < 0.1


def test_bench_eprop_rejects_bad_arguments_with_one_line():
    cmd = [sys.executable, "-m", "runtime.cli", "bench", "eprop", "--steps", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--steps" in r.stderr
