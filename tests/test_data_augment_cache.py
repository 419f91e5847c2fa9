"""Augmentation (SNR, shift, gain) and the on-disk feature cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from edgeprop.augment import Augmenter, load_background_noise
from edgeprop.datasets import load_clip, scan_speech_commands
from edgeprop.errors import ConfigError, DatasetError
from edgeprop.feature_cache import FeatureCache
from edgeprop.frontend import FrontendConfig, features, fit_normalization, normalize
from edgeprop.training import freq_warp


def test_noise_added_at_requested_snr(data_dir):
    noise = load_background_noise(data_dir)
    assert len(noise) == 6
    clip = load_clip(scan_speech_commands(data_dir).clips[0])
    aug = Augmenter(noise, snr_db=(10, 10), shift_ms=0, gain_db=(0, 0), p_noise=1.0)
    out = aug(clip, np.random.default_rng(1))
    added = out.astype(np.float64) - clip
    snr = 10 * np.log10(np.mean(clip.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert abs(snr - 10) < 0.2  # clipping to [-1, 1] may move it a little
    np.testing.assert_array_equal(out, aug(clip, np.random.default_rng(1)))


def test_shift_and_gain():
    x = np.linspace(-0.5, 0.5, 16000).astype(np.float32)
    aug = Augmenter([], shift_ms=0, gain_db=(6, 6))
    np.testing.assert_allclose(aug(x, np.random.default_rng(0)), x * 10 ** (6 / 20), rtol=1e-6)
    shifter = Augmenter([], shift_ms=100, gain_db=(0, 0))
    np.testing.assert_array_equal(shifter.shift_audio(x, 5)[5:], x[:-5])
    np.testing.assert_array_equal(shifter.shift_audio(x, -5)[:-5], x[5:])
    y = shifter(x, np.random.default_rng(3))
    assert y.shape == x.shape and not np.array_equal(y, x)
    with pytest.raises(ConfigError):
        Augmenter([], snr_db=(20, 0))


def test_missing_noise_folder(tmp_path):
    with pytest.raises(DatasetError, match="_background_noise_"):
        load_background_noise(tmp_path)


def test_feature_cache_hits_second_time_and_keys_on_config(data_dir, tmp_path):
    clips = scan_speech_commands(data_dir).clips[::400]
    cache = FeatureCache(tmp_path / "cache")
    cfg = FrontendConfig()
    first = cache.features(clips, cfg)
    assert (cache.hits, cache.misses) == (0, len(clips))
    second = cache.features(clips, cfg)
    assert cache.hits == len(clips)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first[0], features(load_clip(clips[0]), cfg))
    other = cache.features(clips[:2], FrontendConfig(n_mels=32))
    assert other.shape == (2, 100, 64) and cache.misses == len(clips) + 2
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_feature_cache_default_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPROP_CACHE", str(tmp_path / "env"))
    assert FeatureCache().cache_dir == tmp_path / "env"
    monkeypatch.delenv("EDGEPROP_CACHE")
    assert str(FeatureCache().cache_dir) == os.path.expanduser("~/.cache/edgeprop")


def test_feature_cache_misses_when_file_changes(tmp_path):
    root = tmp_path / "sc"
    p = root / "yes" / "aaaaaaaa_nohash_0.wav"
    p.parent.mkdir(parents=True)
    sf.write(p, np.zeros(16000, dtype=np.float32), 16000, subtype="PCM_16")
    cache = FeatureCache(tmp_path / "cache")
    clips = scan_speech_commands(root).clips
    silent = cache.features(clips, FrontendConfig())
    tone = 0.3 * np.sin(np.arange(16000) * 0.2)
    sf.write(p, tone, 16000, subtype="PCM_16")
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    changed = cache.features(clips, FrontendConfig())
    assert cache.misses == 2 and not np.array_equal(silent, changed)


def test_augmented_copy_misses_the_cache_when_a_noise_recording_changes(tmp_path):
    """Same length, other sound (a noise file re-recorded or normalised): the cached copy
    mixed with the old noise must not be served."""
    from edgeprop.training import augmented_features

    root = tmp_path / "sc"
    p = root / "yes" / "aaaaaaaa_nohash_0.wav"
    p.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(p, 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    clips = scan_speech_commands(root).clips
    hiss = 0.5 * rng.standard_normal(32000).astype(np.float32)
    hum = 0.01 * np.sin(np.arange(32000) * 2 * np.pi * 50 / 16000).astype(np.float32)
    copies = [augmented_features(clips, FrontendConfig(), Augmenter([n], p_noise=1.0),
                                 seed=0, copy=1, cache_dir=tmp_path / "cache")
              for n in (hiss, hum, hiss)]
    assert not np.array_equal(copies[0], copies[1])
    np.testing.assert_array_equal(copies[0], copies[2])  # the hiss's own entry, still kept
    assert len(list((tmp_path / "cache" / "augmented").glob("*.npy"))) == 2


def test_freq_warp_makes_a_tone_sound_like_the_higher_tone():
    """alpha = 1.1 on a 1500 Hz tone's features lands where a 1650 Hz tone's are (the
    power-weighted mel channel within 0.2 of a channel); alpha = 1 changes nothing."""
    cfg = FrontendConfig()
    t = np.arange(16000) / 16000
    raw = features(np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in (1500.0, 1650.0)]), cfg)
    fcfg = fit_normalization(raw, cfg)
    x = normalize(raw, fcfg)
    mean, std = np.asarray(fcfg.norm_mean), np.asarray(fcfg.norm_std)

    def centre(xn):
        power = np.exp((xn * std + mean)[..., :cfg.n_mels]).mean(axis=-2)
        return (power * np.arange(cfg.n_mels)).sum(-1) / power.sum(-1)

    low, high = centre(x)
    assert high - low > 1.0
    assert abs(centre(freq_warp(x[:1], np.array([1.1]), fcfg))[0] - high) < 0.2
    np.testing.assert_allclose(freq_warp(x, np.ones(2), fcfg), x, atol=1e-5)


def test_training_data_for_an_8_khz_frontend(data_dir, tmp_path):
    """The memory estimate took 16 kHz clips' frame count for any frontend, and its
    check then refused the features an 8 kHz frontend makes (after computing them)."""
    from edgeprop.training import TrainConfig, prepare_data

    data = prepare_data(data_dir, TrainConfig(n_aug=1), frontend=FrontendConfig(
        sample_rate=8000), cache_dir=tmp_path, max_clips=40)
    assert data.train_x.shape[0] == 2 and data.train_x.shape[2:] == (100, 80)
