"""Shared CLI output: JSON on stdout (last), human text and progress on stderr.

Every verb that measures something takes `--json` and prints one object last on
stdout; while `--json` is on, everything for humans goes to stderr. `--quiet`
silences progress.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object last on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: dict) -> None:
    """Print one JSON object on stdout (NaN/inf become null so it always parses)."""
    sys.stdout.write(json.dumps(_plain(obj), indent=2) + "\n")
    sys.stdout.flush()


def say(*parts: object) -> None:
    """Human-readable line, always on stderr so stdout stays parseable."""
    print(*parts, file=sys.stderr, flush=True)


@contextmanager
def progress(description: str, total: int | None, quiet: bool = False) -> Iterator:
    """A rich progress bar on stderr; yields `advance(n=1)`. Silent when quiet."""
    if quiet:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
