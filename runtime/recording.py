"""Record any stream of wire messages to a file; read it back; replay it deterministically.

File format (docs/protocol.md, "Recordings"): a concatenation of msgpack maps, all
packed by runtime.protocol. The first is a `RecordingHeader` (frontend config and its
hash, encoder and its id, the checkpoint's params_hash, labels, model config); every
following one is a `RecordEntry` holding one encoded protocol message, its direction
("in" = towards the learner: hello, frames with their labels, control, eos; "out" =
from the learner: posteriors, detections, replies), the monotonic time it was seen and
a CRC-32 of the message (a reader refuses an entry whose bytes changed).
The writer appends to `<path>.part`, flushing every entry, and renames it to `<path>`
on close (atomic: a reader never sees a half-renamed file; a recorder killed mid-write
leaves a readable `.part` whose truncated last entry is ignored; a write that fails,
e.g. on a full disk, removes the `.part` and raises an OSError naming `<path>`).

Public API (stable)::

    RecordingWriter(path, header: RecordingHeader)      context manager
        .write(direction: "in"|"out", msg: Message | bytes, t_ns: int | None = None)
        .close() -> Path
    header_for(checkpoint, note="", runtime=None) -> RecordingHeader
        runtime: the learner settings replay needs to be identical (apply_delay, lr,
        detector, backend); replay_recording uses them unless told otherwise
    read_recording(path) -> Recording
        Recording.header, .entries (list[RecordEntry]), .inputs() / .outputs()
        (decoded messages, decoded once per Recording), .learner_params_hash() (the
        weights the learner had at hello), .posteriors() -> {stream: (n, n_out) array},
        .detections() -> list[Detection], .frames() -> list[Frames],
        .require_frames() (frames, or ProtocolError when there is nothing to replay)
        a folder, a file that is not a recording, or damaged entries: ProtocolError
    first_hello_reply(messages) -> HelloReply | None  (the first accepted one)
    check_hello_reply(msg, recorded_outputs, who)  ConfigError for a hello the replay's
        learner rejected (and the recorded one did not): nothing of it would compare
    recorded_settings(recording) -> dict  (the recording learner's backend, lr, ...)
    replay_recording(recording, checkpoint, *, backend=None, learning=None,
                     detector=None, lr=None, apply_delay=None) -> ReplayResult
        feeds every "in" message, in recorded order, through a fresh LearnerCore
        (runtime.learner_node) loaded from the checkpoint: no sockets, no clocks, so
        the posteriors and the final weights are a pure function of (recording,
        checkpoint). ReplayResult: posteriors {stream: array}, detections, params,
        params_hash, outputs (all messages produced).
    compare_replay(recording, result) -> dict  (max_abs_diff of posteriors, frames
        compared / replayed, detections_equal, identical; a recording cut short is
        compared over the frames it holds outputs for; rejected / first_rejected: the
        recorded inputs the replay's learner rejected, see rejected_inputs)
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from edgeprop.errors import CheckpointError, ConfigError, ProtocolError
from edgeprop.network import is_int, is_real
from runtime import protocol as P
from runtime.backends import BACKENDS


class RecordingWriter:
    """Append wire messages to a recording; atomic rename on close.

    A write that fails (disk full, ...) removes the `.part` and raises an OSError naming
    the recording: a failed recording leaves nothing, and the CLI says which file.
    """

    def __init__(self, path: str | os.PathLike, header: P.RecordingHeader):
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.part, "wb")
        self.count = 0
        self._closed = False
        try:
            self._f.write(P.encode(header))
            self._f.flush()
        except OSError as exc:
            self._fail(exc)

    def write(self, direction: str, msg: P.Message | bytes, t_ns: int | None = None) -> None:
        payload = msg if isinstance(msg, (bytes, bytearray)) else P.encode(msg)
        entry = P.RecordEntry(direction, P.now_ns() if t_ns is None else int(t_ns),
                              bytes(payload))
        try:
            self._f.write(P.encode(entry))
            self._f.flush()
        except OSError as exc:
            self._fail(exc)
        self.count += 1

    def close(self) -> Path:
        if not self._closed:
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                os.replace(self.part, self.path)
            except OSError as exc:
                self._fail(exc)
            self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop what was written (a failed session): OUT stays as it was before."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # the unflushed rest of a full disk
                self._f.close()
            self.part.unlink(missing_ok=True)

    def _fail(self, exc: OSError) -> NoReturn:
        """Drop the `.part`, then raise exc as an OSError about the recording's path (the
        bare OSError of a full disk names no file, so the CLI would show a traceback)."""
        self.abort()
        why = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            why += " (disk full?)"
        raise OSError(exc.errno, f"cannot write the recording: {why}", str(self.path)) from None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _encoder_dict(encoder: Any) -> dict:
    if encoder is None:
        return {}
    if isinstance(encoder, dict):
        return dict(encoder)
    return encoder.to_dict()


def header_for(checkpoint: Any, note: str = "", runtime: dict | None = None) -> P.RecordingHeader:
    """A header describing the model (an edgeprop Checkpoint) a stream is recorded against."""
    from edgeprop.checkpoint import params_hash
    from edgeprop.frontend import FrontendConfig

    fe = checkpoint.frontend
    if fe is not None and not isinstance(fe, dict):
        fe = fe.to_dict()
    enc = _encoder_dict(checkpoint.encoder)
    return P.RecordingHeader(
        created=time.time(),
        frontend_hash=FrontendConfig.from_dict(fe).hash() if fe else "",
        frontend=dict(fe or {}), encoder_id=P.encoder_id(enc) if enc else "",
        encoder=enc, params_hash=params_hash(checkpoint.params),
        labels=list(checkpoint.labels or []), model=checkpoint.cfg.to_dict(), note=note,
        runtime=dict(runtime or {}))


@dataclass
class Recording:
    header: P.RecordingHeader
    entries: list[P.RecordEntry]
    path: Path | None = None

    # direction -> its entries decoded: a replay asks for the outputs several times
    # (posteriors, detections, hashes, settings); decode them once. The entries are
    # taken as read: a Recording is not appended to.
    _decoded: dict[str, list[P.Message]] = field(default_factory=dict, init=False,
                                                 repr=False, compare=False)

    def _messages(self, direction: str) -> list[P.Message]:
        if direction not in self._decoded:
            out = []
            for e in self.entries:
                if e.direction == direction:
                    try:
                        out.append(e.message())
                    except P.WireError:
                        continue  # a learner-side recording keeps the bad inputs it survived
            self._decoded[direction] = out
        return list(self._decoded[direction])  # a copy: the caller may change its list

    def inputs(self) -> list[P.Message]:
        return self._messages("in")

    def outputs(self) -> list[P.Message]:
        return self._messages("out")

    def frames(self) -> list[P.Frames]:
        return [m for m in self.inputs() if isinstance(m, P.Frames)]

    def posteriors(self) -> dict[str, np.ndarray]:
        return collect_posteriors(self.outputs())

    def detections(self) -> list[P.Detection]:
        return [m for m in self.outputs() if isinstance(m, P.Detection)]

    def learner_params_hash(self) -> str:
        """The weights the learner really had when the stream began (its hello_reply);
        the header's hash (the model file the recorder read) if none was recorded."""
        reply = first_hello_reply(self.outputs())
        return reply.params_hash if reply is not None else self.header.params_hash

    def require_frames(self) -> list[P.Frames]:
        """The inbound frames, with outputs to compare. A recording without either (its
        recorder never got an answer from a learner, or it was cut short) has nothing
        to replay: an error, not an empty success."""
        frames = self.frames()
        if not frames:
            raise ProtocolError(f"{self.path}: the recording holds no frames")
        if not any(isinstance(m, P.Posteriors) for m in self.outputs()):
            raise ProtocolError(f"{self.path}: the recording holds no posteriors to compare "
                                "with (cut short before the learner answered?)")
        return frames


