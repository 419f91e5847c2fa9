"""Streaming keyword detection: smooth, threshold, hold, suppress repeats. Pure; usable offline.

Per frame t the network gives a readout y[t] (n_out). The detector keeps the last W
readouts and forms the smoothed posterior

    p[t] = softmax( (1/W) sum_{s = t-W+1}^{t} y[s] ),   y[s] = 0 before the stream

i.e. the softmax of the time-averaged readout over a sliding window: exactly the
quantity the model is trained on (cross-entropy on the mean readout of a clip), taken
over the last W frames instead of a whole clip. Frames before the stream (or a reset)
count as the readout at rest, 0: averaging only the few frames seen so far let the
first 0.2 s of near-silence decide, and a word fired spuriously at the start of a
stream (and its refractory period then blocked the real one). A detection of class k
fires when

    k = argmax over keyword classes of p[t],  p_k[t] >= threshold
        on each of the last `hold` frames (the same k throughout),
    and t - t_last_detection >= refractory  (frames)

as streaming keyword spotters do (posterior smoothing + threshold + a refractory
period, after Chen et al. 2014 "Small-footprint keyword spotting using deep neural
networks"). Classes in `ignore` (by default _silence_ and _unknown_) never fire.

Why `hold`: while a word is still being heard the smoothed posterior often crosses the
threshold for a word that shares its start ("le-" of left for yes, "o-" of on for
off) and falls back when the rest arrives; without a hold that early guess fires and
the refractory period then blocks the right word. Asking for 200 ms on top delays a
detection by up to that much (about 130 ms at the median) and, on streams of speakers
not seen in pretraining, raised keyword accuracy by about 5 points and halved false
alarms (`edgeprop bench detector`, docs/runtime.md).
hold = 1 is the rule without a hold.

Parameters (all four are settings of `edgeprop serve` / `run`):
    window       W, frames (10 ms each)        default 50
    threshold    in [0, 1]                      default 0.6
    hold         frames, >= 1                   default 20 (200 ms)
    refractory   frames after a hit             default 100 (1 s)
    warmup       "rest" (above) or "seen"       default "rest"; "seen" divides by the
                                                frames seen so far (W'), the rule
                                                recordings made before it replay with
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeprop.errors import ConfigError
from edgeprop.losses import softmax
from edgeprop.network import is_int
from runtime.arg_types import int_range, probability

DEFAULT_IGNORE = ("_silence_", "_unknown_")


#: window, hold and refractory are at most 10 s: a keyword lasts about 1 s, so longer
#: smoothing or holding never fires and a longer refractory hides the next words
MAX_DETECTOR_FRAMES = 1000
WARMUPS = ("rest", "seen")


@dataclass(frozen=True)
class DetectorConfig:
    window: int = 50
    threshold: float = 0.6
    hold: int = 20
    refractory: int = 100
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    #: "rest": frames before the stream count as the readout at rest, 0; "seen": the
    #: average of the frames seen so far, the rule recordings made before 2026-12-06
    #: were made with (their replays keep it, as they keep hold 1 from before the hold)
    warmup: str = "rest"

    def __post_init__(self) -> None:
        for name, low in (("window", 1), ("hold", 1), ("refractory", 0)):
            value = getattr(self, name)
            if not low <= value <= MAX_DETECTOR_FRAMES:
                raise ConfigError(f"detection {name} must be {low}-{MAX_DETECTOR_FRAMES} frames "
                                  f"(10 ms each), got {value}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"detection threshold must be in [0, 1], got {self.threshold}")
        if self.warmup not in WARMUPS:
            raise ConfigError(f"detection warmup must be one of {', '.join(WARMUPS)}, got "
                              f"{self.warmup!r}")

    def to_dict(self) -> dict:
        return {"window": self.window, "threshold": self.threshold, "hold": self.hold,
                "refractory": self.refractory, "ignore": list(self.ignore),
                "warmup": self.warmup}

    @classmethod
    def from_dict(cls, d: dict | None) -> DetectorConfig:
        """Settings from a file (a recording, a checkpoint): checked for their types
        here, so a wrong one is a ConfigError naming it, not a TypeError in a comparison."""
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"detector settings must be a map, got {d!r}")
        d = dict(d or {})
        unknown = set(d) - {"window", "threshold", "hold", "refractory", "ignore", "warmup"}
        if unknown:
            raise ConfigError(f"unknown detector settings: {sorted(unknown)}")
        for key in ("window", "hold", "refractory"):
            if key in d and not is_int(d[key]):
                raise ConfigError(f"detector {key} must be a whole number of frames, "
                                  f"got {d[key]!r}")
        t = d.get("threshold", 0.0)
        if not (is_int(t) or isinstance(t, (float, np.floating))):
            raise ConfigError(f"detector threshold must be a number, got {d['threshold']!r}")
        if "ignore" in d:
            if not isinstance(d["ignore"], (list, tuple)) or \
                    not all(isinstance(c, str) for c in d["ignore"]):
                raise ConfigError(f"detector ignore must be a list of class names, "
                                  f"got {d['ignore']!r}")
            d["ignore"] = tuple(d["ignore"])
        return cls(**d)


def add_detector_arguments(parser, *, default_from: str | None = None) -> None:
    """--window, --threshold, --hold, --refractory for every verb that detects (serve, run,
    replay, demo live), with DetectorConfig's defaults.

    default_from (replay: "the recording's") says where unset options come from
    instead: they then default to None, so the caller can tell given from not given.
    """
    d = DetectorConfig()

    def option(flag: str, typ: type, value, what: str) -> None:
        default, said = (None, f": {default_from}") if default_from else (value, f" {value:g}")
        parser.add_argument(flag, type=typ, default=default, help=f"{what} (default{said})")

    top = MAX_DETECTOR_FRAMES
    option("--window", int_range(1, top), d.window, f"detection smoothing, frames (1-{top})")
    option("--threshold", probability, d.threshold, "detection threshold, 0-1")
    option("--hold", int_range(1, top), d.hold, "frames the top keyword must stay above the "
                                                "threshold before it fires (1: fire on the "
                                                f"first; up to {top})")
    option("--refractory", int_range(0, top), d.refractory,
           f"frames after a detection during which none fires (0-{top})")


def detector_settings(args) -> dict:
    """The detector settings `add_detector_arguments` parsed, as the learner takes them."""
    return {"window": args.window, "threshold": args.threshold, "hold": args.hold,
            "refractory": args.refractory}


def detector_flags(args) -> list[str]:
    """The same settings as `serve` options, for the learners a verb starts as processes."""
    return [a for k, v in detector_settings(args).items() for a in (f"--{k}", str(v))]


@dataclass(frozen=True)
class Hit:
    """A detection: frame index (stream seq), its time, class and smoothed score."""

    seq: int
    t: float
    index: int
    label: str
    score: float


class Detector:
    """One per stream. `push(y, seq, t)` -> (smoothed posterior, Hit | None)."""

    def __init__(self, labels: Sequence[str], cfg: DetectorConfig | None = None):
        self.cfg = cfg or DetectorConfig()
        self.labels = list(labels)
        self._fire = np.array([lab not in self.cfg.ignore for lab in self.labels])
        if not self._fire.any():
            raise ConfigError("every class is ignored: nothing could ever be detected")
        self.reset()

    def reset(self) -> None:
        self._buf: deque[np.ndarray] = deque()
        self._sum = np.zeros(len(self.labels), dtype=np.float64)
        self._last_hit: int | None = None
        self._run_k = -1  # the keyword on top above threshold, and for how many frames
        self._run_n = 0

    def push(self, y: np.ndarray, seq: int, t: float) -> tuple[np.ndarray, Hit | None]:
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        self._buf.append(y)
        self._sum += y
        if len(self._buf) > self.cfg.window:
            self._sum -= self._buf.popleft()
        n = self.cfg.window if self.cfg.warmup == "rest" else len(self._buf)
        p = softmax(self._sum / n)
        masked = np.where(self._fire, p, -1.0)
        k = int(np.argmax(masked))
        if p[k] >= self.cfg.threshold:
            self._run_n = self._run_n + 1 if k == self._run_k else 1
            self._run_k = k
        else:
            self._run_k, self._run_n = -1, 0
        hit = None
        if self._run_n >= self.cfg.hold and (
                self._last_hit is None or seq - self._last_hit >= self.cfg.refractory):
            self._last_hit = seq
            self._run_n = 0
            hit = Hit(int(seq), float(t), k, self.labels[k], float(p[k]))
        return p.astype(np.float32), hit

    def run(self, ys: np.ndarray, t0: float = 0.0, hop_s: float = 0.01,
            seq0: int = 0) -> tuple[np.ndarray, list[Hit]]:
        """Offline: a whole (T, n_out) readout -> ((T, n_out) posteriors, hits)."""
        probs = np.zeros((len(ys), len(self.labels)), dtype=np.float32)
        hits = []
        for i, y in enumerate(ys):
            probs[i], hit = self.push(y, seq0 + i, t0 + i * hop_s)
            if hit is not None:
                hits.append(hit)
        return probs, hits


@dataclass(frozen=True)
class Event:
    """A labelled utterance in a stream: [t_start, t_end) seconds."""

    t_start: float
    t_end: float
    label: str


def score_detections(events: Sequence[Event], hits: Sequence[tuple[float, str]],
                     keywords: Sequence[str], tolerance_s: float = 0.5) -> dict:
    """Match detections to utterances.

    An utterance of a keyword counts as *detected correctly* when a detection with its
    label falls in [t_start, t_end + tolerance_s] (the smoothing window delays the peak
    past the word's end). Every detection that does not match a keyword utterance of
    the same label is a *false alarm* (wrong word, an _unknown_ word, noise, or a
    second hit on the same utterance). accuracy = detected correctly / keyword
    utterances. delays_s: per correct detection, detection time minus the word's end
    (negative: before the end); median_delay_s their median, None without any.
    false_alarm_kinds splits the false alarms by where they fell (same window rule; the
    first that applies): `repeat` (a keyword's second hit), `wrong_keyword` (on another
    keyword: the classifier's confusion), `non_keyword` (on an _unknown_ word),
    `outside_words` (in a gap or the noise: the detector's own).
    """
    kw = set(keywords)
    targets = [e for e in events if e.label in kw]
    matched = [False] * len(targets)
    kinds = dict.fromkeys(("repeat", "wrong_keyword", "non_keyword", "outside_words"), 0)
    delays = []
    for t, label in hits:
        for i, e in enumerate(targets):
            if not matched[i] and e.label == label and e.t_start <= t <= e.t_end + tolerance_s:
                matched[i] = True
                delays.append(t - e.t_end)
                break
        else:
            near = {e.label for e in events if e.t_start <= t <= e.t_end + tolerance_s}
            kind = ("repeat" if label in near else "wrong_keyword" if near & kw
                    else "non_keyword" if near else "outside_words")
            kinds[kind] += 1
    n = len(targets)
    return {"keyword_utterances": n, "detected": int(sum(matched)),
            "accuracy": (sum(matched) / n) if n else float("nan"),
            "false_alarms": sum(kinds.values()), "false_alarm_kinds": kinds,
            "delays_s": delays,
            "median_delay_s": float(np.median(delays)) if delays else None}
