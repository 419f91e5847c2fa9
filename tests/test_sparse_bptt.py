"""Sparse BPTT: equals dense BPTT when the band covers everything, kernel == reference,
work proportional to the active entries, and the silent-layer guard."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprop import bptt, sparse_bptt
from edgeprop.errors import ConfigError
from edgeprop.network import ModelConfig, init_params
from edgeprop.optim import Adam
from edgeprop.sparse_kernels import REBASE

T_LONG = REBASE + 13  # long enough to exercise the lazy-leak rescale


def _net(neuron: str, recurrent: bool, n_in=12, n_rec=20, n_out=5, seed=1):
    cfg = ModelConfig(n_in=n_in, n_rec=n_rec, n_out=n_out, neuron=neuron, beta=0.6)
    p = init_params(cfg, seed)
    if not recurrent:
        p.w_rec[:] = 0.0
    return cfg, p


def _inputs(cfg, T=T_LONG, B=6, scale=1.5, seed=0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((T, B, cfg.n_in))).astype(np.float32)


def _rel(a, b):
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-30))


@pytest.mark.parametrize("neuron", ["alif", "lif"])
@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("loss", ["mean", "per_step"])
def test_sparse_equals_dense_when_band_covers_every_entry(neuron, recurrent, loss):
    cfg, p = _net(neuron, recurrent)
    x = _inputs(cfg)
    rng = np.random.default_rng(3)
    B = x.shape[1]
    labels = rng.integers(0, cfg.n_out, B) if loss == "mean" else \
        rng.integers(-1, cfg.n_out, (x.shape[0], B))
    kw = dict(loss=loss, reg_coef=0.7, target_rate=0.05)
    dense = bptt.backward(cfg, p, bptt.forward(cfg, p, x), labels, **kw)
    st = sparse_bptt.forward(cfg, p, x, b_th=cfg.v_th, keep_y=(loss == "per_step"))
    assert 0.0 < st.active_fraction < 1.0 and st.firing_rate > 0.0
    sparse = sparse_bptt.backward(cfg, p, st, labels, **kw)
    for name, gs, gd in zip(("w_in", "w_rec", "w_out"), sparse.arrays(), dense.arrays(),
                            strict=True):
        assert gs.dtype == np.float32
        assert _rel(gs, gd) < 2e-5, name
    assert np.all(np.diag(sparse.w_rec) == 0.0)


@pytest.mark.parametrize("neuron", ["alif", "lif"])
@pytest.mark.parametrize("recurrent", [True, False])
def test_fused_forward_equals_the_step_loop(neuron, recurrent):
    cfg, p = _net(neuron, recurrent, n_in=30, n_rec=40)
    x = _inputs(cfg, T=50, B=4, scale=1.0)
    ref = sparse_bptt.forward(cfg, p, x, b_th=0.25, keep_y=True)
    got = sparse_bptt.forward_fused(cfg, p, x, b_th=0.25, keep_y=True)
    assert ref.n_active > 0 and ref.spk_idx.size > 0
    for name in ("act_ptr", "act_idx", "spk_ptr", "spk_idx"):
        assert np.array_equal(getattr(ref, name), getattr(got, name)), name
    np.testing.assert_allclose(got.act_psi, ref.act_psi, atol=1e-6)
    np.testing.assert_allclose(got.y, ref.y, atol=1e-5)
    np.testing.assert_allclose(got.ybar, ref.ybar, atol=1e-5)
    np.testing.assert_array_equal(got.zw, ref.zw)


def test_sparse_loss_equals_dense_loss():
    cfg, p = _net("alif", True)
    x = _inputs(cfg)
    labels = np.arange(x.shape[1]) % cfg.n_out
    e_dense, _, _ = bptt.loss_and_grads(cfg, p, x, labels, reg_coef=0.3)
    e_sparse, _, _ = sparse_bptt.loss_and_grads(cfg, p, x, labels, b_th=0.1, reg_coef=0.3)
    assert e_sparse == pytest.approx(e_dense, rel=1e-5)


@pytest.mark.parametrize("loss", ["mean", "per_step"])
def test_kernel_equals_numpy_reference(loss):
    cfg, p = _net("alif", True, n_in=16, n_rec=24)
    x = _inputs(cfg, T=70, B=5)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, cfg.n_out, 5) if loss == "mean" else \
        rng.integers(-1, cfg.n_out, (70, 5))
    st = sparse_bptt.forward(cfg, p, x, b_th=0.3, keep_y=True)
    assert 0.0 < st.active_fraction < 0.5
    kw = dict(loss=loss, reg_coef=0.2)
    g_kernel = sparse_bptt.backward(cfg, p, st, labels, use_kernel=True, **kw)
    g_ref = sparse_bptt.backward(cfg, p, st, labels, use_kernel=False, **kw)
    for gk, gr in zip(g_kernel.arrays(), g_ref.arrays(), strict=True):
        assert _rel(gk, gr) < 2e-5


def test_narrow_band_gradient_stays_aligned_with_dense():
    cfg, p = _net("alif", True, n_in=30, n_rec=40)
    x = _inputs(cfg, T=60, B=8, scale=1.0)
    labels = np.arange(8) % cfg.n_out
    dense = bptt.backward(cfg, p, bptt.forward(cfg, p, x), labels)
    st = sparse_bptt.forward(cfg, p, x, b_th=0.3)
    sparse = sparse_bptt.backward(cfg, p, st, labels)
    a = np.concatenate([g.ravel() for g in sparse.arrays()])
    b = np.concatenate([g.ravel() for g in dense.arrays()])
    assert st.active_fraction < 0.5
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9


def _ops(cfg, p, x, labels, b_th):
    st = sparse_bptt.forward(cfg, p, x, b_th=b_th)
    stats: list = []
    sparse_bptt.backward(cfg, p, st, labels, stats=stats)
    return st, stats[0].ops


def test_backward_work_is_proportional_to_active_entries():
    """Operation counts (deterministic): ops = A (2 n + 2 + n_in) for the A active entries,
    plus one pass over the input and spike traces up to the last active step and a
    rescale every REBASE steps; dense BPTT does B T n (n_in + 2 n) multiply-adds whatever
    the activity."""
    cfg, p = _net("alif", True, n_in=40, n_rec=64)
    T, B = 100, 16
    labels = np.arange(B) % cfg.n_out
    n, n_in = cfg.n_rec, cfg.n_in
    rng = np.random.default_rng(0)
    x_busy = (1.5 * rng.standard_normal((T, B, n_in))).astype(np.float32)
    x_quiet = (0.1 * x_busy).astype(np.float32)  # weak drive: membranes stay far below threshold
    st_b, ops_b = _ops(cfg, p, x_busy, labels, cfg.v_th)
    st_q, ops_q = _ops(cfg, p, x_quiet, labels, 0.05)
    per_entry = 2 * n + 2 + n_in
    for st, ops in ((st_b, ops_b), (st_q, ops_q)):
        t_end = int(np.nonzero(np.diff(st.act_ptr))[0].max()) + 1 if st.n_active else 0
        fixed = t_end * B * (n_in + n) + ((T - 1) // REBASE) * B * n
        assert ops == st.n_active * per_entry + fixed
    assert 0 < st_q.n_active < st_b.n_active / 50
    dense_macs = T * B * n * (n_in + 2 * n)
    assert ops_b < dense_macs / 2
    assert ops_q * 10 < ops_b  # near silence: the trace pass only, an order below busy
    assert ops_q * 100 < dense_macs


def test_silent_layer_warns_and_gets_no_gradient():
    cfg, p = _net("alif", True)
    x = np.abs(_inputs(cfg))
    p.w_in[:] = -np.abs(p.w_in)  # every input pushes v down: the layer never fires
    labels = np.arange(x.shape[1]) % cfg.n_out
    with pytest.warns(sparse_bptt.SilentLayerWarning, match="near silent"):
        _, g, st = sparse_bptt.loss_and_grads(cfg, p, x, labels, b_th=0.1)
    assert st.n_active == 0 and st.firing_rate == 0.0
    assert not np.any(g.w_in) and not np.any(g.w_rec)


def test_rate_regulariser_holds_a_fading_layer_at_the_target_rate():
    """From a layer fading toward silence (rate < 1 %), sparse BPTT with the regulariser
    brings the rate to the target; without it the rate goes wherever the task takes it."""
    cfg, p0 = _net("alif", True, n_in=20, n_rec=30)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((60, 8, cfg.n_in))).astype(np.float32)
    p0.w_in *= np.float32(0.3)  # weak input: the layer fades
    labels = np.arange(8) % cfg.n_out
    target = 0.05
    start = sparse_bptt.forward(cfg, p0, x, b_th=0.3).firing_rate
    with pytest.warns(sparse_bptt.SilentLayerWarning):
        sparse_bptt.check_activity(sparse_bptt.forward(cfg, p0, x, b_th=0.3), min_rate=0.01)
    rates = {}
    for reg in (0.0, 200.0):
        p = p0.copy()
        opt = Adam(lr=0.01)
        for _ in range(40):
            _, g, _ = sparse_bptt.loss_and_grads(cfg, p, x, labels, b_th=0.3, reg_coef=reg,
                                                 target_rate=target, warn_silent=False)
            opt.step([p.w_in, p.w_rec, p.w_out], list(g.arrays()))
        rates[reg] = sparse_bptt.forward(cfg, p, x, b_th=0.3).firing_rate
    assert start < 0.01
    assert abs(rates[200.0] - target) < 0.01
    assert abs(rates[0.0] - target) > 2 * abs(rates[200.0] - target)


def test_bad_band_and_missing_readout_are_config_errors():
    cfg, p = _net("lif", False)
    x = _inputs(cfg, T=5, B=2)
    with pytest.raises(ConfigError):
        sparse_bptt.forward(cfg, p, x, b_th=0.0)
    st = sparse_bptt.forward(cfg, p, x, b_th=0.2)
    with pytest.raises(ConfigError, match="keep_y"):
        sparse_bptt.backward(cfg, p, st, np.zeros((5, 2), np.int64), loss="per_step")


def test_split_flat_equals_divmod():
    from edgeprop.sparse_kernels import split_flat, split_flat_reference

    rng = np.random.default_rng(4)
    for n in (1, 7, 120, 256, 1000, 65_537):
        flat = rng.integers(0, 2**31 - 1, 5000).astype(np.int32)
        flat[:4] = [0, n - 1, n, 2**31 - 1]
        b, j = np.empty_like(flat), np.empty_like(flat)
        split_flat(flat, n, b, j)
        rb, rj = split_flat_reference(flat, n)
        assert np.array_equal(b, rb) and np.array_equal(j, rj), n



@pytest.mark.parametrize("neuron", ["lif", "alif"])
@pytest.mark.parametrize("tau_m", [0.3, 0.05, 0.008])
def test_kernel_holds_to_the_reference_for_a_fast_leak(neuron, tau_m):
    """alpha^-32 overflows float32 once tau_m < 0.36: the kernel's lazy leak scales then
    went inf (wrong gradients under fastmath) while the reference stayed exact. It now
    rescales as often as the leak needs."""
    cfg = ModelConfig(n_in=3, n_rec=7, n_out=2, neuron=neuron, tau_m=tau_m)
    p = init_params(cfg, seed=1)
    x = (np.random.default_rng(0).standard_normal((40, 2, 3)) * 1.5).astype(np.float32)
    labels = np.array([1, 0])
    st = sparse_bptt.forward(cfg, p, x, b_th=10.0)  # the whole band: dense as well
    g_kernel = sparse_bptt.backward(cfg, p, st, labels, use_kernel=True)
    g_ref = sparse_bptt.backward(cfg, p, st, labels, use_kernel=False)
    _, g_dense = bptt.loss_and_grads(cfg, p, x, labels)[:2]
    for k, r, d in zip(g_kernel.arrays(), g_ref.arrays(), g_dense.arrays(), strict=True):
        assert np.isfinite(k).all()
        np.testing.assert_allclose(k, r, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r, d, rtol=1e-4, atol=1e-6)
