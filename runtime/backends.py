"""Backends the learner node hosts: where the online e-prop updates run.

- ``emulator`` (default): firmware_model.EmulatedLearner, the SpiNNaker 2 emulator
  (12 PEs by default), which runs the per-PE e-prop kernels and counts cycles/energy.
- ``reference``: edgeprop.eprop.EpropLearner, the plain NumPy e-prop.

Both expose the same learner interface (reset, step, end_sample, apply, ...). What the
node asks of a backend is small:

    learn_window(x_seq (T, n_in), label) -> loss
        one labelled utterance window, learned from a zeroed network state with the
        *mean* loss (cross-entropy of the time-averaged readout: the loss the model
        was pretrained with), then one optimizer step. Why mean and not per_step: an
        utterance is one label for the whole window, most of whose frames come before
        the word is complete; per-step targets would push the readout to commit
        before the evidence arrives.
    params            the live weights (updated in place by learn_window)
    optimizer_state() / profile() / close()

Inference on every frame does not go through the backend: it is `edgeprop.network.step`
on the shared weights (the one forward the emulator's kernels are held equal to by its
own tests), so a stream costs one forward per frame and no learner state.

    make_backend(name, cfg, params, *, lr=1e-4, optimizer_state=None, n_pes=12) -> Backend
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgeprop.errors import CheckpointError, ConfigError
from edgeprop.network import ModelConfig, Params

BACKENDS = ("emulator", "reference")
DEFAULT_ONLINE_LR = 1e-4


def warm_up(spare: Any, n_in: int) -> float:
    """Load (after an install: compile) a learner's numba kernels before any timed or
    live work: one zero window and one update on `spare`, a throwaway learner over a copy
    of the weights, which is then closed. Returns the seconds it took: about 0.75 s for
    the emulator in a new process, and about 45 s the first time after an install."""
    t0 = time.perf_counter()
    try:
        spare.train_sample(np.zeros((3, n_in), np.float32), 0)
        spare.apply()
    finally:
        close = getattr(spare, "close", None)
        if close:
            close()
    return time.perf_counter() - t0


class Backend:
    """A learner (emulated chip or reference) plus the bookkeeping the node needs."""

    name = "base"

    def __init__(self, learner: Any, cfg: ModelConfig, params: Params,
                 learner_kwargs: dict | None = None):
        self.learner = learner
        self._learner_kwargs = dict(learner_kwargs or {})
        self.cfg = cfg
        self._params = params
        self.windows = 0
        self.learn_s = 0.0
        self._refresh()

    @property
    def params(self) -> Params:
        """The weights inference uses: re-read from the learner after every update (the
        emulator gathers them from its PEs' SRAM, dequantised; the reference updates
        the very same arrays in place)."""
        return self._params

    def _refresh(self) -> None:
        self._params = getattr(self.learner, "params", self._params)

    def learn_window(self, x_seq: np.ndarray, label: int) -> float:
        """Learn one labelled window from a zero state (mean loss), apply one update."""
        x_seq = np.asarray(x_seq, dtype=np.float32)
        if x_seq.ndim != 2 or x_seq.shape[1] != self.cfg.n_in or x_seq.shape[0] == 0:
            raise ConfigError(f"a window must be (T>0, {self.cfg.n_in}), got {x_seq.shape}")
        if not 0 <= int(label) < self.cfg.n_out:
            raise ConfigError(f"label {label} out of range 0..{self.cfg.n_out - 1}")
        t0 = time.perf_counter()
        out = self.learner.train_sample(x_seq, int(label))  # reset, step over T, end_sample
        loss = float(out[0] if isinstance(out, tuple) else out)
        self.learner.apply()
        self._refresh()
        self.windows += 1
        self.learn_s += time.perf_counter() - t0
        return loss

    def warmup(self) -> float:
        """Compile/caches before the first real window (numba JIT would otherwise stall
        the stream for ~0.5 s at the first label); returns the seconds it took."""
        return warm_up(type(self.learner)(self.cfg, self.params.copy(),
                                          **self._learner_kwargs), self.cfg.n_in)

    def optimizer_state(self) -> dict | None:
        fn = getattr(self.learner, "optimizer_state", None)
        return fn() if fn else None

    def profile(self) -> dict:
        fn = getattr(self.learner, "profile", None)
        out = {"backend": self.name, "windows": self.windows, "learn_s": self.learn_s}
        if fn is not None:
            try:
                out["chip"] = fn()
            except Exception as exc:  # profiling must never take the learner down
                out["chip_error"] = f"{type(exc).__name__}: {exc}"
        return out

    def close(self) -> None:
        fn = getattr(self.learner, "close", None)
        if fn:
            fn()


class ReferenceBackend(Backend):
    name = "reference"


class EmulatorBackend(Backend):
    name = "emulator"


def make_backend(name: str, cfg: ModelConfig, params: Params, *, lr: float = DEFAULT_ONLINE_LR,
                 optimizer_state: dict | None = None, n_pes: int = 12) -> Backend:
    """Build a backend around `params` (the learner updates them in place or owns a copy)."""
    if name == "reference":
        from edgeprop.eprop import EpropLearner

        kwargs: dict = {"loss": "mean", "optimizer": "adam", "lr": lr}
        learner = EpropLearner(cfg, params, **kwargs)
        cls: type[Backend] = ReferenceBackend
    elif name == "emulator":
        from firmware_model import EmulatedLearner

        kwargs = {"n_pes": n_pes, "loss": "mean", "optimizer": "adam", "lr": lr}
        learner = EmulatedLearner(cfg, params, **kwargs)
        cls = EmulatorBackend
    else:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if optimizer_state:
        try:
            learner.load_optimizer_state(optimizer_state)
        except Exception as exc:
            raise CheckpointError(f"checkpoint optimizer state does not fit the {name} "
                                  f"backend: {exc}") from None
    return cls(learner, cfg, params, kwargs)
