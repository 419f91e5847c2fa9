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


@pytest.fixture
def full_dir(tmp_path):
    """A folder on a tiny tmpfs that is already full (root only)."""
    import os
    import subprocess

    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        try:
            with open(folder / "filler", "wb", buffering=0) as fh:
                while True:
                    fh.write(b"x" * 1024)
        except OSError:
            pass  # full
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
