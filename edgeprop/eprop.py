"""Online e-prop (Bellec et al. 2020): a learner stepped one frame at a time.

Equations and time indices are those of docs/learning.md. Per step t, after the forward
step (`edgeprop.network.step`, or the fused numba kernel held equal to it):

    eps_in_i[t]  = alpha eps_in_i[t-1] + x_i[t]          one trace per presynaptic unit
    eps_rec_i[t] = alpha eps_rec_i[t-1] + z_i[t-1]
    eps_a_ji[t]  = psi_j[t-1] eps_v_i[t-1] + (rho - beta psi_j[t-1]) eps_a_ji[t-1]  (ALIF)
    e_ji[t]      = psi_j[t] (eps_v_i[t] - beta eps_a_ji[t])
    ebar_ji[t]   = kappa ebar_ji[t-1] + e_ji[t]
    zbar_j[t]    = kappa zbar_j[t-1] + z_j[t]

- loss="mean": acc_ji += ebar_ji[t] (S of learning.md). At `end_sample(label)`:
  grad_ji += (1/T)(L_j + c (1-kappa)(f_j - f*)) S_ji with L = B (pi - y*),
  f_j = (1-kappa)/T sum_t zbar_j[t]; grad_out += (pi - y*) (1/T) sum_t zbar[t]^T.
- loss="per_step": on a labelled step delta = softmax(y[t]) - onehot(label_t) and
  acc_ji += L_j[t] ebar_ji[t], L = B delta; grad_out += delta zbar[t]^T. With the
  regulariser, L_j[t] also gets c (1-kappa)(fhat_j[t] - f*), fhat_j[t] the running
  filtered rate (1-kappa)/t sum_{s<=t} zbar_j[s] since the last reset: an online
  stand-in for f_j, which is only known at the end (documented approximation).

Normalisation matches `edgeprop.losses` batches: `grads()` is the mean over samples
completed since the last `apply` (mean loss), or divided by the number of labelled steps
since then (per_step). So a learner fed samples one by one reproduces dense BPTT on the
batch exactly when W_rec = 0 and feedback is symmetric (tests/test_core_eprop.py).

Memory is constant in T: per synapse eps_a (ALIF), ebar and one accumulator. With the
mean loss a second per-synapse buffer exists only while grads of a finished sample wait
for `apply` *and* a new sample runs (mini-batches); applying after every sample (the
online default) keeps one.
"""

from __future__ import annotations

import math

import numpy as np

from edgeprop.bptt import Grads
from edgeprop.errors import ConfigError
from edgeprop.network import DTYPE, ModelConfig, Params, State, step, zero_diagonal
from edgeprop.optim import make_optimizer

_ROWS = ("v", "a", "z", "psi", "psi_prev", "zbar", "sum_zbar", "L", "z_prev")
_R = {name: i for i, name in enumerate(_ROWS)}


def _contig(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=DTYPE)


def check_param_shapes(cfg: ModelConfig, params: Params,
                       names: tuple[str, ...] = ("w_in", "w_rec", "w_out", "b_fb")) -> None:
    """Raise ConfigError unless each named matrix of params has the shape cfg implies."""
    expected = {"w_in": (cfg.n_rec, cfg.n_in), "w_rec": (cfg.n_rec, cfg.n_rec),
                "w_out": (cfg.n_out, cfg.n_rec), "b_fb": (cfg.n_rec, cfg.n_out)}
    for name in names:
        shape = np.shape(getattr(params, name))
        if shape != expected[name]:
            raise ConfigError(f"params.{name} has shape {shape}, expected {expected[name]}")


def sample_targets(label, T: int, n_out: int, per_step: bool) -> np.ndarray:
    """Per-step targets (T,) int64 of `train_sample`: all -1 (mean loss), else label (an int
    or a (T,) array, -1 = unlabelled) checked to lie in [-1, n_out)."""
    if not per_step:
        return np.full(T, -1, np.int64)
    targets = np.broadcast_to(np.asarray(label, np.int64), (T,)).copy()
    if targets.max() >= n_out or targets.min() < -1:
        raise ConfigError(f"labels must lie in [-1, {n_out})")
    return targets


