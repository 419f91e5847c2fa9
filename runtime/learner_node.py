"""The learner node: hosts a backend, runs every stream's network, learns from labels.

Two layers:

- `LearnerCore`: no sockets, no threads. `handle_bytes(payload, route)` takes one wire
  message and returns the replies for that peer. All state lives here: one `Session`
  per stream (its own network state, detector, sequence tracking, labelled-window
  buffer, a short history for `teach`), the shared model (backend + weights), optional
  per-session personalised weights, counters, checkpoints. Replaying a recording is
  feeding its inbound messages to a fresh core (runtime/recording.py).
- `LearnerNode`: the sockets around a core, all owned by ONE thread (`run`):
  `data_router` (ROUTER, bind; frontends' DEALERs connect) or, behind the broker,
  `data_dealer` (DEALER, connect); `control_rep` (REP, bind, optional); `outputs_pub`
  (PUB, bind, optional: posteriors and detections, topic = stream id). Sends on
  data_router never block: a reply to a vanished or stalled peer is dropped and
  counted (ROUTER_MANDATORY + NOBLOCK).

Per frame (each encoder sub-step is one network step, `edgeprop.network.step`):
    y = readout;  p = softmax(mean of y over the detector window)  -> Posteriors
    detector (window / threshold / hold / refractory)               -> Detection
    a frame flagged in `pauses` ends a pause: the stream's state is zeroed after it
Learning: frames whose `labels`/`windows` are set form a labelled window; when the
window id changes (or the stream ends) the backend learns the window with the mean
loss from a zero state and applies one update (runtime/backends.py says why).
`teach` does the same for a past window [t_start, t_end) of the stream's history.

Learning never stalls inference: with apply_delay > 0 (default 100 frames = 1 s)
windows are learned on a separate thread, and the updated weights replace the ones
inference uses exactly when the stream that ended the window reaches frame
end + apply_delay (waiting there if learning is slower). The switch point is a
function of the stream, not of timing, so a replay gives bit-identical posteriors.
apply_delay = 0 learns inline (simplest; the stream waits for each update).
late_updates="defer" trades that determinism for real time under overload: an update
not learned by its switch point is used from the first frame after it is ready; and
at most max_pending_updates windows wait for learning (more are skipped, counted).

Faults are counters (`stats()`), logged (first few of each kind, then every 100th),
and never raise out of `handle_bytes`: malformed, version, oversized, unknown_type,
bad_field (also frames holding NaN or inf: refused whole, the network never sees
them), shape, config_mismatch, seq_gaps / frames_missing, seq_dups, unknown_stream,
peers_timed_out, outputs_dropped, control_errors (a control request refused, e.g. for
a mistyped argument; the reply says which).

Public API (stable)::

    Model.from_checkpoint(ckpt) ; load_model(path_or_None) -> Checkpoint
    LearnerCore(checkpoint, *, backend="emulator", lr=1e-4, detector=None (dict),
                learning=True, history_s=5.0, peer_timeout_s=10.0, max_window_frames=300,
                checkpoint_dir=None, checkpoint_every=30.0, n_pes=12, apply_delay=100,
                late_updates="wait", max_pending_updates=256, personal_dir=None)
        personal_dir: where personal weights live (default checkpoint_dir; one folder
        that all of a broker's workers share, so a returning stream finds its own)
        .handle_bytes(payload, route=b"") -> list[Message]
        .handle(msg, route=b"") -> list[Message]
        .control(req: ControlRequest) -> ControlReply
        .tick(now_s=None) -> [(route, Notice)]   # timeouts (a notice per stream closed),
                                                 # periodic checkpoint
        .save_checkpoint(path=None) -> dict(path, params_hash, updates)
        .stats() -> dict ; .finish() ; .close()
        .params (shared weights, all updates learned) ; .infer_params ; .params_hash()
    LearnerNode(core, *, bind=None, connect=None, control_bind=None, pub_bind=None,
                hwm=10000, recorder=None)
        .run(stop: threading.Event | None = None) ; .start() -> Thread ; .stop()
        .endpoints -> dict of resolved endpoints (after bind)
    resume_path(checkpoint_dir) -> Path   (dir/learner.ckpt)
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeprop.atomic_file import rescue_folder, safe_name
from edgeprop.errors import CheckpointError, ConfigError, EdgepropError
from edgeprop.network import KWS_LABELS, ModelConfig, Params, State, init_state, step
from runtime import protocol as P
from runtime.backends import DEFAULT_ONLINE_LR, Backend, make_backend
from runtime.detection import Detector, DetectorConfig

log = logging.getLogger("edgeprop.learner")

CHECKPOINT_NAME = "learner.ckpt"

#: control commands that change what the streams get (weights, learning, state): a
#: recording holds them, from control_rep too, so that its replay is identical. The
#: others (stats, checkpoint, ...) change no output, and a replay must not write files.
REPLAYED_CONTROL = ("teach", "learning", "reset")


def is_replayed_input(payload: bytes) -> bool:
    """Whether an inbound message belongs in a recording and its replay: everything but
    a control request outside REPLAYED_CONTROL (a `checkpoint` or `shutdown` sent on the
    data path must neither be recorded nor, from an older recording, sent again)."""
    try:
        typ, _ = P.peek(payload)
        if typ != "control":
            return True
        req = P.decode(payload)
    except P.WireError:
        return True  # recorded as it came (a replay meets the same rejection)
    return not isinstance(req, P.ControlRequest) or req.cmd in REPLAYED_CONTROL


def step_frame(cfg: ModelConfig, params: Params, state: State, rows: np.ndarray,
               pause: bool = False) -> tuple[State, np.ndarray]:
    """One frame as a stream runs it: a network step per encoder sub-step row, the
    readout of the last. After a frame that ends a pause the state is zeroed, so the
    next word starts as every pretraining clip and every online update does
    (edgeprop.pauses). `edgeprop bench detector` steps its streams through this too."""
    y = None
    for r in rows:
        state, y = step(cfg, params, state, r)
    return (init_state(cfg) if pause else state), y


def resume_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def base_params_hash(checkpoint) -> str:
    """The params hash of the model a checkpoint's weights were learned from: a learner's
    own checkpoints carry it (extra.runtime.base_params_hash); any other checkpoint is
    itself the base. Resuming compares it, since the learned weights themselves differ."""
    from edgeprop.checkpoint import params_hash

    runtime = (checkpoint.extra or {}).get("runtime", {})
    base = runtime.get("base_params_hash") if isinstance(runtime, dict) else None
    return base if isinstance(base, str) and base else params_hash(checkpoint.params)


_HASHED = re.compile(r"-[0-9a-f]{12}$")  # the suffix stream_file_part adds


def stream_file_part(stream: str) -> str:
    """`stream` as part of a file name: itself when it is already safe, else its safe form
    plus a hash of the real name, so that two streams ("a b" and "a_b", or two long ids
    alike in their first 80 characters) never share one personal checkpoint."""
    safe = safe_name(stream, "stream")
    if safe == stream and not _HASHED.search(stream):  # (a hashed name's look-alike is hashed)
        return safe
    digest = hashlib.sha256(stream.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{safe[:64]}-{digest[:12]}"


def _nonfinite(f: P.Frames) -> str:
    """Why `f` must not reach the network (a NaN or inf in its times or f32 values), or
    "". The wire can carry any float32; a streaming learner cannot use these ones."""
    span = f"frames {f.seq}-{f.seq + f.n - 1}"
    if not (math.isfinite(f.t) and math.isfinite(f.hop_s)):
        return f"{span} refused: t ({f.t}) and hop_s ({f.hop_s}) must be finite numbers"
    if f.spikes.dtype.kind == "f":
        bad = ~np.isfinite(f.spikes)
        if bad.any():
            i, k, c = (int(x) for x in np.argwhere(bad)[0])
            return (f"{span} refused: NaN or infinite f32 values ({int(bad.sum())} of "
                    f"{bad.size}, first at frame {f.seq + i}, substep {k}, channel {c}); only "
                    "finite values are accepted")
    return ""


@dataclass
class Model:
    """What the node needs from a checkpoint, with the wire ids computed once."""

    cfg: ModelConfig
    frontend: dict
    frontend_hash: str
    encoder: dict
    encoder_id: str
    substeps: int
    labels: list[str]
    extra: dict

    @classmethod
    def from_checkpoint(cls, ckpt: Any) -> Model:
        from edgeprop.frontend import FrontendConfig

        fe = ckpt.frontend
        if fe is None:
            raise CheckpointError("checkpoint has no frontend config; the learner cannot check "
                                  "what frontends send (re-save it with its frontend)")
        if not isinstance(fe, dict):
            fe = fe.to_dict()
        fe_hash = FrontendConfig.from_dict(fe).hash()
        enc = ckpt.encoder
        if enc is None:
            enc = {"name": "current", "n_in": ckpt.cfg.n_in}
        elif not isinstance(enc, dict):
            enc = enc.to_dict()
        enc = dict(enc)
        substeps = int(enc.get("substeps", 1))
        labels = list(ckpt.labels or (KWS_LABELS if ckpt.cfg.n_out == len(KWS_LABELS)
                                      else [f"class{i}" for i in range(ckpt.cfg.n_out)]))
        if len(labels) != ckpt.cfg.n_out:
            raise CheckpointError(f"checkpoint has {len(labels)} labels for {ckpt.cfg.n_out} "
                                  "outputs")
        return cls(ckpt.cfg, fe, fe_hash, enc, P.encoder_id(enc), substeps, labels,
                   dict(ckpt.extra or {}))


def load_model(path: str | os.PathLike | None):
    """A checkpoint from `path`, or the shipped model when path is None."""
    from edgeprop.checkpoint import load_checkpoint

    if path is not None:
        return load_checkpoint(path)
    try:
        from edgeprop.shipped import load_shipped
    except ImportError:
        raise CheckpointError("no shipped model in this build (edgeprop/shipped.py missing); "
                              "pass --model CHECKPOINT") from None
    return load_shipped()


class WeightSet:
    """One set of weights: the backend that learns them and the copy inference uses.

    Synchronous learning (apply_delay 0): `infer` IS the backend's weights. Asynchronous:
    the backend learns on its own thread; `infer` is a snapshot replaced at a
    deterministic point of the stream (see LearnerCore)."""

    def __init__(self, backend: Backend, asynchronous: bool):
        self.backend = backend
        self.infer: Params = backend.params.copy() if asynchronous else backend.params
        self.pending = 0  # jobs submitted, not yet swapped in


@dataclass
class _Job:
    weights: WeightSet
    stream: str
    swap_seq: int
    x: np.ndarray
    label: int
    done: threading.Event = field(default_factory=threading.Event)
    params: Params | None = None
    loss: float = float("nan")
    error: str | None = None


@dataclass
class Session:
    stream: str
    route: bytes
    mode: str
    state: State
    detector: Detector
    weights: WeightSet | None = None  # personalised weights, else None (shared model)
    next_seq: int | None = None
    win_id: int | None = None
    win_label: int = -1
    win_rows: list = field(default_factory=list)
    win_last_seq: int = -1
    history: deque = field(default_factory=deque)  # (t, rows (substeps, n_in))
    last_seen: float = 0.0
    frames: int = 0
    gaps: int = 0
    missing: int = 0
    dups: int = 0
    windows: int = 0
    detections: int = 0


class LearnerCore:
    """All of the learner's logic; sockets live in LearnerNode."""

    def __init__(self, checkpoint: Any, *, backend: str = "emulator",
                 lr: float = DEFAULT_ONLINE_LR, detector: dict | DetectorConfig | None = None,
                 learning: bool = True, history_s: float = 5.0, peer_timeout_s: float = 10.0,
                 max_window_frames: int = 300, checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every: float = 30.0, n_pes: int = 12, name: str = "learner",
                 apply_delay: int = 100, late_updates: str = "wait",
                 max_pending_updates: int = 256,
                 personal_dir: str | os.PathLike | None = None):
        self.model = Model.from_checkpoint(checkpoint)
        self.cfg = self.model.cfg
        self.base_hash = base_params_hash(checkpoint)  # written into its checkpoints
        self.backend_name = backend
        self.lr = float(lr)
        self.n_pes = n_pes
        try:
            self.backend = make_backend(backend, self.cfg, checkpoint.params.copy(), lr=lr,
                                        optimizer_state=checkpoint.optimizer_state, n_pes=n_pes)
        except CheckpointError as exc:  # its optimizer state: name the file
            where = getattr(checkpoint, "path", None)
            if where is None:
                raise
            raise CheckpointError(f"{where}: {exc}") from None
        self.warmup_s = self.backend.warmup()
        if apply_delay < 0:
            raise ConfigError(f"apply_delay must be >= 0 frames, got {apply_delay}")
        self.apply_delay = int(apply_delay)
        if late_updates not in ("wait", "defer"):
            raise ConfigError(f"late_updates must be 'wait' or 'defer', got {late_updates!r}")
        self.late_updates = late_updates
        self.max_pending_updates = int(max_pending_updates)
        self.shared = WeightSet(self.backend, self.apply_delay > 0)
        self._jobs: deque[_Job] = deque()
        self._queue: queue.Queue = queue.Queue()
        self._learn_thread: threading.Thread | None = None
        self.swap_wait_s = 0.0  # time inference waited for a late update (apply_delay too short)
        self.det_cfg = (detector if isinstance(detector, DetectorConfig)
                        else DetectorConfig.from_dict(detector))
        self.learning = bool(learning)
        self.history_s = float(history_s)
        self.peer_timeout_s = float(peer_timeout_s)
        self.max_window_frames = int(max_window_frames)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.personal_dir = Path(personal_dir) if personal_dir else self.checkpoint_dir
        self.checkpoint_every = float(checkpoint_every)
        self.name = name
        self.sessions: dict[str, Session] = {}
        self.counts: Counter = Counter()
        self.losses: deque = deque(maxlen=50)
        self.updates = int(self.model.extra.get("runtime", {}).get("updates", 0))
        self.busy_s = 0.0
        self.started = time.monotonic()
        self._last_ckpt = time.monotonic()
        # what the last checkpoint held: shared updates, personal ones (any stream's)
        self._learned_at_ckpt = (self.updates, 0)
        self.last_checkpoint: dict | None = None
        self.stop_requested = False

    # ------------------------------------------------------------ helpers

    @property
    def params(self) -> Params:
        """The shared weights with every submitted update learned (waits for them)."""
        return self._settled(self.shared)

    @property
    def infer_params(self) -> Params:
        """The shared weights inference uses right now."""
        return self.shared.infer

    def params_hash(self, params: Params | None = None) -> str:
        from edgeprop.checkpoint import params_hash

        return params_hash(params if params is not None else self.params)

    def _fault(self, kind: str, detail: str, stream: str = "") -> None:
        self.counts[kind] += 1
        n = self.counts[kind]
        if n <= 5 or n % 100 == 0:
            log.warning("%s: %s%s (%s #%d, survived)", self.name, f"[{stream}] " if stream else "",
                        detail, kind, n)

    # ------------------------------------------------------------ dispatch

    def handle_bytes(self, payload: bytes, route: bytes = b"") -> list:
        """One raw wire message -> replies. Never raises for anything a peer sends."""
        t0 = time.perf_counter()
        self.counts["messages_in"] += 1
        self.counts["bytes_in"] += len(payload)
        try:
            msg = P.decode(payload)
        except P.WireError as exc:
            self._fault(exc.kind, exc.detail)
            return [P.Notice("", exc.kind, exc.detail[:200])]
        try:
            return self.handle(msg, route)
        except EdgepropError as exc:  # a user-level problem tied to this message
            self._fault("bad_field", f"{type(exc).__name__}: {exc}")
            return [P.Notice(getattr(msg, "stream", ""), "bad_field", str(exc)[:200])]
        finally:
            self.busy_s += time.perf_counter() - t0

    def handle(self, msg: Any, route: bytes = b"") -> list:
        if isinstance(msg, P.Frames):
            return self._frames(msg, route)
        if isinstance(msg, P.Hello):
            return [self._hello(msg, route)]
        if isinstance(msg, P.Heartbeat):
            sess = self.sessions.get(msg.stream)
            if sess is not None:
                sess.last_seen = time.monotonic()
            self.counts["heartbeats"] += 1
            return [P.Heartbeat(msg.stream, P.now_ns())]
        if isinstance(msg, P.EndOfStream):
            return self._eos(msg)
        if isinstance(msg, P.ControlRequest):
            return [self.control(msg)]
        self._fault("unknown_type", f"{msg.TYPE!r} is not for the learner")
        return [P.Notice(getattr(msg, "stream", ""), "unknown_type",
                         f"{msg.TYPE} is not for the learner")]

    # ------------------------------------------------------------ handshake

    def _hello(self, h: P.Hello, route: bytes) -> P.HelloReply:
        m = self.model
        problems = []
        if len(h.stream) > P.MAX_STREAM_CHARS:
            problems.append(f"stream id of {len(h.stream)} characters is longer than "
                            f"{P.MAX_STREAM_CHARS}")
        if h.frontend_hash != m.frontend_hash:
            problems.append(f"frontend config hash {h.frontend_hash[:12]} != model's "
                            f"{m.frontend_hash[:12]}")
        if h.encoder_id != m.encoder_id:
            problems.append(f"encoder {h.encoder_id} != model's {m.encoder_id}")
        if h.n_channels != self.cfg.n_in or h.substeps != m.substeps:
            problems.append(f"frames of {h.substeps}x{h.n_channels} != model's "
                            f"{m.substeps}x{self.cfg.n_in}")
        reply = P.HelloReply(h.stream, not problems, "; ".join(problems), self.params_hash(),
                             m.frontend_hash, m.encoder_id, list(m.labels), self.name,
                             self.settings())
        if problems:
            self._fault("config_mismatch", reply.reason, h.stream)
            return reply
        if h.stream in self.sessions:
            self.counts["rehello"] += 1
            old = self.sessions[h.stream]
            idle = time.monotonic() - old.last_seen
            if old.route != route and idle < self.peer_timeout_s:
                # a frontend that reconnected says hello from its new route; one still
                # streaming under the other route is a second frontend with the same id
                self.counts["stream_taken_over"] += 1
                log.warning("%s: stream %r: a hello from another client while its session "
                            "was active %.1f s ago; the new client takes it over (two "
                            "frontends with one stream id?)", self.name, h.stream, idle)
            self._close_session(h.stream, learn=False)
        weights = None
        if h.personal:
            try:
                weights = WeightSet(self._personal_backend(h.stream), self.apply_delay > 0)
            except EdgepropError as exc:  # e.g. a stale personal checkpoint
                reply.accepted, reply.reason = False, f"personal weights: {exc}"
                self._fault("config_mismatch", reply.reason, h.stream)
                return reply
            reply.params_hash = self.params_hash(weights.infer)
        self.sessions[h.stream] = Session(
            h.stream, route, h.mode, init_state(self.cfg), Detector(m.labels, self.det_cfg),
            weights, last_seen=time.monotonic())
        self.counts["sessions_opened"] += 1
        log.info("%s: stream %r opened (%s%s)", self.name, h.stream, h.mode,
                 ", personal weights" if h.personal else "")
        return reply

    def _personal_path(self, stream: str) -> Path | None:
        if self.personal_dir is None:
            return None
        return self.personal_dir / f"personal-{stream_file_part(stream)}.ckpt"

    def _saved_personal(self, stream: str):
        """(path, checkpoint) of `stream`'s saved personal weights, or None: its own name
        in personal_dir, else where earlier versions kept it (the bare safe name, which
        two streams could share; a worker's own folder under serve --workers), if the
        file says it is this stream's. Saving always writes the first."""
        from edgeprop.checkpoint import load_checkpoint

        if self.personal_dir is None:
            return None
        names = [f"personal-{stream_file_part(stream)}.ckpt",
                 f"personal-{safe_name(stream, 'stream')}.ckpt"]
        folders = [self.personal_dir] + ([self.checkpoint_dir] if self.checkpoint_dir
                                         not in (None, self.personal_dir) else [])
        for k, path in enumerate(dict.fromkeys(f / n for f in folders for n in names)):
            if not path.is_file():
                continue
            try:
                ck = load_checkpoint(path, expect=self.cfg)
            except CheckpointError:
                if k == 0:
                    raise  # its own file, damaged or of another model: said at the hello
                continue
            owner = (ck.extra.get("runtime") or {}).get("stream")
            if owner == stream or (k == 0 and owner is None):
                return path, ck
        return None

    def _personal_backend(self, stream: str) -> Backend:
        saved = self._saved_personal(stream)
        if saved is not None:
            path, ck = saved
            theirs = (ck.extra.get("runtime") or {}).get("base_params_hash")
            if theirs is not None and theirs != self.base_hash:
                raise CheckpointError(
                    f"{path} was learned from another model (base params {theirs[:12]}, "
                    f"this learner's {self.base_hash[:12]}); move it away to start this "
                    "stream's personal weights afresh")
            params, opt = ck.params, ck.optimizer_state
        else:
            params, opt = self.params.copy(), None
        return make_backend(self.backend_name, self.cfg, params, lr=self.lr,
                            optimizer_state=opt, n_pes=self.n_pes)

    # ------------------------------------------------------------ frames

    def _frames(self, f: P.Frames, route: bytes) -> list:
        sess = self.sessions.get(f.stream)
        if sess is None:
            self._fault("unknown_stream", f"frames for stream {f.stream!r} without hello", f.stream)
            return [P.Notice(f.stream, "unknown_stream", "send hello first")]
        sess.last_seen = time.monotonic()
        sess.route = route
        if f.encoder_id != self.model.encoder_id:
            self._fault("config_mismatch", f"frames from encoder {f.encoder_id}", f.stream)
            return [P.Notice(f.stream, "config", f"encoder {f.encoder_id} != "
                                                 f"{self.model.encoder_id}")]
        want = (self.model.substeps, self.cfg.n_in)
        if tuple(f.spikes.shape[1:]) != want:
            self._fault("shape", f"frames of shape {list(f.spikes.shape)}, want [n, {want[0]}, "
                                 f"{want[1]}]", f.stream)
            return [P.Notice(f.stream, "shape", f"want [n, {want[0]}, {want[1]}]")]
        problem = _nonfinite(f)
        if problem:  # one NaN would poison the stream's state and, learned, the weights
            self._fault("bad_field", problem, f.stream)
            return [P.Notice(f.stream, "bad_field", problem)]
        skip = 0
        if sess.next_seq is not None:
            if f.seq > sess.next_seq:
                sess.gaps += 1
                sess.missing += f.seq - sess.next_seq
                self.counts["frames_missing"] += f.seq - sess.next_seq
                self._fault("seq_gaps", f"seq jumped {sess.next_seq} -> {f.seq}", f.stream)
            elif f.seq < sess.next_seq:
                skip = min(f.n, sess.next_seq - f.seq)
                sess.dups += skip
                self.counts["frames_duplicate"] += skip
                self._fault("seq_dups", f"frames {f.seq}..{f.seq + skip - 1} already seen",
                            f.stream)
                if skip == f.n:
                    return []
        sess.next_seq = f.seq + f.n
        return self._run_frames(sess, f, skip)

    def _run_frames(self, sess: Session, f: P.Frames, skip: int) -> list:
        cfg = self.cfg
        x_all = np.asarray(f.spikes[skip:], dtype=np.float32)
        n = x_all.shape[0]
        probs = np.empty((n, cfg.n_out), dtype=np.float32)
        out: list = []
        times = f.times()[skip:]
        labels = f.labels[skip:] if f.labels is not None else None
        windows = f.windows[skip:] if f.windows is not None else None
        pauses = f.pauses[skip:] if f.pauses is not None else None
        hist_len = max(1, int(round(self.history_s / max(f.hop_s, 1e-3))))
        ws = sess.weights or self.shared
        for i in range(n):
            seq = f.seq + skip + i
            if self._jobs:
                self._swap_due(sess.stream, seq)
            rows = x_all[i]
            pause = pauses is not None and bool(pauses[i])
            sess.state, y = step_frame(cfg, ws.infer, sess.state, rows, pause)
            if pause:
                self.counts["pause_resets"] += 1
            probs[i], hit = sess.detector.push(y, seq, float(times[i]))
            if hit is not None:
                sess.detections += 1
                self.counts["detections"] += 1
                out.append(P.Detection(sess.stream, hit.seq, hit.t, hit.label, hit.index,
                                       hit.score))
            sess.history.append((float(times[i]), rows))
            while len(sess.history) > hist_len:
                sess.history.popleft()
            lab = labels[i] if labels is not None else P.NO_LABEL
            win = windows[i] if windows is not None else P.NO_LABEL
            self._window_step(sess, lab, win, rows, seq)
        sess.frames += n
        self.counts["frames"] += n
        t_in = f.t_in_ns[skip:] if f.t_in_ns is not None else None
        out.insert(0, P.Posteriors(sess.stream, f.seq + skip, float(times[0]) if n else f.t,
                                   probs, t_in, P.now_ns()))
        return out

    def _window_step(self, sess: Session, lab: int, win: int, rows: np.ndarray,
                     seq: int) -> None:
        labelled = lab != P.NO_LABEL and win != P.NO_LABEL and self.learning
        if sess.win_id is not None and (not labelled or win != sess.win_id):
            self._end_window(sess, seq - 1)
        if not labelled:
            return
        if not 0 <= lab < self.cfg.n_out:
            self._fault("bad_field", f"label {lab} out of range", sess.stream)
            return
        if sess.win_id is None:
            sess.win_id, sess.win_label, sess.win_rows = win, lab, []
        if len(sess.win_rows) < self.max_window_frames:
            sess.win_rows.append(rows)
        elif len(sess.win_rows) == self.max_window_frames:
            # learn the first max_window_frames only; the rest of the window is ignored
            self.counts["windows_truncated"] += 1
            sess.win_rows.append(None)
        sess.win_last_seq = seq

    def _end_window(self, sess: Session, last_seq: int | None = None) -> None:
        rows, label = sess.win_rows, sess.win_label
        end = sess.win_last_seq if last_seq is None else last_seq
        sess.win_id, sess.win_label, sess.win_rows = None, -1, []
        rows = [r for r in rows if r is not None]
        if not rows:
            return
        self._learn(sess, np.concatenate(rows, axis=0), label, end)

    # ------------------------------------------------------------ learning

    def _learn(self, sess: Session, x_seq: np.ndarray, label: int, end_seq: int) -> float | None:
        """Learn one window. Synchronous: now, returning the loss. Asynchronous: queued
        for the learning thread; the new weights replace the inference weights when the
        stream reaches frame end_seq + apply_delay (or ends): a point fixed by the
        stream itself, so posteriors stay a deterministic function of the input."""
        ws = sess.weights or self.shared
        sess.windows += 1
        if self.apply_delay == 0:
            loss = ws.backend.learn_window(x_seq, label)
            ws.infer = ws.backend.params
            self._learned(loss, label, ws)
            return loss
        if len(self._jobs) >= self.max_pending_updates:
            self._fault("windows_skipped", f"{len(self._jobs)} updates already queued; "
                                           "learning cannot keep up, window skipped",
                        sess.stream)
            sess.windows -= 1
            return None
        job = _Job(ws, sess.stream, end_seq + self.apply_delay, x_seq, label)
        ws.pending += 1
        self._jobs.append(job)
        if self._learn_thread is None:
            self._learn_thread = threading.Thread(target=self._learn_loop, name="learn",
                                                  daemon=True)
            self._learn_thread.start()
        self._queue.put(job)
        return None

    def _learn_loop(self) -> None:
        """The learning thread: the only one touching backends while jobs are pending."""
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.loss = job.weights.backend.learn_window(job.x, job.label)
                job.params = job.weights.backend.params.copy()
            except Exception as exc:  # reported (counted) when swapped in
                job.error = f"{type(exc).__name__}: {exc}"
            job.done.set()

    def _learned(self, loss: float, label: int, ws: WeightSet) -> None:
        self.losses.append(loss)
        if ws is self.shared:
            self.updates += 1  # updates of the shared model (what checkpoints count)
        else:
            self.counts["personal_updates"] += 1
        self.counts["windows_learned"] += 1
        if not math.isfinite(loss):
            self._fault("nonfinite_loss", f"loss {loss} on label {label}")

    def _swap_head(self) -> None:
        job = self._jobs.popleft()
        if not job.done.is_set():
            t0 = time.perf_counter()
            job.done.wait()
            self.swap_wait_s += time.perf_counter() - t0
            self.counts["swap_waits"] += 1
        job.weights.pending -= 1
        if job.error is not None:
            self._fault("learn_errors", job.error, job.stream)
            return
        job.weights.infer = job.params
        self._learned(job.loss, job.label, job.weights)

    def _swap_due(self, stream: str, seq: int) -> None:
        while self._jobs and self._jobs[0].stream == stream and seq >= self._jobs[0].swap_seq:
            if self.late_updates == "defer" and not self._jobs[0].done.is_set():
                self.counts["updates_deferred"] += 1  # real time first: try next frame
                return
            self._swap_head()

    def _drain(self, stream: str | None = None) -> None:
        """Swap in every pending update (of `stream` and all queued before them)."""
        if stream is None:
            while self._jobs:
                self._swap_head()
            return
        last = max((i for i, j in enumerate(self._jobs) if j.stream == stream), default=-1)
        for _ in range(last + 1):
            self._swap_head()

    def _settled(self, ws: WeightSet) -> Params:
        """ws's weights with every submitted update learned, without changing what
        inference uses (so checkpoints and stats never perturb the stream)."""
        if ws.pending:
            for job in list(self._jobs):
                if job.weights is ws:
                    job.done.wait()
            last = [j for j in self._jobs if j.weights is ws][-1]
            if last.params is not None:
                return last.params
        return ws.infer

    def _updates_settled(self) -> int:
        return self.updates + sum(1 for j in self._jobs if j.weights is self.shared)

    def _eos(self, e: P.EndOfStream) -> list:
        if e.stream not in self.sessions:
            self._fault("unknown_stream", f"end-of-stream for unknown stream {e.stream!r}",
                        e.stream)
            return [P.EndOfStream(e.stream, e.last_seq, "unknown stream")]
        sess = self.sessions[e.stream]
        if sess.next_seq is not None and e.last_seq >= sess.next_seq:
            missing = e.last_seq + 1 - sess.next_seq
            sess.missing += missing
            self.counts["frames_missing"] += missing
            self._fault("seq_gaps", f"stream ended at {e.last_seq}, last frame seen "
                                    f"{sess.next_seq - 1}", e.stream)
        self._close_session(e.stream, learn=True)
        self.counts["streams_ended"] += 1
        return [P.EndOfStream(e.stream, e.last_seq, "processed")]

    def _close_session(self, stream: str, learn: bool) -> None:
        sess = self.sessions.pop(stream, None)
        if sess is None:
            return
        if learn and sess.win_id is not None:
            self._end_window(sess)
        self._drain(stream)
        if sess.weights is not None:
            self._keep_personal(sess)
            sess.weights.backend.close()
        log.info("%s: stream %r closed after %d frames (%d gaps, %d dups, %d windows learned)",
                 self.name, stream, sess.frames, sess.gaps, sess.dups, sess.windows)

    # ------------------------------------------------------------ control

    def control(self, req: P.ControlRequest) -> P.ControlReply:
        """Run one command. Its arguments are checked first (`checked_args`), so the
        `_cmd_*` methods only see values of the documented types; a refused request
        gets ok=False and an error saying what was wrong, never Python exception text."""
        self.counts["control"] += 1
        try:
            args = req.checked_args()
            result = getattr(self, f"_cmd_{req.cmd}")(req.stream, args)
            return P.ControlReply(req.cmd, True, result)
        except EdgepropError as exc:  # the request's fault: tell the sender what to fix
            self._fault("control_errors", f"{req.cmd}: {exc}")
            return P.ControlReply(req.cmd, False, {}, str(exc))
        except Exception as exc:  # a bug, not the sender's fault; still answered
            self.counts["internal_errors"] += 1
            log.exception("%s: internal error on control %s (survived)", self.name, req.cmd)
            return P.ControlReply(req.cmd, False, {}, f"internal error in {req.cmd} "
                                                      f"({type(exc).__name__}); see the "
                                                      "learner's log")

    def _session(self, stream: str) -> Session:
        """The open session of `stream`; the error lists the streams that are open."""
        sess = self.sessions.get(stream)
        if sess is None:
            open_ = ", ".join(repr(s) for s in self.sessions) or "none"
            if not stream:
                raise ConfigError("no stream given (argument 'stream' or the request's "
                                  f"stream field); open streams: {open_}")
            raise ConfigError(f"no open stream {stream!r}; open streams: {open_}")
        return sess

    def _label_index(self, label: str | int) -> int:
        labels = self.model.labels
        if isinstance(label, str):
            if label not in labels:
                raise ConfigError(f"unknown label {label!r}; labels are {', '.join(labels)}")
            return labels.index(label)
        if not 0 <= label < len(labels):
            raise ConfigError(f"label index {label} is out of range 0-{len(labels) - 1}")
        return label

    def _cmd_teach(self, stream: str, args: dict) -> dict:
        stream = args.get("stream", stream)
        sess = self._session(stream)
        label = self._label_index(args["label"])
        t0, t1 = args["t_start"], args["t_end"]
        if not t0 < t1:
            raise ConfigError(f"t_start ({t0:g} s) must be before t_end ({t1:g} s)")
        rows = [r for t, r in sess.history if t0 <= t < t1]
        if not rows:
            have = (f"{sess.history[0][0]:.2f}-{sess.history[-1][0]:.2f} s" if sess.history
                    else "nothing")
            raise ConfigError(f"window {t0:.2f}-{t1:.2f} s is not in the stream's history "
                              f"(holds {have}, the last {self.history_s:g} s)")
        self._learn(sess, np.concatenate(rows, axis=0), label, sess.next_seq or 0)
        self._drain(stream)  # a taught update applies now
        self.counts["teach"] += 1
        return {"loss": self.losses[-1] if self.losses else None, "frames": len(rows),
                "updates": self.updates}

    def _cmd_learning(self, stream: str, args: dict) -> dict:
        self.learning = args["on"]
        if not self.learning:
            for sess in self.sessions.values():
                sess.win_id, sess.win_rows = None, []
        return {"learning": self.learning}

    def _cmd_checkpoint(self, stream: str, args: dict) -> dict:
        """A path on the learner's host (relative: to its working folder; the reply
        names it absolute). Checked here, so that an empty one or a folder gets a reply
        that says so, not a temp file's OSError."""
        path = args.get("path")
        if path is not None:
            if not path.strip():
                raise ConfigError("argument 'path' is empty: give a file name, or leave it "
                                  "out to write the checkpoint dir's learner.ckpt")
            if Path(path).is_dir():
                raise ConfigError(f"argument 'path': {path} is a folder; give a file name")
        return self.save_checkpoint(path)

    def _cmd_stats(self, stream: str, args: dict) -> dict:
        return self.stats()

    def _cmd_reset(self, stream: str, args: dict) -> dict:
        stream = args.get("stream", stream)
        targets = [self._session(stream)] if stream else list(self.sessions.values())
        for sess in targets:
            sess.state = init_state(self.cfg)
            sess.detector.reset()
        return {"reset": [s.stream for s in targets]}

    def _cmd_ping(self, stream: str, args: dict) -> dict:
        return {"pong": True, "name": self.name}

    def _cmd_shutdown(self, stream: str, args: dict) -> dict:
        self.stop_requested = True
        return {"stopping": True}

    # ------------------------------------------------------------ time, checkpoints

    def tick(self, now_s: float | None = None) -> list[tuple[bytes, P.Notice]]:
        """Close the streams silent past peer_timeout_s, checkpoint when due. Returns a
        notice for each closed stream's route: a broker in between forgets the route (a
        peer still there learns why its next frames are unknown)."""
        now = time.monotonic() if now_s is None else now_s
        told = []
        for stream, sess in list(self.sessions.items()):
            if now - sess.last_seen > self.peer_timeout_s:
                why = f"no message for {now - sess.last_seen:.1f} s; closing the stream"
                self._fault("peers_timed_out", why, stream)
                self._close_session(stream, learn=False)
                told.append((sess.route, P.Notice(stream, "peers_timed_out", why)))
        learned = (self._updates_settled(), self.counts["personal_updates"])
        if (self.checkpoint_dir is not None and learned != self._learned_at_ckpt
                and now - self._last_ckpt >= self.checkpoint_every):
            try:
                self.save_checkpoint()
            except (CheckpointError, OSError) as exc:  # disk full, folder gone...
                self.counts["checkpoint_failed"] += 1
                self._last_ckpt = now  # retried after checkpoint_every, not on every tick
                log.error("%s: %s; still serving with the weights in memory, retrying in "
                          "%.0f s (checkpoint_failed #%d)", self.name, exc,
                          self.checkpoint_every, self.counts["checkpoint_failed"])
        return told

    def final_checkpoint(self) -> str | None:
        """The checkpoint on the way out. When checkpoint_dir cannot take it (a full disk,
        a folder removed), the weights go to a fresh rescue folder in the temp dir rather
        than being lost. Returns what the user must be told, or None when all went well."""
        try:
            self.save_checkpoint()
            return None
        except (CheckpointError, OSError) as exc:
            first = f"the final checkpoint failed: {exc}"
        wanted = self.checkpoint_dir
        try:  # the open streams' personal weights go with the shared ones
            self.checkpoint_dir = self.personal_dir = rescue_folder(self.name)
            saved = self.save_checkpoint()
        except (CheckpointError, OSError) as exc:
            since = (f"update {self.last_checkpoint['updates']} (its last checkpoint)"
                     if self.last_checkpoint else "its start")
            return (f"{first}; a rescue copy in the temp dir failed too ({exc}): the learning "
                    f"since {since} is lost")
        return (f"{first}; the weights were saved to {saved['path']} instead: resume with "
                f"--checkpoint-dir {self.checkpoint_dir}, or copy {CHECKPOINT_NAME} back "
                f"into {wanted} once it has room")

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> dict:
        from edgeprop.checkpoint import save_checkpoint

        if path is None:
            if self.checkpoint_dir is None:
                raise ConfigError("no checkpoint dir set (serve --checkpoint-dir DIR) and no "
                                  "path given")
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            path = resume_path(self.checkpoint_dir)
        extra = dict(self.model.extra)
        params = self._settled(self.shared)
        updates = self._updates_settled()
        extra["runtime"] = {"updates": updates, "saved_unix": time.time(),
                            "backend": self.backend_name, "base_params_hash": self.base_hash,
                            "streams": {s.stream: s.next_seq for s in self.sessions.values()}}
        save_checkpoint(path, self.cfg, params,
                        optimizer_state=self.backend.optimizer_state(),
                        frontend=self.model.frontend, encoder=self.model.encoder,
                        labels=list(self.model.labels), extra=extra)
        for sess in self.sessions.values():
            if sess.weights is not None:
                self._save_personal(sess)  # (settles their pending updates first)
        personal = self.counts["personal_updates"]
        if self.checkpoint_dir is not None and \
                Path(path).absolute() == resume_path(self.checkpoint_dir).absolute():
            # only learner.ckpt is resumed from: a copy elsewhere (`checkpoint` with a
            # path) must not put off the periodic one, or a kill -9 would lose its updates
            self._last_ckpt = time.monotonic()
            self._learned_at_ckpt = (updates, personal)
        self.counts["checkpoints"] += 1
        self.last_checkpoint = {"path": str(Path(path).absolute()),  # for peers elsewhere
                                "params_hash": self.params_hash(params), "updates": updates}
        log.info("%s: checkpoint %s (updates %d)", self.name, path, updates)
        return dict(self.last_checkpoint)

    def _keep_personal(self, sess: Session) -> None:
        """Save a closing stream's personal weights; when their folder cannot take them
        (a full disk), into a rescue folder in the temp dir, named in the log. Never
        raises: the stream is gone either way, and the learner keeps serving the rest."""
        try:
            self._save_personal(sess)
            return
        except (CheckpointError, OSError) as exc:
            self.counts["checkpoint_failed"] += 1
            first = f"{self.name}: stream {sess.stream!r}, personal weights: {exc}"
        wanted = self.personal_dir
        try:
            self.personal_dir = rescue_folder(f"{self.name}-personal")
            self._save_personal(sess)
            log.error("%s; saved to %s instead (copy it back into %s once it has room)",
                      first, self._personal_path(sess.stream), wanted)
        except (CheckpointError, OSError) as exc:
            log.error("%s; a rescue copy in the temp dir failed too (%s): they are lost",
                      first, exc)
        finally:
            self.personal_dir = wanted

    def _save_personal(self, sess: Session) -> None:
        from edgeprop.checkpoint import save_checkpoint

        path = self._personal_path(sess.stream)
        if path is None or sess.weights is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, self.cfg, self._settled(sess.weights),
                        optimizer_state=sess.weights.backend.optimizer_state(),
                        frontend=self.model.frontend, encoder=self.model.encoder,
                        labels=list(self.model.labels),
                        extra={"runtime": {"stream": sess.stream, "windows": sess.windows,
                                           "base_params_hash": self.base_hash}})

    def settings(self) -> dict:
        """What a replay needs to reproduce this learner (goes into recordings)."""
        return {"backend": self.backend_name, "lr": self.lr, "apply_delay": self.apply_delay,
                "learning": self.learning, "detector": self.det_cfg.to_dict(),
                "late_updates": self.late_updates}

    def stats(self) -> dict:
        up = time.monotonic() - self.started
        return {
            "name": self.name, "backend": self.backend_name, "learning": self.learning,
            "uptime_s": up, "busy_s": self.busy_s, "updates": self._updates_settled(),
            "params_hash": self.params_hash(), "infer_params_hash": self.params_hash(
                self.shared.infer), "apply_delay": self.apply_delay,
            "pending_updates": len(self._jobs), "swap_wait_s": self.swap_wait_s,
            "counts": dict(self.counts),
            "recent_loss": float(np.mean(self.losses)) if self.losses else None,
            "last_checkpoint": self.last_checkpoint,
            "detector": self.det_cfg.to_dict(),
            "streams": {s.stream: {"frames": s.frames, "gaps": s.gaps, "missing": s.missing,
                                   "dups": s.dups, "windows": s.windows,
                                   "detections": s.detections, "mode": s.mode,
                                   "personal": s.weights is not None, "next_seq": s.next_seq}
                        for s in self.sessions.values()},
        }

    def finish(self) -> None:
        """Close every open stream, learning its pending window; swap in every update."""
        for stream in list(self.sessions):
            self._close_session(stream, learn=True)
        self._drain()

    def close(self) -> None:
        if self._learn_thread is not None:
            self._queue.put(None)
            self._learn_thread.join(30)
            self._learn_thread = None
        self.backend.close()


