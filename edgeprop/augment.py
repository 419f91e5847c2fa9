"""Training-time augmentation: background noise at a chosen SNR, time shift, gain.

For a clip x (1 s, float32) and an rng, in this order::

    shift  x <- x shifted by s ~ U{-shift, .., +shift} samples, zero-filled (no wrap)
    noise  with probability p_noise: a random 1 s segment n of a random background
           recording is added at SNR ~ U(snr_db): x <- x + n * g,
           g = sqrt(P_x / (P_n 10^(SNR/10))) with P the mean power; a silent clip
           (P_x = 0) gets the noise at its recorded level instead
    gain   x <- x 10^(G/20), G ~ U(gain_db), then clipped to [-1, 1]

Everything is drawn from the rng passed in, so a seeded run is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeprop.audio import load_wav
from edgeprop.datasets import NOISE_DIR
from edgeprop.errors import ConfigError, DatasetError


def load_background_noise(root: str | Path) -> list[np.ndarray]:
    """The `_background_noise_/*.wav` recordings of a Speech Commands folder (float32)."""
    folder = Path(root) / NOISE_DIR
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no background noise folder")
    noise = [load_wav(p) for p in sorted(folder.glob("*.wav"))]
    if not noise:
        raise DatasetError(f"{folder}: no .wav files")
    return noise


class Augmenter:
    """Callable `aug(audio, rng) -> audio`; see the module docstring for the maths."""

    def __init__(self, noise: list[np.ndarray] | None = None, snr_db=(0.0, 20.0),
                 shift_ms: float = 100.0, gain_db=(-6.0, 6.0), p_noise: float = 0.8,
                 sample_rate: int = 16000):
        self.noise = [np.asarray(n, dtype=np.float32) for n in (noise or [])]
        if not 0.0 <= p_noise <= 1.0:
            raise ConfigError(f"p_noise must be in [0, 1], got {p_noise}")
        if snr_db[0] > snr_db[1] or gain_db[0] > gain_db[1] or shift_ms < 0:
            raise ConfigError("snr_db / gain_db must be (low, high) with low <= high, "
                              "shift_ms >= 0")
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.gain_db = (float(gain_db[0]), float(gain_db[1]))
        self.shift = int(round(shift_ms * sample_rate / 1000))
        self.p_noise = float(p_noise) if self.noise else 0.0

    def shift_audio(self, x: np.ndarray, s: int) -> np.ndarray:
        out = np.zeros_like(x)
        if s > 0:
            out[s:] = x[:-s]
        elif s < 0:
            out[:s] = x[-s:]
        else:
            out[:] = x
        return out

    def noise_segment(self, n: int, rng: np.random.Generator) -> np.ndarray:
        rec = self.noise[int(rng.integers(len(self.noise)))]
        if rec.shape[0] <= n:
            return np.resize(rec, n)
        start = int(rng.integers(0, rec.shape[0] - n + 1))
        return rec[start:start + n]

    def __call__(self, audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(audio, dtype=np.float32)
        if self.shift:
            x = self.shift_audio(x, int(rng.integers(-self.shift, self.shift + 1)))
        if self.p_noise and rng.random() < self.p_noise:
            n = self.noise_segment(x.shape[0], rng).astype(np.float64)
            snr = rng.uniform(*self.snr_db)
            p_x = float(np.mean(x.astype(np.float64) ** 2))
            p_n = float(np.mean(n ** 2))
            g = np.sqrt(p_x / (p_n * 10 ** (snr / 10))) if p_x > 0 and p_n > 0 else 1.0
            x = (x + n * g).astype(np.float32)
        gain = 10 ** (rng.uniform(*self.gain_db) / 20)
        return np.clip(x * np.float32(gain), -1.0, 1.0).astype(np.float32)
