"""Frontend and learner nodes over real ZeroMQ sockets on 127.0.0.1, with real clips."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
from runtime_support import (
    control,
    feed_stream,
    frontend_for,
    make_checkpoint,
    raw_dealer,
    real_clip_stream,
    start_learner,
)

from edgeprop.checkpoint import load_checkpoint, params_hash
from edgeprop.errors import ConfigError
from runtime import protocol as P
from runtime.recording import (
    RecordingWriter,
    compare_replay,
    header_for,
    read_recording,
    replay_recording,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("model") / "m.ckpt"))


@pytest.fixture(scope="module")
def stream(data_dir):
    return real_clip_stream(data_dir, per_label=1)


def test_end_to_end_over_loopback_with_real_clips(ckpt, stream):
    node = start_learner(ckpt)
    ep = node.endpoints
    try:
        fe = frontend_for(ckpt, ep["data_router"], stream="e2e", batch=2)
        reply = fe.start()
        assert reply.accepted and reply.params_hash == params_hash(ckpt.params)
        n = feed_stream(fe, stream)
        st = fe.finish()
        fe.close()
        stats = control(ep["control_rep"], "stats").result
    finally:
        node.stop()
        node.core.close()
    assert st["eos_confirmed"] and st["dropped"] == 0
    assert st["frames"] == n == stats["counts"]["frames"]
    probs = np.concatenate([p.probs for p in fe.posteriors])
    assert probs.shape == (n, 12) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert len(fe.latencies_ns) == n and st["latency_p99_ms"] < 5000
    # every labelled utterance was learned once, and the weights moved
    assert stats["counts"]["windows_learned"] == len(stream.events)
    assert stats["params_hash"] != params_hash(ckpt.params)
    assert not any(k in stats["counts"] for k in ("malformed", "seq_gaps", "shape"))


def test_record_then_replay_gives_identical_posteriors_and_weights(ckpt, stream, tmp_path):
    node = start_learner(ckpt, apply_delay=30)
    try:
        rec_path = tmp_path / "s.rec"
        writer = RecordingWriter(rec_path, header_for(ckpt, note="test"))
        fe = frontend_for(ckpt, node.endpoints["data_router"], stream="rec", recorder=writer)
        fe.start()
        feed_stream(fe, stream, limit_s=12)
        assert fe.finish()["eos_confirmed"]
        fe.close()
        writer.close()
        live_hash = control(node.endpoints["control_rep"], "stats").result["params_hash"]
    finally:
        node.stop()
        node.core.close()
    rec = read_recording(rec_path)
    assert rec.header.params_hash == params_hash(ckpt.params)
    assert len(rec.frames()) > 1000 and rec.posteriors()["rec"].shape[1] == 12
    result = replay_recording(rec, ckpt)  # settings from the recorded hello_reply
    cmp = compare_replay(rec, result)
    assert cmp["identical"], cmp
    assert cmp["frames_compared"] == sum(f.n for f in rec.frames())
    assert result.params_hash == live_hash != params_hash(ckpt.params)
    assert result.stats["updates"] > 3


def test_learner_side_recording_of_interleaved_streams_replays_identically(ckpt, stream,
                                                                           tmp_path):
    import threading

    from runtime.learner_node import LearnerCore

    settings = LearnerCore(ckpt, backend="reference", apply_delay=20).settings()
    writer = RecordingWriter(tmp_path / "l.rec", header_for(ckpt, runtime=settings))
    node = start_learner(ckpt, recorder=writer, apply_delay=20)
    try:
        fes = [frontend_for(ckpt, node.endpoints["data_router"], stream=f"x{i}", batch=1 + i)
               for i in range(3)]
        for fe in fes:
            fe.start()
        threads = [threading.Thread(target=feed_stream, args=(fe, stream),
                                    kwargs={"limit_s": 6}) for fe in fes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fe in fes:
            assert fe.finish()["eos_confirmed"]
            fe.close()
        live_hash = control(node.endpoints["control_rep"], "stats").result["params_hash"]
    finally:
        node.stop()  # closes the recorder too
        node.core.close()
    rec = read_recording(tmp_path / "l.rec")
    assert rec.header.runtime["apply_delay"] == 20
    assert set(rec.posteriors()) == {"x0", "x1", "x2"}
    result = replay_recording(rec, ckpt)
    cmp = compare_replay(rec, result)
    assert cmp["identical"], cmp
    assert result.params_hash == live_hash != params_hash(ckpt.params)


def _send(sock, payload: bytes) -> P.Notice | P.HelloReply:
    sock.send(payload)
    return P.decode(sock.recv())


def test_every_bad_input_is_counted_and_survived(ckpt, stream):
    node = start_learner(ckpt)
    ep = node.endpoints
    fe_hash = header_for(ckpt).frontend_hash
    enc = header_for(ckpt).encoder_id
    good_hello = P.Hello("bad", fe_hash, enc, 80)
    frames = lambda seq, n=1, ch=80: P.Frames("bad", seq, seq * 0.01, 0.01, enc,
                                              np.zeros((n, 1, ch), np.float32)).encode()
    try:
        s = raw_dealer(ep["data_router"])
        assert _send(s, b"\x93\xc1 not msgpack").kind == "malformed"
        assert _send(s, msgpack.packb({"v": 9, "type": "frames"})).kind == "version"
        assert _send(s, b"\x00" * (P.MAX_MESSAGE_BYTES + 10)).kind == "oversized"
        assert _send(s, msgpack.packb({"v": 1, "type": "bogus"})).kind == "unknown_type"
        assert _send(s, frames(0)).kind == "unknown_stream"
        rej = _send(s, P.Hello("bad", "0" * 64, enc, 80).encode())
        assert not rej.accepted and "frontend config hash" in rej.reason
        rej = _send(s, P.Hello("bad", fe_hash, "delta-000", 160).encode())
        assert not rej.accepted and "encoder" in rej.reason
        assert _send(s, good_hello.encode()).accepted
        assert isinstance(_send(s, frames(0, 2)), P.Posteriors)
        assert _send(s, frames(2, 1, ch=81)).kind == "shape"
        assert isinstance(_send(s, frames(5)), P.Posteriors)  # gap: 2, 3, 4 missing
        s.send(frames(5, 2))  # 5 is a duplicate, 6 is new
        assert P.decode(s.recv()).seq == 6
        s.send(frames(6))  # fully duplicate: no reply at all
        s.send(P.Heartbeat("bad", 1).encode())
        assert isinstance(P.decode(s.recv()), P.Heartbeat)
        s.close(0)
        counts = control(ep["control_rep"], "stats").result["counts"]
        for kind in ("malformed", "version", "oversized", "unknown_type", "unknown_stream",
                     "shape", "seq_gaps"):
            assert counts.get(kind) == 1, (kind, counts)
        assert counts["config_mismatch"] == 2 and counts["seq_dups"] == 2
        assert counts["frames_missing"] == 3 and counts["frames_duplicate"] == 2
        assert control(ep["control_rep"], "bogus").ok is False  # bad control: replied, counted
        # and the learner still serves a normal stream
        fe = frontend_for(ckpt, ep["data_router"], stream="after")
        fe.start()
        feed_stream(fe, stream, limit_s=2)
        assert fe.finish()["eos_confirmed"]
        fe.close()
    finally:
        node.stop()
        node.core.close()


def test_peer_vanishing_mid_stream_is_timed_out_and_survived(ckpt, stream):
    node = start_learner(ckpt, peer_timeout_s=0.5)
    ep = node.endpoints
    try:
        fe = frontend_for(ckpt, ep["data_router"], stream="ghost", heartbeat_s=100)
        fe.start()
        feed_stream(fe, stream, limit_s=1.5)
        deadline = time.monotonic() + 5
        while fe.frames_sent < fe.frames_made and time.monotonic() < deadline:
            time.sleep(0.01)
        fe.close()  # vanishes: no end-of-stream, socket gone
        time.sleep(1.5)
        stats = control(ep["control_rep"], "stats").result
        assert stats["counts"]["peers_timed_out"] == 1 and "ghost" not in stats["streams"]
        assert control(ep["control_rep"], "ping").result["pong"]
    finally:
        node.stop()
        node.core.close()


def test_control_teach_learning_reset_and_checkpoint(ckpt, stream, tmp_path):
    node = start_learner(ckpt, checkpoint_dir=tmp_path, checkpoint_every=1e9)
    ep = node.endpoints
    try:
        fe = frontend_for(ckpt, ep["data_router"], stream="c")
        fe.start()
        assert control(ep["control_rep"], "learning", on=False).result["learning"] is False
        feed_stream(fe, stream, limit_s=4)  # labels ride along but learning is off
        deadline = time.monotonic() + 10
        while control(ep["control_rep"], "stats").result["streams"]["c"]["frames"] < 400:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = control(ep["control_rep"], "stats").result
        assert st["updates"] == 0 and st["params_hash"] == params_hash(ckpt.params)
        e = stream.events[1]
        taught = control(ep["control_rep"], "teach", stream="c", label=e.label,
                         t_start=e.t_start, t_end=e.t_end)
        assert taught.ok and taught.result["updates"] == 1 and taught.result["frames"] > 20
        bad = control(ep["control_rep"], "teach", stream="c", label="yes", t_start=500.0,
                      t_end=501.0)
        assert not bad.ok and "history" in bad.error
        assert control(ep["control_rep"], "reset", stream="c").result["reset"] == ["c"]
        saved = control(ep["control_rep"], "checkpoint").result
        assert params_hash(load_checkpoint(saved["path"]).params) == saved["params_hash"]
        assert saved["params_hash"] != params_hash(ckpt.params)
        fe.finish()
        fe.close()
    finally:
        node.stop()
        node.core.close()


def test_personal_session_learns_alone_and_is_saved(ckpt, stream, tmp_path):
    node = start_learner(ckpt, checkpoint_dir=tmp_path, checkpoint_every=1e9, apply_delay=0)
    ep = node.endpoints
    try:
        shared = frontend_for(ckpt, ep["data_router"], stream="shared")
        mine = frontend_for(ckpt, ep["data_router"], stream="mine", personal=True)
        shared.start()
        mine.start()
        feed_stream(shared, stream, labelled=False, limit_s=3)
        feed_stream(mine, stream, labelled=True, limit_s=6)
        assert shared.finish()["eos_confirmed"] and mine.finish()["eos_confirmed"]
        shared.close()
        mine.close()
        st = control(ep["control_rep"], "stats").result
    finally:
        node.stop()
        node.core.close()
    assert st["updates"] == 0 and st["params_hash"] == params_hash(ckpt.params)
    personal = load_checkpoint(tmp_path / "personal-mine.ckpt")
    assert params_hash(personal.params) != params_hash(ckpt.params)
    assert personal.extra["runtime"]["windows"] >= 3


def test_each_stream_has_its_own_personal_checkpoint_file():
    """Sanitising alone mapped "a b" and "a_b" (and long ids alike in their first 80
    characters) to one file: one speaker's weights overwrote the other's."""
    from runtime.learner_node import stream_file_part

    streams = ["mine", "a b", "a_b", "a/b", "", "x" * 100, "x" * 100 + "y", "spk\u00e9"]
    parts = [stream_file_part(s) for s in streams]
    assert len(set(parts)) == len(streams)
    assert parts[0] == "mine" and parts[2] == "a_b"  # a safe name stays as it is
    assert all(len(p) <= 80 and p.replace("-", "").replace("_", "").replace(".", "")
               .isalnum() and p.isascii() for p in parts)


def test_a_hello_with_an_overlong_stream_id_is_rejected_with_the_reason(ckpt):
    """Every message repeats the stream id: a learner refuses one past MAX_STREAM_CHARS
    at the hello, with a reason, rather than carrying it in every frame."""
    node = start_learner(ckpt)
    try:
        ok = frontend_for(ckpt, node.endpoints["data_router"], stream="s" * P.MAX_STREAM_CHARS)
        assert ok.start().accepted
        ok.close()
        long = frontend_for(ckpt, node.endpoints["data_router"],
                            stream="s" * (P.MAX_STREAM_CHARS + 1))
        with pytest.raises(ConfigError, match="stream id of 129 characters is longer than 128"):
            long.start()
        long.close()
    finally:
        node.stop()
        node.core.close()


def test_live_mode_drops_the_oldest_frames_and_counts_them(ckpt, stream):
    node = start_learner(ckpt)
    fe = frontend_for(ckpt, node.endpoints["data_router"], stream="live", mode="live",
                      live_queue=10)
    try:
        fe.start()
        node.stop()  # the learner goes away: nothing can be sent any more
        node.core.close()
        time.sleep(0.2)
        n = feed_stream(fe, stream, labelled=False, limit_s=3)
        queued = list(fe._outbox)
        assert fe.dropped > 0
        assert fe.frames_sent + fe.dropped + sum(m.n for m in queued) == n
        assert [m.seq for m in queued] == list(range(n - len(queued), n))  # newest kept
    finally:
        fe.close()


def test_outputs_are_published_and_a_mismatched_frontend_is_refused(ckpt, stream):
    import zmq

    from edgeprop.encoders import make_encoder
    from edgeprop.frontend import FrontendConfig
    from runtime.frontend_node import FrontendNode
    from runtime.learner_node import LearnerCore, LearnerNode

    core = LearnerCore(ckpt, backend="reference")
    node = LearnerNode(core, bind="tcp://127.0.0.1:*", pub_bind="tcp://127.0.0.1:*")
    node.start()
    outputs_sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        outputs_sub.setsockopt(zmq.LINGER, 0)
        outputs_sub.setsockopt(zmq.RCVTIMEO, 5000)
        outputs_sub.setsockopt(zmq.SUBSCRIBE, b"pub")
        outputs_sub.connect(node.endpoints["outputs_pub"])
        time.sleep(0.3)  # let the subscription reach the publisher
        fe = frontend_for(ckpt, node.endpoints["data_router"], stream="pub")
        fe.start()
        feed_stream(fe, stream, limit_s=1)
        fe.finish()
        fe.close()
        topic, payload = outputs_sub.recv_multipart()
        assert topic == b"pub" and isinstance(P.decode(payload), P.Posteriors)
        other = FrontendNode(node.endpoints["data_router"], FrontendConfig(n_mels=20),
                             make_encoder("current", 40), stream="wrong")
        with pytest.raises(ConfigError, match="rejected"):
            other.start()
    finally:
        outputs_sub.close(0)
        node.stop()
        core.close()
