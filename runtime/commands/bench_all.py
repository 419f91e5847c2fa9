"""`edgeprop bench all`: run every benchmark, write docs/BENCHMARKS.md with plots.

Each benchmark runs as its own subprocess (`python -m runtime.cli <verb> ... --json`),
one after another (the machine is shared; running them side by side would spoil the
timings). A benchmark that fails, times out or prints no JSON is reported as such and
the others still run. The collected results are kept in docs/benchmarks.json so the
report can be redrawn without re-measuring (`--from-json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from edgeprop.atomic_file import atomic_write_text
from edgeprop.datasets import DEV_DATA, default_data_dir
from edgeprop.errors import ConfigError
from runtime import bench_report
from runtime.arg_types import folder, name_list, new_file, pos_float
from runtime.console import add_output_flags, print_json, say

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REPORT = REPO / "docs" / "BENCHMARKS.md"

#: name -> (argv after `edgeprop`, slow?). Slow ones are skipped by --quick.
BENCHMARKS: dict[str, tuple[list[str], bool]] = {
    "eprop": (["bench", "eprop", "--json"], False),
    "frontend": (["bench", "frontend", "--json"], False),
    "sparse-bptt": (["bench", "sparse-bptt", "--json"], True),
    "profile": (["profile", "--json"], False),
    "run": (["run", "--json"], False),
    "detector": (["bench", "detector", "--data", "{data}", "--json"], False),
    "personalize": (["personalize", "--data", "{data}", "--all-speakers", "--min-clips", "30",
                     "--shots", "2", "--json"], True),
    "regress": (["regress", "--json", "--quiet"], False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", type=name_list, default=None,
                        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--skip", type=name_list, default=None,
                        help="comma-separated benchmarks to leave out")
    parser.add_argument("--quick", action="store_true",
                        help="leave out the slow ones (sparse-bptt, personalize)")
    parser.add_argument("--data", type=folder, default=str(default_data_dir() or DEV_DATA),
                        help="Speech Commands folder for detector and personalize "
                             "(default ../shared/...)")
    parser.add_argument("--timeout", type=pos_float, default=1800.0,
                        help="seconds allowed per benchmark (default 1800)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                        help="extra arguments for one benchmark, e.g. --extra 'run=--clips 8'")
    parser.add_argument("--out", type=new_file, default=None,
                        help="markdown report to write (default docs/BENCHMARKS.md; a subset "
                             "of the benchmarks needs its own --out)")
    parser.add_argument("--img-dir", default=None, help="plot folder (default: <out dir>/img)")
    parser.add_argument("--raw", default=None,
                        help="collected JSON file (default: <out dir>/benchmarks.json)")
    parser.add_argument("--from-json", default=None,
                        help="redraw the report from a collected JSON file, measuring nothing")
    add_output_flags(parser)


def _selection(args: argparse.Namespace) -> list[str]:
    bad = [n for n in (args.only or []) + (args.skip or []) if n not in BENCHMARKS]
    if bad:
        raise ConfigError(f"unknown benchmark(s) {bad}; choose from {list(BENCHMARKS)}")
    chosen = args.only or list(BENCHMARKS)
    skip = set(args.skip or [])
    if args.quick and not args.only:
        skip |= {n for n, (_, slow) in BENCHMARKS.items() if slow}
    left = [n for n in chosen if n not in skip]
    if not left:
        raise ConfigError("--only and --skip leave no benchmark to run")
    return left


def _extras(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition("=")
        if not sep or name not in BENCHMARKS:
            raise ConfigError(f"--extra wants NAME=ARGS with NAME in {list(BENCHMARKS)}, "
                              f"got {item!r}")
        out.setdefault(name, []).extend(shlex.split(rest))
    return out


def run_one(name: str, argv: list[str], timeout: float) -> dict:
    """Run one benchmark subprocess; never raises for the benchmark's own failure."""
    cmd = [sys.executable, "-m", "runtime.cli", *argv]
    shown = "edgeprop " + " ".join(shlex.quote(a) for a in argv)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": shown, "status": "timeout", "seconds": time.perf_counter() - t0,
                "returncode": None, "json": None, "error": f"no result within {timeout:.0f} s"}
    secs = time.perf_counter() - t0
    obj = bench_report.extract_last_json(proc.stdout)
    err_tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
    if proc.returncode == 0 and obj is not None:
        status, error = "ok", None
    else:
        status = "failed"
        error = (f"exit {proc.returncode}" + ("" if obj is not None else ", no JSON on stdout")
                 + (f": {err_tail}" if err_tail else ""))
    return {"command": shown, "status": status, "seconds": secs, "returncode": proc.returncode,
            "json": obj, "error": error}


def run(args: argparse.Namespace) -> int:
    subset = bool(args.only or args.skip or args.quick) and not args.from_json
    if args.out is None and subset:  # the committed report holds every benchmark
        raise ConfigError(f"--only, --skip and --quick run a subset, which would replace "
                          f"{DEFAULT_REPORT} (every benchmark's numbers) and "
                          "its benchmarks.json; give --out for this subset's report")
    out = Path(args.out) if args.out is not None else DEFAULT_REPORT
    img_dir = Path(args.img_dir) if args.img_dir else out.parent / "img"
    raw_path = Path(args.raw) if args.raw else out.parent / "benchmarks.json"
    if args.from_json:
        try:
            collected = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read collected results {args.from_json}: {exc}") from exc
    else:
        names = _selection(args)
        extras = _extras(args.extra)
        shown_cmd = "edgeprop bench all --json" + (f" --only {','.join(names)}"
                                                   if args.only or args.quick or args.skip else "")
        collected = {"command": shown_cmd, "machine": bench_report.machine_info(),
                     "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "benchmarks": {}}
        t0 = time.perf_counter()
        for name in names:
            # shown relative to the repo (the subprocess runs there), so the reproduce
            # line in the report works on any checkout with ../shared beside it
            # (a relative --data is the user's, from where they ran the command)
            data = os.path.relpath(os.path.abspath(args.data), REPO)
            argv = [a.replace("{data}", data) for a in BENCHMARKS[name][0]]
            argv += extras.get(name, [])
            if not args.quiet:
                say(f"bench all: {name}: edgeprop {' '.join(argv)}")
            res = run_one(name, argv, args.timeout)
            collected["benchmarks"][name] = res
            if not args.quiet:
                say(f"bench all: {name}: {res['status']} in {res['seconds']:.1f} s"
                    + (f" ({res['error']})" if res["error"] else ""))
        collected["seconds"] = time.perf_counter() - t0
        atomic_write_text(raw_path, json.dumps(collected, indent=1) + "\n")
    plots = bench_report.write_report(collected, out, img_dir)
    benches = collected["benchmarks"]
    failed = [n for n, r in benches.items() if r["status"] != "ok"]
    summary = {
        "report": str(out),
        "raw": str(raw_path),
        "machine": collected["machine"],
        "passed": [n for n in benches if n not in failed],
        "failed": failed,
        "plots": plots,
        "benchmarks": benches,
    }
    if args.json:
        print_json(summary)
    else:
        say(f"wrote {out}; ok: {summary['passed']}; failed: {failed}")
    return 1 if failed else 0
