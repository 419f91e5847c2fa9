"""Speaker personalization: adapt the keyword spotter to one voice with online e-prop.

The protocol (`personalize_speaker`), for one speaker of a Speech Commands folder:

1. **Split.** For each of the 10 keywords, K of the speaker's clips (seeded shuffle) are
   *shots*; the speaker's `_unknown_` clips give up to K shots too (a user says other
   words to a real device as well). Everything else of that speaker is the *test* set.
   `_silence_` clips have no speaker; they never enter the test set.
2. **Adapt** with online e-prop, one utterance at a time (reset, T steps, end_sample:
   what the chip does), for `passes` passes over the shots, replayed from memory; after
   the first pass, in turn one of `augment` noisy copies of them (the pretraining's
   Augmenter), so a couple of utterances are not fitted too closely. Each pass also
   replays `rehearsal` generic clips (balanced over the 12 classes, *other*
   speakers, drawn from a fixed pool chosen before anything about the test speaker is
   looked at) and `silence` background clips, so the model does not forget the other
   voices or silence. The e-prop gradients of a whole pass are summed and applied in one
   optimizer step (`update="pass"`): 20 consistent steps instead of ~700 noisy
   single-utterance ones, which is what lets the input and recurrent layers learn from
   a couple of shots without drifting (`update="utterance"` steps after each one).
   If the base model already gets at least `skip_above` of the speaker's shots right,
   nothing is learned: the base is kept. Only the layers in `learn` change (default:
   all three). Optionally (`guard`) an update that lowers accuracy on the adaptation
   data is undone, and the learned weights are pulled back toward the base after every
   update by a fraction `pull` (an L2-SP style prior, decoupled).
3. **Measure** accuracy on the test set before (base weights) and after (adapted
   weights), with the reference forward pass (`edgeprop.training.predict_logits`),
   which the emulator's kernels are held equal to by their own tests.

The learner is `edgeprop.eprop.EpropLearner` ("reference") or
`firmware_model.EmulatedLearner` ("emulator", at the chip's default precision unless
told), both with the mean loss the model was pretrained with. Everything is
deterministic for a seed: the splits and draws come from
`default_rng([seed, crc32(speaker)])`.

`sweep` runs the protocol for every speaker with at least `min_clips` clips and
summarises mean_before, mean_after, relative_error_reduction
(= (err_before - err_after) / err_before of the mean accuracies) and worst_delta. When
the checkpoint records its pretraining split (extra.train_config / extra.data_info, as
`edgeprop pretrain` writes them), each speaker is marked `seen_in_pretraining`, and the
summary is repeated over held-out speakers only: personalising a voice the model was
trained on measures something else.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np

from edgeprop.atomic_file import rescue_folder
from edgeprop.checkpoint import Checkpoint
from edgeprop.datasets import (
    SILENCE,
    UNKNOWN,
    Clip,
    n_real_speakers,
    require_data_dir,
    scan_speech_commands,
    speaker_split,
)
from edgeprop.errors import CheckpointError, ConfigError, DatasetError
from edgeprop.frontend import FrontendConfig, speech_mean, toward_user
from edgeprop.network import DTYPE, KWS_LABELS, Params, zero_diagonal
from edgeprop.optim import OPTIMIZER_KINDS

LAYERS = ("w_in", "w_rec", "w_out")


def _emulator_default_precision() -> str:
    """The chip's default storage format (int8 weights, fp8 Adam v), if the emulator is here."""
    try:
        from firmware_model import DEFAULT_PRECISION
    except ImportError:
        return "fp32"
    return DEFAULT_PRECISION

BACKENDS = ("emulator", "reference")


@dataclass(frozen=True)
class AdaptConfig:
    """How adaptation runs. Defaults were chosen on two tuning models whose held-out
    speakers are not the shipped model's (docs/personalization.md, "How the defaults
    were chosen")."""

    shots: int = 2                 # clips per keyword (and of _unknown_) to adapt on
    passes: int = 20               # passes over the shots (replayed from memory)
    lr: float = 2e-4               # 5e-4 until the model was retrained (2026-11-25)
    optimizer: str = "adam"        # "adam" | "sgd" | "momentum" (edgeprop.optim)
    learn: tuple[str, ...] = ("w_in", "w_rec", "w_out")
    update: str = "pass"           # one optimizer step per pass of accumulated e-prop
                                   # gradients ("pass"), or after every utterance
    pull: float = 0.0              # after each update: W <- W - pull (W - W_base)
    augment: int = 4               # noisy copies of the shots (background noise, shift,
                                   # gain) replayed in turn on passes after the first
    rehearsal: int = 8             # generic clips of other speakers per pass
    silence: int = 4               # _silence_ clips per pass
    include_unknown: bool = True   # the speaker's _unknown_ clips as shots too
    validate: bool = False         # keep the adaptation only if it helps on held-back shots
    skip_above: float = 0.95       # keep the base if it gets >= this fraction of the shots
                                   # right (0 = never): the voice is already known
    guard: bool = False            # keep an update only if it does not lower accuracy on
                                   # the adaptation data (shots + rehearsal clips)
    user_norm: float = 0.5         # move the frontend's normalisation this fraction of the
                                   # way to the speaker's speech mean (from the shots), before
                                   # e-prop; 0 = the base frontend (frontend.toward_user)
    precision: str = field(default_factory=_emulator_default_precision)  # emulator storage
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.shots, self.passes, self.rehearsal, self.silence, self.augment) < 0:
            raise ConfigError("shots, passes, augment, rehearsal and silence must be >= 0")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.update not in ("pass", "utterance"):
            raise ConfigError(f"update must be 'pass' or 'utterance', got {self.update!r}")
        if not 0.0 <= self.pull < 1.0:
            raise ConfigError(f"pull must be in [0, 1), got {self.pull}")
        bad = [name for name in self.learn if name not in LAYERS]
        if bad or not self.learn:
            raise ConfigError(f"learn must name some of {LAYERS}, got {self.learn}")
        if not 0.0 <= self.skip_above <= 1.0:
            raise ConfigError(f"skip_above must be in [0, 1], got {self.skip_above}")
        if self.optimizer not in OPTIMIZER_KINDS:
            raise ConfigError(f"optimizer must be one of {sorted(OPTIMIZER_KINDS)}, "
                              f"got {self.optimizer!r}")
        if not 0.0 <= self.user_norm <= 1.0:
            raise ConfigError(f"user_norm must be in [0, 1], got {self.user_norm}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["learn"] = list(self.learn)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdaptConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "learn" in kw:
            kw["learn"] = tuple(kw["learn"])
        return cls(**kw)


# ---------------------------------------------------------------- data
@dataclass
class SpeakerSplit:
    speaker: str
    shots: list[Clip]
    test: list[Clip]


def _rng(seed: int, speaker: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(speaker.encode())])


