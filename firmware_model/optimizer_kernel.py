"""A PE's optimizer step on its stored rows in one numba call, and its NumPy reference.

The reference, `adam_store_numpy`, is what the firmware model always meant: load w, m
and v through `Stored.read()`, run `edgeprop.optim.adam_step` (float32), store back
through `Stored.write()` (weights stochastically rounded when the variant says so, m
to nearest, v rounded up). Per PE that is some sixty small NumPy calls, about a third
of a training sample's wall time once the sample itself runs in one call; the kernel
does the same arithmetic, in the same float32 order, synapse by synapse. The random
numbers of stochastic rounding are drawn in NumPy with the same call as the reference,
so both consume the PE's generator identically and agree bit for bit
(tests/test_emulator_kernels.py holds the kernel to the reference for every variant).
SGD and momentum (`sgd_store`, reference `sgd_store_numpy` around
`edgeprop.optim.sgd_step`) follow the same pattern.

fp16 and fp8 arrays are handed to numba as their uint16 / uint8 bit patterns;
`_f16_bits` and `_f16_value` convert between those and float32 values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edgeprop.optim import ADAM_BETAS, ADAM_EPS, adam_step, sgd_step
from firmware_model.kernels import round_fp16
from firmware_model.precision import FP8_BIAS, FP8_BIAS_INV, Stored

FP32, FP16, FIXED, FP8 = range(4)
# stand-ins the kernel never reads: the scale of a float format, draws of nearest rounding
_NO_SCALE = np.ones(1, np.float32)
_NO_DRAWS = np.zeros((1, 1), np.float32)


def _code(s: Stored) -> int:
    if s.fmt == "fp32":
        return FP32
    if s.fmt == "fp8":
        return FP8
    return FP16 if s.qmax is None else FIXED


@njit(cache=True, inline="always")
def _f16_value(h):  # pragma: no cover - numba
    """fp16 bit pattern -> its value as float32 (exact)."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        val = np.float32(m) * np.float32(5.9604644775390625e-08)  # m * 2^-24
    elif e == 31:
        val = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        val = np.uint32(((e + 112) << 23) | (m << 13)).view(np.float32)
    return -val if h & 0x8000 else val


@njit(cache=True, inline="always")
def _f16_bits(r):  # pragma: no cover - numba
    """float32 value that fp16 holds exactly (or inf/NaN) -> its fp16 bit pattern."""
    b = np.float32(r).view(np.uint32)
    sign = np.uint16((b >> 16) & 0x8000)
    e = (b >> 23) & 0xFF
    if e == 255:
        man = (b >> 13) & 0x3FF
        if (b & 0x7FFFFF) != 0 and man == 0:
            man = 0x200
        return np.uint16(sign | 0x7C00 | man)
    if e >= 113:
        return np.uint16(sign | ((e - 112) << 10) | ((b >> 13) & 0x3FF))
    return np.uint16(sign | np.uint16(abs(r) * np.float32(16777216.0)))  # subnormal: r / 2^-24


@njit(cache=True, inline="always")
def _f16_next(h, up):  # pragma: no cover - numba
    """np.nextafter on fp16 bit patterns, toward +inf (up) or -inf; h finite."""
    if (h & 0x7FFF) == 0:
        return np.uint16(0x0001) if up else np.uint16(0x8001)
    if ((h & 0x8000) == 0) == up:
        return np.uint16(h + 1)
    return np.uint16(h - 1)


@njit(cache=True, boundscheck=False)
def f16_tables(bits, vals):  # pragma: no cover - numba
    """The helpers over arrays, for tests: values of `bits`, bits of `vals`, and each
    finite pattern's neighbours toward +inf and -inf."""
    n = bits.shape[0]
    got_vals = np.empty(n, np.float32)
    got_bits = np.empty(n, np.uint16)
    up = np.empty(n, np.uint16)
    down = np.empty(n, np.uint16)
    for i in range(n):
        got_vals[i] = _f16_value(bits[i])
        got_bits[i] = _f16_bits(vals[i])
        finite = (bits[i] & 0x7C00) != 0x7C00
        up[i] = _f16_next(bits[i], True) if finite else bits[i]
        down[i] = _f16_next(bits[i], False) if finite else bits[i]
    return got_vals, got_bits, up, down


