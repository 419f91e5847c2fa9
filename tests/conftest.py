"""Shared fixtures: the real Speech Commands dev folder, small real inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeprop.datasets import DEV_DATA

DATA_DIR = Path(os.environ.get("EDGEPROP_DATA", DEV_DATA))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data/speech_commands_dev (or $EDGEPROP_DATA); never copied into the repo."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"speech_commands_dev not found at {DATA_DIR}")
    return DATA_DIR