def first_hello_reply(messages: list) -> P.HelloReply | None:
    """The first accepted hello_reply: the learner's starting params_hash and settings."""
    for m in messages:
        if isinstance(m, P.HelloReply) and m.accepted and m.params_hash:
            return m
    return None


def check_hello_reply(msg: Any, recorded: list, who: str) -> None:
    """Stop a replay at a hello its learner rejected (ConfigError naming who and why):
    the stream's frames would only draw "without hello" notices, leaving nothing to
    compare. Unless the recorded learner rejected that stream's hello too (`recorded`:
    the recording's outputs): then the rejection is what was recorded."""
    if isinstance(msg, P.HelloReply) and not msg.accepted and not any(
            isinstance(m, P.HelloReply) and not m.accepted and m.stream == msg.stream
            for m in recorded):
        raise ConfigError(f"{who} rejected stream {msg.stream!r}: {msg.reason}")


#: detector settings added after recordings were made, with the rule those recordings
#: were made with (today's defaults would change their outputs)
_DETECTOR_BEFORE = {
    "hold": 1,  # before the hold: fire on the first frame above threshold (default 20)
    "warmup": "seen",  # before: average the frames seen so far, not zeros before them
}


def recorded_settings(rec: Recording) -> dict:
    """The recording learner's settings (backend, lr, detector, ...): the header's
    (`serve --record`), or, recorded at a frontend, those its hello_reply announced."""
    from runtime.detection import DetectorConfig

    header = dict(rec.header.runtime or {})  # a map: protocol checks both
    reply = first_hello_reply(rec.outputs())
    announced = dict((reply.settings or {}) if reply is not None else {})
    # the header's (the learner's own) win; a key it lacks comes from the hello_reply
    # before any default does
    rt = {**announced, **header}
    for key, (ok, what) in _SETTING_CHECKS.items():
        v = rt.get(key)
        if v is not None and not ok(v):
            where = "header runtime" if key in header else "hello_reply settings"
            raise ProtocolError(f"{rec.path}: recorded learner setting {key!r} ({where}) is "
                                f"{v!r}, not {what}")
    where = "header runtime" if "detector" in header else "hello_reply settings"
    det = rt.get("detector")
    if isinstance(det, dict):  # a setting it lacks: the rule it was recorded with
        rt["detector"] = det = {**_DETECTOR_BEFORE, **det}
    try:
        DetectorConfig.from_dict(det)
    except ConfigError as exc:
        raise ProtocolError(f"{rec.path}: recorded learner setting 'detector' ({where}): "
                            f"{exc}") from None
    return rt


