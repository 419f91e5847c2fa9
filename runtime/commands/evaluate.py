"""`edgeprop evaluate`: accuracy of a checkpoint on any Speech Commands folder.

Uses the shipped model when --model is omitted. Prints accuracy, n, per-class accuracy
and the confusion matrix (rows = true label, columns = predicted, in label order).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.arg_types import folder, output_folder
from runtime.console import add_output_flags, print_json, progress, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint (default: the shipped edgeprop/assets/kws_srnn.npz)")
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder (default ../shared/data/speech_commands_dev)")
    parser.add_argument("--cache-dir", type=output_folder, default=None,
                        help="feature cache folder (default $EDGEPROP_CACHE or ~/.cache/edgeprop)")
    add_output_flags(parser)


def _table(res) -> str:
    w = max(len(lab) for lab in res.labels)
    head = " " * (w + 1) + " ".join(f"{i:>4d}" for i in range(len(res.labels)))
    lines = [head]
    for i, lab in enumerate(res.labels):
        acc = res.per_class[lab]
        acc_s = "   -  " if acc is None else f"{100 * acc:5.1f}%"
        row = " ".join(f"{v:>4d}" for v in res.confusion[i])
        lines.append(f"{lab:<{w}} {row}   {acc_s} of {res.per_class_n[lab]}")
    return "\n".join(lines)


def run(args) -> int:
    from edgeprop.checkpoint import load_checkpoint
    from edgeprop.datasets import require_data_dir, skipped_files, skipped_note
    from edgeprop.evaluation import checkpoint_frontend, evaluate_clips, scan_folder_for_model
    from edgeprop.feature_cache import FeatureCache
    from edgeprop.shipped import SHIPPED_MODEL, load_shipped

    ckpt = load_checkpoint(args.model) if args.model is not None else load_shipped()
    model_path = args.model or SHIPPED_MODEL
    data = require_data_dir(args.data)
    checkpoint_frontend(ckpt)  # a checkpoint unfit for audio fails before the bar starts
    scan = scan_folder_for_model(data, ckpt)
    clips = scan.clips
    cache = FeatureCache(args.cache_dir)
    with progress("evaluating", len(clips), args.quiet) as adv:
        res = evaluate_clips(ckpt, clips, cache=cache, progress=adv)
    say(_table(res))
    say(f"accuracy {100 * res.accuracy:.2f} % on {res.n} clips of {data} ({model_path})")
    for note in (skipped_note(skipped_files(data, scan.skipped, scan.labels)),
                 cache.write_note()):
        if note:
            say(note)
    present = [lab for lab in res.labels if res.per_class_n[lab]]
    if len(present) == 1:
        say(f"note: every clip is {present[0]!r}, so this is that word's recall alone; "
            "how often other sounds are taken for it is not measured")
    if args.json:
        print_json(res.to_dict() | {"model": str(model_path), "data": str(data)})
    return 0
