"""Storage formats for what a PE keeps in SRAM: fp32, fp16, int16, int8.

The Cortex-M4F computes in float32 only; lower precisions are *storage* formats:
a value is loaded, widened to float32 (VCVT for fp16, a multiply by the row scale for
fixed point), used, and rounded back on store. So every kernel reads through
`Stored.read()` and writes through `Stored.write()`, and the rounding error of a
variant is exactly what the chip would see.

Fixed-point arrays carry one float32 scale per row (per postsynaptic neuron), so a
row's largest magnitude maps to the format's largest integer. int8 matches the
SpiNNaker 2 MAC array's operand width (Hoeppner et al. 2021).

Rounding: round to nearest even, or stochastic rounding from the PE's random number
generator (SpiNNaker 2 PEs have a hardware PRNG/TRNG, Hoeppner et al. 2021). Stochastic
rounding keeps small weight updates alive in expectation where nearest rounding
would drop them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgeprop.errors import ConfigError

FORMATS = {
    "fp32": (np.float32, None),
    "fp16": (np.float16, None),
    "int16": (np.int16, 32767),
    "int8": (np.int8, 127),
    # e5m2: the upper byte of an fp16 (same exponent range, 2 mantissa bits); only for
    # non-negative values stored rounding up (Adam's v)
    "fp8": (np.uint8, None),
}


@dataclass(frozen=True)
class Precision:
    """One storage variant: a format per role, and whether e-prop's ebar is fused away.

    `fused` drops the filtered trace ebar and accumulates E = sum_t e[t] instead; the
    gradient then uses sum_t ebar[t] ~= E / (1 - kappa), which ignores the last ~tau_out
    steps' filter tail. It is an approximation (saves one trace per synapse).
    """

    name: str
    weights: str = "fp32"
    traces: str = "fp32"   # eps_a, ebar, accumulator
    opt_m: str = "fp32"
    opt_v: str = "fp32"
    fused: bool = False
    stochastic_rounding: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        for role in ("weights", "traces", "opt_m", "opt_v"):
            if getattr(self, role) not in FORMATS:
                raise ConfigError(f"unknown storage format {getattr(self, role)!r} for {role}")
        if self.weights == "fp8" or self.traces == "fp8" or self.opt_m == "fp8":
            raise ConfigError("fp8 (e5m2, rounded up) is only for the optimizer's v")
        if FORMATS[self.traces][1] is not None or FORMATS[self.opt_v][1] is not None:
            # traces and Adam's v span decades within a row; a per-row linear scale
            # would flush most of them to zero (v = 0 then divides by eps: huge steps).
            raise ConfigError("traces and optimizer v must be floating point (fp32 or fp16)")

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", description="everything float32: bit-exact with edgeprop e-prop"),
        Precision("fp16", "fp16", "fp16", "fp16", "fp16",
                  description="all per-synapse state fp16, nearest rounding"),
        Precision("fp16-sr", "fp16", "fp16", "fp16", "fp16", stochastic_rounding=True,
                  description="all per-synapse state fp16, weights stochastically rounded"),
        Precision("fp16-m8", "fp16", "fp16", "int8", "fp16", stochastic_rounding=True,
                  description="fp16 weights (stochastic rounding), traces and v; int8 Adam m"),
        Precision("int8w", "int8", "fp16", "int8", "fp16", stochastic_rounding=True,
                  description="int8 weights (MAC-array width, stochastic rounding), fp16 "
                              "traces and v, int8 Adam m"),
        Precision("int8w-v8", "int8", "fp16", "int8", "fp8", stochastic_rounding=True,
                  description="int8 weights and Adam m, fp16 traces, fp8 (e5m2, rounded "
                              "up) Adam v"),
        Precision("fp16-fused", "fp16", "fp16", "int8", "fp16", fused=True,
                  stochastic_rounding=True,
                  description="fp16-m8 with ebar fused into the accumulator (approximate)"),
        Precision("lean", "int8", "fp16", "int8", "fp8", fused=True, stochastic_rounding=True,
                  description="int8w-v8 with ebar fused into the accumulator (approximate)"),
    )
}

DEFAULT_PRECISION = "int8w-v8"

#: fp8 values are stored times 2^16 (exact), moving e5m2's range [2^-16, 57344] to
#: [2.3e-10, 0.875]: where Adam's v of our gradients lives (measured 1e-13 .. 2e-3 at
#: lr 1e-4); smaller v round up to 2.3e-10 (sqrt 1.5e-5 acts as Adam's eps), larger
#: ones saturate to inf (that synapse's step becomes 0: safe).
FP8_BIAS = 2.0**16
FP8_BIAS_INV = 2.0**-16


def get_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    if name not in VARIANTS:
        raise ConfigError(f"unknown precision {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


class Stored:
    """A 2-D (rows x cols) or 1-D array held in SRAM in one storage format.

    `q` is the SRAM array; fixed-point formats add `scale` (float32 per row), also in
    SRAM. The owner allocates both through the PE's allocator (see `alloc_stored`).
    """

    def __init__(self, q: np.ndarray, fmt: str, scale: np.ndarray | None,
                 round_up: bool = False) -> None:
        self.q = q
        self.fmt = fmt
        self.scale = scale
        self.qmax = FORMATS[fmt][1]
        self.round_up = round_up

    @property
    def is_f32(self) -> bool:
        return self.fmt == "fp32"

    def read(self) -> np.ndarray:
        """float32 values (a view for fp32: callers must not modify it)."""
        if self.fmt == "fp32":
            return self.q
        if self.fmt == "fp8":
            h = (self.q.astype(np.uint16) << np.uint16(8)).view(np.float16).astype(np.float32)
            return h * np.float32(FP8_BIAS_INV)
        if self.qmax is None:
            return self.q.astype(np.float32)
        s = self.scale if self.q.ndim == 1 else self.scale[:, None]
        return self.q.astype(np.float32) * s

    def write(self, x: np.ndarray, rng: np.random.Generator | None = None) -> None:
        """Store float32 values, rounding to the format (stochastically if rng given)."""
        x = np.asarray(x, dtype=np.float32)
        if self.fmt == "fp32":
            if x is not self.q:
                self.q[...] = x
            return
        if self.fmt == "fp8":
            if (x < 0).any():
                raise ValueError("fp8 storage holds non-negative values only")
            b = _round_fp16_up(x * np.float32(FP8_BIAS)).view(np.uint16)
            top = (b >> np.uint16(8)) + ((b & np.uint16(0xFF)) != 0)
            self.q[...] = np.minimum(top, 0x7C).astype(np.uint8)  # 0x7C00 = +inf
            return
        if self.qmax is None:
            if self.round_up:
                self.q[...] = _round_fp16_up(x)
            else:
                self.q[...] = _round_fp16(x, rng)
            return
        if self.q.ndim == 1:
            peak = np.abs(x).max(initial=0.0)
            self.scale[...] = peak / self.qmax if peak > 0 else 1.0
            s = self.scale
        else:
            peak = np.abs(x).max(axis=1, initial=0.0)
            self.scale[...] = np.where(peak > 0, peak / self.qmax, 1.0).astype(np.float32)
            s = self.scale[:, None]
        y = x / s
        y = np.floor(y + rng.random(y.shape, dtype=np.float32)) if rng is not None else np.rint(y)
        self.q[...] = np.clip(y, -self.qmax, self.qmax).astype(self.q.dtype)

    def zero(self) -> None:
        self.q[...] = 0
        if self.scale is not None:
            self.scale[...] = 1.0


def _round_fp16(x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """float32 -> float16, nearest-even or unbiased stochastic rounding."""
    near = x.astype(np.float16)
    if rng is None:
        return near
    n32 = near.astype(np.float32)
    err = x - n32
    toward = np.where(err >= 0, np.float16(np.inf), np.float16(-np.inf)).astype(np.float16)
    other = np.nextafter(near, toward)
    gap = other.astype(np.float32) - n32
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(np.isfinite(gap) & (gap != 0), err / gap, 0.0)
    take = rng.random(x.shape, dtype=np.float32) < p
    return np.where(take, other, near)


def _round_fp16_up(x: np.ndarray) -> np.ndarray:
    """float32 -> float16 rounding toward +inf (the FPU's RP mode, FPSCR.RMode = 01).

    Used for Adam's second moment v: a positive v never flushes to zero (which would
    make the step m / eps explode); a stored v is never below the true one, so a
    narrow-format step is never larger than the float32 step.
    """
    with np.errstate(over="ignore"):  # beyond fp16's range: +inf, on purpose
        near = x.astype(np.float16)
    low = near.astype(np.float32) < x
    return np.where(low, np.nextafter(near, np.float16(np.inf)), near)


def alloc_stored(sram, region: str, name: str, shape, fmt: str,
                 round_up: bool = False) -> Stored:
    """Allocate a Stored array (and its per-row scales for fixed point) in a PE's SRAM."""
    dtype, qmax = FORMATS[fmt]
    q = sram.alloc(region, name, shape, dtype)
    scale = None
    if qmax is not None:
        rows = shape[0] if len(shape) > 1 else 1
        scale = sram.alloc(region, name + ".scale", (rows,), np.float32)
        scale[...] = 1.0
    return Stored(q, fmt, scale, round_up=round_up)
