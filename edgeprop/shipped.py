"""The keyword spotter the package ships: pretrained with sparse BPTT (docs/pretraining.md).

`edgeprop pretrain` regenerates it; its training record (command, seed, time, accuracy)
sits beside it in kws_srnn.json.
"""

from __future__ import annotations

from pathlib import Path

from edgeprop.checkpoint import Checkpoint, load_checkpoint
from edgeprop.errors import CheckpointError

SHIPPED_MODEL: Path = Path(__file__).resolve().parent / "assets" / "kws_srnn.npz"
SHIPPED_RECORD: Path = SHIPPED_MODEL.with_suffix(".json")


def load_shipped() -> Checkpoint:
    """The shipped checkpoint (80-120-12 ALIF, frontend + encoder + labels included)."""
    if not SHIPPED_MODEL.is_file():
        raise CheckpointError(
            f"the shipped model {SHIPPED_MODEL} is missing; regenerate it with "
            f"`edgeprop pretrain --out {SHIPPED_MODEL}` (see docs/pretraining.md)")
    return load_checkpoint(SHIPPED_MODEL)
