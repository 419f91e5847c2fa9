"""Garbage interleaved with a valid stream must not corrupt the learner's state.

A learner fed a valid stream (frames with labelled windows, learning on) with
garbage mixed in between its messages -- bytes that are not messages, messages of
the wrong version, shape or encoder, frames and end-of-stream for streams that do
not exist, message types that are not for the learner -- must give bit-identical
posteriors, detections and final weights to the same stream without the garbage,
and count every piece of garbage as a fault instead of crashing.

Garbage here means input the learner must *refuse*: a well-formed frame of the
valid stream is data, and a learner that accepts it is right to change state.
The in-process property test drives `LearnerCore.handle_bytes`; the socket test
sends the same mix over a real ZeroMQ TCP connection.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from runtime_support import small_checkpoint

from edgeprop.checkpoint import params_hash
from edgeprop.network import KWS_LABELS
from runtime import protocol as P
from runtime import regress as R
from runtime.learner_node import LearnerCore, Model

STREAM = "valid-stream"
CKPT = small_checkpoint()
MODEL = Model.from_checkpoint(CKPT)


def valid_recording(n_frames: int = 90) -> R.StreamRecording:
    """Real-valued frames with three labelled windows of 20 frames (learning happens)."""
    rng = np.random.default_rng(7)
    frames = (rng.standard_normal((n_frames, 1, 80)) * 1.5).astype(np.float32)
    labels = np.full(n_frames, P.NO_LABEL)
    windows = np.full(n_frames, P.NO_LABEL)
    for w, (s, lab) in enumerate([(5, 0), (35, 3), (65, 10)]):
        labels[s:s + 20] = lab
        windows[s:s + 20] = w
    header = P.RecordingHeader(0.0, MODEL.frontend_hash, MODEL.frontend, MODEL.encoder_id,
                               MODEL.encoder, params_hash(CKPT.params), list(KWS_LABELS),
                               CKPT.cfg.to_dict())
    return R.StreamRecording("fuzz", header, frames, labels, windows)


REC = valid_recording()


def stream_messages() -> list[bytes]:
    msgs = [REC.hello(STREAM)] + REC.frame_messages(STREAM, per_message=7) + [REC.end(STREAM)]
    return [P.encode(m) for m in msgs]


VALID = stream_messages()


def run_core(payloads: list[bytes]) -> tuple[dict, LearnerCore]:
    core = LearnerCore(CKPT, backend="reference", learning=True)
    posts, dets = [], []
    try:
        for raw in payloads:
            for reply in core.handle_bytes(raw, route=b"peer"):
                if isinstance(reply, P.Posteriors) and reply.stream == STREAM:
                    posts.append(reply.probs)
                elif isinstance(reply, P.Detection) and reply.stream == STREAM:
                    dets.append((reply.seq, reply.label))
        core.finish()
        return {"post": np.concatenate(posts), "dets": dets, "hash": core.params_hash(),
                "windows": core.counts["windows_learned"]}, core
    finally:
        core.close()


CLEAN, _ = run_core(VALID)


# ---------------------------------------------------------------- garbage strategies

def _pack(d: dict) -> bytes:  # hostile input only; the product packs in protocol.py alone
    return msgpack.packb(d, use_bin_type=True)


def _frames_map(**over) -> dict:
    d = msgpack.unpackb(VALID[1], raw=False)
    d.update(over)
    return d


refused_messages = st.one_of(
    # wrong shape / encoder / version for the valid stream: refused before any state change
    st.builds(lambda c: _pack(_frames_map(shape=[7, 1, c], data=b"\x00" * (28 * c))),
              st.integers(1, 79)),
    st.builds(lambda e: _pack(_frames_map(enc=e)), st.text(max_size=12)),
    st.builds(lambda v: _pack(_frames_map(v=v)), st.integers(2, 1000)),
    # frames / eos / heartbeats for streams that were never opened
    st.builds(lambda s: _pack(_frames_map(stream=s)),
              st.text(min_size=1, max_size=12).filter(lambda s: s != STREAM)),
    st.builds(lambda s: P.encode(P.EndOfStream(s, 3)),
              st.text(min_size=1, max_size=12).filter(lambda s: s != STREAM)),
    # message types that are not for the learner
    st.sampled_from([P.encode(P.Posteriors(STREAM, 0, 0.0, np.zeros((1, 12), np.float32))),
                     P.encode(P.Detection(STREAM, 0, 0.0, "yes", 0, 1.0)),
                     P.encode(P.Notice(STREAM, "x", "y")),
                     P.encode(P.HelloReply(STREAM, True))]),
    # a hello for a different stream with the wrong config (refused)
    st.builds(lambda s: P.encode(P.Hello(s, "not-the-hash", "enc", 80)),
              st.text(min_size=1, max_size=8)),
)


@st.composite
def undecodable(draw) -> bytes:
    """Random bytes or a mutated valid message that the decoder refuses."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=200))
    else:
        data = bytearray(draw(st.sampled_from(VALID)))
        for _ in range(draw(st.integers(1, 3))):
            if not data:
                break
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        data = bytes(data[:draw(st.integers(0, len(data)))])
    try:
        P.decode(data)
    except P.WireError:
        return data
    assume(False)  # it decoded: that is data, not garbage (see the module docstring)
    return b""


