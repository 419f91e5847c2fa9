"""Pauses in a feature stream: where a stream's network state should start from zero.

The network was pretrained on 1 s clips, each run from a zeroed state, and every online
update is learned that way too. A continuous stream never zeroes it: each word starts
from whatever the previous one, and the noise since, left in the neurons and the
readout. So the frontend marks the frame that ends a pause, and the learner zeroes that
stream's state once it has stepped it (docs/runtime.md "Pauses").

A pause: after speech (a frame `start_db` above the noise floor), `quiet` frames in a row
within `stop_db` of it. The last of them is flagged, once per pause.
The level of a frame is the mean of its static log-mel channels in dB, read from the
features themselves (un-normalised with the frontend's own mean and std), so the flags
are the same in a stream and in a batch and cost a few float operations per frame.
The noise floor is the lowest level seen, rising by `rise_db` per frame after it
(minimum statistics, constant time), so it follows a room that gets louder.

    PauseDetector(frontend_cfg, PauseConfig()).step(frame) -> bool
    PauseDetector(frontend_cfg).run(frames (T, F)) -> (T,) bool
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprop.errors import ConfigError
from edgeprop.frontend import FrontendConfig

_DB_PER_NEPER = 10.0 / np.log(10.0)  # log-mel is a natural log of power


@dataclass(frozen=True)
class PauseConfig:
    quiet: int = 20          # frames (10 ms) near the floor that make a pause
    start_db: float = 15.0   # speech: this far above the floor
    stop_db: float = 8.0     # quiet: within this of the floor
    rise_db: float = 0.01    # how fast the floor follows a louder room, dB per frame

    def __post_init__(self) -> None:
        if self.quiet < 1:
            raise ConfigError(f"a pause needs >= 1 quiet frame, got {self.quiet}")
        if not 0.0 < self.stop_db <= self.start_db:
            raise ConfigError(f"need 0 < stop_db <= start_db, got {self.stop_db}, "
                              f"{self.start_db}")
        if not self.rise_db >= 0.0:
            raise ConfigError(f"rise_db must be >= 0, got {self.rise_db}")


class PauseDetector:
    """One per stream, beside its StreamingFrontend: `step(frame)` is True on the frame
    that ends a pause."""

    def __init__(self, frontend_cfg: FrontendConfig, cfg: PauseConfig | None = None):
        self.cfg = cfg or PauseConfig()
        m = frontend_cfg.n_mels
        self._m = m
        if frontend_cfg.normalized:
            std = np.asarray(frontend_cfg.norm_std[:m], np.float64)
            mean = np.asarray(frontend_cfg.norm_mean[:m], np.float64)
        else:
            std, mean = np.ones(m), np.zeros(m)
        # mean_c(x_c std_c + mean_c) in dB as one dot product: per frame on the hot path
        self._w = _DB_PER_NEPER * std / m
        self._b = _DB_PER_NEPER * float(mean.mean())
        self.reset()

    def reset(self) -> None:
        self._floor: float | None = None
        self._quiet = 0
        self._armed = False  # speech seen since the last pause

    def level_db(self, frames: np.ndarray) -> np.ndarray:
        """(..., F) features -> (...) frame level, dB of the mean static log-mel power."""
        return np.asarray(frames)[..., :self._m] @ self._w + self._b

    def _next(self, level: float) -> bool:
        c = self.cfg
        if self._floor is None or level < self._floor:
            self._floor = level
        else:
            self._floor += c.rise_db
        if level > self._floor + c.start_db:
            self._armed, self._quiet = True, 0
        elif level < self._floor + c.stop_db:
            self._quiet += 1
            if self._armed and self._quiet >= c.quiet:
                self._armed = False
                return True
        else:
            self._quiet = 0
        return False

    def step(self, frame: np.ndarray) -> bool:
        return self._next(float(self.level_db(frame)))

    def run(self, frames: np.ndarray) -> np.ndarray:
        """Flags for a whole (T, F) feature array, as `step` frame by frame gives them."""
        return np.array([self._next(float(v)) for v in self.level_db(frames)], dtype=bool)
