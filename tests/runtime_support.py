"""Helpers for the runtime tests: a small real checkpoint, real clips, a learner in a thread."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgeprop.checkpoint import Checkpoint, save_checkpoint
from edgeprop.encoders import make_encoder
from edgeprop.frontend import FrontendConfig, features
from edgeprop.network import KWS_LABELS, ModelConfig, init_params
from runtime.stream import build_stream, embedded_clips


def make_checkpoint(path: Path, seed: int = 0, encoder: str = "current") -> Path:
    """init_params + a frontend normalised on the embedded clips: a real, valid model."""
    fe = FrontendConfig()
    stream = build_stream(embedded_clips()[:8], seed=seed)
    fe = fe.with_normalization(*_norm(features(stream.audio, fe)))
    cfg = ModelConfig()
    enc = make_encoder(encoder, fe.n_features)
    if enc.n_out != cfg.n_in:
        cfg = ModelConfig(n_in=enc.n_out)
    save_checkpoint(path, cfg, init_params(cfg, seed), frontend=fe.to_dict(),
                    encoder=enc.to_dict(), labels=list(KWS_LABELS), extra={"note": "test"})
    return path


def small_checkpoint() -> Checkpoint:
    """An in-memory model (init weights, default frontend, current encoder, KWS labels)
    for tests that drive a LearnerCore without files."""
    cfg = ModelConfig()
    return Checkpoint(cfg, init_params(cfg, seed=3), frontend=FrontendConfig().to_dict(),
                      encoder=make_encoder("current").to_dict(), labels=list(KWS_LABELS))


def _norm(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(axis=0), np.maximum(f.std(axis=0), 1e-3)


# ---------------------------------------------------------------- live pieces

def start_learner(ckpt, recorder=None, **core_kw):
    """A learner core + node in a thread, on loopback TCP; returns the node."""
    from runtime.learner_node import LearnerCore, LearnerNode

    core_kw.setdefault("backend", "reference")
    core = LearnerCore(ckpt, **core_kw)
    node = LearnerNode(core, bind="tcp://127.0.0.1:*", control_bind="tcp://127.0.0.1:*",
                       recorder=recorder)
    node.start()
    return node


def control(endpoint: str, cmd: str, stream: str = "", timeout_ms: int = 20000, **args):
    import zmq

    from runtime import protocol as P

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.connect(endpoint)
    try:
        sock.send(P.encode(P.ControlRequest(cmd, stream, args)))
        return P.decode(sock.recv(), max_bytes=1 << 24)
    finally:
        sock.close(0)


def real_clip_stream(data_dir: Path, per_label: int = 1, seed: int = 0):
    from runtime.stream import build_stream, folder_clips

    return build_stream(folder_clips(data_dir, per_label, seed), seed=seed, noise_gain=0.05)


def frontend_for(ckpt, endpoint: str, **kw):
    from edgeprop.encoders import encoder_from_dict
    from edgeprop.frontend import FrontendConfig
    from runtime.frontend_node import FrontendNode

    return FrontendNode(endpoint, FrontendConfig.from_dict(ckpt.frontend),
                        encoder_from_dict(ckpt.encoder), **kw)


def feed_stream(node, stream, labelled: bool = True, limit_s: float | None = None) -> int:
    """Feed a Stream hop by hop (10 ms blocks), labels riding along."""
    hop = node.fcfg.hop
    lab, win = stream.frame_labels(hop)
    n = len(lab) if limit_s is None else min(len(lab), int(limit_s * 100))
    for k in range(n):
        node.feed(stream.audio[k * hop:(k + 1) * hop],
                  label=int(lab[k]) if labelled else -1, window=int(win[k]) if labelled else -1)
    return n


def raw_dealer(endpoint: str):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(endpoint)
    return sock


@contextmanager
def broker_with_workers(cores, **broker_kw):
    """A Broker in a thread and a LearnerNode worker per core connected to it, each
    registered before the next starts (so the first core is the broker's first
    worker); yields the broker, and stops the workers, their cores and the broker."""
    import time

    from runtime.broker import Broker
    from runtime.learner_node import LearnerNode

    broker_kw.setdefault("worker_timeout_s", 30.0)
    broker = Broker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", **broker_kw)
    broker.start()  # its thread: broker._thread
    assert broker.ready.is_set() and broker.error is None
    nodes = []
    try:
        for k, core in enumerate(cores):
            nodes.append(LearnerNode(core, connect=broker.endpoints["workers_router"]))
            nodes[-1].start()
            deadline = time.monotonic() + 10
            while len(broker.workers) <= k and time.monotonic() < deadline:
                time.sleep(0.02)
        yield broker
    finally:
        for node in nodes:
            node.stop()
        for core in cores:
            core.close()
        broker.stop()
