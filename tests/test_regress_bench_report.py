"""The benchmark report: JSON from the benchmarks becomes tables and PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from runtime import bench_report

REPO = Path(__file__).resolve().parents[1]

# Results in the shapes the benchmark issues specify (field names from their issues).
COLLECTED = {
    "command": "edgeprop bench all --json",
    "machine": bench_report.machine_info(),
    "started_utc": "2026-01-01 00:00 UTC",
    "seconds": 12.0,
    "benchmarks": {
        "sparse-bptt": {"command": "edgeprop bench sparse-bptt --json", "status": "ok",
                        "seconds": 3.0, "json": {"kws": {"active_fraction": 0.02, "sweep": [
                            {"B_th": b, "active_fraction": a, "backward_speedup": s}
                            for b, a, s in [(0.05, 0.01, 40.0), (0.1, 0.03, 20.0),
                                            (0.2, 0.07, 9.0)]]}}},
        "profile": {"command": "edgeprop profile --json", "status": "ok", "seconds": 1.0,
                    "json": {"pes": 3, "memory_total_bytes": 90000, "per_pe": [
                        {"pe": i, "bytes": {"weights": 20000 + i, "state": 8000}}
                        for i in range(3)]}},
        "run": {"command": "edgeprop run --json", "status": "ok", "seconds": 5.0,
                "json": {"frames": 500, "latency_p50_ms": 2.0, "latency_p99_ms": 7.5}},
        "personalize": {"command": "edgeprop personalize --json", "status": "ok", "seconds": 2.0,
                        "json": {"mean_before": 0.8, "speakers": [
                            {"speaker": f"{i:08x}", "before": 0.7 + 0.01 * i, "after": 0.8}
                            for i in range(5)]}},
        "detector": {"command": "edgeprop bench detector --json", "status": "ok",
                     "seconds": 6.0, "json": {"detector": {"hold": 20}, "by_hold": [
                         {"hold": h, "accuracy": a, "false_alarms_per_stream": f}
                         for h, a, f in [(1, 0.70, 12.0), (20, 0.75, 6.3), (40, 0.66, 4.7)]]}},
        "eprop": {"command": "edgeprop bench eprop --json", "status": "failed", "seconds": 0.1,
                  "json": None, "error": "exit 2"},
    },
}


def test_report_draws_every_plot_and_states_the_machine(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    plots = bench_report.write_report(COLLECTED, md, tmp_path / "img")
    for key in ("speedup_vs_bth", "memory_per_pe", "latency_histogram", "personalization",
                "detector_hold"):
        png = Path(plots[key])
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", plots[key]
    text = md.read_text()
    cpu = COLLECTED["machine"]["cpu"]
    # every figure carries the machine and the reproducing command
    figure_lines = [ln for ln in text.splitlines() if ln.startswith("_Figure:")]
    assert len(figure_lines) == 5
    assert all(cpu in ln and "Reproduce: `edgeprop" in ln for ln in figure_lines)
    assert "**failed**: exit 2" in text
    assert "percentiles only" in text
    # headline numbers are judged against the issues' targets
    assert "| run | `latency_p99_ms` | 7.5 | <= 20 ms | yes |" in text
    assert "| profile | `memory_max_pe_bytes`" not in text  # absent field: no row


def test_extract_last_json_skips_earlier_output():
    out = 'noise {"not": json\n{\n  "a": 1\n}\n{\n  "b": [1, 2]\n}\n'
    assert bench_report.extract_last_json(out) == {"b": [1, 2]}
    assert bench_report.extract_last_json("no json here") is None


def test_bench_all_reports_a_failing_benchmark_without_dying(tmp_path):
    """Real subprocess: an unknown-to-this-build verb fails, the report is still written."""
    out = tmp_path / "B.md"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bench", "all", "--only", "eprop", "--json",
         "--quiet", "--out", str(out), "--extra", "eprop=--no-such-flag"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    res = bench_report.extract_last_json(proc.stdout)
    assert res is not None, proc.stderr
    assert set(res["passed"]) | set(res["failed"]) == {"eprop"}
    assert res["benchmarks"]["eprop"]["command"].endswith("--no-such-flag")
    assert proc.returncode == (1 if res["failed"] else 0)
    assert out.is_file() and json.loads((tmp_path / "benchmarks.json").read_text())


def test_bench_all_subset_needs_its_own_out_and_takes_data_from_the_callers_folder(
        tmp_path, data_dir):
    """A subset would replace docs/BENCHMARKS.md (every benchmark's numbers); a relative
    --data is the caller's, not the repo's (where the benchmarks run)."""
    import shlex

    def bench_all(*argv):
        return subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "all", *argv],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    r = bench_all("--only", "eprop", "--quiet")
    assert r.returncode == 2 and "give --out for this subset's report" in r.stderr
    r = bench_all("--timeout", "-5", "--out", str(tmp_path / "B.md"))
    assert r.returncode == 2 and "--timeout" in r.stderr
    (tmp_path / "sc").symlink_to(data_dir)
    r = bench_all("--only", "detector", "--data", "sc", "--out", str(tmp_path / "B.md"),
                  "--json", "--quiet", "--extra", "detector=--no-such-flag")
    res = bench_report.extract_last_json(r.stdout)
    assert res is not None, r.stderr
    argv = shlex.split(res["benchmarks"]["detector"]["command"])
    given = argv[argv.index("--data") + 1]  # relative to the repo, where it ran
    assert (REPO / given).resolve() == data_dir.resolve()
