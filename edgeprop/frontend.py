"""Log-mel + causal-delta feature frontend: one chain for batch and stream.

Stages (each a small function below, chained identically by `features` and
`StreamingFrontend.push`)::

    framing   frame k covers samples [k*hop - (win - hop), k*hop + hop) of the stream,
              with zeros before the stream starts; frame k is emitted once hop k
              completes, so N samples give exactly N // hop frames (1 s -> 100).
    window    w = periodic Hann(win)                         (librosa's default window)
    power     P_k = |rfft(w * frame_k, n_fft)|^2
    mel       M_k = P_k @ mel_basis.T                        (librosa.filters.mel, slaney)
    log       c_k = log(M_k + floor)
    delta     d_k = (c_k - c_{k-D}) / D ,  c_{k<0} = log(floor) (the silence before the
              stream), D = delta_lag: causal, no look-ahead, so stream == batch exactly;
              it is the centred slope at frame k - D/2, i.e. delayed by D/2 frames.
    norm      f_k = ([c_k, d_k] - norm_mean) / norm_std      (fixed, fitted on training
              frames by `fit_normalization`; never statistics of the clip being read.
              A personalised model moves norm_mean toward its user's voice and
              microphone once, from their adaptation clips: `toward_user`)

The hot path is NumPy (float64 inside, float32 out). The filterbank is built once
per config and cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from edgeprop.audio import check_audio
from edgeprop.errors import ConfigError
from edgeprop.network import is_int, is_real

FRONTEND_VERSION = 1  # bump when the maths changes, so hashes (and caches) change too


#: from_dict's type check, by field annotation
_SETTING_KINDS = {"int": ("an integer", is_int),
                  "float": ("a finite number", lambda v: is_real(v) and math.isfinite(v)),
                  "bool": ("true or false", lambda v: isinstance(v, (bool, np.bool_)))}


@dataclass(frozen=True)
class FrontendConfig:
    """Every setting of the feature chain; checkpoints and the wire store it.

    Defaults follow the paper's keyword spotter (Rostami et al. 2022, after Bellec et
    al. 2020): 16 kHz, 40 log-mel bands 20-4000 Hz, 30 ms window, 10 ms hop, plus 40
    deltas = 80 channels, 100 frames per second.
    """

    sample_rate: int = 16000
    n_mels: int = 40
    fmin: float = 20.0
    fmax: float = 4000.0
    win_ms: float = 30.0
    hop_ms: float = 10.0
    n_fft: int = 512
    log_floor: float = 1e-6
    deltas: bool = True
    delta_lag: int = 2
    norm_mean: tuple[float, ...] | None = None
    norm_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # one canonical type per setting: FrontendConfig(fmin=20) equals the default,
        # so it must hash (handshake, feature cache) the same, and 20 != 20.0 in JSON
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and is_real(value):
                object.__setattr__(self, f.name, float(value))
            elif f.type == "int" and is_int(value):
                object.__setattr__(self, f.name, int(value))
            elif f.type == "bool" and isinstance(value, np.bool_):
                object.__setattr__(self, f.name, bool(value))
        if self.sample_rate <= 0 or self.n_mels <= 0:
            raise ConfigError("sample_rate and n_mels must be positive")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ConfigError(f"need 0 <= fmin < fmax <= sample_rate/2, got "
                              f"{self.fmin}, {self.fmax}")
        if self.hop <= 0 or self.win < self.hop:
            raise ConfigError(f"need 0 < hop <= win samples, got hop {self.hop}, win {self.win}")
        if self.n_fft < self.win:
            raise ConfigError(f"n_fft {self.n_fft} is shorter than the window ({self.win})")
        if self.log_floor <= 0:
            raise ConfigError("log_floor must be > 0")
        if self.delta_lag < 1:
            raise ConfigError("delta_lag must be >= 1")
        for name in ("norm_mean", "norm_std"):
            val = getattr(self, name)
            if val is not None:
                val = tuple(float(v) for v in val)
                object.__setattr__(self, name, val)
                if len(val) != self.n_features:
                    raise ConfigError(f"{name} has {len(val)} values, expected {self.n_features}")
        if (self.norm_mean is None) != (self.norm_std is None):
            raise ConfigError("set both norm_mean and norm_std, or neither")
        if self.norm_std is not None and min(self.norm_std) <= 0:
            raise ConfigError("norm_std values must be > 0")

    @property
    def n_features(self) -> int:
        return self.n_mels * (2 if self.deltas else 1)

    @property
    def hop(self) -> int:
        return int(round(self.sample_rate * self.hop_ms / 1000))

    @property
    def clip_frames(self) -> int:
        """Frames of one dataset clip (every clip is cut or padded to 1 s)."""
        return self.sample_rate // self.hop

    @property
    def win(self) -> int:
        return int(round(self.sample_rate * self.win_ms / 1000))

    @property
    def normalized(self) -> bool:
        return self.norm_mean is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("norm_mean", "norm_std"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FrontendConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"version"}
        if unknown:
            raise ConfigError(f"unknown frontend settings: {sorted(unknown)}")
        kw = {k: v for k, v in d.items() if k in known}
        for f in fields(cls):  # a stored or sent config: the wrong type is named, not a
            if f.name in kw and f.type in _SETTING_KINDS:  # TypeError deep in the maths
                kind, ok = _SETTING_KINDS[f.type]
                if not ok(kw[f.name]):
                    raise ConfigError(f"frontend setting {f.name} must be {kind}, got "
                                      f"{kw[f.name]!r}")
        for k in ("norm_mean", "norm_std"):
            if kw.get(k) is not None:
                kw[k] = tuple(float(v) for v in kw[k])
        return cls(**kw)

    def hash(self) -> str:
        """sha256 of the canonical JSON (sorted keys, repr floats), plus the maths version."""
        d = self.to_dict()
        d["version"] = FRONTEND_VERSION
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def with_normalization(self, mean, std) -> FrontendConfig:
        mean = np.asarray(mean, dtype=np.float64).ravel()
        std = np.asarray(std, dtype=np.float64).ravel()
        return replace(self, norm_mean=tuple(mean.tolist()), norm_std=tuple(std.tolist()))

    def without_normalization(self) -> FrontendConfig:
        return replace(self, norm_mean=None, norm_std=None)


# ---------------------------------------------------------------- stages (shared)

class _Tables:
    """Constants of one config: window, sliced mel basis, norm affine."""

    def __init__(self, cfg: FrontendConfig):
        import librosa

        self.window = librosa.filters.get_window("hann", cfg.win, fftbins=True).astype(np.float64)
        basis = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                    fmin=cfg.fmin, fmax=cfg.fmax, dtype=np.float64)
        nz = np.flatnonzero(basis.any(axis=0))
        # Bins above fmax (or below fmin) have zero weight: skip computing their power.
        self.bin_lo, self.bin_hi = int(nz[0]), int(nz[-1]) + 1
        self.mel_t = np.ascontiguousarray(basis[:, self.bin_lo:self.bin_hi].T)
        self.mel_centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.fmin,
                                                   fmax=cfg.fmax)[1:-1]
        self.log_floor_value = float(np.log(cfg.log_floor))
        if cfg.normalized:
            self.scale = 1.0 / np.asarray(cfg.norm_std, dtype=np.float64)
            self.shift = np.asarray(cfg.norm_mean, dtype=np.float64) * self.scale
        else:
            self.scale = self.shift = None


@functools.lru_cache(maxsize=16)
def _tables(cfg: FrontendConfig) -> _Tables:
    return _Tables(cfg)


def mel_basis(cfg: FrontendConfig) -> np.ndarray:
    """The full (n_mels, n_fft//2+1) librosa filterbank this config uses."""
    t = _tables(cfg)
    full = np.zeros((cfg.n_mels, cfg.n_fft // 2 + 1))
    full[:, t.bin_lo:t.bin_hi] = t.mel_t.T
    return full


def mel_centres(cfg: FrontendConfig) -> np.ndarray:
    """(n_mels,) centre frequency in Hz of each mel band of this config."""
    return _tables(cfg).mel_centres


def frame_signal(padded: np.ndarray, cfg: FrontendConfig, n_frames: int) -> np.ndarray:
    """(..., L) padded samples -> (..., n_frames, win) frames, a view (no copy)."""
    view = np.lib.stride_tricks.sliding_window_view(padded, cfg.win, axis=-1)
    return view[..., : (n_frames - 1) * cfg.hop + 1 : cfg.hop, :]


def log_mel(frames: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """(..., win) frames -> (..., n_mels) float64 log-mel: window, power, mel, log."""
    t = _tables(cfg)
    spec = np.fft.rfft(frames * t.window, n=cfg.n_fft, axis=-1)[..., t.bin_lo:t.bin_hi]
    power = spec.real * spec.real + spec.imag * spec.imag
    return np.log(power @ t.mel_t + cfg.log_floor)


def add_deltas(logmel: np.ndarray, history: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """(..., T, M) log-mel and (..., D, M) previous frames -> (..., T, 2M) [c, d].

    d_k = (c_k - c_{k-D}) / D, with the D frames before the first one taken from
    `history` (log(floor) at stream start).
    """
    lag = cfg.delta_lag
    full = np.concatenate([history, logmel], axis=-2)
    delta = (full[..., lag:, :] - full[..., :-lag, :]) * (1.0 / lag)
    return np.concatenate([logmel, delta], axis=-1)


def normalize(feats: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """Fixed per-channel affine (x - mean) / std; identity when the config has none."""
    t = _tables(cfg)
    if t.scale is None:
        return feats
    return feats * t.scale - t.shift


def _initial_history(cfg: FrontendConfig, lead: tuple[int, ...] = ()) -> np.ndarray:
    return np.full(lead + (cfg.delta_lag, cfg.n_mels), _tables(cfg).log_floor_value)


# ---------------------------------------------------------------- batch

def features(audio: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """(N,) -> (N // hop, F) or (B, N) -> (B, N // hop, F) float32 features.

    Equal to what `StreamingFrontend` emits for the same samples in any block sizes.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ConfigError(f"features() takes (N,) or (B, N) audio, got shape {x.shape}")
    n_frames = x.shape[-1] // cfg.hop
    lead = x.shape[:-1]
    if n_frames == 0:
        return np.zeros(lead + (0, cfg.n_features), dtype=np.float32)
    pad = np.zeros(lead + (cfg.win - cfg.hop,))
    padded = np.concatenate([pad, x], axis=-1)
    c = log_mel(frame_signal(padded, cfg, n_frames), cfg)
    if cfg.deltas:
        c = add_deltas(c, _initial_history(cfg, lead), cfg)
    return normalize(c, cfg).astype(np.float32)


def raw_log_mel(audio: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """Un-normalised log-mel (no deltas), float64, batch framing: for tests and benches."""
    x = np.asarray(audio, dtype=np.float64)
    n_frames = x.shape[-1] // cfg.hop
    padded = np.concatenate([np.zeros(x.shape[:-1] + (cfg.win - cfg.hop,)), x], axis=-1)
    return log_mel(frame_signal(padded, cfg, n_frames), cfg)


def librosa_log_mel(audio: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """The same log-mel computed by librosa.feature.melspectrogram, framing aligned.

    librosa centres a `win`-long window inside each `n_fft`-long frame, so padding the
    stream with (win - hop) zeros plus (n_fft - win)/2 on each side and using
    center=False gives the same frames as ours. Returns (T, n_mels) float64.
    """
    import librosa

    x = np.asarray(audio, dtype=np.float64)
    n_frames = x.shape[-1] // cfg.hop
    side = (cfg.n_fft - cfg.win) // 2
    y = np.concatenate([np.zeros(cfg.win - cfg.hop + side), x, np.zeros(side + cfg.n_fft)])
    mel = librosa.feature.melspectrogram(
        y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop, win_length=cfg.win,
        window="hann", center=False, power=2.0, n_mels=cfg.n_mels, fmin=cfg.fmin,
        fmax=cfg.fmax,
    )
    return np.log(mel[:, :n_frames].T + cfg.log_floor)


def fit_normalization(frames: np.ndarray, cfg: FrontendConfig) -> FrontendConfig:
    """Per-channel mean/std over training frames (..., F) -> cfg with that affine.

    `frames` must be un-normalised features of `cfg` (pass cfg.without_normalization()
    to `features`). A std below 1e-3 is raised to 1e-3 so a silent channel can't blow up.
    """
    f = np.asarray(frames, dtype=np.float64).reshape(-1, np.shape(frames)[-1])
    if f.shape[-1] != cfg.n_features:
        raise ConfigError(f"frames have {f.shape[-1]} channels, config has {cfg.n_features}")
    if f.shape[0] < 2:
        raise ConfigError("need at least 2 frames to fit a normalisation")
    return cfg.with_normalization(f.mean(axis=0), np.maximum(f.std(axis=0), 1e-3))


def speech_mean(feats: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """(n_mels,) float64: the mean of the static log-mel channels over speech frames.

    `feats` (N, T, F) are normalised features of `cfg`, one row per 1 s clip. A frame
    counts as speech when its mean over the n_mels static channels is at or above its
    clip's median: the louder half of each clip. The quieter half is mostly the room
    and the microphone's noise floor, which says little about the voice.
    """
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 3 or f.shape[-1] != cfg.n_features or f.shape[0] == 0:
        raise ConfigError(f"speech_mean takes (N, T, {cfg.n_features}) features with N >= 1, "
                          f"got shape {f.shape}")
    static = f[..., :cfg.n_mels]
    level = static.mean(axis=-1)
    speech = level >= np.median(level, axis=1, keepdims=True)
    return (static * speech[..., None]).sum(axis=(0, 1)) / speech.sum()


def toward_user(cfg: FrontendConfig, user_mean: np.ndarray, ref_mean: np.ndarray,
                fraction: float) -> FrontendConfig:
    """cfg with its normalisation moved `fraction` of the way to one user's speech mean.

    Speaker (and microphone) mean normalisation: user_mean and ref_mean are
    `speech_mean`s of the user's clips and of the training set, both in cfg's normalised
    units. The personalised chain computes f'_k = f_k - fraction (user_mean - ref_mean)
    on the static channels (deltas of a constant offset are 0), as one changed
    norm_mean: norm_mean'_k = norm_mean_k + fraction (user_mean_k - ref_mean_k) norm_std_k.
    fraction 0 gives cfg back unchanged; 1 removes the whole offset of the user's mean.
    """
    if not cfg.normalized:
        raise ConfigError("toward_user needs a normalised frontend config")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must be in [0, 1], got {fraction}")
    user_mean, ref_mean = (np.asarray(m, dtype=np.float64).ravel() for m in (user_mean, ref_mean))
    if user_mean.shape != (cfg.n_mels,) or ref_mean.shape != (cfg.n_mels,):
        raise ConfigError(f"user and reference means need {cfg.n_mels} values, got "
                          f"{user_mean.size} and {ref_mean.size}")
    if fraction == 0.0:
        return cfg
    mean = np.asarray(cfg.norm_mean, dtype=np.float64)
    std = np.asarray(cfg.norm_std, dtype=np.float64)
    mean[:cfg.n_mels] += fraction * (user_mean - ref_mean) * std[:cfg.n_mels]
    return cfg.with_normalization(mean, std)


# ---------------------------------------------------------------- stream

class StreamingFrontend:
    """Push audio blocks of any size; get the frames whose hop completed.

    State is the last (win - hop) + partial-hop samples and the last `delta_lag`
    log-mel frames. `reset()` returns to the start of a stream (silence before it).
    """

    def __init__(self, cfg: FrontendConfig):
        self.cfg = cfg
        self._t = _tables(cfg)
        self._keep = cfg.win - cfg.hop
        self._empty = np.zeros((0, cfg.n_features), dtype=np.float32)
        # work buffers of the one-frame fast path (the common 10 ms push), and their views
        t, m = self._t, cfg.n_mels
        self._frame = np.zeros(cfg.n_fft)
        self._frame_win = self._frame[: cfg.win]
        self._spec = np.zeros(cfg.n_fft // 2 + 1, dtype=np.complex128)
        # the used bins' (re, im) pairs as one float64 view, their squares, their power
        self._spec_parts = self._spec.view(np.float64)[2 * t.bin_lo: 2 * t.bin_hi]
        squares = np.zeros(2 * (t.bin_hi - t.bin_lo))
        self._squares, self._re2, self._im2 = squares, squares[0::2], squares[1::2]
        self._power = np.zeros(t.bin_hi - t.bin_lo)
        self._out = np.zeros(cfg.n_features)
        self._static, self._delta = self._out[:m], self._out[m:]
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self._keep)
        self._hist = _initial_history(self.cfg)
        self.frames_out = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """samples (n,) float in [-1, 1] -> (n_new_frames, F) float32; n_new_frames may be 0.

        Integer PCM blocks are scaled like `audio.check_audio` does. No NaN/rate/channel
        checks here (hot path): sources pass their blocks through `check_audio` first.
        """
        cfg = self.cfg
        samples = np.asarray(samples)
        if samples.dtype.kind in "iu":
            samples = check_audio(samples.ravel(), cfg.sample_rate, name="stream",
                                  expected_rate=cfg.sample_rate)
        buf = np.concatenate([self._buf, samples.ravel()], dtype=np.float64)
        n = (buf.shape[0] - self._keep) // cfg.hop
        if n <= 0:
            self._buf = buf
            return self._empty
        if n == 1:
            return self._push_one(buf)
        c = log_mel(frame_signal(buf, cfg, n), cfg)
        self._buf = buf[n * cfg.hop:]
        self.frames_out += n
        if cfg.deltas:
            out = add_deltas(c, self._hist, cfg)
            lag = cfg.delta_lag
            # a fresh array: the one-frame path updates the history in place
            self._hist = (np.concatenate([self._hist, c])[-lag:] if n < lag
                          else c[-lag:].copy())
        else:
            out = c
        return normalize(out, cfg).astype(np.float32)

    def _push_one(self, buf: np.ndarray) -> np.ndarray:
        """Exactly one new frame: the same arithmetic as the batch stages, in order, on
        preallocated buffers (a third of the NumPy calls and allocations; equal bits)."""
        cfg, t, out = self.cfg, self._t, self._out
        np.multiply(buf[: cfg.win], t.window, out=self._frame_win)
        np.fft.rfft(self._frame, out=self._spec)
        np.square(self._spec_parts, out=self._squares)  # re^2, im^2 interleaved
        power = np.add(self._re2, self._im2, out=self._power)
        c = np.matmul(power, t.mel_t, out=self._static)
        c += cfg.log_floor
        np.log(c, out=c)
        self._buf = buf[cfg.hop:]
        self.frames_out += 1
        if cfg.deltas:
            hist = self._hist
            delta = np.subtract(c, hist[0], out=self._delta)
            delta *= 1.0 / cfg.delta_lag
            hist[:-1] = hist[1:]
            hist[-1] = c
        frame = np.empty((1, cfg.n_features), dtype=np.float32)
        if t.scale is None:
            frame[0] = out
        else:
            out *= t.scale
            np.subtract(out, t.shift, out=frame[0])  # float64 maths, rounded to float32
        return frame