def mean_loss_terms(sum_y: np.ndarray, sum_zbar: np.ndarray, fb: np.ndarray, T: float,
                    label: int, kappa: float, reg_coef: float, target_rate: float
                    ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """End of a sample, mean loss: (loss, d, coef, zsum/T, ybar), all in float64 but coef.

    ybar = sum_y / T, d = softmax(ybar) - onehot(label), loss = CE (+ rate regulariser
    0.5 c sum_j (f_j - f*)^2 with f = (1-kappa) sum_zbar / T) and the per-neuron gradient
    coefficient coef_j = (sum_k fb[k,j] d_k + c (1-kappa)(f_j - f*)) / T as float32.
    Shared by `EpropLearner.end_sample` and the emulator's readout PE.
    """
    ybar = sum_y.astype(np.float64) / T
    lse = ybar.max() + math.log(np.exp(ybar - ybar.max()).sum())
    d = np.exp(ybar - lse)
    d[label] -= 1.0
    loss = lse - ybar[label]
    zsum = sum_zbar.astype(np.float64)
    f = (1.0 - kappa) * zsum / T
    coef = fb.T.astype(np.float64) @ d
    if reg_coef:
        coef += reg_coef * (1.0 - kappa) * (f - target_rate)
        loss += 0.5 * reg_coef * float(((f - target_rate) ** 2).sum())
    coef = (coef / T).astype(DTYPE)
    return float(loss), d, coef, zsum / T, ybar


class EpropLearner:
    """Stateful e-prop learner for one stream (no batch axis); see module docstring."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        loss: str = "mean",
        optimizer: str = "adam",
        lr: float = 1e-3,
        reg_coef: float = 0.0,
        target_rate: float = 0.02,
        kernel: str = "numba",
    ) -> None:
        if loss not in ("mean", "per_step"):
            raise ConfigError(f"loss must be 'mean' or 'per_step', got {loss!r}")
        if kernel not in ("numba", "numpy"):
            raise ConfigError(f"kernel must be 'numba' or 'numpy', got {kernel!r}")
        if reg_coef < 0:
            raise ConfigError(f"reg_coef must be >= 0, got {reg_coef}")
        self.cfg = cfg
        # the kernel needs C-contiguous float32; fix up in place so callers keep one object
        params.w_in, params.w_rec = _contig(params.w_in), _contig(params.w_rec)
        params.w_out, params.b_fb = _contig(params.w_out), _contig(params.b_fb)
        check_param_shapes(cfg, params)
        self.params = params
        self.loss = loss
        self.kernel = kernel
        self.reg_coef = float(reg_coef)
        self.target_rate = float(target_rate)
        self.alif = cfg.neuron == "alif"
        self._mode = 0 if loss == "mean" else 1
        self.opt = make_optimizer(optimizer, lr)
        self.opt.init_state([params.w_in.shape, params.w_rec.shape, params.w_out.shape])
        n_rec, n_pre, n_out = cfg.n_rec, cfg.n_in + cfg.n_rec, cfg.n_out
        self._consts = np.array(
            [cfg.alpha, cfg.rho, cfg.kappa, cfg.beta_eff, cfg.v_th, cfg.gamma / cfg.v_th,
             self.reg_coef, self.target_rate], dtype=DTYPE)
        self._neur = np.zeros((len(_ROWS), n_rec), DTYPE)
        self._y = np.zeros(n_out, DTYPE)
        self._pre = np.zeros((2, n_pre), DTYPE)
        self._eps_a = np.zeros((n_rec, n_pre) if self.alif else (1, 1), DTYPE)
        self._ebar = np.zeros((n_rec, n_pre), DTYPE)
        self._acc: np.ndarray | None = np.zeros((n_rec, n_pre), DTYPE)
        self._g_syn: np.ndarray | None = None  # mean loss: grads of finished samples
        self._out_acc = np.zeros((n_out, n_rec), DTYPE)
        self._sum_y = np.zeros(n_out, DTYPE)
        self._stats = np.zeros(4, np.float64)
        self._spk = np.zeros(n_rec, np.int64)
        self._n_samples = 0
        self._fb_random = None if cfg.feedback == "symmetric" else _contig(params.b_fb.T)
        self.last_logits = np.zeros(n_out, DTYPE)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> State:
        """The neuron state (views: v, a, z, y) as `edgeprop.network` sees it."""
        n = self._neur
        return State(n[_R["v"]], n[_R["a"]], n[_R["z"]], self._y)

    def _fb(self) -> np.ndarray:
        """B^T as (n_out, n_rec): W_out itself (symmetric) or the fixed random B."""
        return self.params.w_out if self._fb_random is None else self._fb_random

    def _start_sample_counters(self) -> None:
        self._neur[_R["sum_zbar"]] = 0.0
        self._sum_y[:] = 0.0
        self._stats[:3] = 0.0

    def reset(self) -> None:
        """New sample: clear neuron state, traces and this sample's partial sums."""
        self._neur[:] = 0.0
        self._y[:] = 0.0
        self._pre[:] = 0.0
        self._eps_a[:] = 0.0
        self._ebar[:] = 0.0
        self._start_sample_counters()
        if self._mode == 0 and self._acc is not None:
            self._acc[:] = 0.0

    def _ensure_acc(self) -> np.ndarray:
        if self._acc is None:
            self._acc = np.zeros_like(self._ebar)
        return self._acc

    # ------------------------------------------------------------------ stepping
    def step(self, x: np.ndarray, target: int | None = None) -> np.ndarray:
        """One frame x (n_in,); per_step loss: target = this step's label or None."""
        x = np.asarray(x, dtype=DTYPE)
        if x.shape != (self.cfg.n_in,):
            raise ConfigError(f"x must have shape ({self.cfg.n_in},), got {x.shape}")
        t = -1 if target is None or self._mode == 0 else int(target)
        if t >= self.cfg.n_out:
            raise ConfigError(f"target {t} out of range [0, {self.cfg.n_out})")
        acc = self._ensure_acc()
        if self.kernel == "numba":
            from edgeprop.eprop_kernels import step_kernel

            p = self.params
            step_kernel(x, p.w_in, p.w_rec, p.w_out, self._fb(), self._neur, self._y, self._pre,
                        self._eps_a, self._ebar, acc, self._out_acc, self._sum_y, self._consts,
                        self._stats, self._spk, t, self._mode, self.alif)
        else:
            self._step_numpy(x, t, acc)
        return self._y.copy()

    def _step_numpy(self, x: np.ndarray, target: int, acc: np.ndarray) -> None:
        """The NumPy reference of one step (the kernel is held equal to this)."""
        cfg, p, n = self.cfg, self.params, self._neur
        c = self._consts
        alpha, rho, kappa, beta = c[0], c[1], c[2], c[3]
        z_prev = n[_R["z"]].copy()
        state, y = step(cfg, p, self.state, x)
        n[_R["z_prev"]] = z_prev
        n[_R["v"]], n[_R["a"]], n[_R["z"]] = state.v, state.a, state.z
        self._y[:] = y
        thr = c[4] + beta * state.a
        n[_R["psi_prev"]] = n[_R["psi"]]
        n[_R["psi"]] = c[5] * np.maximum(DTYPE(0), DTYPE(1) - np.abs(state.v - thr) / c[4])
        n[_R["zbar"]] = kappa * n[_R["zbar"]] + state.z
        n[_R["sum_zbar"]] += n[_R["zbar"]]
        self._sum_y += self._y
        self._stats[0] += 1
        eps, eps_prev = self._pre[0], self._pre[1]
        eps_prev[:] = eps
        ni = cfg.n_in
        eps[:ni] = alpha * eps[:ni] + x
        eps[ni:] = alpha * eps[ni:] + z_prev
        psi, psi_prev = n[_R["psi"]][:, None], n[_R["psi_prev"]][:, None]
        if self.alif:
            self._eps_a[:] = psi_prev * eps_prev[None, :] + (rho - beta * psi_prev) * self._eps_a
            e = psi * (eps[None, :] - beta * self._eps_a)
        else:
            e = psi * eps[None, :]
        self._ebar[:] = kappa * self._ebar + e
        if self._mode == 0:
            acc += self._ebar
            return
        L = np.zeros(cfg.n_rec, DTYPE)
        if target >= 0:
            y64 = self._y.astype(np.float64)
            lse = y64.max() + math.log(np.exp(y64 - y64.max()).sum())
            d = np.exp(y64 - lse)
            d[target] -= 1.0
            d = d.astype(DTYPE)
            self._stats[1:4] += (1.0, lse - y64[target], 1.0)
            L += self._fb().T @ d
            self._out_acc += np.outer(d, n[_R["zbar"]])
        if self.reg_coef != 0.0:
            rate = (DTYPE(1) - kappa) * n[_R["sum_zbar"]] * (DTYPE(1) / DTYPE(self._stats[0]))
            L += c[6] * (DTYPE(1) - kappa) * (rate - c[7])
        n[_R["L"]] = L
        acc += L[:, None] * self._ebar

    # ------------------------------------------------------------------ samples
    def end_sample(self, label: int | None = None) -> float:
        """Close the sample: mean loss forms and adds its grads. Returns the sample loss.

        per_step: the loss is the mean CE over this sample's labelled steps (nan if none).
        """
        T = self._stats[0]
        if T == 0:
            raise ConfigError("end_sample() called before any step of the sample")
        ybar = self._sum_y.astype(np.float64) / T
        self.last_logits = ybar.astype(DTYPE)
        if self._mode == 1:
            n_lab, ce = self._stats[1], self._stats[2]
            loss = ce / n_lab if n_lab else float("nan")
            self._n_samples += 1
            self._start_sample_counters()
            return float(loss)
        if label is None or not 0 <= int(label) < self.cfg.n_out:
            raise ConfigError(f"mean loss needs a label in [0, {self.cfg.n_out}), got {label!r}")
        loss, d, coef, zmean, _ = mean_loss_terms(
            self._sum_y, self._neur[_R["sum_zbar"]], self._fb(), T, int(label), self.cfg.kappa,
            self.reg_coef, self.target_rate)
        coef = coef[:, None]
        s = self._ensure_acc()
        if self._g_syn is None:
            s *= coef            # S becomes this sample's grads: no second buffer needed
            self._g_syn, self._acc = s, None
        else:
            self._g_syn += coef * s
            s[:] = 0.0
        self._out_acc += np.outer(d, zmean).astype(DTYPE)
        self._n_samples += 1
        self._start_sample_counters()
        return float(loss)

    def train_sample(self, x_seq: np.ndarray, label) -> tuple[float, np.ndarray]:
        """reset; step over x_seq (T, n_in); end_sample. Returns (loss, mean readout).

        per_step: label is an int (every step) or an int array (T,) with -1 = unlabelled.
        """
        xs = np.ascontiguousarray(x_seq, dtype=DTYPE)
        if xs.ndim != 2 or xs.shape[1] != self.cfg.n_in or xs.shape[0] < 1:
            raise ConfigError(f"x_seq must have shape (T, {self.cfg.n_in}), got {xs.shape}")
        targets = sample_targets(label, xs.shape[0], self.cfg.n_out, self._mode == 1)
        self.reset()
        acc = self._ensure_acc()
        if self.kernel == "numba":
            from edgeprop.eprop_kernels import run_kernel

            p = self.params
            run_kernel(xs, targets, p.w_in, p.w_rec, p.w_out, self._fb(), self._neur, self._y,
                       self._pre, self._eps_a, self._ebar, acc, self._out_acc, self._sum_y,
                       self._consts, self._stats, self._spk, self._mode, self.alif)
        else:
            for t in range(xs.shape[0]):
                self._step_numpy(xs[t], int(targets[t]), acc)
        loss = self.end_sample(label if self._mode == 0 else None)
        return loss, self.last_logits.copy()

    # ------------------------------------------------------------------ grads / apply
    def grads(self) -> Grads:
        """Accumulated gradients (copies), normalised as in the module docstring."""
        ni = self.cfg.n_in
        if self._mode == 0:
            scale = 1.0 / self._n_samples if self._n_samples else 0.0
            syn = self._g_syn if self._g_syn is not None else np.zeros_like(self._ebar)
        else:
            n_lab = self._stats[3]
            scale = 1.0 / n_lab if n_lab else (1.0 if self.reg_coef else 0.0)
            syn = self._ensure_acc()
        scale = DTYPE(scale)
        g_rec = syn[:, ni:] * scale
        zero_diagonal(g_rec)
        return Grads(w_in=syn[:, :ni] * scale, w_rec=g_rec, w_out=self._out_acc * scale)

    def apply(self) -> None:
        """Optimizer step on the accumulated grads, then zero them; W_rec diagonal stays 0."""
        if self._n_samples == 0 and self._stats[3] == 0 and not (
            self._mode == 1 and self.reg_coef
        ):
            return
        g = self.grads()
        p = self.params
        self.opt.step([p.w_in, p.w_rec, p.w_out], [g.w_in, g.w_rec, g.w_out])
        zero_diagonal(p.w_rec)
        self._out_acc[:] = 0.0
        self._n_samples = 0
        self._stats[3] = 0.0
        if self._mode == 0:
            if self._g_syn is not None:
                if self._acc is None:   # reuse the buffer: back to one per synapse
                    self._g_syn[:] = 0.0
                    self._acc = self._g_syn
                self._g_syn = None
        elif self._acc is not None:
            self._acc[:] = 0.0

    # ------------------------------------------------------------------ state I/O
    def optimizer_state(self) -> dict:
        return self.opt.state_dict()

    def load_optimizer_state(self, d: dict) -> None:
        self.opt.load_state_dict(d)

    def state_nbytes(self) -> dict[str, int]:
        """Bytes held, by part; total / n_weights is the bytes-per-synapse figure."""
        p = self.params
        weights = p.w_in.nbytes + p.w_rec.nbytes + p.w_out.nbytes
        if self._fb_random is not None:
            weights += self._fb_random.nbytes
        elig = self._ebar.nbytes + self._pre.nbytes + (self._eps_a.nbytes if self.alif else 0)
        accs = self._out_acc.nbytes + self._sum_y.nbytes + self._stats.nbytes
        for buf in (self._acc, self._g_syn):
            accs += 0 if buf is None else buf.nbytes
        neuron = self._neur.nbytes + self._y.nbytes + self._spk.nbytes
        return {
            "weights": weights,
            "optimizer": self.opt.nbytes(),
            "eligibility": elig,
            "accumulators": accs,
            "neuron_state": neuron,
        }
