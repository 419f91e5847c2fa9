"""`edgeprop regress`: replay the shipped recordings on real sockets, compare to goldens.

    edgeprop regress [--json]            compare; exit 1 on any regression
    edgeprop regress --update            rewrite goldens, print what changed (review it)
    edgeprop regress --build-recordings --data DIR
                                         rebuild the recordings from speech_commands_dev
                                         (deterministic, seeded) and write their goldens

See runtime/regress.py for the comparison tiers and docs/regression.md for the list
of recordings and how to read a failure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from edgeprop.datasets import require_data_dir
from edgeprop.errors import ConfigError
from runtime.arg_types import folder, name_list, nonneg_int, pos_float
from runtime.console import add_output_flags, print_json, progress, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from runtime.regress import RECORDINGS_DIR

    parser.add_argument("--recordings", default=str(RECORDINGS_DIR),
                        help="folder of recordings (.npz shipped, .rec from `edgeprop record`) "
                             "and their .golden.json (default: the shipped ones)")
    parser.add_argument("--model", default=None,
                        help="checkpoint to replay through (default: the shipped model)")
    parser.add_argument("--backend", default="all", choices=("all", "emulator", "reference"),
                        help="learner backend(s); goldens are kept per backend (default all: "
                             "the SpiNNaker 2 emulator and the reference NumPy e-prop)")
    parser.add_argument("--only", type=name_list, default=None,
                        help="comma-separated recording names")
    parser.add_argument("--update", action="store_true",
                        help="rewrite the goldens from this run and print what changed")
    parser.add_argument("--build-recordings", action="store_true",
                        help="rebuild the recordings from --data, then write their goldens")
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder for --build-recordings (default "
                             "../shared/data/speech_commands_dev, or $EDGEPROP_DATA)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="clip choice seed for the build")
    parser.add_argument("--timeout", type=pos_float, default=120.0,
                        help="seconds allowed per recording (default 120)")
    add_output_flags(parser)


def _load_checkpoint(path: str | None):
    from edgeprop.checkpoint import params_hash
    from runtime.learner_node import load_model

    ckpt = load_model(path)
    return ckpt, params_hash(ckpt.params)


def _table(rows: list[dict]) -> str:
    head = f"{'recording':<24} {'backend':<9} {'frames':>6} {'learn':>5} {'det':>4} " \
           f"{'hit/kw':>7} {'tier':<8} {'result':<6} {'s':>5}  detail"
    lines = [head, "-" * len(head)]
    for r in rows:
        sc = r.get("detection_score") or {}
        hits = f"{sc.get('hits', '-')}/{sc.get('keyword_windows', '-')}" if sc else "-"
        result = "ok" if r["passed"] else "FAIL"
        detail = r.get("reason") or "; ".join(r.get("changes", [])[:3])
        lines.append(f"{r['name']:<24} {r['backend']:<9} {r.get('frames', 0):>6} "
                     f"{r.get('learned_windows', '-'):>5} {r.get('detections', '-'):>4} "
                     f"{hits:>7} {r.get('tier', ''):<8} {result:<6} {r.get('seconds', 0):>5.1f}"
                     f"  {detail}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from runtime import regress as R

    t0 = time.monotonic()
    folder = Path(args.recordings)
    if not args.build_recordings:
        R.list_recordings(folder)  # a missing folder is the first thing to say
    ckpt, ck_hash = _load_checkpoint(args.model)
    built: list[str] = []
    if args.build_recordings:
        data = require_data_dir(args.data)
        say(f"regress: building recordings from {data} into {folder}")
        built = [p.name for p in R.build_recordings(data, folder, ckpt, seed=args.seed)]
        args.update = True
    paths = R.list_recordings(folder)
    if args.only:
        want = set(args.only)
        paths = [p for p in paths if p.stem in want]
        missing = want - {p.stem for p in paths}
        if missing:
            have = ", ".join(p.stem for p in R.list_recordings(folder)) or "none"
            raise ConfigError(f"no recording named {', '.join(sorted(missing))} in {folder} "
                              f"(it holds: {have})")
    if not paths:
        raise ConfigError(f"{folder}: no recordings (build them with --build-recordings)")
    backends = ["emulator", "reference"] if args.backend == "all" else [args.backend]
    rows = []
    with progress("regress", len(paths) * len(backends), args.quiet) as advance:
        for p in paths:
            for backend in backends:
                rows.append(R.run_one(p, ckpt, ck_hash, backend, update=args.update,
                                      timeout_s=args.timeout))
                advance()
    failed = [f"{r['name']}/{r['backend']}" for r in rows if not r["passed"]]
    say(_table(rows))
    updated = [r for r in rows if r.get("tier") == "updated"]
    if updated:  # a row that failed (unreadable, timed out) kept its old golden
        say(f"{len(updated)} goldens rewritten in {folder}; what changed (review it before "
            "committing):")
        for r in updated:
            for line in r.get("changes", []):
                say(f"  {r['name']} ({r['backend']}): {line}")
    total = time.monotonic() - t0
    say(f"regress: {len(rows) - len(failed)} passed, {len(failed)} failed "
        f"({', '.join(backends)}; {total:.1f} s)")
    if args.json:
        print_json({
            "passed": len(rows) - len(failed),
            "failed": len(failed),
            "failed_names": failed,
            "backends": backends,
            "checkpoint_params_hash": ck_hash,
            "updated": bool(args.update),
            "built": built,
            "seconds": round(total, 2),
            "fingerprint": R.platform_fingerprint(",".join(backends)),
            "recordings": rows,
        })
    return 1 if failed else 0