# ---------------------------------------------------------------- the node (sockets)

def _bind(sock: Any, endpoint: str, role: str) -> None:
    """bind, turning 'address in use' and bad endpoints into a user error."""
    import zmq

    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        hint = ("another learner running there? choose another endpoint"
                if exc.errno == zmq.EADDRINUSE else "check the endpoint")
        raise ConfigError(f"cannot bind {role} to {endpoint}: {exc} ({hint})") from None


class LearnerNode:
    """One thread owns every socket: data (ROUTER bind, or DEALER connect), control REP,
    outputs PUB. `run()` polls them, hands messages to the core, ticks timers."""

    def __init__(self, core: LearnerCore, *, bind: str | None = None,
                 connect: str | None = None, control_bind: str | None = None,
                 pub_bind: str | None = None, hwm: int = 10000, recorder: Any = None,
                 heartbeat_s: float = 1.0):
        if (bind is None) == (connect is None):
            raise ConfigError("give exactly one of bind (standalone) or connect (broker worker)")
        self.core = core
        self.bind, self.connect, self.control_bind, self.pub_bind = (bind, connect,
                                                                      control_bind, pub_bind)
        self.hwm = hwm
        self.recorder = recorder
        self.heartbeat_s = heartbeat_s
        self.replay_send_wait_s = 2.0
        self.endpoints: dict[str, str] = {}
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.final_problem: str | None = None  # the final checkpoint's trouble, if any

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run_safe, name="learner", daemon=True)
        self._thread.start()
        if not self.ready.wait(10.0):
            raise EdgepropError(f"learner did not come up: {self.error}")
        if self.error is not None:
            raise self.error
        return self._thread

    def _run_safe(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # reported by start()/join()
            self.error = exc
            self.ready.set()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _send(self, sock: Any, route: bytes, msg: Any, record: bool = True,
              courtesy: bool = False) -> None:
        """Never blocks for long: a replay peer whose queue is full gets up to
        `replay_send_wait_s` of retries (backpressure, lossless); a live peer's output
        or a vanished peer's is dropped and counted (not a `courtesy` message, such as the
        notice to a peer that timed out, which has most likely vanished)."""
        import zmq

        payload = P.encode(msg)
        sess = self.core.sessions.get(getattr(msg, "stream", ""))
        patience = self.replay_send_wait_s if sess is not None and sess.mode == "replay" else 0
        deadline = time.monotonic() + patience
        while True:
            try:
                sock.send_multipart([route, payload], flags=zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    if not courtesy:
                        self.core.counts["outputs_dropped"] += 1
                    return
                time.sleep(0.0005)
            except zmq.ZMQError:  # EHOSTUNREACH: the peer is gone
                if not courtesy:
                    self.core.counts["outputs_dropped"] += 1
                return
        if record:
            self._record("out", payload)

    def _record(self, direction: str, payload: bytes) -> None:
        """Record one message, if recording. A recording that cannot be written (disk
        full, ...) is reported once and stopped (the writer removes its .part), and the
        learner keeps serving: its peers' streams, and the weights it learns, matter
        more than a recording of them."""
        if self.recorder is None:
            return
        try:
            self.recorder.write(direction, payload)
        except OSError as exc:
            self._recording_failed(exc)

    def _recording_failed(self, exc: OSError) -> None:
        self.recorder = None
        self.core.counts["recording_failed"] += 1
        log.error("%s: recording stopped: %s: %s", self.core.name, exc.filename, exc.strerror)

    def _serve_control(self, control_rep: Any) -> None:
        """Answer one request on control_rep, if a whole one is there.

        Never a blocking recv: REP silently drops a message without the REQ envelope
        (a DEALER sent here by mistake), so after poll said readable a blocking recv
        would wait for the next good request while frames, timers and SIGTERM wait too.
        """
        import zmq

        core = self.core
        try:
            parts = control_rep.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            core._fault("malformed", "control socket: a message without a REQ envelope "
                                     "(a DEALER or ROUTER client on the control port?)")
            return
        try:
            if len(parts) != 1:
                raise P.WireError("malformed", f"control request of {len(parts)} parts")
            req = P.decode(parts[0])
            if not isinstance(req, P.ControlRequest):
                raise P.WireError("unknown_type", f"{req.TYPE} on control socket")
            replayed = req.cmd in REPLAYED_CONTROL
            if replayed:
                self._record("in", parts[0])
            reply = core.control(req)
            if replayed:
                self._record("out", P.encode(reply))
        except P.WireError as exc:
            core._fault(exc.kind, f"control socket: {exc.detail}")
            reply = P.ControlReply("?", False, {}, exc.detail)
        except Exception as exc:  # a bug, not the peer's fault: REP must still answer
            core.counts["internal_errors"] += 1
            log.exception("%s: internal error on a control request (survived)", core.name)
            reply = P.ControlReply("?", False, {}, f"internal error: {type(exc).__name__}")
        control_rep.send(P.encode(reply))

    def run(self, stop: threading.Event | None = None) -> None:
        import zmq

        stop = stop or self._stop
        ctx = zmq.Context.instance()
        core = self.core
        # The learning thread (emulator: Python-heavy) shares the GIL with this one; a
        # 1 ms switch interval (default 5 ms) bounds how long a frame waits for it.
        sys.setswitchinterval(0.001)
        if self.bind is not None:
            data = ctx.socket(zmq.ROUTER)
            data.setsockopt(zmq.ROUTER_MANDATORY, 1)
            role = "data_router"
        else:
            data = ctx.socket(zmq.DEALER)
            role = "data_dealer"
        data.setsockopt(zmq.LINGER, 0)
        data.setsockopt(zmq.RCVHWM, self.hwm)
        data.setsockopt(zmq.SNDHWM, self.hwm)
        # Truly huge messages (a broken peer) are cut off by libzmq; anything over
        # protocol.MAX_MESSAGE_BYTES but below this is received and counted "oversized".
        data.setsockopt(zmq.MAXMSGSIZE, 16 * P.MAX_MESSAGE_BYTES)
        if self.bind is not None:
            _bind(data, self.bind, "data_router")
        else:
            data.connect(self.connect)
            data.send_multipart([b"", P.encode(P.Heartbeat("__worker__", P.now_ns()))])
        self.endpoints[role] = data.getsockopt_string(zmq.LAST_ENDPOINT) if self.bind \
            else self.connect
        poller = zmq.Poller()
        poller.register(data, zmq.POLLIN)
        control = pub = None
        if self.control_bind:
            control = ctx.socket(zmq.REP)
            control.setsockopt(zmq.LINGER, 0)
            _bind(control, self.control_bind, "control_rep")
            self.endpoints["control_rep"] = control.getsockopt_string(zmq.LAST_ENDPOINT)
            poller.register(control, zmq.POLLIN)
        if self.pub_bind:
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, self.hwm)
            _bind(pub, self.pub_bind, "outputs_pub")
            self.endpoints["outputs_pub"] = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ready.set()
        log.info("%s: serving %s", core.name, self.endpoints)
        last_hb = time.monotonic()
        try:
            while not stop.is_set() and not core.stop_requested:
                events = dict(poller.poll(50))
                if data in events:
                    for _ in range(256):  # drain, but let control and timers in
                        try:
                            parts = data.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(parts) != 2:
                            core._fault("malformed", f"envelope of {len(parts)} parts")
                            continue
                        route, payload = parts
                        keep = self.recorder is not None and is_replayed_input(payload)
                        if keep:
                            self._record("in", payload)
                        try:
                            replies = core.handle_bytes(payload, route)
                        except Exception:  # a bug, not the peer's fault: never fatal
                            core.counts["internal_errors"] += 1
                            log.exception("%s: internal error on a message (survived)",
                                          core.name)
                            continue
                        for reply in replies:
                            self._send(data, route, reply, record=keep)
                            if pub is not None and isinstance(reply, (P.Posteriors, P.Detection)):
                                pub.send_multipart([reply.stream.encode(), P.encode(reply)],
                                                   zmq.NOBLOCK)
                if control is not None and control in events:
                    self._serve_control(control)
                now = time.monotonic()
                if self.connect is not None and now - last_hb > self.heartbeat_s:
                    try:
                        data.send_multipart([b"", P.encode(P.Heartbeat("__worker__",
                                                                       P.now_ns()))],
                                            zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # broker gone and our queue to it full: the next one will do
                    last_hb = now
                for route, notice in core.tick(now):
                    self._send(data, route, notice, record=False, courtesy=True)
        finally:
            if core.checkpoint_dir is not None:
                try:
                    self.final_problem = core.final_checkpoint()
                except Exception:  # a bug: report it, but still close the sockets
                    log.exception("%s: final checkpoint failed", core.name)
                    self.final_problem = "the final checkpoint failed (see the log above)"
                if self.final_problem:
                    log.error("%s: %s", core.name, self.final_problem)
            for s in (data, control, pub):
                if s is not None:
                    s.close(0)
            if self.recorder is not None:
                try:
                    self.recorder.close()
                except OSError as exc:
                    self._recording_failed(exc)
            log.info("%s: stopped (%s)", core.name, dict(core.counts))