def split_speaker(clips: list[Clip], speaker: str, shots: int, seed: int = 0, *,
                  include_unknown: bool = True, labels: tuple[str, ...] = KWS_LABELS,
                  require_test: bool = True) -> SpeakerSplit:
    """K shots per keyword (and of _unknown_) of one speaker; the rest of theirs is test."""
    mine = sorted((c for c in clips if c.speaker == speaker), key=lambda c: c.key)
    if not mine:
        raise DatasetError(f"speaker {speaker!r} has no clips in this folder")
    rng = _rng(seed, speaker)
    adapt, test = [], []
    for lab in labels:
        if lab == SILENCE:
            continue
        group = [c for c in mine if c.label == lab]
        order = rng.permutation(len(group))
        k = shots if (lab != UNKNOWN or include_unknown) else 0
        if lab == UNKNOWN:
            k = min(k, max(len(group) - 1, 0))  # keep one for the test when we can
        adapt += [group[i] for i in order[:k]]
        test += [group[i] for i in order[k:]]
    if require_test and not test:
        raise DatasetError(f"speaker {speaker!r}: no clips left to test on after {shots} shots "
                           f"per keyword; use fewer --shots")
    return SpeakerSplit(speaker, adapt, test)


def rehearsal_pool(clips: list[Clip], exclude_speaker: str, per_class: int, seed: int,
                   allowed_speakers: set[str] | None = None,
                   labels: tuple[str, ...] = KWS_LABELS) -> list[Clip]:
    """A fixed, class-balanced pool of generic clips; never the excluded speaker's.

    Drawn from the seed alone (not from any result), so it cannot be tuned on the test
    set. `allowed_speakers` (e.g. the pretraining speakers) restricts the draw further.
    """
    rng = np.random.default_rng([seed, 7])
    pool = []
    for lab in labels:
        group = sorted((c for c in clips if c.label == lab and c.speaker != exclude_speaker
                        and (lab == SILENCE or allowed_speakers is None
                             or c.speaker in allowed_speakers)), key=lambda c: c.key)
        if group:
            pick = rng.permutation(len(group))[:per_class]
            pool += [group[i] for i in sorted(pick)]
    return pool


def pretraining_speakers(ckpt: Checkpoint, clips: list[Clip]) -> set[str] | None:
    """Speakers the checkpoint was pretrained on, recomputed from its recorded split.

    The folder is recognised by its contents, not its path (a clone or a copy of the data
    sits elsewhere): the recomputed split must reproduce the recorded clip and speaker
    counts. None when the checkpoint does not say, or the folder is another one.
    """
    extra = ckpt.extra or {}
    tc, info = extra.get("train_config"), extra.get("data_info") or {}
    if not isinstance(tc, dict) or "val_fraction" not in tc or "n_train" not in info:
        return None
    seed = int(tc.get("seed", 0))
    pool = list(clips)
    n_total = int(info["n_train"]) + int(info.get("n_val", 0))
    if n_total < len(pool):  # pretrain ran with --max-clips
        pick = np.random.default_rng(seed).choice(len(pool), n_total, replace=False)
        pool = [pool[i] for i in sorted(pick)]
    train, val = speaker_split(pool, float(tc["val_fraction"]), seed=seed)
    recorded = (info["n_train"], info.get("n_val"), info.get("train_speakers"),
                info.get("val_speakers"))
    found = (len(train), len(val), n_real_speakers(train), n_real_speakers(val))
    if any(r is not None and r != f for r, f in zip(recorded, found, strict=True)):
        return None
    return {c.speaker for c in train}


class FeatureSource:
    """Network inputs for clips through the checkpoint's own frontend and encoder, or
    (`through`) through one user's personalised frontend."""

    def __init__(self, ckpt: Checkpoint, cache=None, data_dir: Path | None = None,
                 fcfg: FrontendConfig | None = None):
        from edgeprop.evaluation import checkpoint_frontend
        from edgeprop.feature_cache import FeatureCache

        self.ckpt = ckpt
        self.fcfg = fcfg or checkpoint_frontend(ckpt)
        # a user's own frontend config is computed, not cached: no one reads it again
        self.persist = fcfg is None
        self.cache = cache or FeatureCache()
        self.data_dir = data_dir  # its _background_noise_ feeds the noisy copies
        self._augmenter = None
        self._memo: dict[str, np.ndarray] = {}

    def through(self, fcfg: FrontendConfig) -> FeatureSource:
        """The same clips, encoder and noise through another frontend config."""
        src = FeatureSource(self.ckpt, self.cache, self.data_dir, fcfg)
        src._augmenter = self._augmenter
        return src

    def features(self, clips: list[Clip]) -> np.ndarray:
        """(N, T, F) normalised features (before the encoder)."""
        return self.cache.features(clips, self.fcfg, persist=self.persist)

    def noisy(self, clips: list[Clip], acfg: AdaptConfig) -> np.ndarray | None:
        """(augment, N, T, n_in): noisy copies of `clips` (None when augment is 0)."""
        from edgeprop.augment import Augmenter, load_background_noise
        from edgeprop.evaluation import encode_batch
        from edgeprop.training import augmented_features

        if not acfg.augment or not clips:
            return None
        if self._augmenter is None:
            try:
                noise = load_background_noise(self.data_dir) if self.data_dir else []
            except DatasetError:
                noise = []  # shift and gain only
            self._augmenter = Augmenter(noise)
        return np.stack([encode_batch(self.ckpt, augmented_features(
            clips, self.fcfg, self._augmenter, acfg.seed, k, cache_dir=self.cache.cache_dir))
            for k in range(acfg.augment)]).astype(DTYPE)

    def inputs(self, clips: list[Clip]) -> np.ndarray:
        """(N, T, n_in) float32."""
        from edgeprop.evaluation import encode_batch

        todo = [c for c in clips if c.key not in self._memo]
        if todo:
            x = encode_batch(self.ckpt, self.features(todo))
            for c, xi in zip(todo, x, strict=True):
                self._memo[c.key] = np.ascontiguousarray(xi, dtype=DTYPE)
        if not clips:
            return np.zeros((0, 1, self.ckpt.cfg.n_in), DTYPE)
        return np.stack([self._memo[c.key] for c in clips])


