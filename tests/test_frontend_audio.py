"""Bad audio input: each case gives a clear AudioError naming the file, or a documented action."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprop.audio import StreamResampler, check_audio, load_wav
from edgeprop.errors import AudioError

SR = 16000


def _tone(n: int = SR, sr: int = SR) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)).astype(np.float32)


def test_good_wav_loads_as_float32_mono(tmp_path):
    p = tmp_path / "ok.wav"
    sf.write(p, _tone(), SR, subtype="PCM_16")
    x = load_wav(p)
    assert x.dtype == np.float32 and x.shape == (SR,)
    assert np.abs(x - _tone()).max() < 1e-4


def test_missing_file_names_it(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: no such file"):
        load_wav(tmp_path / "nope.wav")


def test_empty_file_and_empty_audio(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav: empty file"):
        load_wav(empty)
    zero = tmp_path / "zero.wav"
    with wave.open(str(zero), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(b"")
    with pytest.raises(AudioError, match="zero.wav: empty audio"):
        load_wav(zero)


def test_truncated_wav_is_rejected_not_read_short(tmp_path):
    full = tmp_path / "full.wav"
    sf.write(full, _tone(), SR, subtype="PCM_16")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:20000])
    with pytest.raises(AudioError, match="cut.wav: truncated WAV"):
        load_wav(cut)


def test_corrupt_garbage_bytes(tmp_path):
    p = tmp_path / "garbage.wav"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError, match="garbage.wav: corrupt"):
        load_wav(p)
    hdr = tmp_path / "header_only.wav"
    sf.write(hdr, _tone(), SR)
    hdr.write_bytes(hdr.read_bytes()[:30])
    with pytest.raises(AudioError, match="header_only.wav"):
        load_wav(hdr)


def test_stereo_rejected_unless_mixed(tmp_path):
    p = tmp_path / "stereo.wav"
    st = np.stack([_tone(), -_tone() * 0.5], axis=1)
    sf.write(p, st, SR, subtype="PCM_16")
    with pytest.raises(AudioError, match="stereo.wav: 2 channels"):
        load_wav(p)
    mixed = load_wav(p, mix=True)
    np.testing.assert_allclose(mixed, 0.25 * _tone(), atol=1e-4)


def test_nan_and_inf_samples_rejected(tmp_path):
    for bad in (np.nan, np.inf):
        p = tmp_path / f"bad_{bad}.wav"
        x = _tone()
        x[100] = bad
        sf.write(p, x, SR, subtype="FLOAT")
        with pytest.raises(AudioError, match=f"bad_{bad}.wav: 1 NaN/inf"):
            load_wav(p)
    with pytest.raises(AudioError, match="mic: 1 NaN/inf"):
        check_audio(np.array([0.0, np.nan], dtype=np.float32), SR, name="mic")


def test_wrong_rate_file_is_resampled_or_rejected(tmp_path):
    p = tmp_path / "fast.wav"
    sf.write(p, _tone(44100, 44100), 44100, subtype="PCM_16")
    x = load_wav(p)
    assert x.shape == (SR,)
    # still a 440 Hz tone after resampling
    peak = np.argmax(np.abs(np.fft.rfft(x))) * SR / x.shape[0]
    assert abs(peak - 440) < 2
    with pytest.raises(AudioError, match="fast.wav: sample rate 44100 Hz, expected 16000"):
        load_wav(p, resample=False)
    with pytest.raises(AudioError, match="mic: sample rate 48000 Hz"):
        check_audio(np.zeros(10, dtype=np.float32), 48000, name="mic")
    for rate in (1, 100, 768000):  # a header no recording has: said, not resampled
        bad = tmp_path / f"r{rate}.wav"
        sf.write(bad, np.zeros(64, np.float32), rate, subtype="FLOAT")
        with pytest.raises(AudioError, match=f"sample rate {rate} Hz is not an audio rate"):
            load_wav(bad)


@settings(max_examples=30, deadline=None)
@given(rate=st.sampled_from([22050, 44100, 48000]), seed=st.integers(0, 2**16),
       most=st.integers(1, 3000))
def test_block_by_block_resampling_gives_what_a_file_of_the_same_audio_gives(
        tmp_path_factory, rate, seed, most):
    # a microphone without 16 kHz is resampled block by block (runtime.sources); the
    # joined blocks must be the samples load_wav makes of a file holding that audio
    rng = np.random.default_rng(seed)
    x = (0.2 * rng.standard_normal(rate // 2)).astype(np.float32)
    x[rng.integers(x.size)] = 1.5  # beyond full scale: clipped before resampling by both
    p = tmp_path_factory.mktemp("rs") / "x.wav"
    sf.write(p, x, rate, subtype="FLOAT")
    r, out, i = StreamResampler(rate, SR), [], 0
    while i < x.size:
        n = int(rng.integers(1, most + 1))
        out.append(r(x[i:i + n]))
        i += n
    out.append(r(np.zeros(0, np.float32), last=True))
    np.testing.assert_array_equal(np.concatenate(out), load_wav(p))


def test_too_long_rejected_with_max_seconds(tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, _tone(int(1.5 * SR)), SR, subtype="PCM_16")
    with pytest.raises(AudioError, match="long.wav: 1.500 s long"):
        load_wav(p, max_seconds=1.0)
    assert load_wav(p).shape == (24000,)


def test_check_audio_scales_ints_and_clips_floats():
    ints = np.array([0, 16384, -32768], dtype=np.int16)
    np.testing.assert_allclose(check_audio(ints, SR), [0.0, 0.5, -1.0])
    # unsigned PCM is offset binary (8-bit WAV): midscale is silence, not +0.5
    for kind in (np.uint8, np.uint16):
        top = np.iinfo(kind).max
        np.testing.assert_allclose(check_audio(np.array([0, top // 2 + 1, top], kind), SR),
                                   [-1.0, 0.0, 1.0], atol=2 / (top + 1))
    np.testing.assert_array_equal(check_audio(np.array([2.0, -3.0]), SR), [1.0, -1.0])
    with pytest.raises(AudioError, match="channels"):
        check_audio(np.zeros((10, 2)), SR)
