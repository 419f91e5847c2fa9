"""The broker: spreads sessions (streams) over several learner worker processes.

    frontends (DEALER) --> clients_router (ROUTER, bind) [broker] workers_router (ROUTER,
    bind) <-- learner workers (DEALER, connect; `edgeprop serve --connect`)

ZeroMQ's plain ROUTER/DEALER proxy hands each message to the next worker round-robin,
which would scatter one stream's frames over workers that each hold a different network
state. So the broker keeps *session affinity*: a `hello` for a stream no client holds
picks the worker with the fewest sessions (then the longest-registered), one for a
stream another client holds goes to that stream's worker (a restarted frontend, or a
clash its learner reports), and every later message of that (client, stream) goes to
the same worker. Workers register and stay registered by
sending heartbeats (an empty client envelope); a worker silent for `worker_timeout_s`
is dropped with its sessions, whose frontends then get `unknown_stream` and say hello
again (to a live worker). Workers may run on other hosts: they only connect out.

Wire framing: client -> broker [client_id, msg]; broker -> worker [worker_id,
client_id, msg]; the worker's DEALER sees [client_id, msg] exactly as a standalone
learner's ROUTER would, so the learner code is the same. A control request goes to the
worker holding the stream it names; one naming no stream is answered by the broker
(ping, stats of its own) or refused (it would reach one worker of several). One
thread (`run`) owns both sockets.

    Broker(clients_bind, workers_bind, *, worker_timeout_s=5.0, hwm=1000)
        .run(stop: threading.Event) ; .start() -> Thread ; .stop()
        .endpoints {"clients_router", "workers_router"} ; .stats() -> dict
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from runtime import protocol as P

log = logging.getLogger("edgeprop.broker")


class Broker:
    def __init__(self, clients_bind: str, workers_bind: str, *, worker_timeout_s: float = 5.0,
                 hwm: int = 1000):
        self.clients_bind = clients_bind
        self.workers_bind = workers_bind
        self.worker_timeout_s = worker_timeout_s
        self.hwm = hwm
        self.endpoints: dict[str, str] = {}
        self.workers: dict[bytes, dict] = {}  # id -> {"seen": t, "since": t, "sessions": set}
        self.routes: dict[tuple[bytes, str], bytes] = {}
        self.counts: Counter = Counter()
        self._pending: deque = deque()  # (worker, client, payload) a worker could not take yet
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="broker", daemon=True)
        self._thread.start()
        self.ready.wait(10.0)
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def stats(self) -> dict:
        return {"workers": {w.hex(): len(v["sessions"]) for w, v in self.workers.items()},
                "sessions": len(self.routes), "counts": dict(self.counts)}

    def _guarded(self, fn, *args) -> None:
        """A bug must not take the broker down with every session: count, log, go on."""
        try:
            fn(*args)
        except Exception:
            self.counts["internal_errors"] += 1
            log.exception("broker: internal error handling a message (survived)")

    def _pick(self) -> bytes | None:
        if not self.workers:
            return None
        return min(self.workers, key=lambda w: (len(self.workers[w]["sessions"]),
                                                self.workers[w]["since"]))

    def _worker_holding(self, stream: str) -> bytes | None:
        """A live worker holding `stream` for some client, or None."""
        return next((w for (_, s), w in self.routes.items()
                     if s == stream and w in self.workers), None)

    def _to_client(self, sock: Any, client: bytes, msg: Any) -> None:
        import zmq

        try:
            sock.send_multipart([client, P.encode(msg)], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            self.counts["client_drops"] += 1

    def _from_client(self, clients: Any, workers: Any, client: bytes, payload: bytes) -> None:
        try:
            typ, stream = P.peek(payload)
        except P.WireError as exc:
            self.counts[exc.kind] += 1
            log.warning("broker: %s from client %s (survived)", exc, client.hex())
            self._to_client(clients, client, P.Notice("", exc.kind, exc.detail[:200]))
            return
        key = (client, stream)
        worker = self.routes.get(key)
        if typ == "control":
            worker = self._control_worker(clients, client, payload)
            if worker is None:
                return  # answered here
        elif typ == "hello":
            if worker is None or worker not in self.workers:
                # a stream another client holds stays on its worker, which then sees the
                # clash (stream_taken_over) as a lone learner would, and keeps one copy of
                # its personal weights; else the least loaded worker
                worker = self._worker_holding(stream) or self._pick()
            if worker is None:
                self.counts["no_worker"] += 1
                self._to_client(clients, client, P.HelloReply(stream, False,
                                                              "no learner workers are up yet"))
                return
            self.routes[key] = worker
            self.workers[worker]["sessions"].add(key)
            self.counts["sessions_routed"] += 1
        elif worker is None:
            self.counts["unknown_stream"] += 1
            self._to_client(clients, client, P.Notice(stream, "unknown_stream",
                                                      "send hello first (broker)"))
            return
        self._pending.append((worker, client, payload))
        self._flush(workers)

    def _flush(self, workers: Any) -> None:
        """Send the queued client messages, in order, until a worker's queue is full.
        A full queue is backpressure, not a drop: `run` then stops reading clients until
        it drains (replay stays lossless end to end; a live frontend drops its oldest
        frames itself, counted). Only a message for a worker that is gone is dropped."""
        import zmq

        while self._pending:
            worker, client, payload = self._pending[0]
            if worker not in self.workers:  # expired: its sessions will hello again
                self._pending.popleft()
                self.counts["worker_drops"] += 1
                continue
            try:
                workers.send_multipart([worker, client, payload], zmq.NOBLOCK)
            except zmq.Again:
                self.counts["worker_backpressure"] += 1
                return
            except zmq.ZMQError:  # the worker disconnected (unroutable)
                self.counts["worker_drops"] += 1
            else:
                self.counts["forwarded"] += 1
            self._pending.popleft()

    def _control_worker(self, clients: Any, client: bytes, payload: bytes) -> bytes | None:
        """The worker a control request is for: the one holding the stream it names (its
        own `stream`, or teach's and reset's `stream` argument), whichever client opened
        that stream. A request naming no stream would reach one worker of several, so
        the broker answers it itself: ping and stats with its own numbers, the rest
        (learning, checkpoint, shutdown, reset of all streams) refused with the reason.
        None: answered here."""
        try:
            req = P.decode(payload)
        except P.WireError as exc:
            self.counts[exc.kind] += 1
            self._to_client(clients, client, P.ControlReply("?", False, error=str(exc)))
            return None
        named = req.args.get("stream") if isinstance(req.args, dict) else None
        target = named if isinstance(named, str) and named else req.stream
        if target:
            worker = self.routes.get((client, target)) or self._worker_holding(target)
            if worker is None:
                self.counts["unknown_stream"] += 1
                self._to_client(clients, client, P.ControlReply(
                    req.cmd, False, error=f"no worker holds stream {target!r} (it has not "
                                          "said hello, or it ended)"))
            return worker
        self.counts["control_at_broker"] += 1
        if req.cmd in ("ping", "stats"):
            result = {"pong": True} if req.cmd == "ping" else self.stats()
            self._to_client(clients, client, P.ControlReply(
                req.cmd, True, {**result, "broker": True, "n_workers": len(self.workers)}))
        else:
            self._to_client(clients, client, P.ControlReply(req.cmd, False, error=(
                f"{req.cmd!r} without a stream would reach only one of the broker's "
                f"{len(self.workers)} workers; name a stream, or serve one learner "
                "(without --workers) to control it")))
        return None

    def _from_worker(self, clients: Any, worker: bytes, parts: list) -> None:
        import zmq

        now = time.monotonic()
        info = self.workers.get(worker)
        if info is None:
            info = self.workers[worker] = {"seen": now, "since": now, "sessions": set()}
            log.info("broker: worker %s registered (%d up)", worker.hex(), len(self.workers))
        info["seen"] = now
        if len(parts) != 2:
            self.counts["malformed"] += 1
            return
        client, payload = parts
        if not client:
            return  # registration / heartbeat
        try:
            typ, stream = P.peek(payload, max_bytes=16 * P.MAX_MESSAGE_BYTES)
        except P.WireError:
            typ, stream = "", ""
        if typ == "eos":
            self._forget((client, stream))
        elif typ == "notice":  # a worker closed a silent stream: its route is stale
            notice = P.decode(payload)
            if isinstance(notice, P.Notice) and notice.kind == "peers_timed_out":
                self._forget((client, stream))
        elif typ == "hello_reply":
            reply = P.decode(payload)
            if isinstance(reply, P.HelloReply) and not reply.accepted:
                self._forget((client, stream))

        try:
            clients.send_multipart([client, payload], zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError):
            self.counts["client_drops"] += 1

    def _forget(self, key: tuple[bytes, str]) -> None:
        worker = self.routes.pop(key, None)
        if worker is not None and worker in self.workers:
            self.workers[worker]["sessions"].discard(key)

    def _expire(self, now: float) -> None:
        for w, info in list(self.workers.items()):
            if now - info["seen"] > self.worker_timeout_s:
                self.counts["workers_lost"] += 1
                log.warning("broker: worker %s silent for %.1f s; dropping it and its %d "
                            "sessions (their frontends will hello again)", w.hex(),
                            now - info["seen"], len(info["sessions"]))
                for key in info["sessions"]:
                    self.routes.pop(key, None)
                del self.workers[w]

    def run(self, stop: threading.Event | None = None) -> None:
        import zmq

        stop = stop or self._stop
        ctx = zmq.Context.instance()
        clients_router = ctx.socket(zmq.ROUTER)
        workers_router = ctx.socket(zmq.ROUTER)
        for s in (clients_router, workers_router):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            s.setsockopt(zmq.SNDHWM, self.hwm)
            s.setsockopt(zmq.RCVHWM, self.hwm)
            s.setsockopt(zmq.MAXMSGSIZE, 16 * P.MAX_MESSAGE_BYTES)
        from runtime.learner_node import _bind

        try:
            _bind(clients_router, self.clients_bind, "clients_router")
            _bind(workers_router, self.workers_bind, "workers_router")
        except Exception as exc:
            self.error = exc
            self.ready.set()
            clients_router.close(0)
            workers_router.close(0)
            return
        self.endpoints = {
            "clients_router": clients_router.getsockopt_string(zmq.LAST_ENDPOINT),
            "workers_router": workers_router.getsockopt_string(zmq.LAST_ENDPOINT)}
        poller = zmq.Poller()
        poller.register(clients_router, zmq.POLLIN)
        poller.register(workers_router, zmq.POLLIN)
        workers_only = zmq.Poller()  # while a worker is full: keep taking its outputs
        workers_only.register(workers_router, zmq.POLLIN)
        self.ready.set()
        log.info("broker: %s", self.endpoints)
        try:
            while not stop.is_set():
                self._flush(workers_router)
                if self._pending:  # backpressure: read no client until the queue drains
                    events = dict(workers_only.poll(2))
                else:
                    events = dict(poller.poll(100))
                if workers_router in events:
                    for _ in range(512):
                        try:
                            parts = workers_router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._guarded(self._from_worker, clients_router, parts[0], parts[1:])
                if clients_router in events:
                    for _ in range(512):
                        if self._pending:
                            break
                        try:
                            parts = clients_router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if len(parts) != 2:
                            self.counts["malformed"] += 1
                            continue
                        self._guarded(self._from_client, clients_router, workers_router,
                                      parts[0], parts[1])
                self._expire(time.monotonic())
        finally:
            clients_router.close(0)
            workers_router.close(0)
