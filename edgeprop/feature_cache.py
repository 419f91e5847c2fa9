"""On-disk cache of clip features, keyed by the frontend config and each clip's file.

One `.npy` per (config hash, clip): the name is sha256 of (cfg.hash(), path, offset,
length, file size, mtime_ns), so editing a file or changing any frontend setting
misses the cache instead of serving stale features. Writes go to a temporary file in
the same folder and are renamed into place (atomic), so a killed run never leaves a
half-written entry. Features are computed in batches (the batch path equals the
streaming path, so cached features are what the network sees online).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeprop.atomic_file import atomic_open
from edgeprop.datasets import Clip, load_clip
from edgeprop.frontend import FrontendConfig, features


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEPROP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgeprop"


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save to `path` atomically: a temporary file in its folder (made if missing),
    renamed into place, so a killed run never leaves a half-written .npy."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, arr)


class FeatureCache:
    """features(clips, cfg) -> (N, T, F) float32, computed once per config and file."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, batch_size: int = 64):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch_size = batch_size
        self.hits = 0
        self.misses = 0
        # the first failed write (read-only or full cache): caching only saves time, so
        # it never fails the command; callers may tell the user (see `write_note`)
        self.write_error: OSError | None = None

    def write_note(self) -> str | None:
        """One line for the user when the cache could not be written, else None."""
        if self.write_error is None:
            return None
        exc = self.write_error
        return (f"note: feature cache {self.cache_dir} is not writable ({exc.strerror or exc}"
                "); features were computed but not kept (set --cache-dir)")

    def _entry(self, clip: Clip, cfg_hash: str) -> Path:
        st = clip.path.stat()
        ident = f"{cfg_hash}|{clip.path.resolve()}|{clip.offset}|{clip.length}|" \
                f"{st.st_size}|{st.st_mtime_ns}"
        name = hashlib.sha256(ident.encode()).hexdigest()
        return self.cache_dir / cfg_hash[:16] / name[:2] / f"{name}.npy"

    def features(self, clips: list[Clip], cfg: FrontendConfig, *,
                 progress: Callable[[int], None] | None = None,
                 persist: bool = True) -> np.ndarray:
        """(N, frames per clip, F) float32 for `clips`; `progress(n)` after each n done.

        persist=False computes every clip and stores nothing: for a frontend config of
        one user (a personalised normalisation), whose entries no one would read again.
        """
        n_frames = cfg.clip_frames
        out = np.zeros((len(clips), n_frames, cfg.n_features), dtype=np.float32)
        cfg_hash = cfg.hash()
        todo: list[tuple[int, Path | None]] = []
        for i, clip in enumerate(clips):
            if not persist:
                todo.append((i, None))
                continue
            entry = self._entry(clip, cfg_hash)
            try:
                arr = np.load(entry)
                if arr.shape != out.shape[1:]:
                    raise ValueError("shape")
                out[i] = arr
                self.hits += 1
                if progress:
                    progress(1)
            except (OSError, ValueError, EOFError):
                todo.append((i, entry))
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            audio = np.stack([load_clip(clips[i], cfg.sample_rate) for i, _ in chunk])
            feats = features(audio, cfg)
            for (i, entry), f in zip(chunk, feats, strict=True):
                out[i] = f
                if entry is not None and self.write_error is None:
                    try:
                        atomic_save_npy(entry, f)
                    except OSError as exc:
                        self.write_error = exc
            self.misses += len(chunk)
            if progress:
                progress(len(chunk))
        return out
