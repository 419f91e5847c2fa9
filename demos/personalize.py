"""A speaker-personalization session: `python demos/personalize.py [--device N]`.

Thin wrapper over `edgeprop personalize` (runtime/commands/personalize.py): without
--data it prompts for each keyword, records you, adapts on the emulated chip and saves
a personalised checkpoint; with --data DIR --speaker HASH it runs the evaluation
protocol on a Speech Commands folder instead.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["personalize", *sys.argv[1:]]))
