"""The default continuous stream: real clips concatenated with gaps and background noise.

    embedded_clips() -> list[ClipRef]         the clips shipped in runtime/assets/clips
    folder_clips(root, per_label=3, seed=0) -> list[ClipRef]   from a Speech Commands folder
    build_stream(clips, *, gap_s=(0.3, 0.8), noise_gain=0.1, noise=None, seed=0,
                 trim=True) -> Stream
        Stream.audio (float32, 16 kHz), .events (list[StreamEvent]: t_start, t_end,
        label, label_index, source), .duration_s, .label_at(labels) -> per-frame
        (label index, window id) arrays for the frontend

Each clip is trimmed to its voiced part (energy above 5 % of its peak frame, with 100 ms
margins) when `trim`, so an event's window is the utterance, not the 1 s padding.
Between clips a gap of uniform random length in gap_s; background noise (the shipped
excerpt, looped, at noise_gain times its level) runs under the whole stream.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprop.audio import load_wav
from edgeprop.errors import DatasetError
from edgeprop.network import KWS_LABELS

ASSETS = Path(__file__).resolve().parent / "assets" / "clips"
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class ClipRef:
    path: Path
    label: str
    source: str


@dataclass(frozen=True)
class StreamEvent:
    t_start: float
    t_end: float
    label: str
    label_index: int
    source: str


@dataclass
class Stream:
    audio: np.ndarray
    events: list[StreamEvent]
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    def frame_labels(self, hop: int = 160) -> tuple[np.ndarray, np.ndarray]:
        """Per frame k (covering samples up to (k+1)*hop): (label index, window id), -1 = none.

        A frame belongs to an event when its hop ends inside [t_start, t_end).
        """
        n = len(self.audio) // hop
        lab = np.full(n, -1, np.int64)
        win = np.full(n, -1, np.int64)
        end_s = (np.arange(n) + 1) * hop / self.sample_rate
        for i, e in enumerate(self.events):
            sel = (end_s > e.t_start) & (end_s <= e.t_end)
            lab[sel] = e.label_index
            win[sel] = i
        return lab, win


def _manifest() -> dict:
    path = ASSETS / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"embedded clips missing ({path}); the package is incomplete")
    return json.loads(path.read_text())


def embedded_clips() -> list[ClipRef]:
    m = _manifest()
    return [ClipRef(ASSETS / c["file"], c["label"], c["origin"]) for c in m["clips"]]


def embedded_noise() -> np.ndarray:
    return _read(ASSETS / _manifest()["noise"]["file"])


def folder_clips(root: str | Path, per_label: int = 3, seed: int = 0) -> list[ClipRef]:
    """A few clips per keyword (+ _unknown_) from a Speech Commands folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"no folder {root}")
    rng = random.Random(seed)
    out = []
    for label in list(KWS_LABELS[:10]) + ["_unknown_"]:
        files = sorted((root / label).glob("*.wav"))
        rng.shuffle(files)
        out += [ClipRef(f, label, str(f.relative_to(root))) for f in files[:per_label]]
    if not out:
        raise DatasetError(f"{root} has no keyword folders (yes/, no/, ...)")
    return out


def _read(path: Path) -> np.ndarray:
    """The one audio loader (`edgeprop.audio.load_wav`): a corrupt, truncated, empty,
    stereo or NaN clip is an AudioError naming it, as in every other verb."""
    return load_wav(path, SAMPLE_RATE)


def trim_voiced(x: np.ndarray, frac: float = 0.05, margin_s: float = 0.1) -> np.ndarray:
    hop = 160
    n = len(x) // hop
    if n == 0:
        return x
    e = (x[: n * hop].reshape(n, hop) ** 2).mean(axis=1)
    on = np.flatnonzero(e >= frac * e.max())
    if on.size == 0:
        return x
    m = int(margin_s * SAMPLE_RATE)
    return x[max(0, on[0] * hop - m): min(len(x), (on[-1] + 1) * hop + m)]


def build_stream(clips: list[ClipRef], *, gap_s: tuple[float, float] = (0.3, 0.8),
                 noise_gain: float = 0.1, noise: np.ndarray | None = None, seed: int = 0,
                 trim: bool = True, shuffle: bool = True) -> Stream:
    """Concatenate clips (shuffled by seed) with random gaps, noise under everything."""
    rng = random.Random(seed)
    order = list(clips)
    if shuffle:
        rng.shuffle(order)
    parts: list[np.ndarray] = []
    events: list[StreamEvent] = []
    pos = int(rng.uniform(*gap_s) * SAMPLE_RATE)
    parts.append(np.zeros(pos, np.float32))
    for c in order:
        x = _read(c.path)
        if trim:
            x = trim_voiced(x)
        idx = KWS_LABELS.index(c.label) if c.label in KWS_LABELS else KWS_LABELS.index("_unknown_")
        events.append(StreamEvent(pos / SAMPLE_RATE, (pos + len(x)) / SAMPLE_RATE, c.label, idx,
                                  c.source))
        parts.append(x.astype(np.float32))
        gap = int(rng.uniform(*gap_s) * SAMPLE_RATE)
        parts.append(np.zeros(gap, np.float32))
        pos += len(x) + gap
    audio = np.concatenate(parts)
    if noise_gain > 0:
        nz = embedded_noise() if noise is None else np.asarray(noise, np.float32)
        reps = int(np.ceil(len(audio) / len(nz)))
        audio = audio + noise_gain * np.tile(nz, reps)[: len(audio)]
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return Stream(audio, events)


def truncate(stream: Stream, seconds: float) -> Stream:
    """The first `seconds` of a stream, keeping only the events that end inside it."""
    n = int(seconds * stream.sample_rate)
    return Stream(stream.audio[:n].copy(), [e for e in stream.events if e.t_end <= seconds],
                  stream.sample_rate)
