"""Bad control arguments and non-finite frames are refused in words, and survived.

One real learner on loopback TCP for the module; a REQ client on its control_rep and a
DEALER on its data_router, as a user's tools would connect. Every refusal is checked
for its exact text, for changing nothing, and for the learner still answering after it.
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from runtime_support import raw_dealer, small_checkpoint, start_learner

from edgeprop.network import KWS_LABELS
from runtime import protocol as P
from runtime.learner_node import Model

STREAM = "s"
CKPT = small_checkpoint()
MODEL = Model.from_checkpoint(CKPT)


def _frames(seq: int, n: int = 3, t: float | None = None, hop_s: float = 0.01,
            fill: float = 0.5) -> P.Frames:
    x = np.full((n, MODEL.substeps, CKPT.cfg.n_in), fill, np.float32)
    return P.Frames(STREAM, seq, seq * 0.01 if t is None else t, hop_s, MODEL.encoder_id, x)


def _ask(sock, msg) -> P.Message:
    sock.send(P.encode(msg))
    return P.decode(sock.recv(), max_bytes=1 << 24)


def control(node, cmd: str, args: dict | None = None, stream: str = "") -> P.ControlReply:
    """One request on a fresh REQ socket. (runtime_support.control takes args as keywords,
    where an argument named 'stream' would become the request's own stream field.)"""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(node.endpoints["control_rep"])
    try:
        return _ask(sock, P.ControlRequest(cmd, stream, args or {}))
    finally:
        sock.close(0)


@pytest.fixture(scope="module")
def node():
    """A learner with stream "s" open and 0.06 s of history (frames 0-5)."""
    node = start_learner(CKPT, apply_delay=0)
    data = raw_dealer(node.endpoints["data_router"])
    try:
        hello = P.Hello(STREAM, MODEL.frontend_hash, MODEL.encoder_id, CKPT.cfg.n_in,
                        MODEL.substeps)
        assert _ask(data, hello).accepted
        assert isinstance(_ask(data, _frames(0, n=6)), P.Posteriors)
        yield node
    finally:
        data.close(0)
        node.stop()
        node.core.close()


@pytest.fixture
def data(node):
    sock = raw_dealer(node.endpoints["data_router"])
    yield sock
    sock.close(0)


def _alive(node) -> dict:
    """The learner still answers, and what its stats say now."""
    assert control(node, "ping").result["pong"]
    assert node.error is None and node._thread.is_alive()
    return control(node, "stats").result


LABELS = ", ".join(KWS_LABELS)
TEACH = {"stream": STREAM, "label": "yes", "t_start": 0.0, "t_end": 0.05}

REFUSED = [
    ("learning", {}, "argument 'on' is missing: expected true or false"),
    ("learning", {"on": "yes"}, "argument 'on' must be true or false, got 'yes' (a string)"),
    ("learning", {"on": 1}, "argument 'on' must be true or false, got 1 (an integer)"),
    ("teach", {**TEACH, "label": True},
     "argument 'label' must be a label name (string) or index (integer), got True (a bool)"),
    ("teach", {**TEACH, "label": 1.0},
     "argument 'label' must be a label name (string) or index (integer), got 1.0 (a float)"),
    ("teach", {**TEACH, "label": 12}, "label index 12 is out of range 0-11"),
    ("teach", {**TEACH, "label": -1}, "label index -1 is out of range 0-11"),
    ("teach", {**TEACH, "label": "maybe"}, f"unknown label 'maybe'; labels are {LABELS}"),
    ("teach", {k: v for k, v in TEACH.items() if k != "label"},
     "argument 'label' is missing: expected a label name (string) or index (integer)"),
    ("teach", {**TEACH, "t_start": "a"},
     "argument 't_start' must be a finite number of seconds, got 'a' (a string)"),
    ("teach", {**TEACH, "t_end": float("nan")},
     "argument 't_end' must be a finite number of seconds, got nan (a float)"),
    ("teach", {**TEACH, "t_end": float("inf")},
     "argument 't_end' must be a finite number of seconds, got inf (a float)"),
    ("teach", {**TEACH, "t_start": 0.05, "t_end": 0.0},
     "t_start (0.05 s) must be before t_end (0 s)"),
    ("teach", {**TEACH, "stream": "nope"}, "no open stream 'nope'; open streams: 's'"),
    ("teach", {k: v for k, v in TEACH.items() if k != "stream"},
     "no stream given (argument 'stream' or the request's stream field); open streams: 's'"),
    ("reset", {"stream": "nope"}, "no open stream 'nope'; open streams: 's'"),
    ("reset", {"stream": 3}, "argument 'stream' must be a string, got 3 (an integer)"),
    ("reset", {"strem": STREAM}, "unknown argument 'strem'; reset takes stream"),
    ("checkpoint", {"path": 5}, "argument 'path' must be a string, got 5 (an integer)"),
    ("ping", {"x": 1}, "unknown argument 'x'; ping takes no arguments"),
    ("shutdown", {"now": True}, "unknown argument 'now'; shutdown takes no arguments"),
]


@pytest.mark.parametrize(("cmd", "args", "error"), REFUSED,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(REFUSED)])
def test_a_bad_control_argument_is_refused_by_name_and_changes_nothing(node, cmd, args,
                                                                       error):
    before = _alive(node)
    reply = control(node, cmd, args)
    assert (reply.cmd, reply.ok, reply.result, reply.error) == (cmd, False, {}, error)
    after = _alive(node)
    assert after["counts"]["control_errors"] == before["counts"].get("control_errors", 0) + 1
    assert (after["learning"], after["updates"], after["params_hash"]) == (
        before["learning"], before["updates"], before["params_hash"])
    assert "internal_errors" not in after["counts"]


