"""Wire protocol v1: the message dataclasses and the ONLY place msgpack is packed/unpacked.

Every message is one msgpack map with ``v`` (protocol version, 1) and ``type``. Full
specification (fields, sockets, high-water marks, error handling): docs/protocol.md.

Public API (stable; the demo and regression suites build on it)::

    PROTOCOL_VERSION = 1
    MAX_MESSAGE_BYTES = 256 * 1024       # decode() refuses anything longer
    NO_LABEL = -1                        # per-frame label / window id meaning "none"
    MAX_STREAM_CHARS = 128               # a longer stream id: hello rejected

    Hello(stream, frontend_hash, encoder_id, n_channels, substeps, mode="replay",
          personal=False, client="", sample_rate=16000, hop_s=0.01)
    HelloReply(stream, accepted, reason="", params_hash="", frontend_hash="",
               encoder_id="", labels=[], session="", settings={})
    Frames(stream, seq, t, hop_s, encoder_id, spikes (n, substeps, channels) ndarray,
           labels=None|list[int], windows=None|list[int], t_in_ns=None|list[int],
           pauses=None|list[int] (0/1))
           .n  .seqs()  .times()  -- fmt "bits" (0/1 arrays, bit-packed) or "f32"
    Heartbeat(stream, t_ns)
    EndOfStream(stream, last_seq, reason="done")
    Posteriors(stream, seq, t, probs (n, n_out) float32, t_in_ns=None|list[int], t_out_ns=0)
    Detection(stream, seq, t, label, index, score)
    ControlRequest(cmd, stream="", args={})     cmd in CONTROL_COMMANDS, args per CONTROL_ARGS
           .checked_args() -> args, each of the type CONTROL_ARGS names (else ProtocolError)
    ControlReply(cmd, ok, result={}, error="")
    Notice(stream, kind, detail)                # learner -> peer: what it refused and why

    encode(msg) -> bytes                   msg.encode() is the same; unencodable values
                                           (ints beyond 64 bits...) raise WireError
    decode(data: bytes, max_bytes=MAX_MESSAGE_BYTES) -> Message
        raises WireError (a ProtocolError) with .kind in ERROR_KINDS
    pack_bits(arr) -> bytes / unpack_bits(data, shape) -> uint8 array
    peek(data) -> (type, stream)              routing without decoding (the broker)
    encoder_id(encoder.to_dict()) -> str      e.g. "current-3f2a9c0d1b7e"
    now_ns() -> int                           time.monotonic_ns(), the wire's clock

    # recordings (runtime/recording.py uses these; it never touches msgpack itself)
    RecordingHeader(created, frontend_hash, frontend, encoder_id, encoder, params_hash,
                    labels, model, note="", runtime={})   runtime: the learner's settings
    RecordEntry(direction "in"|"out", t_ns, payload: bytes)   .message() -> Message
    iter_maps(fileobj) -> iterator of RecordingHeader | RecordEntry (truncated tail is ignored)

Why bit-packing: a spike frame of 80 channels is 10 bytes packed instead of 320 as
float32, and messages stay far below the network MTU even in batches of 10.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Union

import msgpack
import numpy as np

from edgeprop.errors import ProtocolError

PROTOCOL_VERSION = 1
#: Largest message decode() accepts. A batch of 32 frames of 80 float32 channels is
#: about 10 KB; 256 KB leaves room for recordings' posteriors while bounding memory a
#: hostile or broken peer can make us allocate.
MAX_MESSAGE_BYTES = 256 * 1024
NO_LABEL = -1
#: Most frames one Frames message may carry (keeps latency and message size bounded).
MAX_BATCH = 64
#: Longest stream id a learner accepts in a hello (every message repeats the id).
MAX_STREAM_CHARS = 128

ERROR_KINDS = ("malformed", "version", "oversized", "unknown_type", "bad_field", "shape")
#: Each control command's arguments: name -> (kind, required). Kinds are checked by
#: ControlRequest.checked_args; docs/protocol.md lists the same table.
CONTROL_ARGS: dict[str, dict[str, tuple[str, bool]]] = {
    "teach": {"stream": ("str", False), "label": ("label", True),
              "t_start": ("seconds", True), "t_end": ("seconds", True)},
    "learning": {"on": ("bool", True)},
    "checkpoint": {"path": ("str", False)},
    "stats": {},
    "reset": {"stream": ("str", False)},
    "ping": {},
    "shutdown": {},
}
CONTROL_COMMANDS = tuple(CONTROL_ARGS)


class WireError(ProtocolError):
    """A message that cannot be used; ``kind`` says which counter it goes to."""

    def __init__(self, kind: str, detail: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# ---------------------------------------------------------------- bit packing

def pack_bits(arr: np.ndarray) -> bytes:
    """0/1 array -> bytes, row-major (C order), little bit order (element 0 = bit 0)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return np.packbits(flat.astype(bool), bitorder="little").tobytes()


