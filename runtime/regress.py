"""Replayed-stream regression suite: shipped recordings, their goldens, and the comparison.

A *recording* is an inbound stream exactly as a frontend sends it (hello, frames with
labels and label windows, end-of-stream) plus the header that says what produced it
(frontend config and hash, encoder, labels, the checkpoint's params_hash). The suite
replays every recording through a learner on real ZeroMQ sockets
(`replay_over_sockets`) with learning on and compares what comes back with the
recording's *golden*: detections with times, the final weight hash, and posterior
summary statistics.

Shipped recordings are stored compactly (`.npz`, zlib) because a protocol recording of
float frames costs 320 bytes a frame: binary spike frames are bit-packed (10 bytes for
80 channels); float frames (the ``current`` encoder) are quantised to int8 per channel
(x = q * scale[c], float32). The quantised values *are* the recorded input -- they are
sent as float32 frames, bit-exactly the same on every replay. Recordings made with
`edgeprop record` (protocol `.rec` files) are replayed too.

Two tiers of comparison (docs/regression.md):

- **exact** when determinism holds -- same checkpoint, same backend, same platform
  fingerprint (CPU model, NumPy version and BLAS, Python): the sha256 of all posteriors,
  the final weight hash, the frame count and every detection (frame, label) must be equal.
- **tolerant** otherwise (float order can differ between BLAS builds and CPUs): frame
  count exact; per-class posterior mean within 2e-3 and max within 2e-2; argmax class
  counts within 1 % of the frames; detections of the same label matched within +-5
  frames for >= 90 % of the golden ones and count within +-10 %; per-matrix weight
  L2 norms within 1e-3 relative.

A golden whose starting checkpoint hash differs from the checkpoint in use is a
failure with the reason "checkpoint changed"; `--update` rewrites it.

Public API::

    StreamRecording(name, header, frames (T, substeps, ch), labels (T,), windows (T,))
        .hello(stream) / .frame_messages(stream) / .end(stream) / .label_windows()
    save_compact(rec, path) / load_compact(path) / load_any(path: .npz | .rec)
    list_recordings(folder) ; golden_path(rec_path) ; read_goldens / write_golden
    build_recordings(data_dir, out_dir, checkpoint, seed=0) -> [paths]
    encode_stream(audio, spans [(start, end, label)], checkpoint)
        -> frames, labels, windows, pauses
    LoopbackLearner(checkpoint, backend)      learner thread on 127.0.0.1 (context manager)
    stream_over_socket(rec, endpoint, stream, garbage=None) -> posteriors, detections, ...
    replay_over_sockets(rec, checkpoint, backend) -> result ; make_golden ; compare
    run_one(rec_path, checkpoint, checkpoint_hash, backend, update=False) -> row
    control_call(endpoint, ControlRequest) -> ControlReply
    ResilientStreamer(endpoint, rec, stream, speed=1.0).run(duration_s) -> stats
        (lossless by acknowledgement across learner restarts; the soak's client)
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeprop.atomic_file import atomic_write_bytes
from edgeprop.errors import ConfigError, EdgepropError, ProtocolError
from runtime import protocol as P
from runtime.bench_report import cpu_model

RECORDINGS_DIR = Path(__file__).resolve().parent / "assets" / "recordings"
COMPACT_FORMAT = "edgeprop-compact-recording/1"
GOLDEN_FORMAT = "edgeprop-golden/1"
FRAMES_PER_MESSAGE = 10  # 100 ms of frames per wire message

#: Tolerances of the tolerant tier (see the module docstring for why each exists).
TOLERANCES = {
    "posterior_mean_abs": 2e-3,
    "posterior_max_abs": 2e-2,
    "argmax_count_frac": 0.01,
    "detection_frames": 5,
    "detection_match_frac": 0.9,
    "detection_count_rel": 0.10,
    "weight_norm_rel": 1e-3,
}


# ---------------------------------------------------------------- files

def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- recordings

@dataclass
class StreamRecording:
    """One replayable inbound stream: frames (T, substeps, channels), labels and windows.

    `frames` is uint8 0/1 (sent bit-packed) or float32 (sent as values).
    """

    name: str
    header: P.RecordingHeader
    frames: np.ndarray
    labels: np.ndarray
    windows: np.ndarray
    hop_s: float = 0.01
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    #: an *audio* recording keeps the samples and (start, end, label) spans instead of
    #: frames; `materialize` runs the model's frontend + encoder on them at replay time,
    #: so the suite covers the feature chain too
    audio: np.ndarray | None = None
    spans: list | None = None
    #: (T,) bool: frame i ends a pause (edgeprop.pauses), as a frontend node flags it;
    #: None for recordings made before the flags existed (replayed without them)
    pauses: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def is_binary(self) -> bool:
        return self.frames.dtype == np.uint8

    def hello(self, stream: str, mode: str = "replay") -> P.Hello:
        return P.Hello(stream, self.header.frontend_hash, self.header.encoder_id,
                       int(self.frames.shape[2]), int(self.frames.shape[1]), mode,
                       client="edgeprop-regress", hop_s=self.hop_s)

    def frame_messages(self, stream: str, per_message: int = FRAMES_PER_MESSAGE,
                       stamp: bool = False) -> list[P.Frames]:
        """The frames as wire messages of up to `per_message` frames each."""
        out = []
        for s in range(0, self.n_frames, per_message):
            e = min(self.n_frames, s + per_message)
            out.append(P.Frames(
                stream, s, round(s * self.hop_s, 6), self.hop_s, self.header.encoder_id,
                self.frames[s:e], labels=[int(v) for v in self.labels[s:e]],
                windows=[int(v) for v in self.windows[s:e]],
                t_in_ns=[P.now_ns()] * (e - s) if stamp else None,
                pauses=None if self.pauses is None else P.pause_flags(self.pauses[s:e])))
        return out

    def end(self, stream: str) -> P.EndOfStream:
        return P.EndOfStream(stream, self.n_frames - 1)

    def label_windows(self) -> list[dict]:
        """[{window, label, start, end}] frame ranges of the labelled windows."""
        out: list[dict] = []
        prev = P.NO_LABEL
        for i, (w, lab) in enumerate(zip(self.windows.tolist(), self.labels.tolist(),
                                         strict=True)):
            if w == P.NO_LABEL or lab == P.NO_LABEL:
                prev = P.NO_LABEL
                continue
            if w != prev:
                out.append({"window": int(w), "label": int(lab), "start": i, "end": i + 1})
            else:
                out[-1]["end"] = i + 1
            prev = w
        return out


def materialize(rec: StreamRecording, checkpoint: Any) -> StreamRecording:
    """An audio recording -> frames through the checkpoint's own frontend and encoder."""
    from runtime.recording import header_for

    if rec.audio is None:
        return rec
    frames, labels, windows, pauses = encode_stream(rec.audio, rec.spans or [], checkpoint)
    header = header_for(checkpoint, note=rec.header.note)
    return StreamRecording(rec.name, header, frames, labels, windows, rec.hop_s, rec.meta,
                           rec.path, pauses=pauses)


