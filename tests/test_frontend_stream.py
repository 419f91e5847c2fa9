"""Frontend: streaming equals batch, log-mel equals librosa, config hashing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeprop.audio import load_wav
from edgeprop.errors import ConfigError
from edgeprop.frontend import (
    FrontendConfig,
    StreamingFrontend,
    features,
    fit_normalization,
    librosa_log_mel,
    raw_log_mel,
)

CFG = FrontendConfig()


@pytest.fixture(scope="module")
def clip(data_dir) -> np.ndarray:
    return load_wav(sorted((data_dir / "yes").glob("*.wav"))[0])


def _stream(x: np.ndarray, sizes: list[int], cfg: FrontendConfig) -> np.ndarray:
    fe = StreamingFrontend(cfg)
    out, i, k = [], 0, 0
    while i < x.shape[0]:
        n = sizes[k % len(sizes)]
        out.append(fe.push(x[i:i + n]))
        i, k = i + n, k + 1
    return np.concatenate(out)


def test_default_config_shape_matches_paper():
    assert (CFG.n_features, CFG.hop, CFG.win) == (80, 160, 480)
    x = np.zeros(16000, dtype=np.float32)
    assert features(x, CFG).shape == (100, 80)
    assert features(np.zeros((3, 16000)), CFG).shape == (3, 100, 80)


_signal = np.random.default_rng(7).normal(0, 0.1, 12345).astype(np.float32)
_norm_cfg = CFG.with_normalization(np.linspace(-5, 5, 80), np.linspace(0.5, 3, 80))


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.one_of(st.just(1), st.just(10000), st.integers(1, 3000)),
                      min_size=1, max_size=6),
       normalised=st.booleans())
@example(sizes=[1], normalised=False)
@example(sizes=[10000], normalised=True)
def test_streaming_equals_batch_for_any_block_sizes(sizes, normalised):
    cfg = _norm_cfg if normalised else CFG
    x = _signal[: 2000] if sizes == [1] else _signal  # 1-sample pushes: keep it quick
    batch = features(x, cfg)
    stream = _stream(x, sizes, cfg)
    assert stream.shape == batch.shape == (x.shape[0] // 160, 80)
    assert np.max(np.abs(stream - batch), initial=0.0) <= 1e-6


@pytest.mark.parametrize("normalised", [False, True])
def test_streaming_equals_batch_on_real_clip_and_reset(clip, normalised):
    """Bit for bit: 10 ms pushes take the one-frame path, 333-sample pushes the general one."""
    cfg = fit_normalization(features(clip, CFG), CFG) if normalised else CFG
    fe = StreamingFrontend(cfg)
    first = np.concatenate([fe.push(clip[i:i + 160]) for i in range(0, 16000, 160)])
    fe.reset()
    again = np.concatenate([fe.push(clip[i:i + 333]) for i in range(0, 16000, 333)])
    batch = features(clip, cfg)
    np.testing.assert_array_equal(first, batch)
    np.testing.assert_array_equal(again, batch)


def test_batch_of_clips_equals_each_clip(clip):
    two = np.stack([clip, clip[::-1]])
    out = features(two, CFG)
    np.testing.assert_array_equal(out[0], features(clip, CFG))
    np.testing.assert_array_equal(out[1], features(np.ascontiguousarray(clip[::-1]), CFG))


def test_log_mel_matches_librosa(clip):
    err = np.abs(raw_log_mel(clip, CFG) - librosa_log_mel(clip, CFG)).max()
    assert err < 1e-4


def test_deltas_are_causal(clip):
    """Changing the future never changes past frames (no look-ahead)."""
    a = features(clip, CFG)
    b = clip.copy()
    b[8000:] = 0.5 * np.sin(np.arange(8000))
    out = features(b, CFG)
    np.testing.assert_array_equal(a[:50], out[:50])
    assert not np.array_equal(a[51:], out[51:])


def test_fit_normalization_standardises_training_frames(clip):
    frames = features(np.stack([clip, clip * 0.3, clip[::-1]]), CFG)
    cfg = fit_normalization(frames, CFG)
    normed = features(np.stack([clip, clip * 0.3, clip[::-1]]), cfg).reshape(-1, 80)
    np.testing.assert_allclose(normed.mean(axis=0), 0.0, atol=1e-4)
    assert np.all(normed.std(axis=0) <= 1.0 + 1e-4)


def test_config_hash_roundtrip_and_sensitivity():
    cfg = _norm_cfg
    back = FrontendConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.hash() == cfg.hash()
    assert FrontendConfig().hash() == FrontendConfig().hash()
    assert FrontendConfig(n_mels=32).hash() != FrontendConfig().hash()
    assert cfg.hash() != CFG.hash()
    assert len(cfg.hash()) == 64
    # equal configs hash equal whatever number types built them (JSON says 20, not 20.0)
    for same in (FrontendConfig(fmin=20), FrontendConfig(fmax=np.float32(4000)),
                 FrontendConfig(n_mels=np.int64(40)), FrontendConfig(deltas=np.bool_(True)),
                 FrontendConfig.from_dict({**FrontendConfig().to_dict(), "hop_ms": 10})):
        assert same == FrontendConfig() and same.hash() == FrontendConfig().hash()


@pytest.mark.parametrize("kw", [dict(fmax=9000.0), dict(win_ms=5.0), dict(delta_lag=0),
                                dict(norm_mean=(0.0,) * 80), dict(n_fft=256)])
def test_bad_config_is_a_config_error(kw):
    with pytest.raises(ConfigError):
        FrontendConfig(**kw)


def test_unknown_settings_rejected():
    with pytest.raises(ConfigError, match="unknown"):
        FrontendConfig.from_dict({"n_mel": 40})