# ---------------------------------------------------------------- learning
def make_learner(backend: str, ckpt: Checkpoint, params: Params, acfg: AdaptConfig):
    """An online e-prop learner over `params` (mean loss, as pretrained)."""
    kw = dict(loss="mean", optimizer=acfg.optimizer, lr=acfg.lr)
    if backend == "reference":
        from edgeprop.eprop import EpropLearner

        return EpropLearner(ckpt.cfg, params, **kw)
    if backend == "emulator":
        from firmware_model import EmulatedLearner

        # precision: the chip default (int8w-v8) by default; measured as accurate as fp32
        # here (docs/personalization.md). fp32 matches the reference learner bit for bit.
        return EmulatedLearner(ckpt.cfg, params, precision=acfg.precision, **kw)
    raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def warm_up_learner(backend: str, ckpt: Checkpoint, acfg: AdaptConfig) -> float:
    """Load the backend's kernels once per process, before the clock of any adaptation
    starts (runtime.backends.warm_up); returns the seconds it took, which the results
    report apart as `warmup_seconds`."""
    from runtime.backends import warm_up

    return warm_up(make_learner(backend, ckpt, ckpt.params.copy(), acfg), ckpt.cfg.n_in)


def _learner_params(learner, fallback: Params) -> Params:
    return getattr(learner, "params", fallback)


def _constrain(learner, base: Params, acfg: AdaptConfig) -> None:
    """Frozen layers back to base; learned ones pulled toward base by `pull`."""
    p = _learner_params(learner, base)
    changed = False
    for name in LAYERS:
        w, w0 = getattr(p, name), getattr(base, name)
        if name not in acfg.learn:
            w[...] = w0
            changed = True
        elif acfg.pull:
            w -= DTYPE(acfg.pull) * (w - w0)
            changed = True
    zero_diagonal(p.w_rec)
    if changed and p is not getattr(learner, "params", None):
        # The emulator's `params` is a copy gathered from PE SRAM: write it back through
        # its public loader (quantised to its storage format; optimizer state is kept).
        sync = getattr(learner, "load_params", None)
        if sync is None:
            raise ConfigError("this backend cannot take weights back; use --learn "
                              "w_in,w_rec,w_out --pull 0")
        sync(p)


@dataclass
class AdaptRun:
    params: Params
    n_utterances: int          # learned samples, passes and rehearsal included
    seconds: float             # wall time of the learning alone
    losses: list[float] = field(default_factory=list)
    n_rejected: int = 0        # updates undone by the guard


def adapt(ckpt: Checkpoint, x_shots: np.ndarray, y_shots: np.ndarray, x_generic: np.ndarray,
          y_generic: np.ndarray, acfg: AdaptConfig, *, backend: str = "reference",
          rng: np.random.Generator | None = None,
          on_utterance: Callable[[int], None] | None = None,
          x_noisy: np.ndarray | None = None) -> AdaptRun:
    """Online e-prop over the shots (+ generic rehearsal each pass). Base is untouched."""
    rng = rng or np.random.default_rng(acfg.seed)
    base = ckpt.params
    params = base.copy()
    learner = make_learner(backend, ckpt, params, acfg)
    losses: list[float] = []
    n = 0
    labels = list(ckpt.labels or KWS_LABELS)
    sil = labels.index(SILENCE) if SILENCE in labels else -1  # -1: no quiet clips to rehearse
    words = np.flatnonzero(y_generic != sil)
    quiet = np.flatnonzero(y_generic == sil)
    t_learn = 0.0
    n_rejected = 0
    guard = None
    if acfg.guard:
        t0 = time.perf_counter()
        start = _learner_params(learner, params)  # as stored (e.g. int8) on the chip
        guard = _Guard(ckpt, np.concatenate([x_shots, x_generic]),
                       np.concatenate([y_shots, y_generic]), start,
                       readout_only=tuple(acfg.learn) == ("w_out",))
        guard.best = guard.score(start)
        t_learn += time.perf_counter() - t0

    def update() -> None:
        """One optimizer step on what was accumulated, then the constraints and the guard."""
        nonlocal n_rejected
        if guard is not None:
            before_update = _learner_params(learner, params).copy()
        learner.apply()
        _constrain(learner, base, acfg)
        if guard is not None:
            acc = guard.score(_learner_params(learner, params))
            if acc < guard.best:
                _set_params(learner, before_update)
                n_rejected += 1
            else:
                guard.best = acc

    try:
        for p in range(acfg.passes):
            noisy = x_noisy is not None and len(x_noisy) and p > 0
            xs, ys = [x_noisy[(p - 1) % len(x_noisy)] if noisy else x_shots], [y_shots]
            for idx, k in ((words, acfg.rehearsal), (quiet, acfg.silence)):
                take = idx[rng.permutation(len(idx))[:k]]
                if len(take):  # (with no rehearsal x_generic is an empty placeholder)
                    xs.append(x_generic[take])
                    ys.append(y_generic[take])
            x = np.concatenate(xs)
            y = np.concatenate(ys)
            t0 = time.perf_counter()
            for i in rng.permutation(len(y)):
                out = learner.train_sample(x[i], int(y[i]))
                if acfg.update == "utterance":
                    update()
                losses.append(float(out[0] if isinstance(out, tuple) else out))
                n += 1
                if on_utterance:
                    t_learn += time.perf_counter() - t0
                    on_utterance(n)
                    t0 = time.perf_counter()
            if acfg.update == "pass":
                update()
            t_learn += time.perf_counter() - t0
        final = _learner_params(learner, params).copy()
    finally:
        close = getattr(learner, "close", None)
        if close:
            close()
    return AdaptRun(final, n, t_learn, losses, n_rejected)