def _flac_bytes(audio: np.ndarray, sr: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _flac_audio(data: bytes) -> np.ndarray:
    import soundfile as sf

    x, _ = sf.read(io.BytesIO(data), dtype="float32")
    return x


def save_compact(rec: StreamRecording, path: Path) -> Path:
    """Write a shipped recording: bit-packed or int8-quantised frames, or 16-bit FLAC
    audio, zlib-compressed."""
    arrays: dict[str, np.ndarray] = {
        "labels": rec.labels.astype(np.int8),
        "windows": rec.windows.astype(np.int16),
    }
    if rec.pauses is not None:
        arrays["pauses"] = rec.pauses.astype(np.uint8)
    meta = dict(rec.meta)
    meta.update({"format": COMPACT_FORMAT, "name": rec.name, "hop_s": rec.hop_s,
                 "shape": list(rec.frames.shape), "header": rec.header.to_map()})
    if rec.audio is not None:
        meta["fmt"] = "audio"
        sr = int(meta.get("sample_rate", 16000))
        meta["sample_rate"] = sr
        arrays["audio_flac"] = np.frombuffer(_flac_bytes(rec.audio, sr), dtype=np.uint8)
        arrays["spans"] = np.asarray(rec.spans or np.zeros((0, 3)), dtype=np.int64)
    elif rec.is_binary:
        meta["fmt"] = "bits"
        arrays["frames"] = np.frombuffer(P.pack_bits(rec.frames), dtype=np.uint8)
    else:
        meta["fmt"] = "q8"
        x = rec.frames.astype(np.float32)
        scale = (np.abs(x).reshape(-1, x.shape[2]).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        arrays["frames"] = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
        arrays["scale"] = scale
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    arrays["meta"] = np.frombuffer(meta_bytes, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_compact(path: Path) -> StreamRecording:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != COMPACT_FORMAT:
                raise ProtocolError(f"{path}: not a {COMPACT_FORMAT} file")
            shape = tuple(int(s) for s in meta["shape"])
            audio = spans = None
            if meta["fmt"] == "audio":
                audio = _flac_audio(z["audio_flac"].tobytes())
                spans = [tuple(int(v) for v in row) for row in z["spans"]]
                frames = np.zeros(shape, dtype=np.float32)
            elif meta["fmt"] == "bits":
                frames = P.unpack_bits(z["frames"].tobytes(), shape).astype(np.uint8)
            elif meta["fmt"] == "q8":
                frames = (z["frames"].astype(np.float32) * z["scale"]).astype(np.float32)
            else:
                raise ProtocolError(f"{path}: unknown frame format {meta['fmt']!r}")
            labels = z["labels"].astype(np.int64)
            windows = z["windows"].astype(np.int64)
            pauses = z["pauses"].astype(bool) if "pauses" in z.files else None
    except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as exc:
        # numpy calls any non-array bytes "pickled data" and suggests loading them unsafely:
        # that advice must not reach a user whose file is merely corrupt or foreign
        why = "not an array file" if "pickle" in str(exc) else f"{type(exc).__name__}: {exc}"
        raise ProtocolError(f"{path}: unreadable recording ({why})") from None
    header = P.RecordingHeader.from_map(meta.pop("header"))
    return StreamRecording(meta["name"], header, frames, labels, windows,
                           float(meta["hop_s"]), meta, path, audio, spans, pauses)


def load_protocol_recording(path: Path) -> StreamRecording:
    """A `.rec` file from `edgeprop record`: its inbound frames become a StreamRecording."""
    from runtime.recording import read_recording

    rec = read_recording(path)
    frames = sorted(rec.frames(), key=lambda f: f.seq)
    if not frames:
        raise ProtocolError(f"{path}: the recording holds no frames")
    streams = list(dict.fromkeys(f.stream for f in frames))
    if len(streams) > 1:  # their frames would be interleaved by seq into one nonsense stream
        raise ProtocolError(f"{path}: holds {len(streams)} streams ({', '.join(map(repr, streams))}"
                            "); regress replays one stream per recording: record each with "
                            "`edgeprop record`, or check it with `edgeprop replay`")
    arr = np.concatenate([np.asarray(f.spikes) for f in frames])
    labels = np.concatenate([np.asarray(f.labels if f.labels is not None
                                        else [P.NO_LABEL] * f.n) for f in frames])
    windows = np.concatenate([np.asarray(f.windows if f.windows is not None
                                         else [P.NO_LABEL] * f.n) for f in frames])
    pauses = np.concatenate([np.asarray(f.pauses if f.pauses is not None else [0] * f.n)
                             for f in frames]).astype(bool)
    return StreamRecording(Path(path).stem, rec.header, arr, labels.astype(np.int64),
                           windows.astype(np.int64), float(frames[0].hop_s),
                           {"source": "edgeprop record"}, Path(path), pauses=pauses)


def load_any(path: Path) -> StreamRecording:
    path = Path(path)
    return load_compact(path) if path.suffix == ".npz" else load_protocol_recording(path)


def list_recordings(folder: Path = RECORDINGS_DIR) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no recordings folder (build one with "
                          "`edgeprop regress --build-recordings --data DIR`)")
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".npz", ".rec") and not p.name.endswith(".golden.json"))


def golden_path(rec_path: Path) -> Path:
    rec_path = Path(rec_path)
    return rec_path.with_name(rec_path.stem + ".golden.json")


# ---------------------------------------------------------------- environment

def platform_fingerprint(backend: str) -> dict:
    """What exact float results depend on besides the code: CPU, NumPy + BLAS, Python."""
    cpu = cpu_model()
    blas = "unknown"
    try:
        cfg = np.show_config(mode="dicts")  # numpy >= 1.26
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        blas = f"{b.get('name', '?')} {b.get('version', '?')}"
    except Exception:  # older numpy: no dict mode; the version alone has to do
        pass
    return {"cpu": cpu, "machine": platform.machine(), "numpy": np.__version__,
            "blas": blas, "python": platform.python_version(), "backend": backend}


# ---------------------------------------------------------------- goldens

def posterior_stats(post: np.ndarray) -> dict:
    """Summary statistics of (T, n_out) posteriors; sha256 pins them bit for bit."""
    post = np.asarray(post, dtype=np.float32)
    if post.size == 0:
        return {"frames": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    am = post.argmax(axis=1)
    return {
        "frames": int(post.shape[0]),
        "sha256": hashlib.sha256(np.ascontiguousarray(post, dtype="<f4").tobytes()).hexdigest(),
        "mean": [round(float(v), 6) for v in post.mean(axis=0)],
        "std": [round(float(v), 6) for v in post.std(axis=0)],
        "max": [round(float(v), 6) for v in post.max(axis=0)],
        "argmax_counts": np.bincount(am, minlength=post.shape[1]).tolist(),
        "mean_top": round(float(post.max(axis=1).mean()), 6),
    }


def weight_stats(params: Any) -> dict:
    """Per-matrix L2 norms of a Params (for the tolerant tier)."""
    out = {}
    for name in ("w_in", "w_rec", "w_out"):
        a = np.asarray(getattr(params, name), dtype=np.float64)
        out[name] = round(float(np.sqrt((a * a).sum())), 6)
    return out


def detection_score(rec: StreamRecording, detections: list[dict], labels: list[str],
                    slack_frames: int = 50) -> dict:
    """Hits / misses / false alarms against the labelled keyword windows.

    A window of a keyword is hit by a detection of that keyword whose frame lies in
    [start, end + slack); any other detection is a false alarm.
    """
    kw = {i for i, lab in enumerate(labels) if not lab.startswith("_")}
    wins = [w for w in rec.label_windows() if w["label"] in kw]
    used = set()
    hits = 0
    for w in wins:
        for j, d in enumerate(detections):
            if j in used or d["index"] != w["label"]:
                continue
            if w["start"] <= d["frame"] < w["end"] + slack_frames:
                used.add(j)
                hits += 1
                break
    return {"keyword_windows": len(wins), "hits": hits, "misses": len(wins) - hits,
            "false_alarms": len(detections) - len(used)}


def make_golden(rec: StreamRecording, rec_path: Path, result: dict, backend: str,
                checkpoint_hash: str) -> dict:
    """The golden record of one replay `result` (see `replay_over_sockets`)."""
    dets = [{"frame": int(d["frame"]), "t": round(float(d["t"]), 4), "label": d["label"],
             "index": int(d["index"]), "score": round(float(d["score"]), 6)}
            for d in result["detections"]]
    labels = list(rec.header.labels) or [str(i) for i in range(result["posteriors"].shape[1])]
    return {
        "format": GOLDEN_FORMAT,
        "recording": Path(rec_path).name,
        "recording_sha256": sha256_file(rec_path),
        "description": rec.meta.get("description", ""),
        "checkpoint_params_hash": checkpoint_hash,
        "fingerprint": platform_fingerprint(backend),
        "learning": True,
        "frames": int(result["frames"]),
        "learned_windows": int(result.get("learned_windows", -1)),
        "detections": dets,
        "detection_score": detection_score(rec, dets, labels),
        "final_params_hash": result["params_hash"],
        "weights": result["weights"],
        "posteriors": posterior_stats(result["posteriors"]),
    }


# ---------------------------------------------------------------- comparison

@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def _match_detections(golden: list[dict], got: list[dict], slack: int) -> int:
    used: set[int] = set()
    matched = 0
    for g in golden:
        for j, d in enumerate(got):
            if j not in used and d["label"] == g["label"] and abs(d["frame"] - g["frame"]) <= slack:
                used.add(j)
                matched += 1
                break
    return matched


def compare(golden: dict, current: dict) -> dict:
    """Compare a fresh golden-shaped record with the stored golden.

    Returns {tier, passed, checks: [{name, ok, detail}], reason}.
    """
    checks: list[Check] = []
    if golden.get("checkpoint_params_hash") != current.get("checkpoint_params_hash"):
        was = str(golden.get("checkpoint_params_hash", "?"))[:12]
        now = str(current.get("checkpoint_params_hash", "?"))[:12]
        checks.append(Check("checkpoint", False,
                            f"golden made with checkpoint {was}, now {now}: checkpoint "
                            "changed (rerun with --update if intended)"))
        return _verdict("none", checks)
    if golden.get("recording_sha256") != current.get("recording_sha256"):
        checks.append(Check("recording", False, "recording file changed since its golden"))
        return _verdict("none", checks)
    exact = golden.get("fingerprint") == current.get("fingerprint")
    tier = "exact" if exact else "tolerant"
    checks.append(Check("frames", golden["frames"] == current["frames"],
                        f"{current['frames']} vs {golden['frames']}"))
    gp, cp = golden["posteriors"], current["posteriors"]
    gd, cd = golden["detections"], current["detections"]
    if exact:
        checks.append(Check("posteriors_sha256", gp["sha256"] == cp["sha256"],
                            "bitwise" if gp["sha256"] == cp["sha256"] else
                            _stats_diff(gp, cp)))
        key = lambda d: (d["frame"], d["label"])
        same = [key(d) for d in gd] == [key(d) for d in cd]
        checks.append(Check("detections", same, f"{len(cd)} vs {len(gd)}" + (
            "" if same else f"; first diff {_first_diff(gd, cd)}")))
        checks.append(Check("final_params_hash",
                            golden["final_params_hash"] == current["final_params_hash"],
                            f"{current['final_params_hash'][:12]} vs "
                            f"{golden['final_params_hash'][:12]}"))
    else:
        tol = TOLERANCES
        if gp.get("frames", 0) and cp.get("frames", 0):
            dm = _max_abs_diff(gp["mean"], cp["mean"])
            dx = _max_abs_diff(gp["max"], cp["max"])
            da = _max_abs_diff(gp["argmax_counts"], cp["argmax_counts"])
            checks.append(Check("posterior_mean", dm <= tol["posterior_mean_abs"],
                                f"max |d| {dm:.2e}"))
            checks.append(Check("posterior_max", dx <= tol["posterior_max_abs"],
                                f"max |d| {dx:.2e}"))
            checks.append(Check("argmax_counts", da <= tol["argmax_count_frac"] * gp["frames"],
                                f"max |d| {da} frames"))
        matched = _match_detections(gd, cd, tol["detection_frames"])
        need = int(np.ceil(tol["detection_match_frac"] * len(gd)))
        count_ok = abs(len(cd) - len(gd)) <= max(1, tol["detection_count_rel"] * len(gd))
        checks.append(Check("detections", matched >= need and count_ok,
                            f"{matched}/{len(gd)} matched, {len(cd)} found"))
        gw, cw = golden["weights"], current["weights"]
        rel = max(abs(gw[k] - cw[k]) / max(abs(gw[k]), 1e-12) for k in gw)
        checks.append(Check("weight_norms", rel <= tol["weight_norm_rel"], f"max rel {rel:.2e}"))
    return _verdict(tier, checks)


def _stats_diff(g: dict, c: dict) -> str:
    if not g.get("mean") or not c.get("mean"):
        return "differs"
    return f"differs; max |d mean| {_max_abs_diff(g['mean'], c['mean']):.2e}"


def _max_abs_diff(a: list, b: list) -> float:
    if len(a) != len(b):
        return float("inf")
    return float(max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0))


def _first_diff(gd: list[dict], cd: list[dict]) -> str:
    for i in range(max(len(gd), len(cd))):
        a = gd[i] if i < len(gd) else None
        b = cd[i] if i < len(cd) else None
        if a is None or b is None or (a["frame"], a["label"]) != (b["frame"], b["label"]):
            fmt = lambda d: "none" if d is None else f"{d['label']}@{d['frame']}"
            return f"#{i}: golden {fmt(a)}, now {fmt(b)}"
    return "none"


def _verdict(tier: str, checks: list[Check]) -> dict:
    failed = [c for c in checks if not c.ok]
    return {"tier": tier, "passed": not failed,
            "checks": [dataclasses.asdict(c) for c in checks],
            "reason": "; ".join(f"{c.name}: {c.detail}" for c in failed)}


def golden_changes(old: dict | None, new: dict) -> list[str]:
    """Human lines saying what `--update` changed in one golden (for commit review)."""
    if old is None:
        return ["new golden"]
    out = []
    for key in ("checkpoint_params_hash", "recording_sha256", "frames", "final_params_hash",
                "learned_windows"):
        if old.get(key) != new.get(key):
            a, b = str(old.get(key)), str(new.get(key))
            out.append(f"{key}: {a[:16]} -> {b[:16]}")
    if old.get("fingerprint") != new.get("fingerprint"):
        diff = {k: (old.get("fingerprint", {}).get(k), v)
                for k, v in new.get("fingerprint", {}).items()
                if old.get("fingerprint", {}).get(k) != v}
        out.append(f"fingerprint: {diff}")
    od = [(d["label"], d["frame"]) for d in old.get("detections", [])]
    nd = [(d["label"], d["frame"]) for d in new.get("detections", [])]
    if od != nd:
        out.append(f"detections: {len(od)} -> {len(nd)} "
                   f"(gone {sorted(set(od) - set(nd))[:5]}, new {sorted(set(nd) - set(od))[:5]})")
    if old.get("posteriors", {}).get("sha256") != new["posteriors"].get("sha256"):
        out.append("posteriors: " + _stats_diff(old.get("posteriors", {}), new["posteriors"]))
    if old.get("detection_score") != new.get("detection_score"):
        out.append(f"detection_score: {old.get('detection_score')} -> {new.get('detection_score')}")
    return out or ["unchanged"]


# ---------------------------------------------------------------- building recordings

SNRS_DB = (0.0, 10.0, 20.0)
#: Gap between words in the clean and noise recordings: longer than the detector's
#: default 1 s refractory period, so each word's detection time is the model's own and
#: not pinned to the end of the previous refractory period (long_stream has shorter gaps
#: on purpose, to cover that interplay).
GAP_S = 1.2
CLIP_S = 1.0


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.asarray(x, dtype=np.float64) ** 2))