garbage = st.one_of(refused_messages, undecodable())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(st.tuples(st.integers(1, len(VALID) - 1), garbage), min_size=1, max_size=25))
def test_garbage_between_valid_messages_leaves_state_intact(inserts):
    payloads = list(VALID)
    for pos, junk in sorted(inserts, key=lambda x: -x[0]):
        payloads.insert(pos, junk)
    got, core = run_core(payloads)
    np.testing.assert_array_equal(got["post"], CLEAN["post"])
    assert got["dets"] == CLEAN["dets"]
    assert got["hash"] == CLEAN["hash"]
    assert got["windows"] == CLEAN["windows"] == 3
    faults = sum(v for k, v in core.counts.items()
                 if k in P.ERROR_KINDS + ("config_mismatch", "unknown_stream"))
    assert faults >= len(inserts)  # every piece of garbage was counted


def test_garbage_over_real_sockets_leaves_state_intact():
    """The same property end to end: DEALER -> tcp loopback -> learner thread."""
    rng = np.random.default_rng(0)
    junk = [b"", b"\xc1", b"\x93\x01\x02", _pack(_frames_map(v=2)),
            _pack(_frames_map(shape=[7, 1, 40], data=b"\x00" * 1120)),
            _pack(_frames_map(stream="ghost")), P.encode(P.EndOfStream("ghost", 1)),
            b"\x00" * (P.MAX_MESSAGE_BYTES + 10)]
    n_msgs = len(REC.frame_messages(STREAM)) + 1
    garbage_at = {i: [junk[int(k)] for k in rng.integers(0, len(junk), size=3)]
                  for i in range(n_msgs)}
    with R.LoopbackLearner(CKPT, "reference") as clean_l:
        clean = R.stream_over_socket(REC, clean_l.data, STREAM, timeout_s=60)
        clean_hash = clean_l.core.params_hash()
    with R.LoopbackLearner(CKPT, "reference") as dirty_l:
        dirty = R.stream_over_socket(REC, dirty_l.data, STREAM, timeout_s=60,
                                     garbage=garbage_at)
        dirty_hash = dirty_l.core.params_hash()
        counts = dict(dirty_l.core.counts)
    np.testing.assert_array_equal(dirty["posteriors"], clean["posteriors"])
    assert dirty["posteriors"].shape[0] == REC.n_frames
    assert dirty["detections"] == clean["detections"]
    assert dirty_hash == clean_hash
    assert counts.get("oversized", 0) + counts.get("malformed", 0) + counts.get("version", 0) \
        + counts.get("shape", 0) + counts.get("unknown_stream", 0) >= 3 * n_msgs
    # the peer is told (a Notice, or an end-of-stream reply for a ghost stream's eos)
    assert len(dirty["notices"]) >= 2 * n_msgs


