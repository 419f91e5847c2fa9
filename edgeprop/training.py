"""Offline pretraining of the keyword-spotting SRNN: one loop for dense and sparse BPTT.

Pure computation: no printing, no threads. Progress goes through callbacks, so the CLI
(`edgeprop pretrain`) can draw bars and tests can run silently.

Data (`prepare_data`): a Speech Commands folder is scanned, split by speaker
(`datasets.speaker_split`), and turned into *un-normalised* frontend features once
(`FeatureCache`). Background-noise augmentation acts on audio (noise adds in the
power domain, before the log, so it has no exact feature-domain equivalent): each
training clip gets `n_aug` augmented copies computed once per seed and cached on disk.
The per-channel normalisation is fitted on the clean training features and stored in
the FrontendConfig (`with_normalization`); normalising cached raw features equals
running the normalised frontend (same affine, applied after the log-mel + deltas).

Training (`train`): every epoch draws, for each training clip, one of its 1 + n_aug
versions, shuffles, and runs minibatch Adam on the mean-readout cross-entropy plus the
firing-rate regulariser, with sparse BPTT (`edgeprop.sparse_bptt`, band B_th) or dense
BPTT (`edgeprop.bptt`). Each epoch's randomness comes from
`default_rng([seed, epoch])`, so a resumed run replays exactly what an uninterrupted
run does; the state to resume is (params, optimizer state, next epoch).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from edgeprop import bptt, sparse_bptt
from edgeprop.datasets import (
    Clip,
    load_clip,
    n_real_speakers,
    scan_speech_commands,
    skipped_files,
    speaker_split,
)
from edgeprop.errors import ConfigError, DatasetError
from edgeprop.feature_cache import FeatureCache, atomic_save_npy, default_cache_dir
from edgeprop.frontend import (
    FrontendConfig,
    features,
    fit_normalization,
    mel_centres,
    normalize,
    speech_mean,
)
from edgeprop.network import DTYPE, KWS_LABELS, ModelConfig, Params, init_params, zero_diagonal
from edgeprop.optim import Adam

Progress = Callable[[int], None]


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the data and the model config."""

    epochs: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    lr_final: float = 1e-4       # cosine decay from lr to lr_final over the epochs
    sparse: bool = True          # sparse BPTT (else dense)
    b_th: float = 0.2            # sparse band |v - A| < B_th (in units of v)
    reg_coef: float = 0.5        # firing-rate regulariser (guards against silence)
    target_rate: float = 0.02    # spikes per step
    weight_decay: float = 1e-4   # L2 on w_in and w_rec, added to the gradient
    seed: int = 0
    val_fraction: float = 0.2
    n_aug: int = 16              # augmented copies per training clip
    p_clean: float = 0.25        # chance an epoch shows the clean version of a clip
    feature_noise: float = 0.0   # std of Gaussian noise on normalised features
    speed: float = 0.0           # speed perturbation of augmented copies: U(1-s, 1+s)
    ema: float = 0.998           # EMA of the weights (per step), shipped; 0 = off
    freq_mask: int = 4           # SpecAugment: zero up to this many mel bands (+ deltas)
    time_mask: int = 8           # SpecAugment: zero up to this many frames
    freq_warp: float = 0.0       # vocal-tract-length warp of the mel axis: U(1-w, 1+w)
    init_seed: int | None = None  # defaults to seed

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError("epochs must be >= 0 and batch_size >= 1")
        if not self.lr > 0 or not self.b_th > 0:
            raise ConfigError("lr and b_th must be > 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.n_aug < 0:
            raise ConfigError("n_aug must be >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.freq_warp < 0.5:
            raise ConfigError(f"freq_warp must be in [0, 0.5), got {self.freq_warp}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


#: Model settings of the shipped keyword spotter: the paper's 80-120-12 ALIF network.
def kws_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**overrides)


# ---------------------------------------------------------------- data
@dataclass
class KWSData:
    """Normalised features (N, T, F) float32 and labels, with the fitted frontend."""

    frontend: FrontendConfig
    train_x: np.ndarray        # (V, N_train, T, F): V = 1 + n_aug versions
    train_y: np.ndarray        # (N_train,)
    val_x: np.ndarray          # (N_val, T, F)
    val_y: np.ndarray
    info: dict = field(default_factory=dict)
    # statistics of the clean training features that personalization needs later:
    # speech_mean (frontend.speech_mean), the reference of frontend.toward_user, and
    # the hash of the frontend config whose units it is in
    frontend_stats: dict = field(default_factory=dict)
    # files of the data (and synth) folders that are not clips: (path, reason)
    skipped: list = field(default_factory=list)
    cache_note: str | None = None  # FeatureCache.write_note: the cache was not writable


def _physical_memory() -> int:
    """Bytes of RAM (Linux and macOS; unknown elsewhere: no limit)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 1 << 62


def _aug_cache_path(clips: list[Clip], cfg: FrontendConfig, seed: int, copy: int,
                    aug_desc: str, cache_dir: Path) -> Path:
    h = hashlib.sha256()
    h.update(f"{cfg.hash()}|{seed}|{copy}|{aug_desc}".encode())
    for c in clips:
        st = c.path.stat()
        h.update(f"{c.key}|{st.st_size}|{st.st_mtime_ns};".encode())
    return cache_dir / "augmented" / f"{h.hexdigest()}.npy"


def speed_perturb(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play `audio` `factor` times faster (tempo and pitch together, like a tape), by
    linear interpolation, keeping the length: centre-cropped or zero-padded both sides."""
    n = audio.shape[0]
    m = max(2, int(round(n / factor)))
    y = np.interp(np.arange(m) * factor, np.arange(n), audio).astype(np.float32)
    if m >= n:
        s = (m - n) // 2
        return y[s:s + n]
    out = np.zeros(n, np.float32)
    s = (n - m) // 2
    out[s:s + m] = y
    return out


def augmented_features(clips: list[Clip], cfg: FrontendConfig, augmenter, seed: int,
                       copy: int, *, speed: float = 0.0, cache_dir: Path | None = None,
                       progress: Progress | None = None, batch: int = 64) -> np.ndarray:
    """Raw features of one augmented copy of `clips` (cached per seed and copy).

    speed > 0 first plays each clip at a rate drawn from U(1 - speed, 1 + speed)
    (`speed_perturb`), then applies `augmenter` (shift, noise, gain).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # the noise by content: a re-recorded noise file of the same length must miss
    noise = [hashlib.sha256(np.ascontiguousarray(n).tobytes()).hexdigest()[:16]
             for n in augmenter.noise]
    desc = repr((augmenter.snr_db, augmenter.gain_db, augmenter.shift, augmenter.p_noise,
                 noise)) + (f"|speed{speed}" if speed else "")
    path = _aug_cache_path(clips, cfg, seed, copy, desc, cache_dir)
    try:
        arr = np.load(path)
        if arr.shape == (len(clips), cfg.clip_frames, cfg.n_features):
            if progress:
                progress(len(clips))
            return arr
    except (OSError, ValueError, EOFError):
        pass
    rng = np.random.default_rng([seed, 1000 + copy])
    out = np.empty((len(clips), cfg.clip_frames, cfg.n_features), np.float32)
    for s in range(0, len(clips), batch):
        chunk = clips[s:s + batch]
        audio = []
        for c in chunk:
            a = load_clip(c, cfg.sample_rate)
            if speed:
                a = speed_perturb(a, float(rng.uniform(1.0 - speed, 1.0 + speed)))
            audio.append(augmenter(a, rng))
        audio = np.stack(audio)
        out[s:s + len(chunk)] = features(audio, cfg)
        if progress:
            progress(len(chunk))
    try:
        atomic_save_npy(path, out)
    except OSError:
        pass  # a read-only cache only costs time
    return out


def prepare_data(
    root: str | Path, tcfg: TrainConfig, *, synth_dir: str | Path | None = None,
    frontend: FrontendConfig | None = None, cache_dir: str | Path | None = None,
    max_clips: int | None = None,
    stage: Callable[[str, int], Progress] | None = None,
) -> KWSData:
    """Scan, split by speaker, featurise (clean + augmented copies), fit normalisation.

    `stage(name, total)` returns an advance(n) callback for each long stage (or None).
    `max_clips` keeps a seeded random subset (tests, quick runs).
    """
    from edgeprop.augment import Augmenter, load_background_noise

    root = Path(root)
    scan = scan_speech_commands(root)
    clips = list(scan.clips)
    skipped = skipped_files(root, scan.skipped)
    if max_clips is not None and max_clips < len(clips):
        pick = np.random.default_rng(tcfg.seed).choice(len(clips), max_clips, replace=False)
        clips = [clips[i] for i in sorted(pick)]
    train, val = speaker_split(clips, tcfg.val_fraction, seed=tcfg.seed)
    if synth_dir is not None:
        synth = scan_speech_commands(synth_dir)
        skipped += skipped_files(synth_dir, synth.skipped)
        train = train + list(synth.clips)  # synthetic voices only ever train
    if not train or not val:
        raise DatasetError(f"{root}: too few speakers for a speaker-disjoint split "
                           f"({len(train)} train / {len(val)} val clips)")
    cfg = (frontend or FrontendConfig()).without_normalization()
    # (V, N, T, F) filled in place, one version at a time, to keep the peak memory low;
    # its size is known from the clip count, so a run that cannot fit stops before the
    # features are computed (minutes), not after
    shape = (1 + tcfg.n_aug, len(train), cfg.clip_frames, cfg.n_features)
    need, ram = math.prod(shape) * np.dtype(DTYPE).itemsize, _physical_memory()
    too_much = ConfigError(f"n_aug={tcfg.n_aug}: {shape[0]} versions of {len(train)} "
                           f"training clips need {need / 2**30:,.1f} GiB of memory (this "
                           f"machine has {ram / 2**30:,.0f} GiB); lower --n-aug or "
                           "--max-clips")
    if need > 0.8 * ram:  # np.empty may still succeed (overcommit), and the filling
        raise too_much    # be killed by the kernel
    cache = FeatureCache(cache_dir)
    noop = lambda n=1: None
    adv = stage("features", len(train) + len(val)) if stage else noop
    raw_train = cache.features(train, cfg, progress=adv)
    raw_val = cache.features(val, cfg, progress=adv)
    fcfg = fit_normalization(raw_train, cfg)  # clean training features only
    if raw_train.shape != shape[1:]:  # the estimate above must be what is filled
        raise DatasetError(f"training features are {raw_train.shape}, expected {shape[1:]}")
    try:
        train_x = np.empty(shape, DTYPE)
    except MemoryError:
        raise too_much from None
    train_x[0] = normalize(raw_train, fcfg)
    stats = {"frontend_hash": fcfg.hash(),
             "speech_mean": speech_mean(train_x[0], fcfg).tolist()}
    val_x = normalize(raw_val, fcfg).astype(DTYPE)
    del raw_train, raw_val
    if tcfg.n_aug:
        try:
            noise = load_background_noise(root)
        except DatasetError:
            noise = []
        aug = Augmenter(noise)
        adv = stage("augmenting", tcfg.n_aug * len(train)) if stage else noop
        for k in range(tcfg.n_aug):
            train_x[k + 1] = normalize(
                augmented_features(train, cfg, aug, tcfg.seed, k, speed=tcfg.speed,
                                   cache_dir=cache.cache_dir, progress=adv), fcfg)
    info = {
        "data": str(root), "n_train": len(train), "n_val": len(val),
        "train_speakers": n_real_speakers(train), "val_speakers": n_real_speakers(val),
        "synth": None if synth_dir is None else str(synth_dir),
        "augmented_copies": tcfg.n_aug,
        "noise_recordings": len(noise) if tcfg.n_aug else 0,
    }
    return KWSData(fcfg, train_x, np.array([c.label_index for c in train]),
                   val_x, np.array([c.label_index for c in val]), info, stats, skipped,
                   cache.write_note())


# ---------------------------------------------------------------- model maths
def predict_logits(cfg: ModelConfig, params: Params, x: np.ndarray,
                   batch: int = 256) -> np.ndarray:
    """Mean readout ybar (N, n_out) for features x (N, T, F): what the classifier reads."""
    out = np.empty((x.shape[0], cfg.n_out), np.float64)
    for s in range(0, x.shape[0], batch):
        xb = np.ascontiguousarray(x[s:s + batch].transpose(1, 0, 2))
        tr = sparse_bptt.forward(cfg, params, xb, b_th=1e-6)  # tiny band: forward only
        out[s:s + xb.shape[1]] = tr.ybar
    return out


def accuracy(cfg: ModelConfig, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    return float((predict_logits(cfg, params, x).argmax(1) == y).mean())


def spec_mask(xb: np.ndarray, freq: int, time_: int, n_mels: int,
              rng: np.random.Generator) -> np.ndarray:
    """SpecAugment-style masks on normalised features (B, T, F), zero = the mean.

    One band of w ~ U{0..freq} mel channels (and their deltas, channel + n_mels) and one
    span of w ~ U{0..time_} frames per sample.
    """
    B, T, F = xb.shape
    keep = np.ones((B, T, F), bool)
    if freq:
        w = rng.integers(0, freq + 1, size=B)
        f0 = rng.integers(0, n_mels - w + 1)
        ch = np.arange(n_mels)
        band = (ch[None] >= f0[:, None]) & (ch[None] < (f0 + w)[:, None])  # (B, n_mels)
        full = np.zeros((B, F), bool)
        full[:, :n_mels] = band
        if F >= 2 * n_mels:
            full[:, n_mels:2 * n_mels] = band
        keep &= ~full[:, None, :]
    if time_:
        w = rng.integers(0, time_ + 1, size=B)
        t0 = rng.integers(0, T - w + 1)
        tt = np.arange(T)
        span = (tt[None] >= t0[:, None]) & (tt[None] < (t0 + w)[:, None])
        keep &= ~span[:, :, None]
    return np.where(keep, xb, DTYPE(0.0)).astype(DTYPE)


def freq_warp(xb: np.ndarray, alpha: np.ndarray, frontend: FrontendConfig) -> np.ndarray:
    """Vocal tract length perturbation (after Jaitly & Hinton 2013) of normalised
    features (B, T, F): sample b sounds as if every frequency were alpha[b] times higher.

    Mel channel c takes the value of the (fractional) channel whose centre is
    f_c / alpha, linearly interpolated, on the un-normalised features; the deltas are
    warped the same way (a linear map across channels commutes with the delta filter
    along time). Channels past the band edges repeat the edge channel.
    """
    n = frontend.n_mels
    centres = mel_centres(frontend)
    src = np.interp(centres[None, :] / alpha[:, None], centres, np.arange(n))  # (B, n)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).astype(DTYPE)[:, None, :]
    mean = np.asarray(frontend.norm_mean, DTYPE)
    std = np.asarray(frontend.norm_std, DTYPE)
    raw = xb * std + mean
    out = np.empty_like(raw)
    for lo in range(0, raw.shape[2] - n + 1, n):  # the log-mel block, then the deltas
        blk = raw[:, :, lo:lo + n]
        a = np.take_along_axis(blk, i0[:, None, :], axis=2)
        b = np.take_along_axis(blk, i1[:, None, :], axis=2)
        out[:, :, lo:lo + n] = a + w * (b - a)
    return ((out - mean) / std).astype(DTYPE)


def batch_grads(cfg: ModelConfig, params: Params, xb: np.ndarray, yb: np.ndarray,
                tcfg: TrainConfig) -> tuple[float, bptt.Grads, dict]:
    """Loss, gradients and activity stats for one batch xb (T, B, F)."""
    if tcfg.sparse:
        loss, g, tr = sparse_bptt.loss_and_grads(
            cfg, params, xb, yb, b_th=tcfg.b_th, reg_coef=tcfg.reg_coef,
            target_rate=tcfg.target_rate, warn_silent=True)
        stats = {"active_fraction": tr.active_fraction, "rate": tr.firing_rate,
                 "correct": int((tr.ybar.argmax(1) == yb).sum())}
    else:
        loss, g, tr = bptt.loss_and_grads(cfg, params, xb, yb, reg_coef=tcfg.reg_coef,
                                          target_rate=tcfg.target_rate)
        stats = {"active_fraction": 1.0, "rate": float(tr.z.mean()),
                 "correct": int((tr.y.mean(0).argmax(1) == yb).sum())}
    return loss, g, stats


# ---------------------------------------------------------------- the loop
@dataclass
class TrainState:
    """What a resume needs: weights, optimizer state and the next epoch to run."""

    params: Params
    optimizer: Adam
    epoch: int = 0
    history: list = field(default_factory=list)
    ema: Params | None = None  # exponential moving average of params (TrainConfig.ema)

    def model(self) -> Params:
        """The weights to evaluate and ship: the EMA when kept, else the raw weights."""
        return self.ema if self.ema is not None else self.params


def init_train_state(cfg: ModelConfig, tcfg: TrainConfig) -> TrainState:
    seed = tcfg.seed if tcfg.init_seed is None else tcfg.init_seed
    return TrainState(init_params(cfg, seed), Adam(lr=tcfg.lr))


def lr_at(tcfg: TrainConfig, epoch: int) -> float:
    if tcfg.epochs <= 1:
        return tcfg.lr
    c = 0.5 * (1 + math.cos(math.pi * epoch / (tcfg.epochs - 1)))
    return tcfg.lr_final + (tcfg.lr - tcfg.lr_final) * c


def run_epoch(cfg: ModelConfig, data: KWSData, tcfg: TrainConfig, st: TrainState,
              on_batch: Progress | None = None) -> dict:
    """One epoch of minibatch training, in place on st.params / st.optimizer."""
    rng = np.random.default_rng([tcfg.seed, st.epoch])
    n = data.train_y.shape[0]
    n_ver = data.train_x.shape[0]
    if n_ver > 1:
        ver = np.where(rng.random(n) < tcfg.p_clean, 0, rng.integers(1, n_ver, size=n))
    else:
        ver = np.zeros(n, np.int64)
    order = rng.permutation(n)
    st.optimizer.lr = lr_at(tcfg, st.epoch)
    p = st.params
    tot_loss = tot_correct = 0.0
    act, rate = [], []
    for s in range(0, n, tcfg.batch_size):
        idx = order[s:s + tcfg.batch_size]
        xb = data.train_x[ver[idx], idx]
        if tcfg.freq_warp:
            alpha = rng.uniform(1.0 - tcfg.freq_warp, 1.0 + tcfg.freq_warp, size=len(idx))
            xb = freq_warp(xb, alpha, data.frontend)
        if tcfg.freq_mask or tcfg.time_mask:
            xb = spec_mask(xb, tcfg.freq_mask, tcfg.time_mask, data.frontend.n_mels, rng)
        if tcfg.feature_noise:
            xb = xb + tcfg.feature_noise * rng.standard_normal(xb.shape).astype(DTYPE)
        xb = np.ascontiguousarray(xb.transpose(1, 0, 2))
        loss, g, stats = batch_grads(cfg, p, xb, data.train_y[idx], tcfg)
        grads = list(g.arrays())
        if tcfg.weight_decay:
            grads[0] = grads[0] + DTYPE(tcfg.weight_decay) * p.w_in
            grads[1] = grads[1] + DTYPE(tcfg.weight_decay) * p.w_rec
        st.optimizer.step([p.w_in, p.w_rec, p.w_out], grads)
        zero_diagonal(p.w_rec)
        if tcfg.ema:
            if st.ema is None:
                st.ema = p.copy()
            d = DTYPE(tcfg.ema)
            for e, w in zip(st.ema.arrays()[:3], p.arrays()[:3], strict=True):
                e *= d
                e += (DTYPE(1.0) - d) * w
        tot_loss += loss * len(idx)
        tot_correct += stats["correct"]
        act.append(stats["active_fraction"])
        rate.append(stats["rate"])
        if on_batch:
            on_batch(len(idx))
    if not all(np.isfinite(a).all() for a in p.arrays()):
        raise ConfigError("training diverged (non-finite weights); lower --lr")
    return {"epoch": st.epoch, "loss": tot_loss / n, "train_acc": tot_correct / n,
            "active_fraction": float(np.mean(act)), "rate": float(np.mean(rate)),
            "lr": st.optimizer.lr}


def train(
    cfg: ModelConfig, data: KWSData, tcfg: TrainConfig, st: TrainState | None = None, *,
    on_epoch_start: Callable[[int], Progress] | None = None,
    on_epoch_end: Callable[[dict, TrainState], None] | None = None,
    stop_after: int | None = None,
) -> TrainState:
    """Train from `st` (fresh when None) up to tcfg.epochs; callbacks see every epoch.

    on_epoch_end(record, state) is where the CLI writes its periodic checkpoint.
    stop_after ends the run early after that many epochs of this call (to be resumed
    later), counted from `st.epoch`: so repeating the same command with --resume goes on
    instead of stopping at once.
    """
    st = st or init_train_state(cfg, tcfg)
    last = tcfg.epochs if stop_after is None else min(tcfg.epochs, st.epoch + stop_after)
    while st.epoch < last:
        t0 = time.perf_counter()
        adv = on_epoch_start(st.epoch) if on_epoch_start else None
        rec = run_epoch(cfg, data, tcfg, st, adv)
        rec["val_acc"] = accuracy(cfg, st.model(), data.val_x, data.val_y)
        rec["seconds"] = time.perf_counter() - t0
        st.history.append(rec)
        st.epoch += 1
        if on_epoch_end:
            on_epoch_end(rec, st)
    return st


def labels() -> list[str]:
    return list(KWS_LABELS)
