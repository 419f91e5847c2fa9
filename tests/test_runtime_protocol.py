"""Wire protocol v1: every message round-trips; every bad input is a typed, counted kind."""

from __future__ import annotations

import io

import msgpack
import numpy as np
import pytest

from runtime import protocol as P


def _all_messages() -> list:
    rng = np.random.default_rng(0)
    bits = (rng.random((3, 2, 80)) < 0.2).astype(np.uint8)
    return [
        P.Hello("s", "f" * 64, "current-abc", 80, 1, "live", True, "me", 16000, 0.01),
        P.HelloReply("s", False, "mismatch", "p", "f", "e", ["yes", "no"], "w0",
                     {"apply_delay": 100}),
        P.Frames("s", 7, 0.07, 0.01, "enc", bits, [1, -1, 2], [0, -1, 1], [5, 6, 7]),
        P.Frames("s", 0, 0.0, 0.01, "enc", rng.standard_normal((2, 1, 80)).astype(np.float32)),
        P.Heartbeat("s", 123),
        P.EndOfStream("s", 99, "done"),
        P.Posteriors("s", 3, 0.03, rng.random((2, 12)).astype(np.float32), [1, 2], 9),
        P.Detection("s", 4, 0.04, "yes", 0, 0.9),
        P.ControlRequest("teach", "s", {"label": "yes", "t_start": 0.0, "t_end": 1.0}),
        P.ControlReply("stats", True, {"frames": 3}, ""),
        P.Notice("s", "shape", "want [n, 1, 80]"),
    ]


def _same(a, b) -> bool:
    for k, v in vars(a).items():
        w = getattr(b, k)
        if isinstance(v, np.ndarray):
            if not np.array_equal(v, w) or v.shape != w.shape:
                return False
        elif v != w:
            return False
    return True


@pytest.mark.parametrize("msg", _all_messages(), ids=lambda m: m.TYPE)
def test_every_message_roundtrips(msg):
    data = msg.encode()
    back = P.decode(data)
    assert type(back) is type(msg)
    assert _same(msg, back)
    assert P.peek(data) == (msg.TYPE, getattr(msg, "stream", ""))


def test_spike_frames_are_bit_packed_little_order():
    bits = np.zeros((1, 1, 16), np.uint8)
    bits[0, 0, 0] = 1
    bits[0, 0, 9] = 1
    assert P.pack_bits(bits) == bytes([0b00000001, 0b00000010])
    f = P.Frames("s", 0, 0.0, 0.01, "e", (np.ones((10, 1, 80)) > 0).astype(np.uint8))
    assert len(f.encode()) < 200  # 10 frames x 80 spikes = 100 payload bytes


def _kind(data) -> str:
    with pytest.raises(P.WireError) as exc:
        P.decode(data)
    return exc.value.kind


def test_bad_inputs_raise_wire_errors_of_the_right_kind():
    ok = P.Heartbeat("s", 1).encode()
    assert _kind(b"\xc1\x00garbage") == "malformed"
    assert _kind(ok[:-3]) == "malformed"
    assert _kind(msgpack.packb([1, 2, 3])) == "malformed"
    assert _kind(msgpack.packb({"type": "heartbeat", "stream": "s"})) == "version"
    assert _kind(msgpack.packb({"v": 2, "type": "heartbeat", "stream": "s"})) == "version"
    assert _kind(msgpack.packb({"v": 1, "type": "teleport"})) == "unknown_type"
    assert _kind(msgpack.packb({"v": 1, "type": "heartbeat", "stream": 5})) == "bad_field"
    assert _kind(b"\x00" * (P.MAX_MESSAGE_BYTES + 1)) == "oversized"
    m = P.Frames("s", 0, 0.0, 0.01, "e", np.zeros((2, 1, 80), np.uint8)).to_map()
    m.update(v=1, type="frames", shape=[2, 1, 81])
    assert _kind(msgpack.packb(m, use_bin_type=True)) == "shape"
    m.update(shape=[P.MAX_BATCH + 1, 1, 80])
    assert _kind(msgpack.packb(m, use_bin_type=True)) == "shape"
    m.update(shape=[2, 1, 80], labels=[1])
    assert _kind(msgpack.packb(m, use_bin_type=True)) == "shape"


def test_recording_stream_tolerates_a_truncated_tail():
    buf = io.BytesIO()
    for i in range(3):
        buf.write(P.Heartbeat("s", i).encode())
    data = buf.getvalue()
    got = list(P.iter_maps(io.BytesIO(data[:-2])))
    assert [m.t_ns for m in got] == [0, 1]


def test_encoder_id_is_stable_and_setting_sensitive():
    a = P.encoder_id({"name": "delta", "n_in": 80, "theta": 0.5})
    assert a == P.encoder_id({"theta": 0.5, "n_in": 80, "name": "delta"})
    assert a != P.encoder_id({"name": "delta", "n_in": 80, "theta": 0.25})
    assert a.startswith("delta-")


@pytest.mark.parametrize("v", [True, 1.0, "1"])
def test_a_version_that_only_compares_equal_to_1_is_rejected(v):
    raw = msgpack.packb({"v": v, "type": "heartbeat", "stream": "s"}, use_bin_type=True)
    for fn in (P.decode, P.peek):
        with pytest.raises(P.WireError) as err:
            fn(raw)
        assert err.value.kind == "version"