@pytest.mark.parametrize("seq_shift", [5, -3])
def test_out_of_order_valid_frames_are_counted_not_fatal(seq_shift):
    """Seq gaps and duplicates are data faults: counted, and the learner keeps going."""
    msgs = [REC.hello(STREAM)] + REC.frame_messages(STREAM, per_message=10)
    bad = msgs[3]
    msgs.insert(4, P.Frames(STREAM, max(0, bad.seq + seq_shift), bad.t, bad.hop_s,
                            bad.encoder_id, bad.spikes))
    got, core = run_core([P.encode(m) for m in msgs] + [P.encode(REC.end(STREAM))])
    assert got["post"].shape[0] >= REC.n_frames - 10
    assert core.counts["seq_gaps"] + core.counts["seq_dups"] >= 1


# ---------------------------------------------------------------- the broker's routing decoder

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 2, None])},
        optional={k: st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=6),
                               st.sampled_from(["frames", "hello", "eos", "control"]),
                               st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2),
                               st.dictionaries(st.text(max_size=2), st.integers(-9, 9),
                                               max_size=2))
                  for k in ("type", "stream", "seq")}).map(_pack)))
def test_peek_never_raises_anything_but_wire_error(data):
    try:
        typ, stream = P.peek(data)
    except P.WireError:
        return
    assert isinstance(typ, str) and isinstance(stream, str)


def _through_broker(garbage_at: dict | None, timeout_s: float = 60) -> tuple[dict, str, dict]:
    """The valid stream via a real broker and one learner worker, both on tcp loopback."""
    from runtime_support import broker_with_workers

    core = LearnerCore(CKPT, backend="reference", learning=True, name="worker")
    with broker_with_workers([core]) as broker:
        out = R.stream_over_socket(REC, broker.endpoints["clients_router"], STREAM,
                                   timeout_s=timeout_s, garbage=garbage_at)
        alive = broker._thread.is_alive()
        return out, core.params_hash(), dict(broker.counts, alive=alive)


def test_broker_survives_garbage_and_keeps_the_stream_intact():
    junk = [b"", b"\xc1", _pack({"v": 1}), _pack({"v": 2, "type": "frames", "stream": STREAM}),
            _pack({"v": 1, "type": "frames", "stream": 7}), _pack(_frames_map(v=3)),
            _pack(_frames_map(stream="ghost")), b"\x00" * (P.MAX_MESSAGE_BYTES + 1)]
    n = len(REC.frame_messages(STREAM)) + 1
    clean, clean_hash, _ = _through_broker(None)
    dirty, dirty_hash, counts = _through_broker({i: list(junk) for i in range(n)})
    assert counts["alive"]
    np.testing.assert_array_equal(dirty["posteriors"], clean["posteriors"])
    assert dirty["posteriors"].shape[0] == REC.n_frames
    assert dirty["detections"] == clean["detections"] and dirty_hash == clean_hash == CLEAN["hash"]
    refused = sum(counts.get(k, 0) for k in P.ERROR_KINDS + ("unknown_stream",))
    assert refused >= 6 * n  # counted by the broker or passed on and refused by the learner


def test_broker_survives_a_message_whose_type_is_unhashable():
    """Found by this suite: protocol.peek raised TypeError here and the broker thread died."""
    n = len(REC.frame_messages(STREAM)) + 1
    out, _, counts = _through_broker({n // 2: [_pack({"v": 1, "type": [1], "stream": "s"})]},
                                     timeout_s=5)
    assert counts["alive"] and out["posteriors"].shape[0] == REC.n_frames


# ---------------------------------------------------------------- control requests

control_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(),
                           st.text(max_size=8),
                           st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2),
                           st.sampled_from(["yes", "_silence_", STREAM]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["teach", "learning", "stats", "reset", "ping"]),
       st.dictionaries(st.sampled_from(["stream", "label", "t_start", "t_end", "on", "x"]),
                       control_values, max_size=5))
def test_any_control_request_gets_a_reply_never_an_exception(cmd, args):
    """(checkpoint is left out: arbitrary paths would write files anywhere.)"""
    core = LearnerCore(CKPT, backend="reference", learning=True)
    try:
        for raw in VALID[:4]:  # an open stream with some history for `teach`
            core.handle_bytes(raw)
        reply = core.handle_bytes(P.encode(P.ControlRequest(cmd, "", args)))
        assert len(reply) == 1 and isinstance(reply[0], P.ControlReply)
        assert reply[0].ok or reply[0].error
        P.encode(reply[0])  # and the reply itself is encodable
    finally:
        core.close()