# the recorded learner settings a replay takes, and the values each may have (a replay
# would otherwise fail deep in the learner on, say, lr "fast" or -1, without naming the
# recording)
_SETTING_CHECKS = {
    "backend": (lambda v: v in BACKENDS, " or ".join(map(repr, BACKENDS))),
    "lr": (lambda v: is_real(v) and math.isfinite(v) and v > 0, "a number > 0"),
    "learning": (lambda v: isinstance(v, bool), "true or false"),
    "apply_delay": (lambda v: is_int(v) and v >= 0, "a whole number of frames >= 0"),
    "late_updates": (lambda v: v in ("wait", "defer"), "'wait' or 'defer'"),
}


def collect_posteriors(messages: list) -> dict[str, np.ndarray]:
    """{stream: (n_frames, n_out)} from Posteriors messages, in seq order."""
    parts: dict[str, list[tuple[int, np.ndarray]]] = {}
    for m in messages:
        if isinstance(m, P.Posteriors):
            parts.setdefault(m.stream, []).append((m.seq, m.probs))
    return {s: np.concatenate([p for _, p in sorted(v, key=lambda x: x[0])])
            for s, v in parts.items()}


def _rows_by_seq(messages: list) -> dict[str, dict[int, np.ndarray]]:
    """{stream: {seq: posterior row}}: what compare_replay matches frame by frame (a
    recording that lost outputs mid-stream must not shift every later frame)."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for m in messages:
        if isinstance(m, P.Posteriors):
            rows = out.setdefault(m.stream, {})
            for k, row in enumerate(np.asarray(m.probs)):
                rows[m.seq + k] = row
    return out


def read_recording(path: str | os.PathLike) -> Recording:
    """Read a recording (or a `.part` left by a killed recorder)."""
    path = Path(path)
    if not path.exists():
        part = path.with_name(path.name + ".part")
        if part.exists():
            path = part
        else:
            raise ProtocolError(f"no recording at {path}")
    if path.is_dir():
        raise ProtocolError(f"{path} is a folder, not a recording (a recording is one file "
                            "written by `edgeprop record` or `edgeprop serve --record`)")
    with open(path, "rb") as f:
        it = P.iter_maps(f)
        try:
            header = next(it, None)
        except P.WireError as exc:
            if exc.kind == "version":
                raise ProtocolError(f"{path}: a recording of another format version ("
                                    f"{exc.detail}); was it made by a newer edgeprop?") from None
            header = None
        if not isinstance(header, P.RecordingHeader):
            raise ProtocolError(f"{path} is not an edgeprop recording ({_not_a_recording(path)})")
        entries = []
        try:
            for m in it:
                if not isinstance(m, P.RecordEntry):
                    raise ProtocolError(f"{path}: unexpected {m.TYPE!r} map after the header")
                entries.append(m)
        except P.WireError as exc:
            # malformed: bytes msgpack cannot read; its own words would not help
            why = "bytes that are not an entry" if exc.kind == "malformed" else exc.detail
            raise ProtocolError(f"{path}: damaged after entry {len(entries)} ({why})") from None
    return Recording(header, entries, path)


def _not_a_recording(path: Path) -> str:
    """What a file without a recording header probably is, and what to do instead."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if path.suffix == ".npz":
        return "a compact regression recording? those are run by `edgeprop regress`"
    if path.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"):
        return f"audio; record it first: edgeprop record OUT.rec --file {path}"
    return "no complete recording header at its start"


