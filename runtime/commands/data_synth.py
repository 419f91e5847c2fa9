"""`edgeprop data synth OUT`: keywords spoken by flite / festival voices, cached.

Writes OUT in the Speech Commands layout (OUT/<word>/<spk>_nohash_<take>.wav), so
`edgeprop data info OUT` and the dataset loader read it. Files already made with the
same settings are reused. Voices that are not installed are named with the reason.
"""

from __future__ import annotations

import argparse

from edgeprop.synth import DEFAULT_VOICES, KEYWORDS, TAKES, make_clips, plan_synthesis
from runtime.console import add_output_flags, print_json, progress, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (Speech Commands layout)")
    parser.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES),
                        help="engine:voice, e.g. flite:slt festival:kal_diphone "
                             f"(default: {' '.join(DEFAULT_VOICES)})")
    parser.add_argument("--words", nargs="+", default=list(KEYWORDS),
                        help="words to speak (default: the 10 keywords)")
    parser.add_argument("--takes", type=int, default=len(TAKES),
                        help=f"takes per word and voice, varying rate/pitch (1..{len(TAKES)})")
    add_output_flags(parser)


def run(args: argparse.Namespace) -> int:
    plan = plan_synthesis(args.out, args.words, args.voices, args.takes)  # errors first
    with progress("synthesising", plan.clips, args.quiet) as advance:
        res = make_clips(plan, progress=advance)
    for key, why in res["missing_voices"].items():
        say(f"skipped voice {key}: {why}")
    say(f"{res['out']}: {res['clips']} clips ({res['made']} made, {res['reused']} reused) "
        f"from {len(res['voices'])} voices")
    if args.json:
        print_json(res)
    return 0
