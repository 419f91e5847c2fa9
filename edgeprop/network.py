"""The spiking recurrent network: config, parameters, state and one time step.

Discrete-time LIF/ALIF neurons with a leaky readout (symbols as in DESIGN.md)::

    v_j[t] = alpha v_j[t-1] + sum_i W_in[j,i] x_i[t] + sum_i W_rec[j,i] z_i[t-1] - v_th z_j[t-1]
    a_j[t] = rho a_j[t-1] + z_j[t-1]                    (ALIF only; LIF has beta = 0)
    A_j[t] = v_th + beta a_j[t]
    z_j[t] = H(v_j[t] - A_j[t])
    y_k[t] = kappa y_k[t-1] + sum_j W_out[k,j] z_j[t]

with alpha = exp(-1/tau_m), rho = exp(-1/tau_a), kappa = exp(-1/tau_out), all time
constants in steps (one step = one 10 ms frame). The pseudo-derivative used by e-prop
and BPTT is psi_j = (gamma / v_th) max(0, 1 - |v_j - A_j| / v_th).

Parameters (what a checkpoint stores) are kept apart from state (what a reset clears).
`step` is the one implementation of the forward dynamics: e-prop, BPTT, the emulator's
reference and the runtime all call it (or hold their kernels to it in tests).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from edgeprop.errors import ConfigError

DTYPE = np.float32

#: The paper's keyword-spotting classes, in readout order (Warden 2018, 12-class task).
KWS_LABELS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "_silence_", "_unknown_",
)


def is_int(v) -> bool:
    """An integer of Python or NumPy, not a bool (configs read from JSON)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v) -> bool:
    """A real number of Python or NumPy, not a bool and not NaN."""
    return (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_)) and not math.isnan(v))