class _Guard:
    """Accuracy on the adaptation data only (the user's shots + rehearsal clips).

    An update that lowers it is undone: what a device can check without test clips.
    When only the readout learns, the spikes do not change, and ybar is linear in W_out:
    ybar = W_out zw / T with zw = sum_t tail[t] z[t] (edgeprop.sparse_bptt), so zw is
    computed once and each check is one small matrix product.
    """

    def __init__(self, ckpt: Checkpoint, x: np.ndarray, y: np.ndarray, frozen: Params,
                 readout_only: bool):
        self.ckpt, self.x, self.y = ckpt, x, y
        self.best = 0.0
        self.zw = None
        if readout_only and len(y):
            from edgeprop import sparse_bptt

            xb = np.ascontiguousarray(x.transpose(1, 0, 2))
            self.zw = sparse_bptt.forward(ckpt.cfg, frozen, xb, b_th=1e-6).zw

    def score(self, params: Params) -> float:
        if not len(self.y):
            return 1.0
        if self.zw is not None:
            ybar = self.zw @ np.asarray(params.w_out, np.float64).T
            return float((ybar.argmax(1) == self.y).mean())
        return accuracy_of(self.ckpt, params, self.x, self.y)


def _set_params(learner, params: Params) -> None:
    """Put `params` back into the learner (in place, or through the emulator's loader)."""
    own = getattr(learner, "params", None)
    if isinstance(own, Params) and own is getattr(learner, "params", None):
        for name in LAYERS:
            getattr(own, name)[...] = getattr(params, name)
        return
    learner.load_params(params)


