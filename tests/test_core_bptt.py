"""Dense BPTT: checked against finite differences on a smooth twin of the network.

The spiking forward has H(.) with zero derivative almost everywhere, so finite
differences of the real network say nothing about the surrogate gradient. Instead we
build, test-only, the same network with z = sigmoid((v - A)/s) (a smooth spike) in
float64, hand BPTT's own adjoint recursion (`backward_core`) the exact derivative
psi = dz/dv of that sigmoid, and compare with central differences of the smooth loss.
The detached reset is modelled exactly: the reset term is a constant input taken from
the unperturbed run. This checks every path of the recursion (readout filter, recurrent
weights, adaptation, both losses, the rate regulariser) independently of e-prop.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeprop import bptt, losses
from edgeprop.network import ModelConfig, init_params

S = 0.3  # sigmoid width (in units of v_th)


def _smooth_forward(cfg, p, x, reset_z=None):
    T, B, _ = x.shape
    n = cfg.n_rec
    v = np.zeros((B, n))
    a = np.zeros((B, n))
    z = np.zeros((B, n))
    y = np.zeros((B, cfg.n_out))
    zs, ys, psis = [], [], []
    w_in, w_rec, w_out = (w.astype(np.float64) for w in (p.w_in, p.w_rec, p.w_out))
    for t in range(T):
        zr = z if reset_z is None else (reset_z[t - 1] if t > 0 else np.zeros((B, n)))
        v = cfg.alpha * v + x[t] @ w_in.T + z @ w_rec.T - cfg.v_th * zr
        a = cfg.rho * a + z
        thr = cfg.v_th + cfg.beta_eff * a
        s = 1.0 / (1.0 + np.exp(-(v - thr) / S))
        z = s
        y = cfg.kappa * y + z @ w_out.T
        zs.append(z)
        ys.append(y)
        psis.append(s * (1 - s) / S)
    return np.array(zs), np.array(ys), np.array(psis)


def _loss(cfg, zs, ys, labels, loss, c, f):
    e = (losses.mean_readout_ce if loss == "mean" else losses.per_step_ce)(ys, labels)[0]
    return e + losses.rate_reg(zs, cfg.kappa, c, f)[0]


@pytest.mark.parametrize("neuron", ["lif", "alif"])
@pytest.mark.parametrize("loss", ["mean", "per_step"])
def test_bptt_matches_finite_differences_on_smooth_network(neuron, loss):
    cfg = ModelConfig(n_in=5, n_rec=7, n_out=3, neuron=neuron, tau_a=20.0, beta=0.5)
    p = init_params(cfg, seed=1)
    rng = np.random.default_rng(2)
    T, B = 12, 2
    x = rng.standard_normal((T, B, cfg.n_in)) * 0.8
    if loss == "mean":
        labels = np.array([0, 2])
    else:
        labels = rng.integers(-1, cfg.n_out, size=(T, B))
    c, f = 0.5, 0.1
    zs, ys, psi = _smooth_forward(cfg, p, x)
    gy = (losses.mean_readout_ce if loss == "mean" else losses.per_step_ce)(ys, labels)[1]
    gz = losses.rate_reg(zs, cfg.kappa, c, f)[1]
    g = bptt.backward_core(cfg, p, x, zs, psi, gy, gz)
    assert g.w_in.dtype == np.float64

    eps = 1e-6
    for name in ("w_in", "w_rec", "w_out"):
        w = getattr(p, name)
        ana = getattr(g, name)
        for _ in range(6):
            idx = tuple(rng.integers(0, s) for s in w.shape)
            if name == "w_rec" and idx[0] == idx[1]:
                continue
            orig = w[idx]
            vals = []
            for sgn in (1, -1):
                q = p.copy()
                q.w_in, q.w_rec, q.w_out = (
                    a.astype(np.float64) for a in (q.w_in, q.w_rec, q.w_out)
                )
                getattr(q, name)[idx] = float(orig) + sgn * eps
                z2, y2, _ = _smooth_forward(cfg, q, x, reset_z=zs)
                vals.append(_loss(cfg, z2, y2, labels, loss, c, f))
            num = (vals[0] - vals[1]) / (2 * eps)
            assert ana[idx] == pytest.approx(num, rel=1e-5, abs=1e-8), (name, idx)
