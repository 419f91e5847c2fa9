"""Property-based fuzzing of the wire decoder (runtime/protocol.py) with hypothesis.

The contract under test: `protocol.decode(data)` either returns a message or raises
`WireError` (a `ProtocolError`) with a known `kind` -- never any other exception, for
random bytes, mutated valid messages, wrong types / shapes / versions and huge sizes.
An accepted message must also be stable: encoding it again and decoding gives the same
bytes, so nothing half-valid survives into the learner.

msgpack is used here only to *build hostile inputs*; the product never packs outside
protocol.py.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeprop.errors import ProtocolError
from runtime import protocol as P

FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def decode_or_wire_error(data: bytes):
    """Decode; a WireError is an accepted outcome, anything else fails the test."""
    try:
        msg = P.decode(data)
    except P.WireError as exc:
        assert isinstance(exc, ProtocolError)
        assert exc.kind in P.ERROR_KINDS
        return None
    # accepted: it must survive a re-encode unchanged (canonical, no half-valid state)
    again = P.encode(msg)
    assert P.encode(P.decode(again)) == again
    return msg


def valid_messages() -> list:
    rng = np.random.default_rng(0)
    bits = (rng.random((4, 2, 80)) < 0.2).astype(np.uint8)
    vals = rng.standard_normal((3, 1, 80)).astype(np.float32)
    return [
        P.Hello("s1", "fhash", "enc", 80, 2, "live", True, "c"),
        P.HelloReply("s1", True, "", "phash", "fhash", "enc", list("ab"), "w0"),
        P.Frames("s1", 7, 0.07, 0.01, "enc", bits, [1, 2, P.NO_LABEL, 3], [0, 0, -1, 1],
                 [1, 2, 3, 4]),
        P.Frames("s2", 0, 0.0, 0.01, "enc", vals),
        P.Heartbeat("s1", 123),
        P.EndOfStream("s1", 99),
        P.Posteriors("s1", 3, 0.03, rng.random((2, 12)).astype(np.float32), [5, 6], 9),
        P.Detection("s1", 3, 0.03, "yes", 0, 0.9),
        P.ControlRequest("teach", "s1", {"label": "yes", "t_start": 0.1, "t_end": 0.9}),
        P.ControlReply("stats", True, {"frames": 3}),
        P.Notice("s1", "seq_gap", "3 -> 5"),
    ]


VALID = [P.encode(m) for m in valid_messages()]

# ---------------------------------------------------------------- strategies

msgpack_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=64))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=6),
                            st.dictionaries(st.text(max_size=8), inner, max_size=6)),
    max_leaves=25)


@st.composite
def mutated_valid(draw) -> bytes:
    """A valid message with a few byte flips, insertions, deletions or a truncation."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            data = data[:pos]
    return bytes(data)


@st.composite
def field_swapped(draw) -> bytes:
    """A valid message map with one field replaced by a value of any type, or removed,
    or with an extra field, or a different version/type tag."""
    d = msgpack.unpackb(draw(st.sampled_from(VALID)), raw=False)
    key = draw(st.sampled_from(sorted(d) + ["extra"]))
    if draw(st.booleans()) and key in d:
        del d[key]
    else:
        d[key] = draw(msgpack_values)
    return msgpack.packb(d, use_bin_type=True)


@st.composite
def wrong_shapes(draw) -> bytes:
    """Frames/Posteriors whose shape and payload disagree, or are absurd."""
    dims = draw(st.lists(st.integers(-3, 2**40), min_size=0, max_size=5))
    payload = draw(st.binary(max_size=256))
    typ = draw(st.sampled_from(["frames", "posteriors"]))
    d = {"v": 1, "type": typ, "stream": "s", "seq": draw(st.integers(-5, 2**64 - 1)),
         "t": 0.0, "hop_s": 0.01, "enc": "e", "shape": dims,
         "fmt": draw(st.sampled_from(["bits", "f32", "other"])), "data": payload}
    if draw(st.booleans()):
        d["labels"] = draw(st.lists(msgpack_scalars, max_size=4))
    return msgpack.packb(d, use_bin_type=True)


# ---------------------------------------------------------------- properties

@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data):
    decode_or_wire_error(data)


