"""Spike encoders: feature frames -> what crosses the wire and feeds the network.

Every encoder states `n_out` (width), `substeps` (network steps per 10 ms frame) and
`expected_sparsity`: the fraction of zero entries in its output, measured with
`edgeprop bench frontend` on 200 speech_commands_dev clips (frontend normalised on
the same clips; see docs/frontend.md). Batch `encode` and streaming `step` give
identical outputs; `reset` returns to the start of a stream.

- ``current``: x_t as input current (the paper's setting). Width F, 1 sub-step, dense.
- ``delta`` (send-on-delta, one up and one down channel per feature): with a
  per-feature reference r (starting at 0 = the normalised mean)::

      k_t = clip(trunc((x_t - r_{t-1}) / theta), -S, S)
      r_t = r_{t-1} + k_t theta
      up_f  spikes on sub-steps 0 .. k_t - 1   when k_t > 0
      down_f spikes on sub-steps 0 .. -k_t - 1 when k_t < 0

  Width 2F (up channels first), S sub-steps (default 1: one spike per frame at most,
  the reference then moves by one step per frame too).
- ``threshold``: z_t = H(x_t - theta) per feature (and H(-theta - x_t) on a second
  block of channels when two_sided). Width F (2F), 1 sub-step. Keeps the 80-input
  network shape with binary inputs.
"""

from __future__ import annotations

import inspect

import numpy as np

from edgeprop.errors import ConfigError, ProtocolError
from edgeprop.network import is_int, is_real

# Measured zero fractions (edgeprop bench frontend, 200 dev clips, normalised frontend).
EXPECTED_SPARSITY = {
    "current": 0.0,
    "delta": 0.865,
    "threshold": 0.772,
}