@njit(cache=True, inline="always")
def _f16_round_up(x):  # pragma: no cover - numba
    """float32 -> fp16 bits, rounded toward +inf (precision._round_fp16_up)."""
    h = _f16_bits(round_fp16(x))
    if _f16_value(h) < x:
        h = _f16_next(h, True)
    return h


@njit(cache=True, inline="always")
def _load(q, scale, code, r, c):  # pragma: no cover - numba
    """Stored.read() of one element."""
    if code == FP32:
        return np.float32(q[r, c])
    if code == FP16:
        return _f16_value(np.uint16(q[r, c]))
    if code == FP8:
        return _f16_value(np.uint16(np.uint16(q[r, c]) << 8)) * np.float32(FP8_BIAS_INV)
    return np.float32(q[r, c]) * scale[r]


@njit(cache=True, inline="always")
def _store_row(q, scale, code, qmax, r, x, u, stochastic, round_up):  # pragma: no cover
    """Stored.write() of row r from the float32 values x (u: uniform draws)."""
    n = x.shape[0]
    if code == FP32:
        for c in range(n):
            q[r, c] = x[c]
    elif code == FP8:
        for c in range(n):
            b = _f16_round_up(x[c] * np.float32(FP8_BIAS))
            top = (b >> 8) + (1 if (b & 0xFF) != 0 else 0)
            q[r, c] = min(top, 0x7C)
    elif code == FP16:
        for c in range(n):
            if round_up:
                q[r, c] = _f16_round_up(x[c])
                continue
            near = round_fp16(x[c])
            h = _f16_bits(near)
            if stochastic and abs(near) < np.float32(np.inf):
                err = x[c] - near
                other = _f16_next(h, err >= np.float32(0.0))
                gap = _f16_value(other) - near
                p = np.float32(0.0)
                if abs(gap) < np.float32(np.inf) and gap != np.float32(0.0):
                    p = err / gap
                if u[r, c] < p:
                    h = other
            q[r, c] = h
    else:
        peak = np.float32(0.0)
        for c in range(n):
            peak = max(peak, abs(x[c]))
        s = peak / np.float32(qmax) if peak > np.float32(0.0) else np.float32(1.0)
        scale[r] = s
        for c in range(n):
            y = x[c] / s
            y = np.floor(y + u[r, c]) if stochastic else np.rint(y)
            q[r, c] = min(max(y, np.float32(-qmax)), np.float32(qmax))


@njit(cache=True, boundscheck=False)
def adam_store_kernel(wq, ws, w_code, w_qmax, mq, ms, m_code, m_qmax, vq, vs, v_code, g, u,
                      stochastic, step_size, sq, b1, c1, b2, c2, eps):  # pragma: no cover
    """edgeprop.optim.adam_step on stored rows: load, update, store, row by row."""
    n, k = g.shape
    p_row = np.empty(k, np.float32)
    m_row = np.empty(k, np.float32)
    v_row = np.empty(k, np.float32)
    for r in range(n):
        for c in range(k):
            gg = g[r, c]
            m = _load(mq, ms, m_code, r, c) * b1
            m = m + c1 * gg
            t = gg * gg
            v = _load(vq, vs, v_code, r, c) * b2
            t = t * c2
            v = v + t
            t = np.sqrt(v)
            t = t / sq
            t = t + eps
            t = m / t
            t = t * step_size
            p_row[c] = _load(wq, ws, w_code, r, c) - t
            m_row[c] = m
            v_row[c] = v
        _store_row(wq, ws, w_code, w_qmax, r, p_row, u, stochastic, False)
        _store_row(mq, ms, m_code, m_qmax, r, m_row, u, False, False)
        _store_row(vq, vs, v_code, 0, r, v_row, u, False, True)


