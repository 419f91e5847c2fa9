"""Optimizers that update a list of float32 arrays in place (Adam, SGD with momentum).

Adam (Kingma & Ba 2015), with bias correction, per array p with gradient g:

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

SGD with momentum mu:  buf = mu buf + g;  p -= lr buf   (plain SGD when mu = 0).

State is allocated on the first `step` (or `init_state`) and is exposed as a flat dict of
arrays and floats so checkpoints can store it without pickling.
"""

from __future__ import annotations

import numpy as np

from edgeprop.errors import CheckpointError, ConfigError

DTYPE = np.float32


def _check_pairs(params: list[np.ndarray], grads: list[np.ndarray]) -> None:
    if len(params) != len(grads):
        raise ConfigError(f"{len(params)} params but {len(grads)} grads")
    for p, g in zip(params, grads, strict=True):
        if p.shape != g.shape:
            raise ConfigError(f"param shape {p.shape} != grad shape {g.shape}")


def check_state_for(d: dict, kind: float, hyper: dict[str, float]) -> int:
    """The step count of state dict `d`, or CheckpointError unless an optimizer of this
    kind and these hyperparameters made it. Adam's betas and eps, SGD's momentum say
    which optimizer made the buffers (plain and momentum SGD share a kind); another one
    is refused, not silently taken on. The learning rate is a setting, not state: the
    caller's wins (serve --lr on a resumed learner, alike on every backend)."""
    try:
        theirs, t = float(d["kind"]), int(d["t"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"optimizer state is missing or malformed: {exc}") from None
    if theirs != kind:
        raise CheckpointError(
            f"optimizer state is for another optimizer (kind {theirs}, expected {kind})")
    for k, mine in hyper.items():
        if k != "lr" and k in d and float(d[k]) != mine:
            raise CheckpointError(f"optimizer state is for {k} = {float(d[k]):g}, this "
                                  f"optimizer has {k} = {mine:g}")
    return t


class _Base:
    _slots: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.t = 0
        self.bufs: dict[str, list[np.ndarray]] = {}

    def init_state(self, shapes: list[tuple[int, ...]]) -> None:
        """Allocate zeroed state for arrays of these shapes (idempotent if shapes match)."""
        if self.bufs and [b.shape for b in self.bufs[self._slots[0]]] == list(shapes):
            return
        self.bufs = {s: [np.zeros(sh, DTYPE) for sh in shapes] for s in self._slots}
        self.t = 0

    def _ensure(self, params: list[np.ndarray]) -> None:
        shapes = [p.shape for p in params]
        if not self.bufs or [b.shape for b in self.bufs[self._slots[0]]] != shapes:
            self.init_state(shapes)

    def nbytes(self) -> int:
        return sum(b.nbytes for bl in self.bufs.values() for b in bl)

    def hyperparameters(self) -> dict[str, float]:
        """The settings stored beside the state (the emulator's PEs store the same)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray | float]:
        """Flat dict: hyperparameters and step count as floats, buffers as '<slot>.<i>'."""
        d: dict[str, np.ndarray | float] = {"kind": float(self._kind), "t": float(self.t)}
        d.update(self.hyperparameters())
        for slot, bl in self.bufs.items():
            for i, b in enumerate(bl):
                d[f"{slot}.{i}"] = b.copy()
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore buffers and step count from `state_dict()`, keeping this optimizer's
        learning rate; raises CheckpointError if the state is for another optimizer."""
        t = check_state_for(d, self._kind, self.hyperparameters())
        bufs: dict[str, list[np.ndarray]] = {}
        for slot in self._slots:
            i = 0
            bl = []
            while f"{slot}.{i}" in d:
                a = np.asarray(d[f"{slot}.{i}"])
                if a.dtype != DTYPE:
                    raise CheckpointError(f"optimizer buffer {slot}.{i} has dtype {a.dtype}")
                bl.append(a.copy())
                i += 1
            bufs[slot] = bl
        shapes = {s: [b.shape for b in bl] for s, bl in bufs.items()}
        if len({tuple(v) for v in shapes.values()}) > 1:
            raise CheckpointError("optimizer buffers have inconsistent shapes")
        if self.bufs:
            mine = [b.shape for b in self.bufs[self._slots[0]]]
            theirs = shapes[self._slots[0]]
            if theirs and theirs != mine:
                raise CheckpointError(
                    f"optimizer state shapes {theirs} do not match the model's {mine}"
                )
        self.bufs = bufs if bufs[self._slots[0]] else {}
        self.t = t


#: Adam's defaults, shared with the emulator's PEs (firmware_model.program)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: the heavy-ball coefficient of the 'momentum' optimizer, host and emulator alike
MOMENTUM = 0.9


class Adam(_Base):
    """Adam with bias correction; in-place float32 updates, no per-step allocation."""

    _slots = ("m", "v")
    _kind = 1.0

    def __init__(
        self, lr: float = 1e-3, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr}")
        self.lr = float(lr)
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self._tmp: list[np.ndarray] = []

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "b1": self.b1, "b2": self.b2, "eps": self.eps}

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        _check_pairs(params, grads)
        self._ensure(params)
        if [t.shape for t in self._tmp] != [p.shape for p in params]:
            self._tmp = [np.empty(p.shape, DTYPE) for p in params]
        self.t += 1
        for p, g, m, v, tmp in zip(
            params, grads, self.bufs["m"], self.bufs["v"], self._tmp, strict=True
        ):
            adam_step(p, np.asarray(g, DTYPE), m, v, tmp, self.t, self.lr, self.b1, self.b2,
                      self.eps)