@dataclass(frozen=True)
class ModelConfig:
    """Shape and constants of the SRNN.

    Defaults are the reference keyword spotter of Rostami et al. 2022 (80-120-12 ALIF,
    tau_m 5 steps, tau_a 150 steps, beta 0.184, tau_out 10 steps). gamma = 0.3 is the
    pseudo-derivative dampening of Bellec et al. 2020. v_th = 1.0 is our choice: the
    threshold only sets the scale, which input normalisation and init absorb.
    """

    n_in: int = 80
    n_rec: int = 120
    n_out: int = 12
    neuron: str = "alif"  # "alif" | "lif"
    tau_m: float = 5.0
    tau_a: float = 150.0
    beta: float = 0.184
    v_th: float = 1.0
    tau_out: float = 10.0
    gamma: float = 0.3
    feedback: str = "symmetric"  # "symmetric" | "random"

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("n_in", "n_rec", "n_out"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.neuron not in ("alif", "lif"):
            raise ConfigError(f"neuron must be 'alif' or 'lif', got {self.neuron!r}")
        if self.feedback not in ("symmetric", "random"):
            raise ConfigError(f"feedback must be 'symmetric' or 'random', got {self.feedback!r}")
        for name in ("tau_m", "tau_a", "tau_out", "v_th", "gamma"):  # gamma 0: no gradient
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.beta < 0:  # adaptation raises the threshold after a spike, never lowers it
            raise ConfigError(f"beta must be >= 0, got {self.beta}")

    def _check_types(self) -> None:
        """Each field has its declared kind, so a hand-edited config (a checkpoint's
        meta.json: "v_th": "one", "n_in": 80.5) is named here, not met as a TypeError
        deep in the dynamics. Sizes are integers, constants real numbers (not NaN),
        neuron and feedback strings; bools are neither numbers nor sizes here."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                ok, kind = is_int(v), "an integer"
            elif f.type in ("float", float):
                ok, kind = is_real(v), "a number (not NaN)"
            else:
                ok, kind = isinstance(v, str), "a string"
            if not ok:
                raise ConfigError(f"{f.name} must be {kind}, got {v!r}")

    @property
    def alpha(self) -> float:
        return math.exp(-1.0 / self.tau_m)

    @property
    def rho(self) -> float:
        return math.exp(-1.0 / self.tau_a)

    @property
    def kappa(self) -> float:
        return math.exp(-1.0 / self.tau_out)

    @property
    def beta_eff(self) -> float:
        """beta as the dynamics use it: 0 for LIF."""
        return self.beta if self.neuron == "alif" else 0.0

    @property
    def n_weights(self) -> int:
        return self.n_in * self.n_rec + self.n_rec * self.n_rec + self.n_rec * self.n_out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class Params:
    """Learned weights (post x pre) plus the fixed feedback matrix B (n_rec x n_out).

    w_rec's diagonal is always zero (no self-connections); `REC_MASK` style masking
    is done by whoever updates it, via `zero_diagonal`.
    """

    w_in: np.ndarray   # (n_rec, n_in)
    w_rec: np.ndarray  # (n_rec, n_rec)
    w_out: np.ndarray  # (n_out, n_rec)
    b_fb: np.ndarray   # (n_rec, n_out), used when feedback == "random"

    def copy(self) -> "Params":
        return Params(*(np.array(a, dtype=DTYPE, copy=True) for a in self.arrays()))

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.w_in, self.w_rec, self.w_out, self.b_fb)

    def feedback(self, cfg: ModelConfig) -> np.ndarray:
        """B used for learning signals: W_out^T (symmetric) or the fixed random B."""
        return self.w_out.T if cfg.feedback == "symmetric" else self.b_fb


def zero_diagonal(w_rec: np.ndarray) -> np.ndarray:
    np.fill_diagonal(w_rec, 0.0)
    return w_rec


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
    """Seeded Gaussian init scaled by fan-in, so the first spikes come within a few steps."""
    rng = np.random.default_rng(seed)
    w_in = rng.standard_normal((cfg.n_rec, cfg.n_in)) * (cfg.v_th / math.sqrt(cfg.n_in))
    w_rec = rng.standard_normal((cfg.n_rec, cfg.n_rec)) * (cfg.v_th / math.sqrt(cfg.n_rec))
    w_out = rng.standard_normal((cfg.n_out, cfg.n_rec)) * (1.0 / math.sqrt(cfg.n_rec))
    b_fb = rng.standard_normal((cfg.n_rec, cfg.n_out)) * (1.0 / math.sqrt(cfg.n_out))
    p = Params(*(a.astype(DTYPE) for a in (w_in, w_rec, w_out, b_fb)))
    zero_diagonal(p.w_rec)
    return p


@dataclass
class State:
    """What a reset clears. Arrays have a leading batch axis, or none for one stream."""

    v: np.ndarray  # membrane potential, (..., n_rec)
    a: np.ndarray  # adaptation, (..., n_rec)
    z: np.ndarray  # spikes of the last step, (..., n_rec)
    y: np.ndarray  # readout, (..., n_out)

    def copy(self) -> "State":
        return State(self.v.copy(), self.a.copy(), self.z.copy(), self.y.copy())


def init_state(cfg: ModelConfig, batch: int | None = None) -> State:
    lead = () if batch is None else (batch,)
    zr = lambda n: np.zeros(lead + (n,), dtype=DTYPE)
    return State(zr(cfg.n_rec), zr(cfg.n_rec), zr(cfg.n_rec), zr(cfg.n_out))


def step(cfg: ModelConfig, params: Params, state: State, x: np.ndarray) -> tuple[State, np.ndarray]:
    """Advance one time step. x is (..., n_in); returns the new state and the readout y[t]."""
    x = np.asarray(x, dtype=DTYPE)
    z_prev = state.z
    v = (
        DTYPE(cfg.alpha) * state.v
        + x @ params.w_in.T
        + z_prev @ params.w_rec.T
        - DTYPE(cfg.v_th) * z_prev
    )
    a = DTYPE(cfg.rho) * state.a + z_prev
    thr = DTYPE(cfg.v_th) + DTYPE(cfg.beta_eff) * a
    z = (v > thr).astype(DTYPE)
    y = DTYPE(cfg.kappa) * state.y + z @ params.w_out.T
    return State(v, a, z, y), y


def pseudo_derivative(cfg: ModelConfig, v: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """psi = (gamma / v_th) max(0, 1 - |v - A| / v_th), the surrogate dz/dv."""
    g = DTYPE(cfg.gamma / cfg.v_th)
    return g * np.maximum(DTYPE(0.0), DTYPE(1.0) - np.abs(v - thr) / DTYPE(cfg.v_th))