@dataclass
class ReplayResult:
    """What a replay's learner sent back. `outputs` (every message, in order) is what
    compare_replay reads; `posteriors` is their per-stream stack, for callers."""

    posteriors: dict[str, np.ndarray]
    detections: list[P.Detection]
    params: Any
    params_hash: str
    outputs: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def replay_recording(recording: Recording | str | os.PathLike, checkpoint: Any, *,
                     backend: str | None = None, learning: bool | None = None,
                     detector: dict | None = None, lr: float | None = None,
                     apply_delay: int | None = None) -> ReplayResult:
    """Feed the recorded inbound messages through a fresh learner core.

    Settings left None come from the header's `runtime` (what the recorded learner
    used), else the defaults (reference backend, learning on). The frontend-config
    hash of the recording must match the checkpoint's.
    """
    from edgeprop.checkpoint import params_hash
    from runtime.backends import DEFAULT_ONLINE_LR
    from runtime.learner_node import LearnerCore, is_replayed_input

    rec = recording if isinstance(recording, Recording) else read_recording(recording)
    want = header_for(checkpoint).frontend_hash
    if want and rec.header.frontend_hash and rec.header.frontend_hash != want:
        raise CheckpointError(f"{rec.path}: recorded with another frontend config "
                              f"({rec.header.frontend_hash[:12]}, the model's is "
                              f"{want[:12]}); replay it with the --model it was recorded "
                              f"with (params {rec.header.params_hash[:12]})")
    rt = recorded_settings(rec)
    pick = lambda given, key, default: given if given is not None else rt.get(key, default)
    core = LearnerCore(checkpoint, backend=pick(backend, "backend", "reference"),
                       detector=pick(detector, "detector", None),
                       learning=pick(learning, "learning", True),
                       lr=pick(lr, "lr", DEFAULT_ONLINE_LR),
                       apply_delay=pick(apply_delay, "apply_delay", 100),
                       late_updates=rt.get("late_updates", "wait"))
    outputs: list = []
    recorded = rec.outputs()
    try:
        for entry in rec.entries:
            if entry.direction != "in" or not is_replayed_input(entry.payload):
                continue  # (a checkpoint or shutdown an older recording holds)
            for reply in core.handle_bytes(entry.payload, route=b"replay"):
                check_hello_reply(reply, recorded, f"{rec.path}: the replay's learner")
                outputs.append(reply)
        core.finish()
        params = core.params
        return ReplayResult(collect_posteriors(outputs),
                            [m for m in outputs if isinstance(m, P.Detection)],
                            params, params_hash(params), outputs, core.stats())
    finally:
        core.close()