def mean_ce(ckpt: Checkpoint, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the time-averaged readout (the pretraining loss)."""
    from edgeprop.losses import mean_readout_ce
    from edgeprop.training import predict_logits

    ybar = predict_logits(ckpt.cfg, params, x)
    return mean_readout_ce(ybar[None], np.asarray(y))[0]


def adapt_validated(ckpt: Checkpoint, x_shots: np.ndarray, y_shots: np.ndarray,
                    x_generic: np.ndarray, y_generic: np.ndarray, acfg: AdaptConfig, *,
                    backend: str = "reference", rng: np.random.Generator | None = None,
                    noisy: Callable[[], np.ndarray | None] | None = None
                    ) -> tuple[AdaptRun, dict]:
    """`adapt`, guarded by 2-fold validation on the shots themselves (never the test set).

    `noisy` makes the noisy copies of the shots (`adapt`'s x_noisy); it is called only
    when learning happens, and its time counts as adaptation time.

    With acfg.validate: the shots are split in two halves (alternating within each
    label); adapting on one half must lower the cross-entropy on the other, summed over
    both folds, or the base weights are kept. Then the final run adapts on all shots.
    This is what a device can do with the user's own utterances: keep a personalised
    model only when it predicts held-back utterances better than the base.
    """
    rng = rng or np.random.default_rng(acfg.seed)
    info: dict = {}
    t_check = time.perf_counter()
    if acfg.skip_above > 0 and len(y_shots):
        shot_acc = accuracy_of(ckpt, ckpt.params, x_shots, y_shots)
        info["shot_accuracy_before"] = shot_acc
        if shot_acc >= acfg.skip_above:
            # the base already recognises this voice on (nearly) every shot it heard:
            # learning could mostly cost it, so the base is kept (decided on shots only)
            info["skipped"] = True
            return AdaptRun(ckpt.params.copy(), 0, time.perf_counter() - t_check), info
    x_noisy = noisy() if noisy is not None else None  # a device mixes the noise in too
    t_check = time.perf_counter() - t_check  # counted as adaptation time
    if not acfg.validate or len(y_shots) < 2:
        run = adapt(ckpt, x_shots, y_shots, x_generic, y_generic, acfg, backend=backend,
                    rng=rng, x_noisy=x_noisy)
        run.seconds += t_check
        return run, info
    order = np.argsort(y_shots, kind="stable")
    halves = (order[0::2], order[1::2])
    seconds, learned = 0.0, 0
    ce_base = ce_adapted = 0.0
    for a, b in (halves, halves[::-1]):
        run = adapt(ckpt, x_shots[a], y_shots[a], x_generic, y_generic, acfg,
                    backend=backend, rng=np.random.default_rng(rng.integers(2**32)),
                    x_noisy=None if x_noisy is None else x_noisy[:, a])
        seconds += run.seconds
        learned += run.n_utterances
        ce_base += mean_ce(ckpt, ckpt.params, x_shots[b], y_shots[b])
        ce_adapted += mean_ce(ckpt, run.params, x_shots[b], y_shots[b])
    info |= {"validation_ce_base": ce_base / 2, "validation_ce_adapted": ce_adapted / 2,
             "accepted": bool(ce_adapted < ce_base)}
    seconds += t_check
    if not info["accepted"]:
        return AdaptRun(ckpt.params.copy(), learned, seconds), info
    run = adapt(ckpt, x_shots, y_shots, x_generic, y_generic, acfg, backend=backend, rng=rng,
                x_noisy=x_noisy)
    return AdaptRun(run.params, run.n_utterances + learned, run.seconds + seconds,
                    run.losses), info


def accuracy_of(ckpt: Checkpoint, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    from edgeprop.training import predict_logits

    if len(y) == 0:
        return float("nan")
    return float((predict_logits(ckpt.cfg, params, x).argmax(1) == y).mean())


# ---------------------------------------------------------------- the user's frontend
def stored_speech_mean(ckpt: Checkpoint) -> np.ndarray | None:
    """The training set's speech mean that `edgeprop pretrain` stored with the checkpoint
    (extra.frontend_stats), if it is in the units of the checkpoint's own frontend."""
    from edgeprop.evaluation import checkpoint_frontend

    stats = (ckpt.extra or {}).get("frontend_stats") or {}
    mean = stats.get("speech_mean")
    if mean is None or stats.get("frontend_hash") != checkpoint_frontend(ckpt).hash():
        return None
    return np.asarray(mean, np.float64)


def user_frontend(base: FrontendConfig, shot_features: np.ndarray, reference: np.ndarray,
                  fraction: float) -> FrontendConfig:
    """The base chain with its normalisation moved toward the user: speaker (and
    microphone) mean normalisation from the adaptation clips alone.

    shot_features (N, T, F) are the user's shots through `base`; the user's speech mean
    is compared with the training set's (`reference`), and `fraction` of the offset is
    taken out by the frontend (frontend.toward_user). Chosen on the tuning models at 0.5
    (docs/personalization_tuning.md).
    """
    return toward_user(base, speech_mean(shot_features, base), reference, fraction)


def moved_toward(ckpt: Checkpoint) -> str | None:
    """Whose voice this checkpoint's frontend already moved toward, or None for a base
    frontend. save_personalized records the move; a personalised checkpoint whose chain is
    not the one its training statistics were measured in counts as moved too (a later
    session of an earlier version dropped the record)."""
    from edgeprop.evaluation import checkpoint_frontend

    extra = ckpt.extra or {}
    info = extra.get("personalized") or {}
    if not info:
        return None
    stats_hash = (extra.get("frontend_stats") or {}).get("frontend_hash")
    if info.get("base_frontend_sha256") or (
            stats_hash and stats_hash != checkpoint_frontend(ckpt).hash()):
        return str(info.get("speaker", "a user"))
    return None


def require_base_frontend(ckpt: Checkpoint) -> None:
    """Refuse to move a frontend that already moved toward a user: its offset would be
    measured against a reference in other units and taken out a second time."""
    owner = moved_toward(ckpt)
    if owner is not None:
        info = (ckpt.extra or {}).get("personalized") or {}
        raise ConfigError(f"this checkpoint is already personalised for {owner!r} with a "
                          f"moved frontend: personalise its base "
                          f"({info.get('base', 'see extra.personalized')}) again, or pass "
                          "--user-norm 0 to adapt it further as it is")


def resolve_user_norm(ckpt: Checkpoint, requested: float | None) -> tuple[float, str | None]:
    """--user-norm when given. Unset: the default for a base frontend, and 0 for one that
    already moved toward its user, so a later session adapts the weights further through
    the same chain instead of stopping at an error. Returns (fraction, note or None)."""
    if requested is not None:
        return requested, None
    owner = moved_toward(ckpt)
    if owner is None:
        return AdaptConfig.user_norm, None
    return 0.0, (f"this checkpoint's frontend already moved toward {owner!r}: it is kept "
                 "as it is (--user-norm 0), and e-prop adapts the weights further")


def training_speech_mean(ckpt: Checkpoint,
                         recompute: Callable[[], np.ndarray | None] | None = None,
                         folder: Path | None = None) -> np.ndarray:
    """The reference of the user's frontend: the training set's speech mean as stored
    with the checkpoint, else `recompute()` (from the pretraining clips of `folder`, when
    it holds them); neither, or a frontend that already moved, is a ConfigError."""
    require_base_frontend(ckpt)
    ref = stored_speech_mean(ckpt)
    if ref is None and recompute is not None:
        ref = recompute()
    if ref is None:
        where = "" if folder is None else f" and its pretraining split is not in {folder}"
        raise ConfigError("this checkpoint stores no speech mean of its training set "
                          f"(extra.frontend_stats; `edgeprop pretrain` writes it){where}: pass "
                          "--user-norm 0 to adapt without moving the frontend's normalisation")
    return ref


# ---------------------------------------------------------------- the protocol
@dataclass
class Session:
    """Everything the protocol needs that does not depend on the speaker."""

    ckpt: Checkpoint
    clips: list[Clip]
    data_dir: Path
    features: FeatureSource
    seen: set[str] | None
    _reference: np.ndarray | None = field(default=None, repr=False)

    def reference_speech_mean(self) -> np.ndarray:
        """The training set's speech mean: stored with the checkpoint, or recomputed from
        the folder's pretraining clips (checkpoints written before it was stored)."""
        if self._reference is None:
            def recompute() -> np.ndarray | None:
                if not self.seen:
                    return None
                train = [c for c in self.clips if c.speaker in self.seen]
                return speech_mean(self.features.features(train), self.features.fcfg)

            self._reference = training_speech_mean(self.ckpt, recompute, self.data_dir)
        return self._reference

    def absent_labels(self) -> list[str]:
        """The model's labels the folder holds no clip of: they are neither adapted nor
        tested, so the accuracies are over the others only."""
        have = {c.label for c in self.clips}
        return [lab for lab in (self.ckpt.labels or KWS_LABELS) if lab not in have]

    @classmethod
    def open(cls, ckpt: Checkpoint, data_dir: str | Path, cache=None) -> Session:
        data_dir = require_data_dir(data_dir)
        labels = tuple(ckpt.labels or KWS_LABELS)
        clips = scan_speech_commands(data_dir, labels).clips
        return cls(ckpt, clips, data_dir, FeatureSource(ckpt, cache, data_dir),
                   pretraining_speakers(ckpt, clips))

    def speakers(self, min_clips: int) -> list[str]:
        from collections import Counter

        cnt = Counter(c.speaker for c in self.clips
                      if not c.speaker.startswith(("silence:", "noise:")))
        return sorted(s for s, n in cnt.items() if n >= min_clips)


def _generic(session: Session, speaker: str, acfg: AdaptConfig) -> tuple[np.ndarray, np.ndarray]:
    per_class = max(2, (acfg.rehearsal * acfg.passes) // 11 + 1)
    pool = rehearsal_pool(session.clips, speaker, per_class, acfg.seed, session.seen)
    words = [c for c in pool if c.label != SILENCE]
    sil = [c for c in pool if c.label == SILENCE]
    rng = np.random.default_rng([acfg.seed, 11])
    sil = [sil[i] for i in rng.permutation(len(sil))[:max(acfg.silence * acfg.passes, 1)]]
    chosen = words if acfg.rehearsal else []
    chosen = chosen + (sil if acfg.silence else [])
    if not chosen:
        return (np.zeros((0, 1, session.ckpt.cfg.n_in), DTYPE), np.zeros(0, np.int64))
    return session.features.inputs(chosen), np.array([c.label_index for c in chosen])


def adapt_speaker(session: Session, speaker: str, shots: list[Clip], acfg: AdaptConfig, *,
                  backend: str = "reference") -> tuple[AdaptRun, dict, FeatureSource]:
    """The speaker's frontend (acfg.user_norm), then online e-prop on `shots`.

    Returns the run, adapt_validated's info, and the features the adapted model reads:
    through the user's chain, or the base one when the skip rule kept the base (then
    nothing changes, frontend included). The frontend work counts as adaptation time.
    """
    t0 = time.perf_counter()
    fe = session.features
    if acfg.user_norm:
        fe = fe.through(user_frontend(fe.fcfg, fe.features(shots),
                                      session.reference_speech_mean(), acfg.user_norm))
    x_shot = fe.inputs(shots)
    y_shot = np.array([c.label_index for c in shots], np.int64)
    t_frontend = time.perf_counter() - t0
    x_gen, y_gen = _generic(session, speaker, acfg)
    run, info = adapt_validated(session.ckpt, x_shot, y_shot, x_gen, y_gen, acfg,
                                backend=backend, rng=_rng(acfg.seed + 1, speaker),
                                noisy=partial(fe.noisy, shots, acfg))
    run.seconds += t_frontend
    if info.get("skipped"):
        fe = session.features
    return run, info, fe


def split_for(session: Session, speaker: str, acfg: AdaptConfig) -> SpeakerSplit:
    """The protocol's split of one speaker (what personalize_speaker adapts and tests on)."""
    return split_speaker(session.clips, speaker, acfg.shots, acfg.seed,
                         include_unknown=acfg.include_unknown,
                         labels=tuple(session.ckpt.labels or KWS_LABELS))


def check_speakers(session: Session, speakers: list[str],
                   acfg: AdaptConfig) -> dict[str, SpeakerSplit]:
    """Every speaker's split, before any work: a hash not in the folder, or a speaker with
    nothing to adapt or test on, is one DatasetError naming them all (not a crash after
    the speakers before it were adapted)."""
    splits, bad = {}, []
    for spk in speakers:
        try:
            splits[spk] = split_for(session, spk, acfg)
        except DatasetError as exc:
            bad.append(str(exc))
            continue
        if not splits[spk].shots:
            n = sum(c.speaker == spk for c in session.clips)
            bad.append(f"speaker {spk!r} has {n} clip{'s' if n != 1 else ''} here and no "
                       "keyword clip to adapt on")
    if bad:
        more = (f" (and {len(bad) - 1} more speaker{'s' if len(bad) > 2 else ''})"
                if len(bad) > 1 else "")
        raise DatasetError(f"{bad[0]}{more}; `edgeprop data info {session.data_dir}` lists "
                           "the speakers and their clips")
    return splits


def personalize_speaker(session: Session, speaker: str, acfg: AdaptConfig, *,
                        backend: str = "reference", curve: bool = False) -> dict:
    """The non-interactive protocol for one speaker; returns a JSON-able result (and, under
    `_params` and `_frontend`, the adapted weights and frontend config)."""
    split = split_for(session, speaker, acfg)
    y_test = np.array([c.label_index for c in split.test], np.int64)
    before = accuracy_of(session.ckpt, session.ckpt.params, session.features.inputs(split.test),
                         y_test)
    run, vinfo, fe = adapt_speaker(session, speaker, split.shots, acfg, backend=backend)
    after = accuracy_of(session.ckpt, run.params, fe.inputs(split.test), y_test)
    out = vinfo | {
        "speaker": speaker, "before": before, "after": after, "delta": after - before,
        "n_adapt": len(split.shots), "n_test": len(split.test),
        "n_learned": run.n_utterances, "n_rejected": run.n_rejected,
        "adapt_seconds": run.seconds,
        # None when nothing was learned (the base was kept): the time was the check's
        "seconds_per_learned_utterance": (run.seconds / run.n_utterances
                                          if run.n_utterances else None),
        "seconds_per_adapt_utterance": run.seconds / max(len(split.shots), 1),
        "frontend_moved": fe is not session.features,
        "skipped": bool(vinfo.get("skipped")),  # documented output, also when False
        "seen_in_pretraining": None if session.seen is None else speaker in session.seen,
        "backend": backend,
    }
    if curve:
        out["curve"] = shots_curve(session, speaker, acfg, backend=backend)
    out["_params"] = run.params
    out["_frontend"] = fe.fcfg
    return out


def shots_curve(session: Session, speaker: str, acfg: AdaptConfig, *,
                backend: str = "reference") -> list[dict]:
    """Accuracy against adaptation utterances: k = 0..shots per keyword, one fixed test set."""
    full = split_speaker(session.clips, speaker, acfg.shots, acfg.seed,
                         include_unknown=acfg.include_unknown)
    y_test = np.array([c.label_index for c in full.test], np.int64)
    points = [{"shots": 0, "n_adapt": 0,
               "accuracy": accuracy_of(session.ckpt, session.ckpt.params,
                                       session.features.inputs(full.test), y_test)}]
    for k in range(1, acfg.shots + 1):
        seen: dict[str, int] = {}
        shots = []  # the first k shots of each label, in the full run's order
        for c in full.shots:
            if seen.get(c.label, 0) < k:
                seen[c.label] = seen.get(c.label, 0) + 1
                shots.append(c)
        run, _, fe = adapt_speaker(session, speaker, shots, replace(acfg, shots=k),
                                   backend=backend)
        points.append({"shots": k, "n_adapt": len(shots),
                       "accuracy": accuracy_of(session.ckpt, run.params, fe.inputs(full.test),
                                               y_test)})
    return points


def summarize(results: list[dict]) -> dict:
    """mean_before/after, relative_error_reduction, worst_delta over speaker results."""
    if not results:
        return {"n_speakers": 0}
    b = float(np.mean([r["before"] for r in results]))
    a = float(np.mean([r["after"] for r in results]))
    err_b, err_a = 1.0 - b, 1.0 - a
    secs = sum(r["adapt_seconds"] for r in results)
    learned = [r for r in results if r["n_learned"]]  # a kept base learned nothing
    n_learned = sum(r["n_learned"] for r in learned)
    n_adapt = sum(r["n_adapt"] for r in results)
    return {
        "n_speakers": len(results),
        "mean_before": b, "mean_after": a,
        "relative_error_reduction": (err_b - err_a) / err_b if err_b > 0 else float("nan"),
        "worst_delta": float(min(r["delta"] for r in results)),
        "n_worse_by_more_than_2_points": int(sum(r["delta"] < -0.02 for r in results)),
        "seconds_per_learned_utterance": (sum(r["adapt_seconds"] for r in learned)
                                          / n_learned if n_learned else None),
        "seconds_per_adapt_utterance": secs / max(n_adapt, 1),  # all of it, checks too
    }


def sweep(session: Session, acfg: AdaptConfig, *, min_clips: int = 30,
          backend: str = "reference", speakers: list[str] | None = None,
          curve: bool = False, on_speaker: Callable[[dict], None] | None = None) -> dict:
    """The protocol for every speaker with >= min_clips clips (or the given ones)."""
    todo = speakers if speakers is not None else session.speakers(min_clips)
    if not todo:
        raise DatasetError(f"{session.data_dir}: no speaker has >= {min_clips} clips")
    results = []
    for spk in todo:
        r = personalize_speaker(session, spk, acfg, backend=backend, curve=curve)
        r.pop("_params")
        r.pop("_frontend")
        results.append(r)
        if on_speaker:
            on_speaker(r)
    out = {"speakers": results, **summarize(results)}
    if session.seen is not None:
        held = [r for r in results if not r["seen_in_pretraining"]]
        out["heldout"] = summarize(held)
        out["seen"] = summarize([r for r in results if r["seen_in_pretraining"]])
    if curve:
        out["curve"] = mean_curve(results)
    return out


def mean_curve(results: list[dict]) -> list[dict]:
    by_k: dict[int, list] = {}
    for r in results:
        for p in r.get("curve", []):
            by_k.setdefault(p["shots"], []).append(p)
    return [{"shots": k, "n_adapt": float(np.mean([p["n_adapt"] for p in ps])),
             "accuracy": float(np.mean([p["accuracy"] for p in ps])), "n_speakers": len(ps)}
            for k, ps in sorted(by_k.items())]


# ---------------------------------------------------------------- saving
def user_data_dir() -> Path:
    """$EDGEPROP_HOME, else $XDG_DATA_HOME/edgeprop, else ~/.local/share/edgeprop."""
    import os

    if os.environ.get("EDGEPROP_HOME"):
        return Path(os.environ["EDGEPROP_HOME"])
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "edgeprop"


def default_personal_path(base_path: Path, speaker: str) -> Path:
    """<base dir>/<base stem>.<speaker>.npz, beside the base checkpoint; for the shipped
    model (inside the installed package) or a base in a read-only folder,
    <user data dir>/personal/<base stem>.<speaker>.npz instead."""
    import edgeprop
    from edgeprop.atomic_file import cannot_write_in

    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in speaker) or "speaker"
    name = f"{Path(base_path).stem}.{safe}.npz"
    folder = Path(base_path).resolve().parent
    package = Path(edgeprop.__file__).resolve().parent
    if folder.is_relative_to(package) or cannot_write_in(folder) is not None:
        return user_data_dir() / "personal" / name
    return folder / name


def refuse_base_as_out(out: Path, base_path: Path) -> None:
    """Adaptation never writes the base checkpoint (ConfigError); the CLI asks before any
    work, save_personalized again at the write."""
    if Path(out).resolve() == Path(base_path).resolve():
        raise ConfigError(f"refusing to overwrite the base checkpoint {base_path}; "
                          f"choose another --out")


def _unused(path: Path) -> Path:
    """`path`, or <stem>.2.npz, <stem>.3.npz, ... when it exists: a later session never
    replaces an earlier one's weights unasked (--out names a file to replace)."""
    candidate, k = path, 2
    while candidate.exists():
        candidate, k = path.with_name(f"{path.stem}.{k}{path.suffix}"), k + 1
    return candidate


def save_personalized(ckpt: Checkpoint, base_path: Path, params: Params, speaker: str,
                      acfg: AdaptConfig, *, out: Path | None = None,
                      result: dict | None = None,
                      frontend: FrontendConfig | None = None) -> Path:
    """Write the adapted weights (and the user's frontend, when it moved) as a new
    checkpoint (atomic); refuses to touch the base."""
    from edgeprop.checkpoint import params_hash, save_checkpoint
    from edgeprop.evaluation import checkpoint_frontend

    path = Path(out) if out is not None else _unused(default_personal_path(base_path, speaker))
    refuse_base_as_out(path, base_path)
    extra = dict(ckpt.extra or {})
    earlier = extra.get("personalized")
    extra["personalized"] = {
        "speaker": speaker, "base": str(base_path),
        "base_params_sha256": params_hash(ckpt.params),
        "adapt_config": acfg.to_dict(), **(result or {}),
    }
    fe = ckpt.frontend
    if frontend is not None and frontend != checkpoint_frontend(ckpt):
        fe = frontend.to_dict()  # frontend_stats stay in the base chain's units (its hash)
        extra["personalized"]["base_frontend_sha256"] = checkpoint_frontend(ckpt).hash()
    elif earlier and earlier.get("base_frontend_sha256"):
        # moved in an earlier session: keep the record, or the next one would move it again
        extra["personalized"]["base_frontend_sha256"] = earlier["base_frontend_sha256"]
    if earlier:
        extra["personalized"]["earlier"] = earlier  # the session before (and its own earlier)
    def write(to: Path) -> None:
        to.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(to, ckpt.cfg, params, frontend=fe, encoder=ckpt.encoder,
                        labels=ckpt.labels, extra=extra)

    try:
        write(path)
    except (CheckpointError, OSError) as exc:  # a full disk must not cost the session
        why = exc if isinstance(exc, CheckpointError) else f"cannot write {path}: {exc}"
        try:
            rescued = rescue_folder(speaker) / path.name
            write(rescued)
        except (CheckpointError, OSError) as again:  # the temp dir is full too
            raise CheckpointError(f"{why}; a rescue copy in the temp dir failed too "
                                  f"({again}): the adapted weights are lost") from None
        raise CheckpointError(f"{why}; the adapted weights were saved to {rescued} instead "
                              "(move it where you want it)") from None
    return path


# ---------------------------------------------------------------- live utterances
def frame_db(x: np.ndarray, hop: int = 160) -> np.ndarray:
    """Per-10 ms-frame RMS level in dBFS (floor -120)."""
    n = len(x) // hop
    if n == 0:
        return np.zeros(0)
    e = np.mean(np.square(x[: n * hop].reshape(n, hop), dtype=np.float64), axis=1)
    return 10.0 * np.log10(np.maximum(e, 1e-12))


def fit_clip(x: np.ndarray, n: int = 16000, hop: int = 160) -> np.ndarray:
    """An utterance as a 1 s clip like the training data: centred on its energy, padded."""
    x = np.asarray(x, np.float32)
    if len(x) > n:
        db = frame_db(x, hop)
        if db.size:
            w = np.power(10.0, db / 10.0)
            c = int(np.round(np.sum(w * np.arange(db.size)) / np.sum(w))) * hop + hop // 2
            start = int(np.clip(c - n // 2, 0, len(x) - n))
            x = x[start:start + n]
        else:
            x = x[:n]
    out = np.zeros(n, np.float32)
    off = (n - len(x)) // 2
    out[off:off + len(x)] = x
    return out


class Endpointer:
    """Energy endpointing over a live stream of 10 ms blocks (pure; no device).

    The noise floor is the running 20th percentile of frame levels while nobody speaks
    (the first `calibrate_ms` only measure it). An utterance starts when a frame is
    `start_db` above the floor (and above `min_level_dbfs`), and ends after `hang_ms` of
    frames below floor + `stop_db`. It is returned with `margin_ms` of audio either side;
    shorter than `min_ms` is ignored. A sound still going after `max_ms` is no word (a
    sentence, a radio): it is dropped whole, counted in `too_long`, and nothing starts
    again until it pauses.
    """

    def __init__(self, *, start_db: float = 15.0, stop_db: float = 8.0,
                 min_level_dbfs: float = -55.0, hang_ms: float = 300.0,
                 margin_ms: float = 150.0, min_ms: float = 100.0, max_ms: float = 2000.0,
                 calibrate_ms: float = 300.0, hop: int = 160, sample_rate: int = 16000):
        self.start_db, self.stop_db, self.min_level = start_db, stop_db, min_level_dbfs
        fr = sample_rate / hop / 1000.0
        self.hang = max(1, int(hang_ms * fr))
        self.margin = max(0, int(margin_ms * fr))
        self.min_frames = max(1, int(min_ms * fr))
        self.max_frames = max(self.min_frames + 1, int(max_ms * fr))
        self.hop = hop
        self.calibrate = max(1, int(calibrate_ms * fr))
        self._hist: list[float] = []
        self._pre: list[np.ndarray] = []
        self._cur: list[np.ndarray] | None = None
        self._quiet = 0
        self._buf = np.zeros(0, np.float32)
        self._skipping = False  # inside a sound longer than max_ms, until it pauses
        self.too_long = 0       # such sounds dropped

    @property
    def floor_db(self) -> float:
        if not self._hist:
            return -90.0
        return float(np.percentile(self._hist[-300:], 20))

    @property
    def word_level_db(self) -> float:
        """The level a frame must exceed to start a word: `start_db` over the noise floor,
        and never below `min_level_dbfs` (what the no-take message tells the user)."""
        return max(self.floor_db + self.start_db, self.min_level)

    @property
    def noise_sets_the_bar(self) -> bool:
        """The room's noise, not the fixed minimum, sets `word_level_db`: more gain cannot
        help then."""
        return self.floor_db + self.start_db > self.min_level

    @property
    def in_utterance(self) -> bool:
        """An utterance has started and not yet ended."""
        return self._cur is not None

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Feed audio; returns the utterances completed by it (usually none)."""
        self._buf = np.concatenate([self._buf, np.asarray(samples, np.float32).reshape(-1)])
        done = []
        while len(self._buf) >= self.hop:
            frame, self._buf = self._buf[:self.hop], self._buf[self.hop:]
            utt = self._frame(frame)
            if utt is not None:
                done.append(utt)
        return done

    def _frame(self, frame: np.ndarray) -> np.ndarray | None:
        db = float(frame_db(frame, self.hop)[0])
        floor = self.floor_db
        if self._skipping:
            self._quiet = self._quiet + 1 if db < floor + self.stop_db else 0
            if self._quiet >= self.hang:
                self._skipping, self._quiet = False, 0
            return None
        if self._cur is None:
            self._pre = (self._pre + [frame])[-(self.margin + 1):]
            calibrated = len(self._hist) >= self.calibrate
            if calibrated and db > max(floor + self.start_db, self.min_level):
                self._cur = list(self._pre)
                self._quiet = 0
            else:
                self._hist.append(db)
            return None
        self._cur.append(frame)
        self._quiet = self._quiet + 1 if db < floor + self.stop_db else 0
        voiced = len(self._cur) - self._quiet
        if self._quiet < self.hang and len(self._cur) >= self.max_frames + self.margin:
            self._cur, self._pre, self._quiet = None, [], 0
            self._skipping = True
            self.too_long += 1
            return None
        if self._quiet >= self.hang:
            cut = len(self._cur) - max(0, self._quiet - self.margin)
            utt = np.concatenate(self._cur[:cut])
            self._cur, self._pre, self._quiet = None, [], 0
            return utt if voiced >= self.min_frames + self.margin else None
        return None