def test_good_control_arguments_still_work(node):
    assert control(node, "learning", {"on": False}).result == {"learning": False}
    assert control(node, "learning", {"on": True}).result == {"learning": True}
    taught = control(node, "teach", {**TEACH, "label": 3, "t_start": 0})  # an int is seconds
    assert taught.ok and taught.result["frames"] == 5, taught.error
    assert control(node, "reset").result == {"reset": [STREAM]}
    assert control(node, "reset", stream=STREAM).result == {"reset": [STREAM]}


def test_a_request_that_is_not_a_control_request_is_answered_on_control_rep(node):
    reply = control(node, "bogus")
    assert (reply.cmd, reply.ok) == ("?", False)
    assert reply.error == ("unknown control command 'bogus'; commands are teach, learning, "
                           "checkpoint, stats, reset, ping, shutdown")
    reply = control(node, "reset", stream=3)  # the request's own stream field
    assert (reply.cmd, reply.ok) == ("?", False)
    assert reply.error == "field 'stream' must be a string, got 3 (an integer)"
    assert _alive(node)["counts"]["bad_field"] >= 2


def test_control_on_the_data_path_is_checked_the_same_way(node, data):
    reply = _ask(data, P.ControlRequest("learning", args={"on": "no"}))
    assert isinstance(reply, P.ControlReply) and not reply.ok
    assert reply.error == "argument 'on' must be true or false, got 'no' (a string)"
    assert _alive(node)["learning"] is True


@pytest.mark.parametrize(("bad", "detail"), [
    ({"fill": float("nan")}, "NaN or infinite f32 values (240 of 240, first at frame {seq}, "
                             "substep 0, channel 0); only finite values are accepted"),
    ({"fill": float("-inf")}, "NaN or infinite f32 values (240 of 240, first at frame {seq},"),
    ({"t": float("nan")}, "t (nan) and hop_s (0.01) must be finite numbers"),
    ({"t": 1.0, "hop_s": float("nan")}, "t (1.0) and hop_s (nan) must be finite numbers"),
])
def test_frames_holding_nan_or_inf_are_refused_with_a_notice(node, data, bad, detail):
    before = _alive(node)
    seq = before["streams"][STREAM]["next_seq"] + 100
    notice = _ask(data, _frames(seq, **bad))
    assert isinstance(notice, P.Notice) and (notice.stream, notice.kind) == (STREAM, "bad_field")
    assert notice.detail.startswith(f"frames {seq}-{seq + 2} refused: ")
    assert detail.format(seq=seq) in notice.detail
    after = _alive(node)
    assert after["counts"]["bad_field"] == before["counts"].get("bad_field", 0) + 1
    assert after["streams"][STREAM]["frames"] == before["streams"][STREAM]["frames"]
    state = node.core.sessions[STREAM].state
    assert all(np.isfinite(a).all() for a in vars(state).values())
    # the stream goes on; the refused range shows as missing frames
    assert isinstance(_ask(data, _frames(seq + 3)), P.Posteriors)
    after = _alive(node)
    assert after["streams"][STREAM]["missing"] == before["streams"][STREAM]["missing"] + 103


def test_one_nan_in_a_labelled_window_never_reaches_the_weights(node, data):
    seq = _alive(node)["streams"][STREAM]["next_seq"]
    frames = _frames(seq, n=4)
    frames.spikes[2, 0, 7] = np.nan
    frames.labels, frames.windows = [1] * 4, [50] * 4
    notice = _ask(data, frames)
    assert notice.kind == "bad_field"
    assert f"(1 of 320, first at frame {seq + 2}, substep 0, channel 7)" in notice.detail
    good = _frames(seq, n=4)
    good.labels, good.windows = [1, 1, 1, P.NO_LABEL], [50, 50, 50, P.NO_LABEL]
    assert isinstance(_ask(data, good), P.Posteriors)  # the window ends: learned now
    assert all(np.isfinite(a).all() for a in node.core.params.arrays())
