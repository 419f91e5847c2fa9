"""Pause flags: found in the features (edgeprop.pauses), carried in `frames`, and the
learner zeroing a stream's state after a flagged frame."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_support import small_checkpoint

from edgeprop.errors import ConfigError
from edgeprop.evaluation import checkpoint_frontend
from edgeprop.frontend import StreamingFrontend, features
from edgeprop.network import KWS_LABELS
from edgeprop.pauses import PauseConfig, PauseDetector
from edgeprop.shipped import load_shipped
from runtime import protocol as P
from runtime.commands.bench_detector import _words_with_a_pause_inside
from runtime.learner_node import LearnerCore, Model
from runtime.stream import build_stream, embedded_clips


@pytest.fixture(scope="module")
def stream_and_feats():
    fcfg = checkpoint_frontend(load_shipped())
    stream = build_stream(embedded_clips(), seed=0)
    return fcfg, stream, features(stream.audio, fcfg)


def test_one_flag_per_gap_between_words_never_inside_a_keyword(stream_and_feats):
    fcfg, stream, feats = stream_and_feats
    flags = PauseDetector(fcfg).run(feats)
    t = (np.flatnonzero(flags) + 1) * 0.01  # the end of each flagged frame, s
    ev = stream.events
    keywords = [e for e in ev if e.label in KWS_LABELS[:10]]
    assert not any(e.t_start <= x <= e.t_end for x in t for e in keywords)
    # every gap between two words holds exactly one flag: the state is zeroed once
    # before each word
    for a, b in zip(ev, ev[1:], strict=False):
        assert len([x for x in t if a.t_end < x < b.t_start]) == 1, (a, b)
    # and one after the last word; the one other flag falls inside an _unknown_ word
    # ("four", 0.6 s into its 0.88 s window)
    assert len(t) == len(ev) - 1 + 2
    assert _words_with_a_pause_inside(ev, flags, 0.01) == 1  # what bench detector counts


def test_the_stream_gives_the_flags_of_the_batch(stream_and_feats):
    fcfg, stream, feats = stream_and_feats
    sf, det = StreamingFrontend(fcfg), PauseDetector(fcfg)
    got = []
    for k in range(0, len(stream.audio), 1234):  # odd block sizes, as a sound card gives
        got += [det.step(f) for f in sf.push(stream.audio[k:k + 1234])]
    assert np.array_equal(np.array(got), PauseDetector(fcfg).run(feats)[:len(got)])
    with pytest.raises(ConfigError):
        PauseConfig(quiet=0)
    with pytest.raises(ConfigError):
        PauseConfig(stop_db=20.0, start_db=15.0)


def test_pauses_cross_the_wire_and_bad_ones_are_refused():
    spikes = np.zeros((3, 1, 80), np.float32)
    f = P.Frames("s", 0, 0.0, 0.01, "enc", spikes, pauses=[0, 1, 0])
    assert P.decode(P.encode(f)).pauses == [0, 1, 0]
    assert P.decode(P.encode(P.Frames("s", 0, 0.0, 0.01, "enc", spikes))).pauses is None
    m = f.to_map()
    m["pauses"] = [0, 2, 0]
    with pytest.raises(P.WireError, match="pauses"):
        P.Frames.from_map(m)


def test_the_learner_zeroes_the_state_after_a_flagged_frame():
    """After the flag, the stream's readout is a fresh stream's on the same frames."""
    ck = small_checkpoint()
    model = Model.from_checkpoint(ck)
    x = (np.random.default_rng(5).standard_normal((60, 1, 80)) * 1.5).astype(np.float32)

    def posteriors(frames, pauses=None):
        core = LearnerCore(ck, backend="reference", learning=False, detector={"window": 1})
        hello = P.Hello("s", model.frontend_hash, model.encoder_id, 80)
        out = list(core.handle_bytes(P.encode(hello), route=b"r"))
        out += core.handle_bytes(P.encode(P.Frames("s", 0, 0.0, 0.01, model.encoder_id,
                                                   frames, pauses=pauses)), route=b"r")
        core.close()
        post = np.concatenate([m.probs for m in out if isinstance(m, P.Posteriors)])
        return post, core.counts["pause_resets"]

    flagged, n = posteriors(x, [1 if i == 29 else 0 for i in range(60)])
    fresh, _ = posteriors(x[30:])
    carried, _ = posteriors(x)
    assert n == 1
    np.testing.assert_array_equal(flagged[30:], fresh)  # window 1: p is this frame's y
    np.testing.assert_array_equal(flagged[:30], carried[:30])
    assert not np.array_equal(carried[30:], fresh)  # without the flag the state carries
    assert len(KWS_LABELS) == fresh.shape[1]


def test_recordings_keep_their_flags_and_send_them(tmp_path):
    from runtime import regress as R

    rec = R.load_compact(R.RECORDINGS_DIR / "long_stream.npz")
    assert rec.pauses is not None and rec.pauses.any()  # built with the frontend's flags
    msgs = rec.frame_messages("s", per_message=7)
    sent = np.concatenate([m.pauses if m.pauses is not None else [0] * m.n for m in msgs])
    assert np.array_equal(sent.astype(bool), rec.pauses)
    again = R.load_compact(R.save_compact(rec, tmp_path / "r.npz"))
    assert np.array_equal(again.pauses, rec.pauses)


def test_a_live_drop_passes_its_pause_to_the_next_frame_sent():
    from edgeprop.encoders import make_encoder
    from edgeprop.frontend import FrontendConfig
    from runtime.frontend_node import FrontendNode

    fe = FrontendNode("tcp://127.0.0.1:9", FrontendConfig(), make_encoder("current"),
                      mode="live", live_queue=2)
    try:
        x = np.zeros((2, 1, 80), np.float32)
        msgs = [P.Frames("s0", 2 * i, 0.0, 0.01, fe.encoder_id, x,
                         pauses=[0, 1] if i == 0 else None) for i in range(3)]
        for m in msgs:
            fe._enqueue(m)  # the third drops the first, which ended a pause
        assert fe.dropped == 2 and list(fe._outbox) == msgs[1:]
        assert msgs[1].pauses == [1, 0] and msgs[2].pauses is None
    finally:
        fe.close()
