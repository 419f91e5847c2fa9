"""The frontend node: audio blocks -> features -> spike frames -> ZeroMQ -> learner.

    FrontendNode(endpoint, frontend_cfg, encoder, *, stream="s0", mode="replay",
                 batch=1, personal=False, max_pending=256, live_queue=50,
                 hwm=100, recorder=None, on_output=None, connect_timeout_s=10.0,
                 heartbeat_s=1.0, pause_reset=True)
                                        pause_reset: flag the frames that end a pause
                                        (edgeprop.pauses) so the learner zeroes the state
        .keep_posteriors = True         set False on long runs (latencies are still kept)
        .start() -> HelloReply          handshake (raises ConfigError when rejected)
        .feed(samples, *, label=-1, window=-1, t_in_ns=None) -> int   frames produced
        .send_spikes(spikes (n, substeps, ch), *, labels=None, windows=None,
                     t_in_ns=None, pauses=None)   already-encoded frames (benchmarks, replays)
        .finish(timeout_s=30.0) -> dict  end-of-stream; waits until the learner echoed it
        .close()
        .stats() -> dict                 frames, dropped, latency ms p50/p99, ...
        .detections (list[Detection]), .posteriors (list[Posteriors]), .notices

Threads and sockets: the caller's thread computes features (`feed`); ONE I/O thread owns
the `frames_dealer` socket (DEALER, connect): it sends queued frames, receives
posteriors/detections/notices, and heartbeats when idle. Between them, the outbox:

- replay mode, lossless: the outbox holds at most `max_pending` messages and `feed`
  BLOCKS while it is full; the DEALER's SNDHWM (`hwm`) is bounded too, so a slow
  learner slows the reader of the file, and no frame is lost.
- live mode, drop-oldest: the outbox is a deque of at most `live_queue` messages; when
  it is full the OLDEST queued message is dropped (its frames counted in `dropped`),
  because for a live keyword spotter the newest audio matters and a stale backlog only
  adds latency. A dropped message's pause flag moves to the next message's first
  frame. The I/O thread sends with NOBLOCK, so frames that do not fit under the
  socket's HWM wait in the outbox, where drop-oldest applies. (ZMQ_CONFLATE would keep
  only the last message and silently break the sequence; it is wrong for frames.)

If the learner replies `unknown_stream` (it restarted and lost the session), the node
sends hello again and carries on; frames lost meanwhile show up as the learner's
seq_gaps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from edgeprop.errors import ConfigError, EdgepropError, ProtocolError
from runtime import protocol as P

log = logging.getLogger("edgeprop.frontend")



#: seconds a frontend (listen, record, replay --endpoint) waits for the hello_reply
CONNECT_TIMEOUT_S = 10.0
#: replay mode waits for a slow learner without losing frames, but not for a dead one: a
# learner that sent nothing (no outputs, no heartbeat reply) this long while frames
# waited has gone away
SILENT_PEER_S = 20.0


def no_learner_error(endpoint: str, waited_s: float) -> EdgepropError:
    """The one message for "nobody answered the hello" (listen and replay alike)."""
    return EdgepropError(f"no reply from a learner at {endpoint} within {waited_s:g} s "
                         "(is `edgeprop serve` running?)")

class FrontendNode:
    def __init__(self, endpoint: str, frontend_cfg: Any, encoder: Any, *, stream: str = "s0",
                 mode: str = "replay", batch: int = 1, personal: bool = False,
                 max_pending: int = 256, live_queue: int = 50, hwm: int = 100,
                 recorder: Any = None, on_output: Callable[[Any], None] | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, heartbeat_s: float = 1.0,
                 pause_reset: bool = True, silent_peer_s: float = SILENT_PEER_S):
        from edgeprop.frontend import StreamingFrontend
        from edgeprop.pauses import PauseDetector

        if mode not in ("replay", "live"):
            raise ConfigError(f"mode must be 'replay' or 'live', got {mode!r}")
        if not 1 <= batch <= P.MAX_BATCH:
            raise ConfigError(f"batch must be 1..{P.MAX_BATCH}, got {batch}")
        self.endpoint = endpoint
        self.fcfg = frontend_cfg
        self.encoder = encoder
        self.stream = stream
        self.mode = mode
        self.batch = batch
        self.personal = personal
        self.max_pending = max_pending
        self.live_queue = live_queue
        self.hwm = hwm
        self.recorder = recorder
        self.on_output = on_output
        self.connect_timeout_s = connect_timeout_s
        self.heartbeat_s = heartbeat_s
        self.silent_peer_s = silent_peer_s
        self._last_rx = time.monotonic()  # the learner's last message (any kind)
        self.frontend = StreamingFrontend(frontend_cfg)
        # marks the frames that end a pause, so the learner zeroes the state after them
        self.pauses = PauseDetector(frontend_cfg) if pause_reset else None
        self.enc_dict = encoder.to_dict()
        self.encoder_id = P.encoder_id(self.enc_dict)
        self.binary = encoder.name != "current"
        self.hop_s = frontend_cfg.hop / frontend_cfg.sample_rate
        self.seq = 0
        # frames waiting to fill a batch: (spikes, label, win, t_in, ends a pause)
        self._pending: list = []
        self._outbox: deque = deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._hello_reply: P.HelloReply | None = None
        self._hello_evt = threading.Event()
        self._eos_evt = threading.Event()
        self._thread: threading.Thread | None = None
        # a self-pipe wakes the I/O thread the moment frames are queued (no poll delay)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.error: BaseException | None = None
        self.frames_sent = 0
        self.frames_made = 0
        self.dropped = 0
        self.rehellos = 0
        self.answered = 0  # frames the learner sent posteriors for
        self._last_rehello = 0.0
        self.latencies_ns: list[int] = []
        self.posteriors: list[P.Posteriors] = []
        self.detections: list[P.Detection] = []
        self.notices: list[P.Notice] = []
        self.keep_posteriors = True

    # ------------------------------------------------------------ lifecycle

    def hello_msg(self) -> P.Hello:
        return P.Hello(self.stream, self.fcfg.hash(), self.encoder_id, int(self.encoder.n_out),
                       int(self.encoder.substeps), self.mode, self.personal, "frontend",
                       int(self.fcfg.sample_rate), self.hop_s)

    def start(self) -> P.HelloReply:
        self._last_rx = time.monotonic()
        self._thread = threading.Thread(target=self._io_safe, name=f"frontend-{self.stream}",
                                        daemon=True)
        self._thread.start()
        if not self._hello_evt.wait(self.connect_timeout_s):
            self.close()
            raise no_learner_error(self.endpoint, self.connect_timeout_s)
        if self.error is not None:
            raise self.error
        reply = self._hello_reply
        assert reply is not None
        if not reply.accepted:
            self.close()
            raise ConfigError(f"learner rejected stream {self.stream!r}: {reply.reason}")
        return reply

    def finish(self, timeout_s: float = 30.0) -> dict:
        """Flush, send end-of-stream, wait for the learner to echo it (all outputs in).
        `timeout_s` is how long it waits with no output arriving: a busy learner still
        working through a long backlog is waited for, a silent one is not."""
        self._flush_batch()
        with self._cv:
            self._outbox.append(P.EndOfStream(self.stream, self.seq - 1, "done"))
            self._cv.notify_all()
        self._wake()
        ok = False
        seen, quiet_since = self.answered, time.monotonic()
        while self.error is None:
            if self._eos_evt.wait(0.2):
                ok = True
                break
            now = time.monotonic()
            if self.answered != seen:  # outputs still coming: the learner is busy, alive
                seen, quiet_since = self.answered, now
            elif now - quiet_since >= timeout_s:
                break
        if self.error is not None:
            raise self.error  # the I/O thread failed (e.g. the recording could not be written)
        if not ok:
            log.warning("frontend %s: learner did not confirm end-of-stream (no output for "
                        "%.0f s)", self.stream, timeout_s)
        st = self.stats()
        st["eos_confirmed"] = ok
        return st

    def close(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------ producing frames

    def feed(self, samples: np.ndarray, *, label: int = P.NO_LABEL, window: int = P.NO_LABEL,
             t_in_ns: int | None = None) -> int:
        """One audio block in (float32 mono at the frontend's rate). Returns frames made."""
        t_in = P.now_ns() if t_in_ns is None else t_in_ns
        feats = self.frontend.push(samples)
        for f in feats:
            spikes = self.encoder.step(f)
            if self.binary:
                spikes = spikes.astype(np.uint8)
            pause = self.pauses is not None and self.pauses.step(f)
            self._pending.append((spikes, label, window, t_in, pause))
            if len(self._pending) >= self.batch:
                self._flush_batch()
        self.frames_made += len(feats)
        return len(feats)

    def send_spikes(self, spikes: np.ndarray, *, labels: list[int] | None = None,
                    windows: list[int] | None = None, t_in_ns: list[int] | None = None,
                    pauses: list[int] | None = None) -> None:
        """Queue already-encoded frames (n, substeps, channels) as one message."""
        n = spikes.shape[0]
        msg = P.Frames(self.stream, self.seq, self.seq * self.hop_s, self.hop_s,
                       self.encoder_id, spikes, labels, windows,
                       t_in_ns if t_in_ns is not None else [P.now_ns()] * n, pauses)
        self.seq += n
        self.frames_made += n
        self._enqueue(msg)

    def _flush_batch(self) -> None:
        if not self._pending:
            return
        rows = self._pending
        self._pending = []
        spikes = np.stack([r[0] for r in rows])
        labels = [int(r[1]) for r in rows]
        windows = [int(r[2]) for r in rows]
        has_label = any(lab != P.NO_LABEL for lab in labels)
        msg = P.Frames(self.stream, self.seq, self.seq * self.hop_s, self.hop_s,
                       self.encoder_id, spikes, labels if has_label else None,
                       windows if has_label else None, [int(r[3]) for r in rows],
                       P.pause_flags(r[4] for r in rows))
        self.seq += len(rows)
        self._enqueue(msg)

    def _enqueue(self, msg: P.Frames) -> None:
        with self._cv:
            if self.mode == "replay":
                while len(self._outbox) >= self.max_pending and not self._stop.is_set():
                    self._cv.wait(0.1)  # backpressure: the reader waits, nothing is lost
                    if self.error is not None:
                        raise self.error
                    silent = time.monotonic() - self._last_rx
                    if silent > self.silent_peer_s:
                        # a live learner answers every frames message and heartbeat: this
                        # one went away (a restarted one would have been greeted again)
                        raise EdgepropError(
                            f"the learner at {self.endpoint} sent nothing for "
                            f"{silent:.0f} s while frames waited for it (did it stop?); "
                            f"{self.frames_sent} of {self.frames_made} frames were sent")
            else:
                while len(self._outbox) >= self.live_queue:
                    old = self._outbox.popleft()
                    if isinstance(old, P.Frames):
                        self.dropped += old.n
                        if old.pauses is not None and any(old.pauses):
                            # the pause ended in frames that are never sent: the learner
                            # zeroes the state after the next frame that is
                            nxt = next((m for m in self._outbox if isinstance(m, P.Frames)),
                                       msg)
                            nxt.pauses = [1] + list(nxt.pauses or [0] * nxt.n)[1:]
            self._outbox.append(msg)
            self._cv.notify_all()
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # pipe full (the thread is awake anyway) or closed

    # ------------------------------------------------------------ the I/O thread

    def _io_safe(self) -> None:
        try:
            self._io()
        except BaseException as exc:
            self.error = exc
            self._hello_evt.set()
            self._eos_evt.set()
            log.error("frontend %s: I/O thread failed: %s", self.stream, exc)

    def _io(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        frames_dealer = ctx.socket(zmq.DEALER)
        frames_dealer.setsockopt(zmq.LINGER, 0)
        frames_dealer.setsockopt(zmq.SNDHWM, self.hwm)
        frames_dealer.setsockopt(zmq.RCVHWM, 100000)  # outputs are small; never drop them
        frames_dealer.connect(self.endpoint)
        try:
            self._send(frames_dealer, self.hello_msg(), block=True)
            last_tx = last_hello = time.monotonic()
            poller = zmq.Poller()
            poller.register(frames_dealer, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            while not self._stop.is_set():
                want_out = bool(self._outbox) and self._hello_reply is not None and \
                    self._hello_reply.accepted
                poller.modify(frames_dealer, zmq.POLLIN | (zmq.POLLOUT if want_out else 0))
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except (BlockingIOError, OSError):
                        pass
                ev = events.get(frames_dealer, 0)
                if ev & zmq.POLLIN:
                    for _ in range(256):
                        try:
                            raw = frames_dealer.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_message(raw, frames_dealer)
                want_out = bool(self._outbox) and self._hello_reply is not None and \
                    self._hello_reply.accepted
                if want_out and not ev & zmq.POLLOUT:
                    ev |= frames_dealer.poll(0, zmq.POLLOUT)
                if want_out and ev & zmq.POLLOUT:
                    while True:
                        with self._cv:
                            if not self._outbox:
                                break
                            msg = self._outbox[0]
                        if not self._send(frames_dealer, msg, block=False):
                            break
                        with self._cv:
                            if self._outbox and self._outbox[0] is msg:
                                self._outbox.popleft()
                            self._cv.notify_all()
                        if isinstance(msg, P.Frames):
                            self.frames_sent += msg.n
                        last_tx = time.monotonic()
                now = time.monotonic()
                if self._hello_reply is None and now - last_hello > 1.0:
                    self._send(frames_dealer, self.hello_msg(), block=False)  # retry handshake
                    last_hello = now
                if now - last_tx > self.heartbeat_s:
                    self._send(frames_dealer, P.Heartbeat(self.stream, P.now_ns()), block=False)
                    last_tx = now
        finally:
            frames_dealer.close(0)

    def _send(self, sock: Any, msg: Any, block: bool) -> bool:
        import zmq

        payload = P.encode(msg)
        try:
            sock.send(payload, 0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return False
        if self.recorder is not None:
            self.recorder.write("in", payload)
        return True

    def _on_message(self, raw: bytes, sock: Any) -> None:
        now = P.now_ns()
        self._last_rx = time.monotonic()
        try:
            msg = P.decode(raw, max_bytes=16 * P.MAX_MESSAGE_BYTES)
        except ProtocolError as exc:
            log.warning("frontend %s: bad message from learner: %s", self.stream, exc)
            return
        if self.recorder is not None and isinstance(msg, (P.Posteriors, P.Detection,
                                                          P.HelloReply)):
            self.recorder.write("out", raw)
        if isinstance(msg, P.Posteriors):
            self.answered += len(msg.probs)
            if msg.t_in_ns is not None:
                self.latencies_ns.extend(now - t for t in msg.t_in_ns)
            if self.keep_posteriors:
                self.posteriors.append(msg)
        elif isinstance(msg, P.Detection):
            self.detections.append(msg)
        elif isinstance(msg, P.HelloReply):
            self._hello_reply = msg
            self._hello_evt.set()
        elif isinstance(msg, P.EndOfStream):
            self._eos_evt.set()
        elif isinstance(msg, P.Notice):
            self.notices.append(msg)
            # at most one new hello a second: notices for frames already in flight when
            # the learner restarted keep arriving for a moment and must not each re-hello
            if (msg.kind == "unknown_stream" and self._hello_reply is not None
                    and time.monotonic() - self._last_rehello > 1.0):
                self._last_rehello = time.monotonic()
                self._hello_reply = None  # hold frames in the outbox until accepted again
                self.rehellos += 1
                log.warning("frontend %s: learner lost the stream (restarted?); hello again",
                            self.stream)
                self._send(sock, self.hello_msg(), block=False)
        if self.on_output is not None:
            self.on_output(msg)

    # ------------------------------------------------------------ numbers

    def stats(self) -> dict:
        lat = np.asarray(self.latencies_ns, dtype=np.float64) / 1e6
        return {
            "stream": self.stream, "mode": self.mode, "frames": self.frames_made,
            "frames_sent": self.frames_sent, "dropped": self.dropped,
            "posterior_frames": int(lat.size), "detections": len(self.detections),
            "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "notices": [f"{n.kind}: {n.detail}" for n in self.notices[:10]],
            "rehellos": self.rehellos,
            # sent, never answered: lost at a learner that restarted mid-stream, say (it
            # cannot count frames it never saw); final once the end of stream is confirmed
            "frames_unanswered": max(0, self.frames_sent - self.answered),
        }