def compare_replay(recording: Recording, result: ReplayResult) -> dict:
    """How a replay's outputs compare with the recorded ones (identical = bitwise).

    A recording cut short (a recorder killed, a `.part`) holds fewer outputs than
    inputs: each stream is compared over the frames whose posteriors it holds, and
    `frames_recorded` < `frames_replayed` says so.
    """
    want = _rows_by_seq(recording.outputs())
    got = _rows_by_seq(result.outputs)
    max_diff = 0.0
    n = 0
    same_shape = set(want) == set(got)
    for s, w in want.items():
        g = got.get(s, {})
        seqs = sorted(set(w) & set(g))  # frames matched by seq, not by position
        if len(seqs) < len(w):  # the replay lacks frames the recording has outputs for
            same_shape = False
        rows_w = [w[q] for q in seqs]
        rows_g = [g[q] for q in seqs]
        if any(a.shape != b.shape for a, b in zip(rows_w, rows_g, strict=True)):
            same_shape = False
            continue
        n += len(seqs)
        if seqs:
            diff = np.abs(np.stack(rows_g).astype(np.float64) - np.stack(rows_w))
            max_diff = max(max_diff, float(diff.max()))
    covered = {}  # stream -> first seq after its recorded posteriors
    for m in recording.outputs():
        if isinstance(m, P.Posteriors):
            covered[m.stream] = max(covered.get(m.stream, 0), m.seq + m.probs.shape[0])
    key = lambda d: (d.stream, d.seq, d.label)
    replayed = [d for d in result.detections if d.seq < covered.get(d.stream, 0)]
    det_equal = sorted(map(key, recording.detections())) == sorted(map(key, replayed))
    rejected = rejected_inputs(recording, result)
    return {"frames_compared": n,
            "frames_replayed": sum(len(g) for g in got.values()),
            "max_abs_diff": max_diff, "same_streams": same_shape,
            "detections_equal": det_equal, "rejected": len(rejected),
            "first_rejected": f"{rejected[0].kind}: {rejected[0].detail}" if rejected else None,
            "identical": same_shape and max_diff == 0.0 and det_equal}


def rejected_inputs(recording: Recording, result: ReplayResult) -> list[P.Notice]:
    """The notices of the replay (inbound messages its learner rejected: damaged, of
    the wrong shape, ...) the recording does not hold: a recording made at a learner
    holds those its learner rejected too, and replaying them is no news."""
    recorded = Counter((m.kind, m.detail) for m in recording.outputs()
                       if isinstance(m, P.Notice))
    new = []
    for m in result.outputs:
        if isinstance(m, P.Notice):
            if recorded[(m.kind, m.detail)] > 0:
                recorded[(m.kind, m.detail)] -= 1
            else:
                new.append(m)
    return new
