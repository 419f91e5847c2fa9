"""`edgeprop data info DIR`: counts per class and speaker of a Speech Commands folder.

Also lists what the scan skipped and why (a label with no clips is listed there too).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from edgeprop.datasets import scan_speech_commands
from runtime.arg_types import folder, nonneg_int
from runtime.console import add_output_flags, print_json, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=folder,
                        help="Speech Commands folder (word folders, _background_noise_...)")
    parser.add_argument("--silence-per-noise-file", type=nonneg_int, default=None,
                        help="1 s silence clips cut per background-noise file "
                             "(default: only when there is no _silence_ folder)")
    parser.add_argument("--top", type=nonneg_int, default=20, help="speakers to list (default 20)")
    add_output_flags(parser)


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    res = scan_speech_commands(root, silence_per_noise_file=args.silence_per_noise_file)
    by_label = res.counts_by_label()
    by_speaker = res.counts_by_speaker()
    kw_counts = Counter(c.speaker for c in res.clips if c.label not in ("_silence_", "_unknown_"))
    lists = [n for n in ("validation_list.txt", "testing_list.txt") if (root / n).is_file()]
    say(f"{root}: {len(res.clips)} clips, {len(by_speaker)} speakers "
        f"({len(kw_counts)} with keyword clips)")
    say("per class:")
    for lab, n in by_label.items():
        say(f"  {lab:<10} {n:6d}")
    say(f"speakers with >= 30 clips: {sum(n >= 30 for n in by_speaker.values())} "
        f"(>= 30 keyword clips: {sum(n >= 30 for n in kw_counts.values())}); top {args.top}:")
    for spk, n in list(by_speaker.items())[: args.top]:
        say(f"  {spk}  {n}")
    if lists:
        say(f"official split lists present: {', '.join(lists)}")
    if res.skipped:
        say(f"skipped {len(res.skipped)}:")
        for path, why in res.skipped[:50]:
            say(f"  {path}: {why}")
        if len(res.skipped) > 50:
            say(f"  ... and {len(res.skipped) - 50} more (see --json)")
    else:
        say("skipped: nothing")
    if args.json:
        print_json({
            "root": str(root), "n_clips": len(res.clips), "counts_by_label": by_label,
            "n_speakers": len(by_speaker), "n_keyword_speakers": len(kw_counts),
            "n_speakers_30_keyword_clips": sum(n >= 30 for n in kw_counts.values()),
            "counts_by_speaker": by_speaker,
            "skipped": [{"path": p, "reason": r} for p, r in res.skipped],
            "split_lists": lists,
        })
    return 0