class Encoder:
    """Base: frames (T, F) -> (T * substeps, n_out) float32; stateful `step` per frame."""

    name: str = "base"
    n_in: int
    n_out: int
    substeps: int = 1

    @property
    def expected_sparsity(self) -> float:
        return EXPECTED_SPARSITY.get(self.name, float("nan"))

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """Whole sequence from a fresh state (does not touch the streaming state)."""
        raise NotImplementedError

    def step(self, frame: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        pass

    def to_dict(self) -> dict:
        return {"name": self.name, "n_in": self.n_in}

    def _check(self, frames: np.ndarray, ndim: int) -> np.ndarray:
        x = np.asarray(frames, dtype=np.float32, order="C")  # kernels take C order
        if x.ndim != ndim or x.shape[-1] != self.n_in:
            want = "(T, F)" if ndim == 2 else "(F,)"
            raise ConfigError(f"{self.name} encoder takes {want} with F={self.n_in}, "
                              f"got {x.shape}")
        return x


class CurrentEncoder(Encoder):
    name = "current"

    def __init__(self, n_features: int = 80):
        self.n_in = self.n_out = int(n_features)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return self._check(frames, 2).copy()

    def step(self, frame: np.ndarray) -> np.ndarray:
        return self._check(frame, 1)[None, :].copy()


class DeltaEncoder(Encoder):
    """Send-on-delta; the arithmetic is `encoder_kernels.delta_kernel` (one numba call
    per frame or per clip, held bit-equal to its NumPy reference by the tests)."""

    name = "delta"

    def __init__(self, n_features: int = 80, theta: float = 0.5, substeps: int = 1):
        from edgeprop.encoder_kernels import delta_kernel  # numba loads slowly: lazily

        if theta <= 0 or substeps < 1:
            raise ConfigError("delta encoder needs theta > 0 and substeps >= 1")
        self.n_in = int(n_features)
        self.n_out = 2 * self.n_in
        self.theta = float(theta)
        self.substeps = int(substeps)
        self._theta32 = np.float32(self.theta)
        self._kernel = delta_kernel
        self.encode(np.zeros((1, self.n_in), dtype=np.float32))  # compile now, not live
        self.reset()

    def reset(self) -> None:
        self._ref = np.zeros(self.n_in, dtype=np.float32)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        ref = np.zeros(self.n_in, dtype=np.float32)
        return self._kernel(self._check(frames, 2), ref, self._theta32, self.substeps)

    def step(self, frame: np.ndarray) -> np.ndarray:
        x = self._check(frame, 1)
        return self._kernel(x[None, :], self._ref, self._theta32, self.substeps)

    def to_dict(self) -> dict:
        return {"name": self.name, "n_in": self.n_in, "theta": self.theta,
                "substeps": self.substeps}


class ThresholdEncoder(Encoder):
    name = "threshold"

    def __init__(self, n_features: int = 80, theta: float = 0.5, two_sided: bool = False):
        self.n_in = int(n_features)
        self.theta = float(theta)
        self.two_sided = bool(two_sided)
        self.n_out = self.n_in * (2 if self.two_sided else 1)

    def _code(self, x: np.ndarray) -> np.ndarray:
        up = (x > np.float32(self.theta)).astype(np.float32)
        if not self.two_sided:
            return up
        return np.concatenate([up, (x < -np.float32(self.theta)).astype(np.float32)], axis=-1)

    def encode(self, frames: np.ndarray) -> np.ndarray:
        return self._code(self._check(frames, 2))

    def step(self, frame: np.ndarray) -> np.ndarray:
        return self._code(self._check(frame, 1))[None, :]

    def to_dict(self) -> dict:
        return {"name": self.name, "n_in": self.n_in, "theta": self.theta,
                "two_sided": self.two_sided}


ENCODERS = {"current": CurrentEncoder, "delta": DeltaEncoder, "threshold": ThresholdEncoder}


def make_encoder(name: str = "current", n_features: int = 80, **opts) -> Encoder:
    """Build an encoder by name ("current", "delta", "threshold")."""
    cls = ENCODERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    try:
        return cls(n_features, **opts)
    except TypeError as exc:
        raise ConfigError(f"bad options for encoder {name!r}: {exc}") from None


def encoder_from_dict(d: dict) -> Encoder:
    d = dict(d)
    name = d.pop("name", None)
    n_in = d.pop("n_in", 80)
    return make_encoder(name, n_in, **d)


def encoder_widths(d: dict) -> tuple[int, int]:
    """(features in, channels out) of an encoder config, checked without building it.

    A checkpoint load checks its encoder against the model with this: building a
    delta encoder compiles its numba kernel (seconds), and a config that does not fit
    would otherwise fail only when the first stream arrives. The width rules are the
    ones the classes' constructors apply (tests hold the two together)."""
    name = d.get("name")
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose from {sorted(ENCODERS)}")
    n_in = d.get("n_in", 80)
    if not is_int(n_in) or n_in < 1:
        raise ConfigError(f"{name} encoder: n_in must be an integer >= 1, got {n_in!r}")
    opts = {k: v for k, v in d.items() if k not in ("name", "n_in")}
    allowed = set(inspect.signature(ENCODERS[name]).parameters) - {"n_features"}
    if set(opts) - allowed:
        raise ConfigError(f"{name} encoder: unknown options {sorted(set(opts) - allowed)}"
                          + (f"; it takes {sorted(allowed)}" if allowed else ""))
    theta = opts.get("theta", 0.5)
    if not is_real(theta) or (name == "delta" and theta <= 0):
        raise ConfigError(f"{name} encoder: theta must be a number"
                          f"{' > 0' if name == 'delta' else ''}, got {theta!r}")
    substeps = opts.get("substeps", 1)
    if not is_int(substeps) or substeps < 1:
        raise ConfigError(f"{name} encoder: substeps must be an integer >= 1, got {substeps!r}")
    two_sided = opts.get("two_sided", False)
    if not isinstance(two_sided, (bool, np.bool_)):
        raise ConfigError(f"{name} encoder: two_sided must be true or false, got {two_sided!r}")
    n_out = 2 * n_in if name == "delta" or (name == "threshold" and two_sided) else n_in
    return int(n_in), int(n_out)


def pack_spikes(spikes: np.ndarray) -> bytes:
    """Binary array (any shape) -> bytes, 8 spikes a byte (np.packbits, row-major)."""
    s = np.asarray(spikes)
    b = s.astype(bool)
    if not np.array_equal(b, s):
        raise ProtocolError("pack_spikes takes 0/1 arrays only (use values for currents)")
    return np.packbits(b.ravel()).tobytes()


def unpack_spikes(data: bytes, shape) -> np.ndarray:
    """Inverse of pack_spikes: bytes + shape -> float32 0/1 array."""
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if len(data) != (n + 7) // 8:
        raise ProtocolError(f"{len(data)} spike bytes do not fit shape {shape} "
                            f"(expected {(n + 7) // 8})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n)
    return bits.reshape(shape).astype(np.float32)


def sparsity(spikes: np.ndarray) -> float:
    """Fraction of zero entries: the number `expected_sparsity` states."""
    s = np.asarray(spikes)
    return float((s == 0).mean()) if s.size else 1.0