def adam_step(p: np.ndarray, g: np.ndarray, m: np.ndarray, v: np.ndarray, tmp: np.ndarray,
              t: int, lr: float, b1: float, b2: float, eps: float) -> None:
    """One in-place float32 Adam update of p (step t >= 1), `tmp` a scratch array.

    The one implementation of the arithmetic: `Adam.step` and the emulator's PEs
    (firmware_model.program) both call it, so fp32 emulation is bit-exact with it.
    """
    step_size = DTYPE(lr / (1.0 - b1**t))
    sq = DTYPE(np.sqrt(1.0 - b2**t))
    m *= DTYPE(b1)
    m += DTYPE(1.0 - b1) * g
    np.multiply(g, g, out=tmp)
    v *= DTYPE(b2)
    tmp *= DTYPE(1.0 - b2)
    v += tmp
    # p -= lr/c1 * m / (sqrt(v)/sqrt(c2) + eps)
    np.sqrt(v, out=tmp)
    tmp /= sq
    tmp += DTYPE(eps)
    np.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


def sgd_step(p: np.ndarray, g: np.ndarray, buf: np.ndarray | None, lr: float,
             momentum: float) -> None:
    """One in-place float32 SGD update of p; heavy-ball momentum through `buf` if given.

    The one implementation of the arithmetic, like `adam_step`: `SGD.step` and the
    emulator's reference (firmware_model.optimizer_kernel) both call it.
    """
    if buf is None:
        p -= DTYPE(lr) * g
        return
    buf *= DTYPE(momentum)
    buf += g
    p -= DTYPE(lr) * buf


class SGD(_Base):
    """SGD with optional (heavy-ball) momentum; state only when momentum > 0."""

    _slots = ("buf",)
    _kind = 2.0

    def __init__(self, lr: float = 1e-2, momentum: float = 0.0) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {lr}")
        self.lr = float(lr)
        self.momentum = float(momentum)

    def hyperparameters(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def init_state(self, shapes: list[tuple[int, ...]]) -> None:
        if self.momentum != 0.0:  # plain SGD keeps no state
            super().init_state(shapes)

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        _check_pairs(params, grads)
        self.t += 1
        if self.momentum == 0.0:
            for p, g in zip(params, grads, strict=True):
                sgd_step(p, np.asarray(g, DTYPE), None, self.lr, 0.0)
            return
        self._ensure(params)
        for p, g, b in zip(params, grads, self.bufs["buf"], strict=True):
            sgd_step(p, np.asarray(g, DTYPE), b, self.lr, self.momentum)


#: the `kind` each optimizer name's state carries (what load_state_dict checks), for
#: stores of the same state elsewhere (the emulator's PEs)
OPTIMIZER_KINDS = {"adam": Adam._kind, "sgd": SGD._kind, "momentum": SGD._kind}


def make_optimizer(name: str, lr: float) -> Adam | SGD:
    """'adam' or 'sgd' (plain) or 'momentum' (SGD, momentum MOMENTUM)."""
    if name == "adam":
        return Adam(lr=lr)
    if name == "sgd":
        return SGD(lr=lr)
    if name == "momentum":
        return SGD(lr=lr, momentum=MOMENTUM)
    raise ConfigError(f"optimizer must be 'adam', 'sgd' or 'momentum', got {name!r}")
