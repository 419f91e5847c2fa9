"""Per-PE numba kernels equal their NumPy references; storage formats round as stated."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprop.network import ModelConfig
from edgeprop.optim import MOMENTUM
from firmware_model.chip import Sram
from firmware_model.kernels import (
    N_NEUR_ROWS,
    pe_step_kernel,
    pe_step_numpy,
    readout_step_kernel,
    readout_step_numpy,
    round_fp16_array,
)
from firmware_model.optimizer_kernel import (
    adam_store,
    adam_store_numpy,
    f16_tables,
    sgd_store,
    sgd_store_numpy,
)
from firmware_model.precision import VARIANTS, alloc_stored


def _consts(cfg):
    return np.array([cfg.alpha, cfg.rho, cfg.kappa, cfg.beta_eff, cfg.v_th,
                     cfg.gamma / cfg.v_th, 0.0, 0.02], np.float32)


@pytest.mark.parametrize("neuron,mode,fused", [("alif", 0, False), ("alif", 1, False),
                                               ("lif", 0, False), ("alif", 0, True)])
def test_pe_step_kernel_equals_numpy_reference(neuron, mode, fused):
    cfg = ModelConfig(neuron=neuron)
    rng = np.random.default_rng(0)
    n, n_in, n_rec = 10, cfg.n_in, cfg.n_rec
    w = (rng.standard_normal((n, n_in + n_rec)) * 0.3).astype(np.float32)
    states = []
    for _ in range(2):
        states.append(dict(neur=np.zeros((N_NEUR_ROWS, n), np.float32),
                           pre=np.zeros((2, n_in + n_rec), np.float32),
                           eps_a=np.zeros((n, n_in + n_rec), np.float32),
                           ebar=np.zeros((n, n_in + n_rec), np.float32),
                           acc=np.zeros((n, n_in + n_rec), np.float32)))
    spk, spk_out = np.zeros(n_rec, np.int64), np.zeros(n, np.int64)
    fired = 0
    for t in range(30):
        x = rng.standard_normal(n_in).astype(np.float32)
        zin = (rng.random(n_rec) < 0.2).astype(np.uint8)
        a, b = states
        n_out, active, n_rx = pe_step_kernel(
            x, zin.copy(), w[:, :n_in], w[:, n_in:], a["neur"], a["pre"], a["eps_a"],
            a["ebar"], a["acc"], _consts(cfg), spk, spk_out, mode, neuron == "alif", fused,
            False)
        idx = pe_step_numpy(x, zin, w[:, :n_in], w[:, n_in:], b["neur"], b["pre"], b["eps_a"],
                            b["ebar"], b["acc"], _consts(cfg), mode, neuron == "alif", fused)
        assert n_rx == zin.sum() and np.array_equal(spk_out[:n_out], idx)
        fired += n_out
        for k in a:
            assert np.array_equal(a[k], b[k]), (t, k)
    trace = "ebar" if mode == 1 else "acc"  # per_step: acc grows only with learning signals
    assert fired > 0 and np.abs(states[0][trace]).sum() > 0


def test_readout_kernel_equals_numpy_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((12, 120)).astype(np.float32)
    bufs = [[np.zeros(12, np.float32), np.zeros(12, np.float32), np.zeros(120, np.float32),
             np.zeros(120, np.float32)] for _ in range(2)]
    kappa = np.float32(ModelConfig().kappa)
    for _ in range(20):
        z = (rng.random(120) < 0.1).astype(np.float32)
        readout_step_kernel(z, w, *bufs[0], kappa, np.zeros(120, np.int64))
        readout_step_numpy(z, w, *bufs[1], kappa)
        for u, v in zip(*bufs, strict=True):
            assert np.array_equal(u, v)


def test_fp16_rounding_kernel_equals_numpy_cast():
    rng = np.random.default_rng(2)
    a = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s
                        for s in (1e-8, 1e-5, 1e-2, 1.0, 1e3, 6e4)])
    ties = ((rng.integers(0, 1024, 5000) + 0.5) / 1024 + 1).astype(np.float32)
    edges = [0, 2**-25, 3 * 2**-26, 65504, 65519, 65520, -65520, 1e6, -1e6, np.inf, -np.inf,
             np.nan, 6.103515625e-05, -6.103515625e-05, 6.1e-5]
    a = np.concatenate([a, -a, ties, np.array(edges, np.float32)])
    b = a.copy()
    round_fp16_array(b)
    with np.errstate(over="ignore", invalid="ignore"):  # beyond 65504 both give inf
        assert np.array_equal(b, a.astype(np.float16).astype(np.float32), equal_nan=True)


@pytest.mark.parametrize("fmt,rel", [("fp16", 1e-3), ("int16", 1e-4), ("int8", 1e-2)])
def test_stored_formats_round_trip_within_their_resolution(fmt, rel):
    s = Sram(0)
    st = alloc_stored(s, "weights", "w", (4, 50), fmt)
    x = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    st.write(x)
    err = np.abs(st.read() - x).max(axis=1) / np.abs(x).max(axis=1)
    assert (err <= rel).all()
    assert st.q.dtype.itemsize == {"fp16": 2, "int16": 2, "int8": 1}[fmt]


def test_stochastic_rounding_is_unbiased_for_small_updates():
    s = Sram(0)
    st = alloc_stored(s, "weights", "w", (1, 20000), "fp16")
    x = np.full((1, 20000), 1.0 + 2.0**-13, np.float32)  # a quarter of an fp16 step
    st.write(x, np.random.default_rng(4))
    mean = st.read().astype(np.float64).mean()
    assert abs(mean - x[0, 0]) < 2.0**-16
    st.write(x)  # nearest rounding drops the update entirely
    assert (st.read() == 1.0).all()


def _optimizer_state(prec, rng, shape):
    """w, m, v in the variant's formats, seeded with realistic, varied values."""
    s = Sram(0)
    w = alloc_stored(s, "weights", "w", shape, prec.weights)
    m = alloc_stored(s, "optimizer", "m", shape, prec.opt_m)
    v = alloc_stored(s, "optimizer", "v", shape, prec.opt_v, round_up=True)
    w.write((rng.standard_normal(shape) * 0.2).astype(np.float32))
    m.write((rng.standard_normal(shape) * 1e-3).astype(np.float32))
    v.write((rng.random(shape) * 1e-6).astype(np.float32) ** 2)
    return w, m, v


