"""Sparse BPTT (Perez-Nieves & Goodman 2021), extended through recurrence and adaptation.

The forward pass is the usual one (`edgeprop.network.step`, looped over time), but it
keeps for the backward pass only:

- the *active* entries (b, t, j) with |v - A| < min(B_th, v_th): flat index b*n + j
  (int32, grouped by t) and psi there (float32). psi = 0 outside |v - A| < v_th, so
  with B_th >= v_th nothing is dropped and the gradients equal dense BPTT exactly;
- the spikes as indices (int32, grouped by t), for the recurrent input traces;
- the input x as it is (float32), for the input traces;
- the readout's time average ybar (mean loss) or y (per-step loss), and
  zw = sum_t tail[t] z[t] with tail[t] = sum_{s>=t} kappa^(s-t), which gives both the
  firing rate f = (1 - kappa)/T zw of the regulariser and dW_out of the mean loss.

Backward (reset detached, as in `edgeprop.bptt`): with h = psi z_adj at the active
entries only,

    z_adj[t] = W_out^T ybar_adj[t] + dE_reg/dz[t] + W_rec^T v_adj[t+1] + a_adj[t+1]
    v_adj[t] = h[t] + alpha v_adj[t+1],   a_adj[t] = -beta h[t] + rho a_adj[t+1]
    dW_in = sum_active h eps_in,  dW_rec = sum_active h eps_rec,  dW_out = sum_t ybar_adj[t]^T z[t]

(see `edgeprop.sparse_kernels` for why the leak needs no dense work). Outside the band
the surrogate is taken as zero, so a layer whose neurons all sit far from threshold
gets no gradient at all: `check_activity` warns (SilentLayerWarning) and the rate
regulariser (reg_coef, target_rate) pulls firing back toward the target.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from edgeprop import losses, sparse_kernels
from edgeprop.bptt import Grads, _check_x
from edgeprop.errors import ConfigError
from edgeprop.network import DTYPE, ModelConfig, Params, init_state, pseudo_derivative, step

#: Below these the layer is treated as (nearly) silent and a warning is raised.
MIN_ACTIVE_FRACTION = 1e-4
MIN_FIRING_RATE = 1e-4  # spikes per neuron per step


class SilentLayerWarning(UserWarning):
    """The recurrent layer barely fires or barely enters the band: gradients vanish."""


@dataclass
class SparseTrace:
    """What the sparse forward keeps for the backward pass (see module docstring)."""

    x: np.ndarray         # (T, B, n_in) float32, the input as given
    act_ptr: np.ndarray   # (T+1,) int64: entries of step t are act_ptr[t]:act_ptr[t+1]
    act_idx: np.ndarray   # (A,) int32 flat b * n_rec + j
    act_psi: np.ndarray   # (A,) float32 surrogate at the active entries
    spk_ptr: np.ndarray   # (T+1,) int64
    spk_idx: np.ndarray   # (S,) int32 flat b * n_rec + j
    ybar: np.ndarray      # (B, n_out) float64 mean readout
    y: np.ndarray | None  # (T, B, n_out) float32, only kept for the per-step loss
    zw: np.ndarray        # (B, n_rec) float64 sum_t tail[t] z[t]
    b_th: float

    @property
    def shape(self) -> tuple[int, int, int]:
        T, B, _ = self.x.shape
        return T, B, self.zw.shape[1]

    @property
    def n_active(self) -> int:
        return int(self.act_idx.size)

    @property
    def active_fraction(self) -> float:
        T, B, n = self.shape
        return self.n_active / float(T * B * n)

    @property
    def firing_rate(self) -> float:
        """Mean spikes per neuron per step."""
        T, B, n = self.shape
        return self.spk_idx.size / float(T * B * n)

    def nbytes(self, include_x: bool = True) -> int:
        """Bytes kept from forward for backward (x included unless told otherwise)."""
        arrays = [self.act_ptr, self.act_idx, self.act_psi, self.spk_ptr, self.spk_idx,
                  self.ybar, self.zw]
        if self.y is not None:
            arrays.append(self.y)
        if include_x:
            arrays.append(self.x)
        return int(sum(a.nbytes for a in arrays))


def readout_tail(cfg: ModelConfig, T: int) -> np.ndarray:
    """tail[t] = sum_{s=t}^{T-1} kappa^(s-t): how much z[t] weighs in sum_t y[t].

    Read-only and cached: every forward and backward of a training run asks for it.
    """
    return _tail(float(cfg.kappa), int(T))


@functools.lru_cache(maxsize=32)
def _tail(k: float, T: int) -> np.ndarray:
    tail = (1.0 - k ** (T - np.arange(T, dtype=np.float64))) / (1.0 - k)
    tail.setflags(write=False)
    return tail


def forward(
    cfg: ModelConfig, params: Params, x: np.ndarray, *, b_th: float = 0.1,
    keep_y: bool = False,
) -> SparseTrace:
    """Run the network over x (T, B, n_in) from the zero state, keeping only active entries.

    Loops the one step function (`network.step`); per step it extracts the entries
    within the band and the spikes. keep_y keeps the full readout (per-step loss).
    """
    if not b_th > 0:
        raise ConfigError(f"b_th must be > 0, got {b_th}")
    x = _check_x(cfg, x)
    T, B, _ = x.shape
    n = cfg.n_rec
    band = DTYPE(min(float(b_th), float(cfg.v_th)))  # psi == 0 beyond v_th anyway
    v_th, beta = DTYPE(cfg.v_th), DTYPE(cfg.beta_eff)
    tail = readout_tail(cfg, T)
    state = init_state(cfg, B)
    act_idx, act_psi, spk_idx = [], [], []
    act_ptr = np.zeros(T + 1, np.int64)
    spk_ptr = np.zeros(T + 1, np.int64)
    ysum = np.zeros((B, cfg.n_out), np.float64)
    zw = np.zeros((B, n), np.float64)
    y_all = np.empty((T, B, cfg.n_out), DTYPE) if keep_y else None
    for t in range(T):
        state, y = step(cfg, params, state, x[t])
        thr = v_th + beta * state.a
        dist = state.v - thr
        idx = np.flatnonzero(np.abs(dist) < band)
        vf, tf = state.v.ravel()[idx], thr.ravel()[idx]
        act_idx.append(idx.astype(np.int32))
        act_psi.append(pseudo_derivative(cfg, vf, tf))
        sidx = np.flatnonzero(state.z)
        spk_idx.append(sidx.astype(np.int32))
        act_ptr[t + 1] = act_ptr[t] + idx.size
        spk_ptr[t + 1] = spk_ptr[t] + sidx.size
        ysum += y
        if sidx.size:
            zw.ravel()[sidx] += tail[t]
        if keep_y:
            y_all[t] = y
    return SparseTrace(
        x=x, act_ptr=act_ptr, act_idx=np.concatenate(act_idx),
        act_psi=np.concatenate(act_psi).astype(DTYPE), spk_ptr=spk_ptr,
        spk_idx=np.concatenate(spk_idx), ybar=ysum / T, y=y_all, zw=zw, b_th=float(b_th),
    )


def forward_fused(
    cfg: ModelConfig, params: Params, x: np.ndarray, *, b_th: float = 0.1,
    keep_y: bool = False,
) -> SparseTrace:
    """`forward` in one compiled pass (`sparse_kernels.forward_kernel`): same equations
    and float32 arithmetic as `network.step`; only the summation order of the input and
    recurrent currents differs (one matrix product for x W_in^T, spike-driven sums), so
    results agree to float rounding (tests/test_sparse_bptt.py holds it to `forward`)."""
    if not b_th > 0:
        raise ConfigError(f"b_th must be > 0, got {b_th}")
    x = _check_x(cfg, x)
    T, B, n_in = x.shape
    n = cfg.n_rec
    i_in = (x.reshape(T * B, n_in) @ params.w_in.T).reshape(T, B, n)
    act_ptr = np.zeros(T + 1, np.int64)
    spk_ptr = np.zeros(T + 1, np.int64)
    ysum = np.zeros((B, cfg.n_out), np.float64)
    zw = np.zeros((B, n), np.float64)
    y_all = np.empty((T if keep_y else 0, B, cfg.n_out), DTYPE)
    f32 = lambda v: np.float32(v)
    act_idx, act_psi, spk_idx = sparse_kernels.forward_kernel(
        f32(cfg.alpha), f32(cfg.rho), f32(cfg.beta_eff), f32(cfg.kappa), f32(cfg.v_th),
        f32(cfg.gamma), f32(min(float(b_th), float(cfg.v_th))), i_in,
        np.ascontiguousarray(params.w_rec.T), np.ascontiguousarray(params.w_out.T),
        readout_tail(cfg, T), keep_y, act_ptr, spk_ptr, ysum, zw, y_all)
    return SparseTrace(
        x=x, act_ptr=act_ptr, act_idx=act_idx, act_psi=act_psi, spk_ptr=spk_ptr,
        spk_idx=spk_idx, ybar=ysum / T, y=y_all if keep_y else None, zw=zw,
        b_th=float(b_th))


def check_activity(
    trace: SparseTrace, *, min_active: float = MIN_ACTIVE_FRACTION,
    min_rate: float = MIN_FIRING_RATE,
) -> bool:
    """Warn (SilentLayerWarning) when the layer is near silent; True when it is healthy."""
    frac, rate = trace.active_fraction, trace.firing_rate
    problems = []
    if frac < min_active:
        problems.append(f"active fraction {frac:.2e} < {min_active:.0e} (B_th {trace.b_th})")
    if rate < min_rate:
        problems.append(f"firing rate {rate:.2e} < {min_rate:.0e} spikes/step")
    if problems:
        warnings.warn(
            "recurrent layer is near silent, sparse BPTT gradients vanish: "
            + "; ".join(problems)
            + ". Use the rate regulariser (reg_coef > 0), a wider B_th or another init.",
            SilentLayerWarning, stacklevel=2,
        )
        return False
    return True


@dataclass
class LossTerms:
    """Loss and the direct output gradients the backward pass is seeded with."""

    loss: float
    g_coef: np.ndarray  # (B, n_rec) float64: g_direct[b,t,j] = tail[t] g_coef[b,j] (+ per-step)
    y_adj: np.ndarray   # (T, B, K) float64 ybar_adj for the per-step loss, else empty
    d_mean: np.ndarray | None  # (B, K) dE/dybar for the mean loss


def loss_terms(
    cfg: ModelConfig, params: Params, trace: SparseTrace, labels: np.ndarray, *,
    loss: str = "mean", reg_coef: float = 0.0, target_rate: float = 0.02,
) -> LossTerms:
    """Task loss (edgeprop.losses) + rate regulariser, as factors for the sparse backward."""
    T, B, n = trace.shape
    y_adj = np.zeros((0, 0, 0), np.float64)
    d_mean = None
    if loss == "mean":
        # E depends on y only through ybar, dE/dybar = (softmax - onehot) / B, and the
        # gradient per step is dE/dybar / T for every t: ybar_adj[t] = tail[t] dE/dybar / T.
        e, d = losses.mean_ce(np.asarray(trace.ybar, np.float64), labels)
        d_mean = d / B / T
        g_coef = d_mean @ params.w_out.astype(np.float64)
    elif loss == "per_step":
        if trace.y is None:
            raise ConfigError("per_step loss needs forward(..., keep_y=True)")
        g_coef = np.zeros((B, n), np.float64)
        e, gy = losses.per_step_ce(trace.y, labels)
        y_adj = np.empty((T, B, cfg.n_out), np.float64)
        acc = np.zeros((B, cfg.n_out))
        for t in range(T - 1, -1, -1):
            acc = gy[t] + cfg.kappa * acc
            y_adj[t] = acc
    else:
        raise ConfigError(f"loss must be 'mean' or 'per_step', got {loss!r}")
    if reg_coef:
        # losses.rate_reg on the filtered rate: E = (c / 2B) sum (f - f*)^2,
        # dE/dz[t] = tail[t] (c / B) (f - f*) (1 - kappa) / T
        f = (1.0 - cfg.kappa) / T * trace.zw
        diff = f - target_rate
        e += 0.5 * reg_coef * float((diff**2).sum()) / B
        g_coef += (reg_coef / B) * diff * (1.0 - cfg.kappa) / T
    return LossTerms(loss=float(e), g_coef=g_coef, y_adj=y_adj, d_mean=d_mean)


@dataclass
class BackwardStats:
    """What one sparse backward did: operation count and working-array bytes."""

    ops: int
    work_bytes: int


def backward(
    cfg: ModelConfig, params: Params, trace: SparseTrace, labels: np.ndarray, *,
    loss: str = "mean", reg_coef: float = 0.0, target_rate: float = 0.02,
    use_kernel: bool = True, stats: list | None = None,
) -> Grads:
    """Sparse BPTT gradients (float32), same conventions as `edgeprop.bptt.backward`.

    use_kernel=False runs the NumPy reference (slow, for tests). When `stats` is a
    list, a BackwardStats is appended (the kernel path counts its operations).
    """
    terms = loss_terms(cfg, params, trace, labels, loss=loss, reg_coef=reg_coef,
                       target_rate=target_rate)
    return backward_from_terms(cfg, params, trace, terms, use_kernel=use_kernel, stats=stats)


def backward_from_terms(
    cfg: ModelConfig, params: Params, trace: SparseTrace, terms: LossTerms, *,
    use_kernel: bool = True, stats: list | None = None,
) -> Grads:
    T, B, n = trace.shape
    n_in = cfg.n_in
    tail = readout_tail(cfg, T)
    alpha, rho, beta = float(cfg.alpha), float(cfg.rho), float(cfg.beta_eff)
    w_rec = np.ascontiguousarray(params.w_rec, dtype=DTYPE)
    w_out = np.ascontiguousarray(params.w_out, dtype=DTYPE)
    if use_kernel and sparse_kernels.kernel_fits(alpha, rho):
        A, S = trace.n_active, trace.spk_idx.size
        act_b, act_j = np.empty(A, np.int32), np.empty(A, np.int32)
        spk_b, spk_j = np.empty(S, np.int32), np.empty(S, np.int32)
        h = np.empty(A, np.float64)
        h32 = np.empty(A, DTYPE)
        acc_r = np.empty((B, n), DTYPE)
        acc_q = np.empty((B, n), np.float64)
        g_in = np.zeros((n, n_in), DTYPE)
        g_rec = np.zeros((n, n), DTYPE)
        eps_in = np.empty((B, n_in), DTYPE)
        eps_rec = np.empty((B, n), DTYPE)
        ops = sparse_kernels.backward_kernel(
            alpha, rho, beta, DTYPE(alpha), trace.x, trace.act_ptr, trace.act_idx,
            trace.act_psi, trace.spk_ptr, trace.spk_idx, w_rec, tail, terms.g_coef,
            terms.y_adj, w_out, act_b, act_j, spk_b, spk_j, h, h32, acc_r, acc_q, g_in,
            g_rec, eps_in, eps_rec)
        work = sum(a.nbytes for a in (h, h32, act_b, act_j, spk_b, spk_j, acc_r, acc_q,
                                      eps_in, eps_rec))
    else:
        h = sparse_kernels.adjoint_reference(
            alpha, rho, beta, n, B, trace.act_ptr, trace.act_idx, trace.act_psi, w_rec,
            tail, terms.g_coef, terms.y_adj, w_out)
        g_in, g_rec = sparse_kernels.weight_grads_reference(
            alpha, n, trace.x, trace.act_ptr, trace.act_idx, h, trace.spk_ptr, trace.spk_idx)
        g_in, g_rec = g_in.astype(DTYPE), g_rec.astype(DTYPE)
        ops, work = -1, -1
    if terms.d_mean is not None:
        # sum_t ybar_adj[t]^T z[t] with ybar_adj[t] = tail[t] dE/dybar / T
        g_out = (terms.d_mean.T @ trace.zw).astype(DTYPE)
    else:
        g_out = np.zeros((cfg.n_out, n), np.float64)
        sparse_kernels.out_grads_kernel(n, trace.spk_ptr, trace.spk_idx, terms.y_adj, g_out)
        g_out = g_out.astype(DTYPE)
    if stats is not None:
        stats.append(BackwardStats(ops=int(ops), work_bytes=int(work)))
    return Grads(w_in=g_in, w_rec=g_rec, w_out=g_out)


def loss_and_grads(
    cfg: ModelConfig, params: Params, x: np.ndarray, labels: np.ndarray, *,
    b_th: float = 0.1, loss: str = "mean", reg_coef: float = 0.0, target_rate: float = 0.02,
    warn_silent: bool = True, fused: bool = True,
) -> tuple[float, Grads, SparseTrace]:
    """Sparse forward + backward: (loss incl. regulariser, grads, sparse trace).

    fused=True runs the compiled forward (`forward_fused`), else the `network.step` loop.
    """
    fwd = forward_fused if fused else forward
    trace = fwd(cfg, params, x, b_th=b_th, keep_y=(loss == "per_step"))
    if warn_silent:
        check_activity(trace)
    terms = loss_terms(cfg, params, trace, labels, loss=loss, reg_coef=reg_coef,
                       target_rate=target_rate)
    return terms.loss, backward_from_terms(cfg, params, trace, terms), trace


def logits(trace: SparseTrace) -> np.ndarray:
    """The mean readout ybar (B, n_out): what the mean loss classifies."""
    return trace.ybar
