"""Dense backpropagation through time: the ground truth for e-prop and sparse BPTT.

Forward loops `edgeprop.network.step` over time and records the trace. Backward runs
the adjoint recursion with the reset term detached (docs/learning.md), t = T-1 .. 0:

    ybar_adj[t] = dE/dy[t] + kappa ybar_adj[t+1]
    z_adj[t]    = W_out^T ybar_adj[t] + dE_reg/dz[t] + W_rec^T v_adj[t+1] + a_adj[t+1]
    v_adj[t]    = psi[t] z_adj[t] + alpha v_adj[t+1]
    a_adj[t]    = -beta psi[t] z_adj[t] + rho a_adj[t+1]
    dW_in  = sum_t v_adj[t]^T x[t],   dW_rec = sum_t v_adj[t]^T z[t-1] (diagonal 0)
    dW_out = sum_t ybar_adj[t]^T z[t]

(z[t] = H(v[t] - A[t]) with dz/dv = psi, dz/dA = -psi, A = v_th + beta a;
a[t+1] = rho a[t] + z[t]; the - v_th z[t-1] reset carries no gradient.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprop import losses
from edgeprop.errors import ConfigError
from edgeprop.network import DTYPE, ModelConfig, Params, init_state, pseudo_derivative, step


@dataclass
class Trace:
    """Recorded forward pass, all float32, time-major (T, B, ...)."""

    x: np.ndarray    # (T, B, n_in)
    v: np.ndarray    # (T, B, n_rec)
    thr: np.ndarray  # (T, B, n_rec)  A = v_th + beta a
    z: np.ndarray    # (T, B, n_rec)
    y: np.ndarray    # (T, B, n_out)


@dataclass
class Grads:
    """dE/dW for each learned matrix, same shapes as Params."""

    w_in: np.ndarray
    w_rec: np.ndarray
    w_out: np.ndarray

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (self.w_in, self.w_rec, self.w_out)


def _check_x(cfg: ModelConfig, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=DTYPE)
    if x.ndim != 3 or x.shape[2] != cfg.n_in:
        raise ConfigError(f"x must have shape (T, B, {cfg.n_in}), got {x.shape}")
    return x


def forward(cfg: ModelConfig, params: Params, x: np.ndarray) -> Trace:
    """Run the network over x (T, B, n_in) from the zero state, recording everything."""
    x = _check_x(cfg, x)
    T, B, _ = x.shape
    v = np.empty((T, B, cfg.n_rec), DTYPE)
    thr = np.empty_like(v)
    z = np.empty_like(v)
    y = np.empty((T, B, cfg.n_out), DTYPE)
    state = init_state(cfg, B)
    v_th, beta = DTYPE(cfg.v_th), DTYPE(cfg.beta_eff)
    for t in range(T):
        state, y[t] = step(cfg, params, state, x[t])
        v[t], z[t] = state.v, state.z
        thr[t] = v_th + beta * state.a
    return Trace(x=x, v=v, thr=thr, z=z, y=y)


def output_grads(
    cfg: ModelConfig,
    trace: Trace,
    labels: np.ndarray,
    *,
    loss: str = "mean",
    reg_coef: float = 0.0,
    target_rate: float = 0.02,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Loss and its direct gradients: (E, dE/dy (T,B,K), dE_reg/dz (T,B,n_rec))."""
    if loss == "mean":
        e, gy = losses.mean_readout_ce(trace.y, labels)
    elif loss == "per_step":
        e, gy = losses.per_step_ce(trace.y, labels)
    else:
        raise ConfigError(f"loss must be 'mean' or 'per_step', got {loss!r}")
    e_reg, gz = losses.rate_reg(trace.z, cfg.kappa, reg_coef, target_rate)
    return e + e_reg, gy, gz


def backward_core(
    cfg: ModelConfig,
    params: Params,
    x: np.ndarray,
    z: np.ndarray,
    psi: np.ndarray,
    gy: np.ndarray,
    gz: np.ndarray,
) -> Grads:
    """The adjoint recursion (module docstring) for a given surrogate psi = dz/dv.

    Dtype-generic: float64 inputs give a float64 result (used by the finite-difference
    test with a smooth surrogate); the public `backward` passes float32.
    """
    T, B, n = z.shape
    dt = z.dtype
    w_rec = params.w_rec.astype(dt)
    w_out = params.w_out.astype(dt)
    alpha, rho, kappa = dt.type(cfg.alpha), dt.type(cfg.rho), dt.type(cfg.kappa)
    beta = dt.type(cfg.beta_eff)
    v_adj = np.empty((T, B, n), dt)
    y_adj = np.zeros((B, cfg.n_out), dt)
    vn = np.zeros((B, n), dt)   # v_adj[t+1]
    an = np.zeros((B, n), dt)   # a_adj[t+1]
    g_out = np.zeros((cfg.n_out, n), dt)
    for t in range(T - 1, -1, -1):
        y_adj = gy[t] + kappa * y_adj
        g_out += y_adj.T @ z[t]
        z_adj = y_adj @ w_out + gz[t] + vn @ w_rec + an
        pz = psi[t] * z_adj
        vn = pz + alpha * vn
        an = rho * an - beta * pz
        v_adj[t] = vn
    flat_v = v_adj.reshape(T * B, n)
    g_in = flat_v.T @ x.reshape(T * B, -1).astype(dt)
    g_rec = v_adj[1:].reshape((T - 1) * B, n).T @ z[:-1].reshape((T - 1) * B, n)
    np.fill_diagonal(g_rec, 0.0)
    return Grads(w_in=g_in, w_rec=g_rec, w_out=g_out)


def backward(
    cfg: ModelConfig,
    params: Params,
    trace: Trace,
    labels: np.ndarray,
    *,
    loss: str = "mean",
    reg_coef: float = 0.0,
    target_rate: float = 0.02,
) -> Grads:
    """BPTT gradients (float32) of the loss (+ rate regulariser) for a recorded trace."""
    _, gy, gz = output_grads(
        cfg, trace, labels, loss=loss, reg_coef=reg_coef, target_rate=target_rate
    )
    psi = pseudo_derivative(cfg, trace.v, trace.thr)
    return backward_core(cfg, params, trace.x, trace.z, psi, gy, gz)


def loss_and_grads(
    cfg: ModelConfig,
    params: Params,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    loss: str = "mean",
    reg_coef: float = 0.0,
    target_rate: float = 0.02,
) -> tuple[float, Grads, Trace]:
    """Forward + backward in one call: (loss incl. regulariser, grads, trace)."""
    trace = forward(cfg, params, x)
    e, gy, gz = output_grads(
        cfg, trace, labels, loss=loss, reg_coef=reg_coef, target_rate=target_rate
    )
    psi = pseudo_derivative(cfg, trace.v, trace.thr)
    return e, backward_core(cfg, params, trace.x, trace.z, psi, gy, gz), trace