def _assemble(pieces: list[tuple[np.ndarray, int, float]], gaps: list[float],
              bed: np.ndarray | None, sr: int, lead_s: float = 0.3
              ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Concatenate clips with gaps over an optional noise bed.

    pieces: (audio, label index, SNR dB or nan for 'as recorded'). With a bed, each
    clip is scaled so that its power over the noise bed's power is the SNR
    (gain g = sqrt(P_n 10^(SNR/10) / P_x)); the bed runs through gaps too.
    Returns the audio and [(start sample, end sample, label)].
    """
    total = int(lead_s * sr) + sum(len(a) for a, _, _ in pieces) + int(sum(gaps) * sr)
    out = np.zeros(total, dtype=np.float64)
    if bed is not None:
        reps = int(np.ceil(total / len(bed)))
        out += np.tile(np.asarray(bed, dtype=np.float64), reps)[:total]
    p_n = _power(out) if bed is not None else 0.0
    spans = []
    pos = int(lead_s * sr)
    for (audio, label, snr), gap in zip(pieces, gaps, strict=True):
        x = np.asarray(audio, dtype=np.float64)
        if bed is not None and np.isfinite(snr) and _power(x) > 0:
            x = x * np.sqrt(p_n * 10 ** (snr / 10) / _power(x))
        out[pos:pos + len(x)] += x
        spans.append((pos, pos + len(x), label))
        pos += len(x) + int(gap * sr)
    peak = np.max(np.abs(out)) if out.size else 0.0
    if peak > 1.0:  # keep the sum a valid audio signal (one gain for the whole stream)
        out /= peak
    return out.astype(np.float32), spans


def encode_stream(audio: np.ndarray, spans: list[tuple[int, int, int]], checkpoint: Any,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Audio -> (frames (T, substeps, channels), labels (T,), windows (T,), pauses (T,)).

    The features and the encoder are the checkpoint's own (the chain the frontend node
    runs; batch == stream exactly, edgeprop/frontend.py). Frame k (hop k complete) of a
    clip spanning samples [s, e) is labelled when s // hop <= k < e // hop; each clip
    is its own label window. `pauses` are the frontend node's flags (edgeprop.pauses).
    """
    from edgeprop.encoders import encoder_from_dict
    from edgeprop.frontend import FrontendConfig, features
    from edgeprop.pauses import PauseDetector

    fe = checkpoint.frontend if isinstance(checkpoint.frontend, dict) \
        else checkpoint.frontend.to_dict()
    fcfg = FrontendConfig.from_dict(fe)
    enc_d = checkpoint.encoder if isinstance(checkpoint.encoder, dict) or \
        checkpoint.encoder is None else checkpoint.encoder.to_dict()
    enc = encoder_from_dict(enc_d or {"name": "current", "n_in": fcfg.n_features})
    feats = features(audio, fcfg)
    x = np.asarray(enc.encode(feats))
    n = feats.shape[0]
    x = x.reshape(n, enc.substeps, -1)
    if enc.name != "current" and np.all((x == 0) | (x == 1)):
        x = x.astype(np.uint8)
    else:
        x = x.astype(np.float32)
    labels = np.full(n, P.NO_LABEL, dtype=np.int64)
    windows = np.full(n, P.NO_LABEL, dtype=np.int64)
    hop = fcfg.hop
    for w, (s, e, lab) in enumerate(spans):
        labels[s // hop:e // hop] = lab
        windows[s // hop:e // hop] = w
    return x, labels, windows, PauseDetector(fcfg).run(feats)


def _pick(clips: list, label: str, k: int, rng: np.random.Generator, used: set) -> list:
    pool = [c for c in clips if c.label == label and c.key not in used]
    if len(pool) < k:
        raise ConfigError(f"need {k} clips of {label!r}, the data folder has {len(pool)}")
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
    used.update(c.key for c in chosen)
    return chosen


def recording_plans(data_dir: Path, labels: list[str], seed: int = 0) -> list[dict]:
    """What each shipped recording holds (clips, gaps, noise, SNR), fixed by the seed."""
    from edgeprop.datasets import scan_speech_commands

    scan = scan_speech_commands(data_dir, tuple(labels))
    clips = scan.clips
    rng = np.random.default_rng(seed)
    used: set = set()
    keywords = [lab for lab in labels if not lab.startswith("_")]
    plans = []
    clean = [c for kw in keywords for c in _pick(clips, kw, 1, rng, used)]
    clean += _pick(clips, "_unknown_", 2, rng, used)
    order = rng.permutation(len(clean))
    plans.append({"name": "clean_speech", "description": "10 keywords and 2 unknown words, "
                  "clean, 1.2 s gaps", "clips": [clean[i] for i in order],
                  "gaps": [GAP_S] * len(clean), "noise": None, "snr": [float("nan")] * len(clean)})
    noise_dir = Path(data_dir) / "_background_noise_"
    for nf in sorted(noise_dir.glob("*.wav")):
        kws = [c for kw in rng.choice(keywords, size=6, replace=False)
               for c in _pick(clips, str(kw), 1, rng, used)]
        snr = [SNRS_DB[i // 2] for i in range(6)]
        plans.append({"name": f"noise_{nf.stem}",
                      "description": f"6 keywords in {nf.name}, 2 each at 0, 10 and 20 dB SNR, "
                                     "1.2 s gaps", "clips": kws, "gaps": [GAP_S] * 6,
                      "noise": nf, "snr": snr})
    sil = _pick(clips, "_silence_", 4, rng, used)
    plans.append({"name": "silence", "description": "4 s of _silence_ clips (background only)",
                  "clips": sil, "gaps": [0.0] * 4, "noise": None, "snr": [float("nan")] * 4})
    long_clips = [c for kw in keywords for c in _pick(clips, kw, 5, rng, used)]
    long_clips += _pick(clips, "_unknown_", 10, rng, used)
    order = rng.permutation(len(long_clips))
    gaps = [round(float(g), 2) for g in rng.uniform(0.2, 1.0, size=len(long_clips))]
    plans.append({"name": "long_stream", "description": f"{len(long_clips)} words (50 keywords, "
                  "10 unknown) with 0.2-1.0 s gaps, clean", "clips": [long_clips[i] for i in order],
                  "gaps": gaps, "noise": None, "snr": [float("nan")] * len(long_clips)})
    return plans


def build_recordings(data_dir: Path, out_dir: Path, checkpoint: Any, seed: int = 0,
                     note: str = "") -> list[Path]:
    """Build the shipped recordings from a Speech Commands folder (deterministic)."""
    from edgeprop.audio import load_wav
    from edgeprop.datasets import load_clip
    from runtime.recording import header_for
    from runtime.stream import trim_voiced

    data_dir = Path(data_dir)
    fe = checkpoint.frontend if isinstance(checkpoint.frontend, dict) \
        else checkpoint.frontend.to_dict()
    sr = int(fe.get("sample_rate", 16000))
    labels = list(checkpoint.labels or [])
    if not labels:
        from edgeprop.network import KWS_LABELS

        labels = list(KWS_LABELS)
    written = []
    for plan in recording_plans(data_dir, labels, seed):
        bed = None
        if plan["noise"] is not None:
            bed = load_wav(plan["noise"], sr)
            # a fixed, seeded excerpt of the noise, at its recorded level
            start = int(np.random.default_rng(seed + len(written)).integers(
                0, max(1, len(bed) - 20 * sr)))
            bed = bed[start:start + 20 * sr]
        # words are trimmed to their voiced part as `edgeprop run` does (runtime/stream.py),
        # so a label window is the utterance, not the 1 s padding; silence stays whole
        pieces = [(load_clip(c, sr) if c.label == "_silence_" else trim_voiced(load_clip(c, sr)),
                   c.label_index, s) for c, s in zip(plan["clips"], plan["snr"], strict=True)]
        audio, spans = _assemble(pieces, plan["gaps"], bed, sr)
        frames, lab, win, pauses = encode_stream(audio, spans, checkpoint)
        header = header_for(checkpoint, note=note or f"edgeprop regress --build-recordings "
                                                     f"(seed {seed})")
        # a reproducible build: the same data, model and seed give byte-identical files
        header.created = float(os.environ.get("SOURCE_DATE_EPOCH", 0))
        meta = {"description": plan["description"], "seed": seed,
                "clips": [str(Path(c.path).relative_to(data_dir)) for c in plan["clips"]],
                "snr_db": [None if not np.isfinite(s) else s for s in plan["snr"]],
                "gaps_s": plan["gaps"], "noise": plan["noise"].name if plan["noise"] else None,
                "audio_s": round(len(audio) / sr, 3),
                "build": "edgeprop regress --build-recordings --data DIR"}
        rec = StreamRecording(plan["name"], header, frames, lab, win,
                              hop_s=fe.get("hop_ms", 10.0) / 1000.0, meta=meta, pauses=pauses)
        written.append(save_compact(rec, Path(out_dir) / f"{plan['name']}.npz"))
        if plan["name"] == "clean_speech":  # the same stream once more, as audio
            name = "clean_speech_audio"
            audio_meta = dict(meta, sample_rate=sr, description=plan["description"] +
                          "; stored as 16-bit FLAC audio, encoded by the model's frontend "
                          "at replay time")
            arec = StreamRecording(name, header, np.zeros((0,) + frames.shape[1:], np.float32),
                                   lab, win, rec.hop_s, audio_meta, audio=audio, spans=spans)
            written.append(save_compact(arec, Path(out_dir) / f"{name}.npz"))
    return written


# ---------------------------------------------------------------- replay on real sockets

class LoopbackLearner:
    """A learner node (LearnerCore + LearnerNode, its own thread) on 127.0.0.1 ports.

    In-process so that a whole suite starts in milliseconds, but every message crosses
    a real ZeroMQ TCP socket both ways, exactly as from a remote frontend.
    """

    def __init__(self, checkpoint: Any, backend: str, detector: dict | None = None,
                 checkpoint_dir: Path | None = None, name: str = "regress-learner"):
        from runtime.learner_node import LearnerCore, LearnerNode

        self.core = LearnerCore(checkpoint, backend=backend, detector=detector, learning=True,
                                checkpoint_dir=checkpoint_dir, checkpoint_every=1e9,
                                peer_timeout_s=60.0, name=name)
        self.node = LearnerNode(self.core, bind="tcp://127.0.0.1:*",
                                control_bind="tcp://127.0.0.1:*", hwm=1000)
        self.node.start()
        self.data = self.node.endpoints["data_router"]
        self.control_ep = self.node.endpoints["control_rep"]

    def close(self) -> None:
        self.node.stop()
        self.core.close()

    def __enter__(self) -> LoopbackLearner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def control_call(endpoint: str, req: P.ControlRequest, timeout_s: float = 30.0
                 ) -> P.ControlReply:
    """One request/reply on a learner's control_rep socket."""
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.connect(endpoint)
    try:
        sock.send(P.encode(req))
        try:
            reply = P.decode(sock.recv())
        except zmq.Again:
            raise ProtocolError(f"no control reply from {endpoint} within {timeout_s:g} s") \
                from None
    finally:
        sock.close(0)
    if not isinstance(reply, P.ControlReply):
        raise ProtocolError(f"control socket answered with {reply.TYPE}")
    return reply


def stream_over_socket(rec: StreamRecording, endpoint: str, stream: str,
                       timeout_s: float = 120.0, garbage: dict[int, list[bytes]] | None = None,
                       ) -> dict:
    """Send one recording to a learner's data socket (DEALER -> ROUTER), losslessly.

    Sends as fast as the learner takes them (the socket's high-water mark is the
    backpressure) while reading replies, until the learner echoes end-of-stream.
    `garbage` maps a message index to raw byte strings sent just before it (fault
    injection). Returns posteriors, detections, notices and timing.
    """
    import time

    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100)
    sock.setsockopt(zmq.RCVHWM, 0)  # never drop replies on our side
    sock.connect(endpoint)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    try:
        sock.send(P.encode(rec.hello(stream)))
        if not sock.poll(int(timeout_s * 1000)):
            raise ProtocolError(f"no hello reply from {endpoint} within {timeout_s:g} s")
        reply = P.decode(sock.recv())
        if not isinstance(reply, P.HelloReply) or not reply.accepted:
            raise ProtocolError(f"learner refused recording {rec.name!r}: "
                                f"{getattr(reply, 'reason', reply)}")
        outgoing: list[bytes] = []
        msgs = rec.frame_messages(stream) + [rec.end(stream)]
        for i, m in enumerate(msgs):
            outgoing.extend((garbage or {}).get(i, []))
            outgoing.append(P.encode(m))
        posts: list[tuple[int, np.ndarray]] = []
        dets: list[dict] = []
        notices: list[dict] = []
        i = 0
        done = False
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN | zmq.POLLOUT)
        while not done:
            if time.monotonic() > deadline:
                raise ProtocolError(f"recording {rec.name!r}: no end-of-stream echo within "
                                    f"{timeout_s:g} s ({i}/{len(outgoing)} messages sent)")
            events = dict(poller.poll(100)).get(sock, 0)
            if events & zmq.POLLOUT and i < len(outgoing):
                try:
                    while i < len(outgoing):
                        sock.send(outgoing[i], zmq.NOBLOCK)
                        i += 1
                except zmq.Again:
                    pass
                if i == len(outgoing):
                    poller.modify(sock, zmq.POLLIN)
            if events & zmq.POLLIN:
                while True:
                    try:
                        raw = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = P.decode(raw)
                    if isinstance(msg, P.Posteriors) and msg.stream == stream:
                        posts.append((msg.seq, msg.probs))
                    elif isinstance(msg, P.Detection) and msg.stream == stream:
                        dets.append({"frame": msg.seq, "t": msg.t, "label": msg.label,
                                     "index": msg.index, "score": msg.score})
                    elif isinstance(msg, P.Notice):
                        notices.append({"kind": msg.kind, "detail": msg.detail})
                    elif isinstance(msg, P.EndOfStream) and msg.stream == stream:
                        done = True
    finally:
        sock.close(0)
    posts.sort(key=lambda p: p[0])
    n_out = len(rec.header.labels) or 12
    post = np.concatenate([p for _, p in posts]) if posts else np.zeros((0, n_out), np.float32)
    seqs = [s + k for s, p in posts for k in range(p.shape[0])]
    return {"posteriors": post, "seqs": seqs, "detections": dets, "notices": notices,
            "seconds": time.monotonic() - t0}


def replay_over_sockets(rec: StreamRecording, checkpoint: Any, backend: str,
                        detector: dict | None = None, timeout_s: float = 120.0) -> dict:
    """Replay one recording through a fresh loopback learner; the result `make_golden` takes.

    Final weights come back over the control socket (`checkpoint` to a temp file, then
    loaded), so nothing reaches into the learner's memory.
    """
    from edgeprop.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory(prefix="edgeprop-regress-") as tmp:
        with LoopbackLearner(checkpoint, backend, detector) as learner:
            sent = stream_over_socket(rec, learner.data, f"regress-{rec.name}", timeout_s)
            ck = control_call(learner.control_ep, P.ControlRequest(
                "checkpoint", args={"path": str(Path(tmp) / "final.ckpt")}))
            stats = control_call(learner.control_ep, P.ControlRequest("stats"))
        if not ck.ok or not stats.ok:
            raise ProtocolError(f"learner control failed: {ck.error or stats.error}")
        final = load_checkpoint(ck.result["path"])
    counts = stats.result.get("counts", {})
    expected = list(range(rec.n_frames))
    return {
        "frames": int(sent["posteriors"].shape[0]),
        "lost_frames": len(set(expected) - set(sent["seqs"])),
        "posteriors": sent["posteriors"],
        "detections": sent["detections"],
        "notices": sent["notices"],
        "params_hash": ck.result["params_hash"],
        "weights": weight_stats(final.params),
        "learned_windows": int(counts.get("windows_learned", 0)),
        "faults": {k: v for k, v in counts.items()
                   if k in P.ERROR_KINDS + ("config_mismatch", "seq_gaps", "seq_dups",
                                            "outputs_dropped", "frames_missing")},
        "seconds": sent["seconds"],
    }


# ---------------------------------------------------------------- golden files

def read_goldens(rec_path: Path) -> dict:
    """{backend: golden} stored beside a recording ({} when there is none yet)."""
    gp = golden_path(rec_path)
    if not gp.exists():
        return {}
    try:
        d = json.loads(gp.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{gp}: unreadable golden ({exc}); rewrite it with --update") from None
    if d.get("format") != GOLDEN_FORMAT or not isinstance(d.get("by_backend"), dict):
        raise ConfigError(f"{gp}: not a {GOLDEN_FORMAT} file; rewrite it with --update")
    return d["by_backend"]


def write_golden(rec_path: Path, backend: str, golden: dict) -> None:
    """Store one backend's golden (others in the file are kept), atomically."""
    try:
        by_backend = read_goldens(rec_path)
    except ConfigError:
        by_backend = {}
    by_backend[backend] = golden
    text = json.dumps({"format": GOLDEN_FORMAT, "recording": Path(rec_path).name,
                       "by_backend": by_backend}, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(golden_path(rec_path), text.encode())


def check_recording_fits(rec: StreamRecording, checkpoint: Any) -> str | None:
    """None when the model can take the recording's frames, else why not."""
    from runtime.learner_node import Model

    m = Model.from_checkpoint(checkpoint)
    h = rec.header
    if h.frontend_hash and h.frontend_hash != m.frontend_hash:
        return (f"recorded with frontend {h.frontend_hash[:12]}, the model wants "
                f"{m.frontend_hash[:12]}: rebuild with --build-recordings --data DIR")
    if h.encoder_id and h.encoder_id != m.encoder_id:
        return (f"recorded with encoder {h.encoder_id}, the model wants {m.encoder_id}: "
                "rebuild with --build-recordings --data DIR")
    if tuple(rec.frames.shape[1:]) != (m.substeps, m.cfg.n_in):
        return f"frames {list(rec.frames.shape[1:])} do not fit the model"
    return None


def run_one(rec_path: Path, checkpoint: Any, checkpoint_hash: str, backend: str,
            update: bool = False, timeout_s: float = 120.0) -> dict:
    """Replay one recording on sockets and compare with (or with update, rewrite) its golden."""
    import time

    t0 = time.monotonic()
    row: dict = {"name": Path(rec_path).stem, "recording": Path(rec_path).name,
                 "backend": backend, "frames": 0}
    try:  # one unreadable or stuck recording fails its row, not the whole suite
        rec = materialize(load_any(rec_path), checkpoint)
        row.update(name=rec.name, frames=rec.n_frames)
        why = check_recording_fits(rec, checkpoint)
        res = None if why else replay_over_sockets(rec, checkpoint, backend,
                                                    timeout_s=timeout_s)
    except EdgepropError as exc:
        why = str(exc)
    if why:
        row.update(passed=False, tier="none", reason=why,
                   seconds=round(time.monotonic() - t0, 3))
        return row
    current = make_golden(rec, rec_path, res, backend, checkpoint_hash)
    row.update(lost_frames=res["lost_frames"], faults=res["faults"],
               detections=len(current["detections"]),
               detection_score=current["detection_score"],
               final_params_hash=current["final_params_hash"],
               posteriors=current["posteriors"], learned_windows=current["learned_windows"],
               replay_seconds=round(res["seconds"], 3),
               # stream seconds replayed per wall second, sockets and learning included
               speed_x_realtime=round(rec.n_frames * rec.hop_s / max(res["seconds"], 1e-9), 1))
    try:
        old = read_goldens(rec_path).get(backend)
    except ConfigError as exc:  # a corrupt golden: --update writes a new one
        if not update:
            row.update(passed=False, tier="none", reason=str(exc),
                       seconds=round(time.monotonic() - t0, 3))
            return row
        old = None
    if update:
        write_golden(rec_path, backend, current)
        row.update(passed=True, tier="updated", changes=golden_changes(old, current), reason="")
    elif old is None:
        row.update(passed=False, tier="none",
                   reason=f"no golden for backend {backend!r}; create it with --update")
    else:
        verdict = compare(old, current)
        if res["lost_frames"]:
            verdict["passed"] = False
            verdict["reason"] = (verdict["reason"] + "; " if verdict["reason"] else "") + \
                f"{res['lost_frames']} frames lost"
        row.update(verdict)
    row["seconds"] = round(time.monotonic() - t0, 3)
    return row


# ---------------------------------------------------------------- a client that survives restarts

class ResilientStreamer:
    """Replays a recording in a loop, paced, losslessly *by acknowledgement*.

    Every Frames message is acknowledged by the Posteriors the learner sends back for
    it. At most `max_inflight` messages are unacknowledged at any time (application
    flow control: nothing between us and the learner can overflow, so a broker's
    NOBLOCK forwarding never drops). When the learner goes away -- a Notice
    `unknown_stream` (it restarted, or the broker lost its worker) or `silence_s` with
    unacknowledged frames and no reply -- it says hello again and, once accepted,
    resends from the first unacknowledged message. A frame is *lost* only if it is
    never acknowledged by the end; duplicates (frames acknowledged twice because the
    learner died after processing but before we heard) are counted apart.

    Loop k of the recording uses label-window ids offset by k, so windows of
    consecutive loops never merge.
    """

    def __init__(self, endpoint: str, rec: StreamRecording, stream: str, *,
                 speed: float = 1.0, max_inflight: int = 20, silence_s: float = 3.0,
                 per_message: int = FRAMES_PER_MESSAGE):
        self.endpoint = endpoint
        self.rec = rec
        self.stream = stream
        self.speed = float(speed)
        self.max_inflight = int(max_inflight)
        self.silence_s = float(silence_s)
        self.per = int(per_message)
        self.n_msgs_loop = -(-rec.n_frames // self.per)
        self.win_span = int(rec.windows.max()) + 1 if rec.n_frames else 1
        self.acked: bytearray = bytearray()  # per message: 0 none, else number of acks
        self.stats: dict = {"rehellos": 0, "resent_messages": 0, "notices": 0,
                            "detections": 0, "errors": []}

    def _message(self, k: int) -> P.Frames:
        loop, j = divmod(k, self.n_msgs_loop)
        s = j * self.per
        e = min(self.rec.n_frames, s + self.per)
        base = loop * self.rec.n_frames
        win = self.rec.windows[s:e]
        win = np.where(win == P.NO_LABEL, P.NO_LABEL, win + loop * self.win_span)
        seq = base + s
        return P.Frames(self.stream, seq, round(seq * self.rec.hop_s, 6), self.rec.hop_s,
                        self.rec.header.encoder_id, self.rec.frames[s:e],
                        labels=[int(v) for v in self.rec.labels[s:e]],
                        windows=[int(v) for v in win], t_in_ns=[P.now_ns()] * (e - s))

    def _seq_to_msg(self, seq: int) -> int:
        loop, f = divmod(seq, self.rec.n_frames)
        return loop * self.n_msgs_loop + f // self.per

    def run(self, duration_s: float, stop_sending: Any = None, finish_timeout_s: float = 120.0
            ) -> dict:
        """Stream for `duration_s` (or until `stop_sending` is set), then drain and end."""
        import time

        import zmq

        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(self.endpoint)
        hop = self.rec.hop_s * self.per / self.speed  # seconds of stream per message
        t0 = time.monotonic()
        next_new = 0          # next never-sent message
        resend: list[int] = []
        inflight: dict[int, float] = {}  # message -> time sent
        accepted = False
        last_hello = -1e9
        last_reply = time.monotonic()
        ended = eos_sent = False
        final_total = None
        stall_since: float | None = None

        def send(data: bytes) -> bool:
            try:  # never block: a vanished peer must not hang the client
                sock.send(data, zmq.NOBLOCK)
                return True
            except zmq.Again:
                return False

        def hello() -> None:
            nonlocal last_hello, accepted
            send(P.encode(self.rec.hello(self.stream)))  # if it fails, the stall timer retries
            last_hello = time.monotonic()
            accepted = False

        try:
            hello()
            while True:
                now = time.monotonic()
                sending = final_total is None
                if sending and (now - t0 >= duration_s or
                                (stop_sending is not None and stop_sending.is_set())):
                    final_total = next_new
                if accepted and not eos_sent:
                    while resend and len(inflight) < self.max_inflight:
                        if not send(P.encode(self._message(resend[0]))):
                            break
                        inflight[resend.pop(0)] = now
                        self.stats["resent_messages"] += 1
                    while (final_total is None and len(inflight) < self.max_inflight
                           and now - t0 >= next_new * hop and not resend):
                        if not send(P.encode(self._message(next_new))):
                            break
                        self.acked.append(0)
                        inflight[next_new] = now
                        next_new += 1
                    if final_total is not None and not inflight and not resend:
                        eos = P.EndOfStream(self.stream, self._last_seq(final_total))
                        if send(P.encode(eos)):
                            eos_sent = True
                            eos_at = now
                if eos_sent and (ended or now - eos_at > 10.0):
                    break
                if final_total is not None and now - t0 > duration_s + finish_timeout_s:
                    self.stats["errors"].append("finish timeout with unacknowledged frames")
                    break
                stalled = (inflight or not accepted) and now - max(last_reply, last_hello) \
                    > self.silence_s
                if stalled:
                    stall_since = stall_since or now - self.silence_s
                    self.stats["rehellos"] += 1
                    resend = sorted(set(resend) | set(inflight))
                    inflight.clear()
                    hello()
                if not sock.poll(10):
                    continue
                while True:
                    try:
                        raw = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    last_reply = time.monotonic()
                    try:
                        msg = P.decode(raw)
                    except P.WireError as exc:
                        self.stats["errors"].append(f"undecodable reply: {exc}")
                        continue
                    if isinstance(msg, P.HelloReply) and msg.stream == self.stream:
                        if not msg.accepted:
                            self.stats["errors"].append(f"hello refused: {msg.reason}")
                            continue
                        if not accepted:
                            accepted = True
                            if stall_since is not None:
                                self.stats.setdefault("recovery_s", []).append(
                                    round(time.monotonic() - stall_since, 2))
                                stall_since = None
                            # the (new) session starts from scratch: resend what is not acked
                            resend = sorted(set(resend) | set(inflight))
                            inflight.clear()
                    elif isinstance(msg, P.Posteriors) and msg.stream == self.stream:
                        k = self._seq_to_msg(msg.seq)
                        if k < len(self.acked):
                            self.acked[k] = min(255, self.acked[k] + 1)
                        inflight.pop(k, None)
                    elif isinstance(msg, P.Detection):
                        self.stats["detections"] += 1
                    elif isinstance(msg, P.Notice):
                        self.stats["notices"] += 1
                        if msg.kind == "unknown_stream" and accepted:
                            stall_since = stall_since or time.monotonic()
                            self.stats["rehellos"] += 1
                            resend = sorted(set(resend) | set(inflight))
                            inflight.clear()
                            hello()
                    elif isinstance(msg, P.EndOfStream) and msg.stream == self.stream:
                        ended = True
        finally:
            sock.close(0)
        total = final_total if final_total is not None else next_new
        acked = self.acked[:total]
        frames_total = sum(self._msg_len(k) for k in range(total))
        lost = sum(self._msg_len(k) for k in range(total) if not acked[k])
        dups = sum(self._msg_len(k) * (acked[k] - 1) for k in range(total) if acked[k] > 1)
        self.stats.update(frames=frames_total, lost_frames=lost, duplicate_frames=dups,
                          messages=total, loops=total / max(1, self.n_msgs_loop),
                          ended_cleanly=ended, seconds=time.monotonic() - t0)
        return self.stats

    def _msg_len(self, k: int) -> int:
        j = k % self.n_msgs_loop
        return min(self.per, self.rec.n_frames - j * self.per)

    def _last_seq(self, total: int) -> int:
        if total == 0:
            return -1
        k = total - 1
        loop, j = divmod(k, self.n_msgs_loop)
        return loop * self.rec.n_frames + j * self.per + self._msg_len(k) - 1
