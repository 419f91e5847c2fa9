"""Spike encoders: deterministic, streaming == batch, documented sparsity on real clips,
bit packing round-trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgeprop.datasets import load_clips, scan_speech_commands
from edgeprop.encoder_kernels import delta_kernel, delta_reference
from edgeprop.encoders import (
    EXPECTED_SPARSITY,
    encoder_from_dict,
    make_encoder,
    pack_spikes,
    sparsity,
    unpack_spikes,
)
from edgeprop.errors import ConfigError, ProtocolError
from edgeprop.frontend import FrontendConfig, features, fit_normalization


@pytest.fixture(scope="module")
def real_frames(data_dir) -> np.ndarray:
    """Normalised features of 60 dev clips (every 60th: all classes), norm fitted on them."""
    clips = scan_speech_commands(data_dir).clips[::60]
    raw = features(load_clips(clips), FrontendConfig())
    cfg = fit_normalization(raw, FrontendConfig())
    return features(load_clips(clips), cfg)


@pytest.mark.parametrize("name,opts", [("current", {}), ("delta", {}),
                                       ("delta", {"substeps": 3, "theta": 0.25}),
                                       ("threshold", {}), ("threshold", {"two_sided": True})])
def test_encoder_deterministic_and_stream_equals_batch(real_frames, name, opts):
    enc = make_encoder(name, 80, **opts)
    frames = real_frames[0]
    a = enc.encode(frames)
    assert a.shape == (100 * enc.substeps, enc.n_out) and a.dtype == np.float32
    np.testing.assert_array_equal(a, make_encoder(name, 80, **opts).encode(frames))
    for _ in range(2):  # second pass after reset
        enc.reset()
        s = np.concatenate([enc.step(f) for f in frames])
        np.testing.assert_array_equal(s, a)
    back = encoder_from_dict(enc.to_dict())
    np.testing.assert_array_equal(back.encode(frames), a)
    if name != "current":
        assert set(np.unique(a)) <= {0.0, 1.0}
        assert pack_spikes(a)  # binary codes pack


def test_sparsity_on_real_clips_matches_documented(real_frames):
    for name in ("current", "delta", "threshold"):
        enc = make_encoder(name)
        measured = sparsity(np.concatenate([enc.encode(f) for f in real_frames]))
        assert abs(measured - EXPECTED_SPARSITY[name]) < 0.05, (name, measured)
        assert enc.expected_sparsity == EXPECTED_SPARSITY[name]


def _kernel_and_reference(x: np.ndarray, ref0: np.ndarray, theta: float, substeps: int):
    outs = []
    for fn in (delta_kernel, delta_reference):
        ref = ref0.copy()
        outs.append((fn(x, ref, np.float32(theta), substeps), ref))
    return outs


@pytest.mark.parametrize("theta,substeps", [(0.5, 1), (0.25, 3), (0.1, 5)])
def test_delta_kernel_equals_reference_on_real_frames(real_frames, theta, substeps):
    for frames in real_frames[:20]:
        (k_out, k_ref), (r_out, r_ref) = _kernel_and_reference(
            frames, np.zeros(80, np.float32), theta, substeps)
        np.testing.assert_array_equal(k_out, r_out)
        np.testing.assert_array_equal(k_ref, r_ref)


_values = st.floats(-1e6, 1e6, width=32) | st.sampled_from([np.inf, -np.inf, np.nan, 0.0])


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 7)), elements=_values),
       theta=st.floats(1e-3, 10.0), substeps=st.integers(1, 4), seed=st.integers(0, 9))
def test_delta_kernel_equals_reference_on_any_input(x, theta, substeps, seed):
    """Bit for bit, extremes, infinities and NaN included (NaN: no spikes, NaN reference)."""
    ref0 = np.random.default_rng(seed).normal(0, 2, x.shape[1]).astype(np.float32)
    (k_out, k_ref), (r_out, r_ref) = _kernel_and_reference(x, ref0, theta, substeps)
    np.testing.assert_array_equal(k_out, r_out)
    np.testing.assert_array_equal(k_ref, r_ref)  # NaNs compare equal here


def test_delta_encoder_tracks_signal():
    """Send-on-delta reference follows the input within theta when substeps suffice."""
    enc = make_encoder("delta", 1, theta=0.1, substeps=20)
    x = np.sin(np.linspace(0, 6, 200))[:, None].astype(np.float32)
    s = enc.encode(x).reshape(200, 20, 2).sum(axis=1)
    recon = np.cumsum(s[:, 0] - s[:, 1]) * 0.1
    assert np.abs(recon - x[:, 0]).max() < 0.1 + 1e-6


def test_pack_roundtrip_and_errors():
    rng = np.random.default_rng(0)
    s = (rng.random((3, 160)) < 0.1).astype(np.float32)
    data = pack_spikes(s)
    assert len(data) == 60
    np.testing.assert_array_equal(unpack_spikes(data, s.shape), s)
    odd = (rng.random((1, 13)) < 0.5).astype(np.float32)
    np.testing.assert_array_equal(unpack_spikes(pack_spikes(odd), (1, 13)), odd)
    with pytest.raises(ProtocolError):
        unpack_spikes(data, (4, 160))
    with pytest.raises(ProtocolError):
        pack_spikes(np.array([0.5, 1.0]))


def test_bad_encoder_requests():
    with pytest.raises(ConfigError, match="unknown encoder"):
        make_encoder("morse")
    with pytest.raises(ConfigError):
        make_encoder("delta", theta=-1)
    with pytest.raises(ConfigError, match="F=80"):
        make_encoder("delta").encode(np.zeros((5, 40)))