def unpack_bits(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of pack_bits; raises WireError('shape') when the length does not fit."""
    count = int(np.prod(shape)) if len(shape) else 1
    if len(data) != (count + 7) // 8:
        raise WireError("shape", f"{len(data)} payload bytes do not hold shape {list(shape)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count, bitorder="little")
    return bits.reshape(shape)


def _f32_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def _f32_array(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    if len(data) != 4 * count:
        raise WireError("shape", f"{len(data)} payload bytes do not hold float32 {list(shape)}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


# ---------------------------------------------------------------- field helpers

def _is_int(val: Any) -> bool:
    """An int that is not a bool (bool is an int subclass: True would pass as 1)."""
    return isinstance(val, int) and not isinstance(val, bool)


def _what(val: Any) -> str:
    """A received value as a user reads it: its (shortened) repr and its wire type."""
    kinds = {bool: "a bool", int: "an integer", float: "a float", str: "a string",
             bytes: "bytes", list: "a list", dict: "a map", type(None): "nil"}
    text = repr(val)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({kinds.get(type(val), type(val).__name__)})"


_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               bytes: "bytes", list: "a list", dict: "a map"}


def _get(d: dict, key: str, typ: Any, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise WireError("bad_field", f"missing field {key!r}")
        return default
    val = d[key]
    if typ is float and _is_int(val):
        val = float(val)
    if typ is not Any and (not isinstance(val, typ) or (typ is int and isinstance(val, bool))):
        raise WireError("bad_field", f"field {key!r} must be {_TYPE_WORDS.get(typ, typ)}, "
                                     f"got {_what(val)}")
    return val


def _int_list(d: dict, key: str, n: int) -> list[int] | None:
    val = d.get(key)
    if val is None:
        return None
    if not isinstance(val, list) or len(val) != n:
        raise WireError("shape", f"field {key!r} must be a list of {n} ints")
    if not all(_is_int(x) for x in val):
        raise WireError("bad_field", f"field {key!r} must hold ints")
    return val


def _shape(d: dict, ndim: int) -> tuple[int, ...]:
    shape = _get(d, "shape", list)
    if len(shape) != ndim or not all(isinstance(s, int) and 0 <= s <= 1 << 20 for s in shape):
        raise WireError("shape", f"shape must be {ndim} non-negative ints, got {shape!r}")
    return tuple(shape)


# ---------------------------------------------------------------- messages

@dataclass
class Hello:
    """Frontend -> learner, first on each stream: what it will send (the handshake)."""

    TYPE = "hello"
    stream: str
    frontend_hash: str
    encoder_id: str
    n_channels: int
    substeps: int = 1
    mode: str = "replay"  # "replay" (lossless) | "live" (drop oldest)
    personal: bool = False  # give this stream its own copy of the weights
    client: str = ""
    sample_rate: int = 16000
    hop_s: float = 0.01

    def to_map(self) -> dict:
        return {"stream": self.stream, "frontend_hash": self.frontend_hash,
                "encoder_id": self.encoder_id, "n_channels": self.n_channels,
                "substeps": self.substeps, "mode": self.mode, "personal": self.personal,
                "client": self.client, "sample_rate": self.sample_rate, "hop_s": self.hop_s}

    @classmethod
    def from_map(cls, d: dict) -> Hello:
        mode = _get(d, "mode", str, "replay")
        if mode not in ("replay", "live"):
            raise WireError("bad_field", f"mode must be 'replay' or 'live', got {mode!r}")
        return cls(_get(d, "stream", str), _get(d, "frontend_hash", str),
                   _get(d, "encoder_id", str), _get(d, "n_channels", int),
                   _get(d, "substeps", int, 1), mode, _get(d, "personal", bool, False),
                   _get(d, "client", str, ""), _get(d, "sample_rate", int, 16000),
                   _get(d, "hop_s", float, 0.01))


@dataclass
class HelloReply:
    """Learner -> frontend: accepted, or rejected with a reason (e.g. config mismatch)."""

    TYPE = "hello_reply"
    stream: str
    accepted: bool
    reason: str = ""
    params_hash: str = ""
    frontend_hash: str = ""
    encoder_id: str = ""
    labels: list = field(default_factory=list)
    session: str = ""  # which learner (worker) took the stream
    settings: dict = field(default_factory=dict)  # learner: backend, lr, apply_delay, detector

    def to_map(self) -> dict:
        return {"stream": self.stream, "accepted": self.accepted, "reason": self.reason,
                "params_hash": self.params_hash, "frontend_hash": self.frontend_hash,
                "encoder_id": self.encoder_id, "labels": list(self.labels),
                "session": self.session, "settings": dict(self.settings)}

    @classmethod
    def from_map(cls, d: dict) -> HelloReply:
        return cls(_get(d, "stream", str), _get(d, "accepted", bool), _get(d, "reason", str, ""),
                   _get(d, "params_hash", str, ""), _get(d, "frontend_hash", str, ""),
                   _get(d, "encoder_id", str, ""), _get(d, "labels", list, []),
                   _get(d, "session", str, ""), _get(d, "settings", dict, {}))


@dataclass
class Frames:
    """One frame or a small batch of consecutive frames of one stream.

    ``spikes`` is (n, substeps, channels): uint8 0/1 (sent bit-packed, fmt "bits") or
    float32 values (fmt "f32"). Frame i has sequence number seq + i and time
    t + i * hop_s seconds (stream time). ``labels[i]`` is a class index or NO_LABEL;
    ``windows[i]`` the id of the labelled utterance window the frame belongs to (or
    NO_LABEL). ``t_in_ns[i]`` is time.monotonic_ns() when the audio block that
    completed frame i entered the frontend: the learner echoes it for latency.
    ``pauses[i]`` is 1 when frame i ends a pause (edgeprop.pauses): the learner zeroes
    the stream's network state once it has stepped that frame. Absent: no pauses.
    """

    TYPE = "frames"
    stream: str
    seq: int
    t: float
    hop_s: float
    encoder_id: str
    spikes: np.ndarray
    labels: list[int] | None = None
    windows: list[int] | None = None
    t_in_ns: list[int] | None = None
    pauses: list[int] | None = None

    @property
    def n(self) -> int:
        return int(self.spikes.shape[0])

    def seqs(self) -> range:
        return range(self.seq, self.seq + self.n)

    def times(self) -> np.ndarray:
        return self.t + self.hop_s * np.arange(self.n)

    def to_map(self) -> dict:
        s = np.asarray(self.spikes)
        if s.ndim != 3:
            raise WireError("shape", f"spikes must be (n, substeps, channels), got {s.shape}")
        if s.dtype == np.float32 or s.dtype == np.float64:
            fmt, data = "f32", _f32_bytes(s)
        else:
            fmt, data = "bits", pack_bits(s)
        m = {"stream": self.stream, "seq": int(self.seq), "t": float(self.t),
             "hop_s": float(self.hop_s), "enc": self.encoder_id, "shape": list(s.shape),
             "fmt": fmt, "data": data}
        for key, val in (("labels", self.labels), ("windows", self.windows),
                         ("t_in_ns", self.t_in_ns), ("pauses", self.pauses)):
            if val is not None:
                m[key] = [int(x) for x in val]
        return m

    @classmethod
    def from_map(cls, d: dict) -> Frames:
        shape = _shape(d, 3)
        if shape[0] > MAX_BATCH:
            raise WireError("shape", f"{shape[0]} frames in one message (max {MAX_BATCH})")
        fmt = _get(d, "fmt", str)
        data = _get(d, "data", bytes)
        if fmt == "bits":
            spikes = unpack_bits(data, shape)
        elif fmt == "f32":
            spikes = _f32_array(data, shape)
        else:
            raise WireError("bad_field", f"fmt must be 'bits' or 'f32', got {fmt!r}")
        seq = _get(d, "seq", int)
        if seq < 0:
            raise WireError("bad_field", f"negative seq {seq}")
        n = shape[0]
        pauses = _int_list(d, "pauses", n)
        if pauses is not None and not all(x in (0, 1) for x in pauses):
            raise WireError("bad_field", "field 'pauses' must hold 0 or 1 per frame")
        return cls(_get(d, "stream", str), seq, _get(d, "t", float), _get(d, "hop_s", float),
                   _get(d, "enc", str), spikes, _int_list(d, "labels", n),
                   _int_list(d, "windows", n), _int_list(d, "t_in_ns", n), pauses)


@dataclass
class Heartbeat:
    """Either direction, every ~1 s while idle: 'I am alive' (peers time out without it)."""

    TYPE = "heartbeat"
    stream: str
    t_ns: int = 0

    def to_map(self) -> dict:
        return {"stream": self.stream, "t_ns": int(self.t_ns)}

    @classmethod
    def from_map(cls, d: dict) -> Heartbeat:
        return cls(_get(d, "stream", str), _get(d, "t_ns", int, 0))


@dataclass
class EndOfStream:
    """Frontend -> learner (and echoed back once processed): no more frames."""

    TYPE = "eos"
    stream: str
    last_seq: int
    reason: str = "done"

    def to_map(self) -> dict:
        return {"stream": self.stream, "last_seq": int(self.last_seq), "reason": self.reason}

    @classmethod
    def from_map(cls, d: dict) -> EndOfStream:
        return cls(_get(d, "stream", str), _get(d, "last_seq", int), _get(d, "reason", str, ""))


@dataclass
class Posteriors:
    """Learner -> frontend/subscribers: softmax of the readout per frame (smoothed: no)."""

    TYPE = "posteriors"
    stream: str
    seq: int
    t: float
    probs: np.ndarray  # (n, n_out) float32
    t_in_ns: list[int] | None = None
    t_out_ns: int = 0

    def to_map(self) -> dict:
        p = np.asarray(self.probs, dtype=np.float32)
        if p.ndim != 2:
            raise WireError("shape", f"probs must be (n, n_out), got {p.shape}")
        m = {"stream": self.stream, "seq": int(self.seq), "t": float(self.t),
             "shape": list(p.shape), "data": _f32_bytes(p), "t_out_ns": int(self.t_out_ns)}
        if self.t_in_ns is not None:
            m["t_in_ns"] = [int(x) for x in self.t_in_ns]
        return m

    @classmethod
    def from_map(cls, d: dict) -> Posteriors:
        shape = _shape(d, 2)
        return cls(_get(d, "stream", str), _get(d, "seq", int), _get(d, "t", float),
                   _f32_array(_get(d, "data", bytes), shape), _int_list(d, "t_in_ns", shape[0]),
                   _get(d, "t_out_ns", int, 0))


@dataclass
class Detection:
    """Learner -> frontend/subscribers: a keyword was spotted at stream time t."""

    TYPE = "detection"
    stream: str
    seq: int
    t: float
    label: str
    index: int
    score: float

    def to_map(self) -> dict:
        return {"stream": self.stream, "seq": int(self.seq), "t": float(self.t),
                "label": self.label, "index": int(self.index), "score": float(self.score)}

    @classmethod
    def from_map(cls, d: dict) -> Detection:
        return cls(_get(d, "stream", str), _get(d, "seq", int), _get(d, "t", float),
                   _get(d, "label", str), _get(d, "index", int), _get(d, "score", float))


#: What each argument kind of CONTROL_ARGS accepts, and how an error reply words it.
_ARG_KINDS: dict[str, tuple[Any, str]] = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "seconds": (lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),
                "a finite number of seconds"),
    "label": (lambda v: isinstance(v, str) or _is_int(v),
              "a label name (string) or index (integer)"),
}


@dataclass
class ControlRequest:
    """To the learner's control_rep socket. cmd/args (CONTROL_ARGS):

    teach       {stream, label (name or index), t_start, t_end}: learn from a past window
    learning    {on: bool}
    checkpoint  {path?}  -> {path, params_hash, updates}
    stats       {}  -> counters
    reset       {stream?}: clear network state (one stream or all)
    ping        {}
    shutdown    {}: checkpoint and stop (what SIGINT does too)

    `from_map` checks only the envelope (cmd, stream, args a map); `checked_args`
    checks the arguments, so a request with bad ones still decodes and its sender gets
    a control_reply naming the problem rather than a notice.
    """

    TYPE = "control"
    cmd: str
    stream: str = ""
    args: dict = field(default_factory=dict)

    def to_map(self) -> dict:
        return {"cmd": self.cmd, "stream": self.stream, "args": dict(self.args)}

    @classmethod
    def from_map(cls, d: dict) -> ControlRequest:
        cmd = _get(d, "cmd", str)
        if cmd not in CONTROL_COMMANDS:
            raise WireError("bad_field", f"unknown control command {cmd!r}; commands are "
                                         f"{', '.join(CONTROL_COMMANDS)}")
        return cls(cmd, _get(d, "stream", str, ""), _get(d, "args", dict, {}))

    def checked_args(self) -> dict:
        """args, each present when required and of its CONTROL_ARGS kind (ints given
        for seconds become floats); anything else raises ProtocolError saying which
        argument, what it must be and what came."""
        spec = CONTROL_ARGS.get(self.cmd)
        if spec is None:
            raise ProtocolError(f"unknown control command {self.cmd!r}; commands are "
                                f"{', '.join(CONTROL_COMMANDS)}")
        for key in self.args:
            if key not in spec:
                takes = f"takes {', '.join(spec)}" if spec else "takes no arguments"
                raise ProtocolError(f"unknown argument {key!r}; {self.cmd} {takes}")
        args = {}
        for key, (kind, required) in spec.items():
            ok, words = _ARG_KINDS[kind]
            if key not in self.args:
                if required:
                    raise ProtocolError(f"argument {key!r} is missing: expected {words}")
                continue
            val = self.args[key]
            if not ok(val):
                raise ProtocolError(f"argument {key!r} must be {words}, got {_what(val)}")
            args[key] = float(val) if kind == "seconds" else val
        return args


@dataclass
class ControlReply:
    TYPE = "control_reply"
    cmd: str
    ok: bool
    result: dict = field(default_factory=dict)
    error: str = ""

    def to_map(self) -> dict:
        return {"cmd": self.cmd, "ok": self.ok, "result": self.result, "error": self.error}

    @classmethod
    def from_map(cls, d: dict) -> ControlReply:
        return cls(_get(d, "cmd", str), _get(d, "ok", bool), _get(d, "result", dict, {}),
                   _get(d, "error", str, ""))


@dataclass
class Notice:
    """Learner -> peer: a message of this stream was refused (kind from ERROR_KINDS,
    or 'config', 'seq_gap', 'seq_dup', 'unknown_stream')."""

    TYPE = "notice"
    stream: str
    kind: str
    detail: str = ""

    def to_map(self) -> dict:
        return {"stream": self.stream, "kind": self.kind, "detail": self.detail}

    @classmethod
    def from_map(cls, d: dict) -> Notice:
        return cls(_get(d, "stream", str, ""), _get(d, "kind", str), _get(d, "detail", str, ""))


@dataclass
class RecordingHeader:
    """First map of a recording file: what produced the stream."""

    TYPE = "recording_header"
    created: float
    frontend_hash: str
    frontend: dict
    encoder_id: str
    encoder: dict
    params_hash: str
    labels: list
    model: dict
    note: str = ""
    runtime: dict = field(default_factory=dict)  # learner settings: backend, lr, detector...

    def to_map(self) -> dict:
        return {"created": self.created, "frontend_hash": self.frontend_hash,
                "frontend": self.frontend, "encoder_id": self.encoder_id,
                "encoder": self.encoder, "params_hash": self.params_hash,
                "labels": list(self.labels), "model": self.model, "note": self.note,
                "runtime": self.runtime}

    @classmethod
    def from_map(cls, d: dict) -> RecordingHeader:
        return cls(_get(d, "created", float), _get(d, "frontend_hash", str),
                   _get(d, "frontend", dict), _get(d, "encoder_id", str),
                   _get(d, "encoder", dict), _get(d, "params_hash", str),
                   _get(d, "labels", list), _get(d, "model", dict), _get(d, "note", str, ""),
                   _get(d, "runtime", dict, {}))


@dataclass
class RecordEntry:
    """One recorded wire message: direction 'in' (to the learner) or 'out', the
    monotonic time it was seen, and the message's own encoded bytes."""

    TYPE = "record"
    direction: str
    t_ns: int
    payload: bytes

    def message(self) -> Message:
        return decode(self.payload, max_bytes=1 << 30)

    def to_map(self) -> dict:
        # crc: a flipped bit in a recorded float would otherwise replay as a regression
        return {"dir": self.direction, "t_ns": int(self.t_ns), "msg": self.payload,
                "crc": zlib.crc32(self.payload)}

    @classmethod
    def from_map(cls, d: dict) -> RecordEntry:
        direction = _get(d, "dir", str)
        if direction not in ("in", "out"):
            raise WireError("bad_field", f"record direction {direction!r}")
        payload = _get(d, "msg", bytes)
        crc = _get(d, "crc", int, None)  # absent in recordings made before it was added
        if crc is not None and crc != zlib.crc32(payload):
            raise WireError("bad_field", "its checksum does not match its message (the "
                                         "bytes changed after recording)")
        return cls(direction, _get(d, "t_ns", int), payload)


Message = Union[Hello, HelloReply, Frames, Heartbeat, EndOfStream, Posteriors, Detection,
                ControlRequest, ControlReply, Notice, RecordingHeader, RecordEntry]

_TYPES: dict[str, type] = {c.TYPE: c for c in (
    Hello, HelloReply, Frames, Heartbeat, EndOfStream, Posteriors, Detection,
    ControlRequest, ControlReply, Notice, RecordingHeader, RecordEntry)}


# ---------------------------------------------------------------- encode / decode

def encode(msg: Message) -> bytes:
    """Message -> msgpack bytes (a map with v and type first)."""
    m = {"v": PROTOCOL_VERSION, "type": msg.TYPE}
    m.update(msg.to_map())
    try:
        return msgpack.packb(m, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:  # e.g. an int beyond 64 bits
        raise WireError("bad_field", f"{msg.TYPE} cannot be encoded: {exc}") from None


def _unpack(data: bytes, max_bytes: int) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               max_bin_len=max_bytes, max_str_len=max_bytes,
                               max_array_len=max_bytes, max_map_len=max_bytes)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError("malformed", f"not a msgpack map ({type(exc).__name__}: {exc})") from None


def _is_our_version(v: Any) -> bool:
    """Exactly the integer PROTOCOL_VERSION: True and 1.0 compare equal to 1 but are not it."""
    return type(v) is int and v == PROTOCOL_VERSION


def decode_map(d: Any) -> Message:
    """An already unpacked map -> Message (checks version, type and fields)."""
    if not isinstance(d, dict):
        raise WireError("malformed", f"top level is {type(d).__name__}, not a map")
    if "v" not in d:
        raise WireError("version", "no protocol version field 'v'")
    if not _is_our_version(d["v"]):
        raise WireError("version", f"protocol version {d['v']!r}, this side speaks "
                                   f"{PROTOCOL_VERSION}")
    typ = d.get("type")
    cls = _TYPES.get(typ) if isinstance(typ, str) else None
    if cls is None:
        raise WireError("unknown_type", f"unknown message type {typ!r}")
    try:
        return cls.from_map(d)
    except WireError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise WireError("bad_field", f"{typ}: {exc}") from None


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """bytes -> Message. Raises WireError (kind in ERROR_KINDS); never anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("malformed", f"payload is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise WireError("oversized", f"{len(data)} bytes > limit {max_bytes}")
    return decode_map(_unpack(bytes(data), max_bytes))


def iter_maps(fileobj: IO[bytes]) -> Iterator[Message]:
    """Decode a file of concatenated messages (a recording) one by one.

    A truncated last message (a recorder killed mid-write) ends the iteration
    quietly; anything else malformed raises WireError.
    """
    unpacker = msgpack.Unpacker(fileobj, raw=False, use_list=True, strict_map_key=True,
                                max_buffer_size=1 << 30)
    while True:
        try:
            d = unpacker.unpack()
        except msgpack.OutOfData:
            return
        except Exception as exc:
            raise WireError("malformed", f"recording: {type(exc).__name__}: {exc}") from None
        yield decode_map(d)


def peek(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[str, str]:
    """(type, stream) of a message without building it: what the broker routes on.

    Raises WireError like decode() for anything that is not a v1 map.
    """
    if len(data) > max_bytes:
        raise WireError("oversized", f"{len(data)} bytes > limit {max_bytes}")
    d = _unpack(bytes(data), max_bytes)
    if not isinstance(d, dict):
        raise WireError("malformed", f"top level is {type(d).__name__}, not a map")
    if not _is_our_version(d.get("v")):
        raise WireError("version", f"protocol version {d.get('v')!r}")
    typ, stream = d.get("type"), d.get("stream", "")
    if not isinstance(typ, str) or typ not in _TYPES:
        raise WireError("unknown_type", f"unknown message type {typ!r}")
    if not isinstance(stream, str):
        raise WireError("bad_field", "field 'stream' is not a string")
    return typ, stream


def encoder_id(encoder: dict) -> str:
    """Stable id of an encoder from its to_dict(): '<name>-<sha256 of canonical JSON>[:12]'.

    Both ends compute it from the encoder settings, so a frontend and a model agree
    exactly when their encoders are configured identically.
    """
    import hashlib
    import json

    blob = json.dumps(encoder, sort_keys=True, separators=(",", ":"))
    return f"{encoder.get('name', 'unknown')}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def pause_flags(flags) -> list[int] | None:
    """The `pauses` field of a `frames` message for per-frame flags: 0/1 ints, or None
    (the field left out) when no frame of the message ends a pause."""
    out = [int(bool(v)) for v in flags]
    return out if any(out) else None


def now_ns() -> int:
    """The clock every timestamp on the wire uses: CLOCK_MONOTONIC, shared by all
    processes of one host (so latency across processes on loopback is exact)."""
    return time.monotonic_ns()


# every message class gets msg.encode() and Cls.decode(bytes)
def _add_encode(cls: type) -> None:
    cls.encode = lambda self: encode(self)  # type: ignore[attr-defined]
    cls.decode = staticmethod(decode)  # type: ignore[attr-defined]


for _cls in _TYPES.values():
    _add_encode(_cls)
