"""Live keyword spotting from the microphone: `python demos/live_kws.py [--device N]`.

Thin wrapper over `edgeprop demo live` (runtime/commands/demo_live.py); every option
of that command works here (--list-devices, --replay FILE, --seconds N, --json ...).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["demo", "live", *sys.argv[1:]]))