@njit(cache=True, boundscheck=False)
def sgd_store_kernel(wq, ws, w_code, w_qmax, mq, ms, m_code, m_qmax, has_m, g, u, stochastic,
                     lr, momentum):  # pragma: no cover - numba
    """edgeprop.optim.sgd_step on stored rows (heavy-ball buffer m if has_m), row by row."""
    n, k = g.shape
    p_row = np.empty(k, np.float32)
    m_row = np.empty(k, np.float32)
    for r in range(n):
        for c in range(k):
            step = g[r, c]
            if has_m:
                step = _load(mq, ms, m_code, r, c) * momentum
                step = step + g[r, c]
                m_row[c] = step
            p_row[c] = _load(wq, ws, w_code, r, c) - lr * step
        if has_m:
            _store_row(mq, ms, m_code, m_qmax, r, m_row, u, False, False)
        _store_row(wq, ws, w_code, w_qmax, r, p_row, u, stochastic, False)


def _kernel_view(s: Stored) -> tuple[np.ndarray, np.ndarray, int, int]:
    q = s.q.view(np.uint16) if s.fmt == "fp16" else s.q
    scale = s.scale if s.scale is not None else _NO_SCALE
    return q, scale, _code(s), int(s.qmax or 0)


def _draws(w: Stored, shape: tuple[int, ...], rng: np.random.Generator | None):
    """Whether w is stochastically rounded, and the uniform draws Stored.write would take."""
    if w.q.ndim != 2:
        raise ValueError("the optimizer kernels update 2-D stored arrays (rows x synapses)")
    stochastic = rng is not None and w.fmt != "fp32"
    return stochastic, (rng.random(shape, dtype=np.float32) if stochastic else _NO_DRAWS)


def adam_store(w: Stored, g: np.ndarray, m: Stored, v: Stored, t: int, lr: float,
               rng: np.random.Generator | None) -> None:
    """One Adam step (step t >= 1) of the stored rows w with float32 gradients g."""
    stochastic, u = _draws(w, g.shape, rng)
    b1, b2 = ADAM_BETAS
    f = np.float32
    adam_store_kernel(*_kernel_view(w), *_kernel_view(m), *_kernel_view(v)[:3],
                      np.ascontiguousarray(g, np.float32), u, stochastic,
                      f(lr / (1.0 - b1**t)), f(np.sqrt(1.0 - b2**t)), f(b1), f(1.0 - b1),
                      f(b2), f(1.0 - b2), f(ADAM_EPS))


def adam_store_numpy(w: Stored, g: np.ndarray, m: Stored, v: Stored, t: int, lr: float,
                     rng: np.random.Generator | None) -> None:
    """The reference: Stored.read, edgeprop.optim.adam_step, Stored.write."""
    p = w.read().copy()
    mm, vv = m.read().copy(), v.read().copy()
    adam_step(p, g, mm, vv, np.empty_like(p), t, lr, *ADAM_BETAS, ADAM_EPS)
    m.write(mm)
    v.write(vv)
    w.write(p, rng)


def sgd_store(w: Stored, g: np.ndarray, m: Stored | None, lr: float, momentum: float,
              rng: np.random.Generator | None) -> None:
    """One SGD step of the stored rows w; heavy-ball momentum through m unless m is None."""
    stochastic, u = _draws(w, g.shape, rng)
    f = np.float32
    m_view = _kernel_view(m) if m is not None else _kernel_view(w)  # not read without m
    sgd_store_kernel(*_kernel_view(w), *m_view, m is not None,
                     np.ascontiguousarray(g, np.float32), u, stochastic, f(lr), f(momentum))


def sgd_store_numpy(w: Stored, g: np.ndarray, m: Stored | None, lr: float, momentum: float,
                    rng: np.random.Generator | None) -> None:
    """The reference: Stored.read, edgeprop.optim.sgd_step, Stored.write."""
    p = w.read().copy()
    b = m.read().copy() if m is not None else None
    sgd_step(p, np.asarray(g, np.float32), b, lr, momentum)
    if m is not None:
        m.write(b)
    w.write(p, rng)