def _assert_same_stored(a, b, where) -> None:
    """Same storage dtype, same stored bits and (fixed point) the same row scales."""
    assert a.q.dtype == b.q.dtype and np.array_equal(a.q, b.q), where
    if b.scale is not None:
        assert np.array_equal(a.scale, b.scale), where


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adam_store_kernel_equals_numpy_reference(variant):
    """Every storage variant: same stored bits and scales, same generator state, 6 steps."""
    prec = VARIANTS[variant]
    rng = np.random.default_rng(5)
    shape = (10, 200)
    state = _optimizer_state(prec, rng, shape)
    ref = _optimizer_state(prec, np.random.default_rng(5), shape)
    w0 = ref[0].read().copy()
    gens = [np.random.default_rng(6) if prec.stochastic_rounding else None for _ in range(2)]
    for t in range(1, 7):
        g = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, -1, (shape[0], 1)))
        g = g.astype(np.float32)
        g[0, :5] = [0.0, -0.0, 1e-30, -1e-30, 3.0]  # zeros, f32 subnormal-ish, large
        adam_store(*state[:1], g, *state[1:], t, 2e-4, gens[0])
        adam_store_numpy(*ref[:1], g, *ref[1:], t, 2e-4, gens[1])
        for a, b in zip(state, ref, strict=True):
            _assert_same_stored(a, b, (variant, t, a.fmt))
    if gens[0] is not None:
        assert gens[0].random() == gens[1].random()
    assert not np.array_equal(state[0].read(), w0)  # the weights did move


@pytest.mark.parametrize("momentum", [0.0, MOMENTUM])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sgd_store_kernel_equals_numpy_reference(variant, momentum):
    """Plain SGD and heavy-ball momentum: same stored bits, scales and generator state."""
    prec = VARIANTS[variant]
    rng = np.random.default_rng(7)
    shape = (10, 200)
    # the momentum buffer lives where Adam's m does (program.py); plain SGD keeps none
    w, m, _ = _optimizer_state(prec, rng, shape)
    rw, rm, _ = _optimizer_state(prec, np.random.default_rng(7), shape)
    if momentum == 0.0:
        m = rm = None
    w0 = rw.read().copy()
    gens = [np.random.default_rng(8) if prec.stochastic_rounding else None for _ in range(2)]
    for _ in range(6):
        g = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 0, (shape[0], 1)))
        g = g.astype(np.float32)
        g[0, :4] = [0.0, -0.0, 1e-30, 3.0]
        sgd_store(w, g, m, 1e-2, momentum, gens[0])
        sgd_store_numpy(rw, g, rm, 1e-2, momentum, gens[1])
        for a, b in ((w, rw), (m, rm)):
            if b is not None:
                _assert_same_stored(a, b, (variant, a.fmt))
    if gens[0] is not None:
        assert gens[0].random() == gens[1].random()
    assert not np.array_equal(rw.read(), w0)  # the weights did move


def test_fp16_bit_helpers_equal_numpy_views():
    """_f16_bits / _f16_value / _f16_next against NumPy's own fp16, over every pattern."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    vals = bits.view(np.float16).astype(np.float32)
    got_vals, got_bits, up, down = f16_tables(bits, vals)
    finite = np.isfinite(vals)
    assert np.array_equal(got_vals, vals, equal_nan=True)
    assert np.array_equal(got_bits[~np.isnan(vals)], bits[~np.isnan(vals)])
    assert np.isnan(got_bits.view(np.float16)[np.isnan(vals)]).all()
    h = bits.view(np.float16)[finite]
    with np.errstate(over="ignore"):  # +-65504 step to +-inf, as the helpers' do
        assert np.array_equal(up[finite].view(np.float16), np.nextafter(h, np.float16(np.inf)))
        assert np.array_equal(down[finite].view(np.float16),
                              np.nextafter(h, np.float16(-np.inf)))
