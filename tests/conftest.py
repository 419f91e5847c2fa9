"""Shared fixtures: the real Speech Commands dev folder, small real inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "speech_commands_dev"
DATA_DIR = Path(os.environ.get("EDGEPROP_DATA", DEFAULT_DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data/speech_commands_dev (or $EDGEPROP_DATA); never copied into the repo."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"speech_commands_dev not found at {DATA_DIR}")
    return DATA_DIR
