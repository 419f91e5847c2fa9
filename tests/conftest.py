"""Shared fixtures: the real Speech Commands dev folder, small real inputs, a small model."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_support import make_checkpoint

from edgeprop.checkpoint import load_checkpoint
from edgeprop.datasets import DEV_DATA, default_data_dir

DATA_DIR = default_data_dir() or DEV_DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data/speech_commands_dev (or $EDGEPROP_DATA); never copied into the repo."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"speech_commands_dev not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A small random model with the shipped frontend and encoder (runtime_support)."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "m.ckpt")


@pytest.fixture(scope="module")
def ckpt(model_path):
    return load_checkpoint(model_path)
