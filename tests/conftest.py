"""Shared fixtures: the real Speech Commands dev folder, small real inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeprop.datasets import DEV_DATA, default_data_dir

DATA_DIR = default_data_dir() or DEV_DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data/speech_commands_dev (or $EDGEPROP_DATA); never copied into the repo."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"speech_commands_dev not found at {DATA_DIR}")
    return DATA_DIR
