"""The user's frontend: speaker mean normalisation from the adaptation clips (real clips)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgeprop.audio import load_wav
from edgeprop.errors import ConfigError
from edgeprop.evaluation import checkpoint_frontend
from edgeprop.frontend import StreamingFrontend, features, speech_mean, toward_user
from edgeprop.shipped import load_shipped
from runtime import personalization as P

SPEAKER = "837a0f64"  # held out from the shipped model's pretraining


@pytest.fixture(scope="module")
def shipped():
    return load_shipped()


@pytest.fixture(scope="module")
def base(shipped):
    return checkpoint_frontend(shipped)


@pytest.fixture(scope="module")
def audio(data_dir) -> np.ndarray:
    return np.stack([load_wav(p) for p in sorted((data_dir / "left").glob(f"{SPEAKER}_*"))[:3]])


@pytest.fixture(scope="module")
def session(shipped, data_dir):
    return P.Session.open(shipped, data_dir)


def test_speech_mean_averages_the_louder_half_of_each_clip(base):
    x = np.zeros((2, 4, base.n_features))
    x[0, :, :base.n_mels] = np.array([0.0, 1.0, 3.0, 5.0])[:, None]  # median 2: frames 3, 5
    x[1, :, :base.n_mels] = np.array([-4.0, -2.0, -1.0, 1.0])[:, None]  # median -1.5: -1, 1
    x[..., base.n_mels:] = 99.0  # deltas never count
    assert np.allclose(speech_mean(x, base), (3 + 5 - 1 + 1) / 4)


def test_moved_frontend_subtracts_the_offset_from_static_channels_only(base, audio):
    user, ref = np.linspace(-1, 1, base.n_mels), np.full(base.n_mels, 0.25)
    moved = toward_user(base, user, ref, 0.5)
    a, b = features(audio, base), features(audio, moved)
    n = base.n_mels
    assert np.allclose(b[..., :n], a[..., :n] - 0.5 * (user - ref), atol=2e-5)
    assert np.allclose(b[..., n:], a[..., n:], atol=2e-5)
    assert moved.hash() != base.hash() and toward_user(base, user, ref, 0.0) is base
    # the streaming chain of the moved config equals its batch chain, as for any config
    fe = StreamingFrontend(moved)
    streamed = np.concatenate([fe.push(audio[0][i:i + 700]) for i in range(0, 16000, 700)])
    assert np.array_equal(streamed, b[0])


def test_bad_inputs_to_the_user_frontend_are_config_errors(base):
    m = np.zeros(base.n_mels)
    for call, words in (
            (lambda: toward_user(base, m, m, 1.5), "fraction must be in"),
            (lambda: toward_user(base, m[:3], m, 0.5), "need 40 values"),
            (lambda: toward_user(base.without_normalization(), m, m, 0.5), "normalised"),
            (lambda: speech_mean(np.zeros((0, 100, base.n_features)), base), "N >= 1")):
        with pytest.raises(ConfigError, match=words):
            call()
    with pytest.raises(ConfigError, match="user_norm must be in"):
        P.AdaptConfig(user_norm=-0.1)


def test_the_reference_is_stored_and_equals_the_pretraining_clips(shipped, session):
    stored = P.stored_speech_mean(shipped)
    assert stored is not None and stored.shape == (40,)
    # without the stored value it is recomputed from the folder's pretraining speakers
    bare = dataclasses.replace(shipped, extra={k: v for k, v in shipped.extra.items()
                                               if k != "frontend_stats"})
    again = P.Session(bare, session.clips, session.data_dir, session.features, session.seen)
    assert np.allclose(again.reference_speech_mean(), stored, atol=1e-5)
    # and a model that neither stores it nor says its split is a one-line error
    lost = P.Session(bare, session.clips, session.data_dir, session.features, None)
    with pytest.raises(ConfigError, match="--user-norm 0"):
        lost.reference_speech_mean()


def test_a_moved_frontend_is_never_moved_again(shipped, session, base, tmp_path):
    from edgeprop.checkpoint import load_checkpoint

    sp = P.split_speaker(session.clips, SPEAKER, 2, seed=0)
    user = P.user_frontend(base, session.features.features(sp.shots),
                           session.reference_speech_mean(), 0.5)
    path = P.save_personalized(shipped, tmp_path / "base.npz", shipped.params, SPEAKER,
                               P.AdaptConfig(), out=tmp_path / "me.npz", frontend=user)
    me = load_checkpoint(path)
    assert me.frontend == user.to_dict() and P.stored_speech_mean(me) is None
    again = P.Session(me, session.clips, session.data_dir, P.FeatureSource(me), session.seen)
    with pytest.raises(ConfigError, match="already personalised for '837a0f64'.*--user-norm 0"):
        again.reference_speech_mean()
    # unset, --user-norm follows the checkpoint: a later session keeps the moved chain
    assert P.resolve_user_norm(shipped, None) == (P.AdaptConfig.user_norm, None)
    assert P.resolve_user_norm(me, None)[0] == 0.0 and P.resolve_user_norm(me, 0.5) == (0.5, None)
    # a session that keeps the chain keeps the record too, or the next would move it again
    later = P.save_personalized(me, path, me.params, SPEAKER, P.AdaptConfig(user_norm=0.0),
                                out=tmp_path / "me2.npz", frontend=user)
    me2 = load_checkpoint(later)
    info = me2.extra["personalized"]
    assert me2.frontend == user.to_dict() and P.moved_toward(me2) == SPEAKER
    assert info["base_frontend_sha256"] == base.hash() and info["earlier"]["base"] == str(
        tmp_path / "base.npz")
    # one saved without the record (before it was kept) still counts as moved: its chain
    # is not the one its training statistics were measured in
    del info["base_frontend_sha256"]
    assert P.moved_toward(me2) == SPEAKER
    assert P.moved_toward(shipped) is None


def test_a_later_session_adapts_a_personalised_checkpoint_through_its_chain(
        shipped, session, base, data_dir, tmp_path):
    import json
    import subprocess
    import sys

    from edgeprop.checkpoint import load_checkpoint

    sp = P.split_speaker(session.clips, SPEAKER, 2, seed=0)
    user = P.user_frontend(base, session.features.features(sp.shots),
                           session.reference_speech_mean(), 0.5)
    me = P.save_personalized(shipped, tmp_path / "base.npz", shipped.params, SPEAKER,
                             P.AdaptConfig(), out=tmp_path / "me.npz", frontend=user)

    def personalize(model, *more):
        return subprocess.run(
            [sys.executable, "-m", "runtime.cli", "personalize", "--model", str(model),
             "--data", str(data_dir), "--speaker", SPEAKER, "--shots", "1", "--passes", "1",
             "--backend", "reference", "--skip-above", "0", "--json", *more],
            capture_output=True, text=True, timeout=120)

    r = personalize(me, "--out", str(tmp_path / "me2.npz"))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert "already moved toward '837a0f64'" in r.stderr
    assert res["adapt_config"]["user_norm"] == 0.0 and not res["frontend_moved"]
    me2 = load_checkpoint(tmp_path / "me2.npz")
    assert me2.frontend == user.to_dict()
    assert not np.array_equal(me2.params.w_out, shipped.params.w_out)
    # asking for a second move is still refused, in one line
    r = personalize(tmp_path / "me2.npz", "--user-norm", "0.5")
    assert r.returncode == 2 and "already personalised for '837a0f64'" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_skip_rule_keeps_the_base_frontend_too(session, base):
    acfg = P.AdaptConfig(shots=1, passes=1, rehearsal=2, skip_above=0.01)
    r = P.personalize_speaker(session, SPEAKER, acfg, backend="reference")
    assert r["skipped"] and r["_frontend"] == base and r["after"] == r["before"]
    off = P.personalize_speaker(session, SPEAKER, dataclasses.replace(acfg, skip_above=0.0,
                                                                        user_norm=0.0),
                                backend="reference")
    assert not off["frontend_moved"] and off["_frontend"] == base
    on = P.personalize_speaker(session, SPEAKER, dataclasses.replace(acfg, skip_above=0.0),
                               backend="reference")
    assert on["frontend_moved"] and on["_frontend"] != base


def test_a_full_disk_does_not_cost_the_adapted_weights(shipped, tmp_path, full_dir):
    """The session's weights go to a rescue folder, and the error says where."""
    import re
    import shutil

    from edgeprop.checkpoint import CheckpointError, load_checkpoint, params_hash

    weights = shipped.params.copy()
    weights.w_out[0, 0] += 0.25  # "adapted"
    with pytest.raises(CheckpointError) as err:
        P.save_personalized(shipped, tmp_path / "base.npz", weights, SPEAKER,
                            P.AdaptConfig(), out=full_dir / "me.npz")
    said = str(err.value)
    assert "No space left" in said and "the adapted weights were saved to " in said
    rescued = Path(re.search(r"saved to (\S+) instead", said).group(1))
    try:
        assert rescued.name == "me.npz"
        assert params_hash(load_checkpoint(rescued).params) == params_hash(weights)
    finally:
        shutil.rmtree(rescued.parent, ignore_errors=True)
