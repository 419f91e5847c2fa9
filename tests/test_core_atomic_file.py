"""The one atomic-write helper that checkpoints, caches, goldens and reports use."""

from __future__ import annotations

import stat

import pytest

from edgeprop.atomic_file import atomic_open, atomic_write_bytes, atomic_write_text


def test_written_files_are_readable_by_others_not_mkstemp_private(tmp_path):
    path = tmp_path / "sub" / "report.md"
    atomic_write_text(path, "hello")
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "weights.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "wb") as f:
            f.write(b"half a new fi")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