@FUZZ
@given(mutated_valid())
def test_mutated_valid_messages_never_crash_the_decoder(data):
    decode_or_wire_error(data)


@FUZZ
@given(field_swapped())
def test_wrong_field_types_never_crash_the_decoder(data):
    decode_or_wire_error(data)


@FUZZ
@given(wrong_shapes())
def test_wrong_shapes_never_crash_the_decoder(data):
    msg = decode_or_wire_error(data)
    if msg is not None:  # accepted only when the payload really holds the shape
        arr = msg.spikes if isinstance(msg, P.Frames) else msg.probs
        assert list(arr.shape) == msgpack.unpackb(data, raw=False)["shape"]


@FUZZ
@given(msgpack_values)
def test_any_msgpack_value_is_a_message_or_a_wire_error(value):
    decode_or_wire_error(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=5), st.none(),
                 st.floats(allow_nan=False))
       .filter(lambda v: v != P.PROTOCOL_VERSION))
def test_any_other_version_is_refused_as_version(v):
    d = msgpack.unpackb(VALID[2], raw=False)
    d["v"] = v
    with pytest.raises(P.WireError) as info:
        P.decode(msgpack.packb(d, use_bin_type=True))
    assert info.value.kind == "version"


@FUZZ
@given(st.integers(1, 64), st.integers(1, 4), st.integers(1, 200), st.data())
def test_valid_frames_round_trip_exactly(n, substeps, channels, data):
    seed = data.draw(st.integers(0, 2**32 - 1))
    spikes = (np.random.default_rng(seed).random((n, substeps, channels)) < 0.3).astype(np.uint8)
    labels = data.draw(st.lists(st.integers(-1, 11), min_size=n, max_size=n))
    msg = P.Frames("stream", data.draw(st.integers(0, 2**40)), 1.5, 0.01, "enc", spikes,
                   labels=labels)
    out = P.decode(P.encode(msg))
    assert isinstance(out, P.Frames)
    np.testing.assert_array_equal(out.spikes, spikes)
    assert out.labels == labels and out.seq == msg.seq


# ---------------------------------------------------------------- huge sizes

def test_oversized_payload_is_refused_before_unpacking():
    with pytest.raises(P.WireError) as info:
        P.decode(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
    assert info.value.kind == "oversized"


@pytest.mark.parametrize("header", [
    b"\xc6\xff\xff\xff\xff",          # bin32 claiming 4 GB
    b"\xdb\xff\xff\xff\xff",          # str32 claiming 4 GB
    b"\xdd\xff\xff\xff\xff",          # array32 claiming 4 G items
    b"\xdf\xff\xff\xff\xff",          # map32 claiming 4 G pairs
    b"\x81\xa1v\xc6\x7f\xff\xff\xff",  # map with a 2 GB bin value
])
def test_huge_length_headers_do_not_allocate(header):
    with pytest.raises(P.WireError) as info:
        P.decode(header + b"\x00" * 16)
    assert info.value.kind == "malformed"


def test_huge_claimed_shape_with_small_payload_is_a_shape_error():
    d = msgpack.unpackb(VALID[2], raw=False)
    d["shape"] = [64, 1 << 20, 1 << 20]
    with pytest.raises(P.WireError) as info:
        P.decode(msgpack.packb(d, use_bin_type=True))
    assert info.value.kind == "shape"


def test_deeply_nested_message_is_malformed_not_a_recursion_crash():
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(P.WireError):
        P.decode(deep)


def test_too_many_frames_in_one_message_is_refused():
    spikes = np.zeros((P.MAX_BATCH + 1, 1, 8), dtype=np.uint8)
    data = P.encode(P.Frames("s", 0, 0.0, 0.01, "e", spikes))
    with pytest.raises(P.WireError) as info:
        P.decode(data)
    assert info.value.kind == "shape"


def test_float_and_int_fields_reject_bool_and_huge_int():
    d = msgpack.unpackb(VALID[2], raw=False)
    d["seq"] = True
    with pytest.raises(P.WireError):
        P.decode(msgpack.packb(d, use_bin_type=True))
    d["seq"] = 2**64 - 1  # fits msgpack; accepted as a (large) int, re-encodes exactly
    assert P.decode(msgpack.packb(d, use_bin_type=True)).seq == 2**64 - 1
    assert struct.calcsize("<Q") == 8
