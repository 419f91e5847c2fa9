"""Audio loading and checks: every sample that reaches the frontend passes here.

Policy for bad input (each names the file or stream; see docs/frontend.md):

| input                         | action                                                  |
|-------------------------------|---------------------------------------------------------|
| missing / not a file          | AudioError                                              |
| empty (0 bytes or 0 frames)   | AudioError                                              |
| truncated WAV (data chunk     | AudioError (libsndfile would silently read less)        |
|   shorter than its header)    |                                                         |
| corrupt / not audio           | AudioError (libsndfile's reason appended)               |
| stereo / multi-channel        | AudioError, unless `mix=True`: mean over channels       |
| NaN or inf samples            | AudioError                                              |
| float samples beyond [-1, 1]  | clipped to [-1, 1] (PCM files cannot exceed it)         |
| wrong sample rate (file)      | resampled with librosa (soxr_hq), unless resample=False |
| rate outside 8-384 kHz (file) | AudioError: no speech recording has it (a bad header)   |
| wrong sample rate (stdin)     | AudioError: the sender declares the rate, so send 16 kHz |
| microphone without 16 kHz     | captured at its own rate, resampled by StreamResampler  |
|                               |   (seamless: equal to the file path's resampling)       |
| longer than `max_seconds`     | AudioError (datasets.load_clip crops 1 s clips instead) |
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from edgeprop.errors import AudioError

#: Sample rates that audio hardware and speech recordings use, in Hz (inclusive).
AUDIO_RATES = (8000, 384000)

#: A WAV data chunk of this size means "length unknown" (written while streaming).
_STREAMING_SIZES = (0, 0xFFFFFFFF)


def _check_riff(path: Path) -> None:
    """Raise AudioError if a RIFF/WAVE file's data chunk is shorter than declared.

    libsndfile reads a truncated WAV without complaint (it just returns fewer frames),
    so a half-copied file would look like a short clip. Walk the chunks and compare.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
            return  # not a RIFF WAVE file: libsndfile will judge it
        endian = "<" if head[:4] == b"RIFF" else ">"
        pos = 12
        while pos + 8 <= size:
            fh.seek(pos)
            cid, clen = struct.unpack(endian + "4sI", fh.read(8))
            if cid == b"data":
                if clen in _STREAMING_SIZES:
                    return
                have = size - (pos + 8)
                if have < clen:
                    raise AudioError(
                        f"{path}: truncated WAV: data chunk declares {clen} bytes but the file "
                        f"holds {have}; re-copy or re-record the file"
                    )
                return
            pos += 8 + clen + (clen & 1)
        raise AudioError(f"{path}: corrupt WAV: no complete 'data' chunk")


def check_audio(
    x: np.ndarray,
    sample_rate: int,
    *,
    name: str = "audio",
    expected_rate: int = 16000,
    mix: bool = False,
) -> np.ndarray:
    """Validate in-memory or streamed samples; return float32 mono in [-1, 1].

    Accepts shape (N,) or (N, C) (soundfile's layout). Integer PCM arrays are scaled
    to [-1, 1), unsigned ones (offset binary, as 8-bit WAV) about their midscale. A
    rate other than `expected_rate` is rejected here: a streaming source must open its
    device at the frontend's rate (resampling block by block is not seamless).
    Zero-length blocks are allowed (a stream may deliver them).
    """
    x = np.asarray(x)
    if sample_rate != expected_rate:
        raise AudioError(
            f"{name}: sample rate {sample_rate} Hz, expected {expected_rate} Hz; "
            f"open the source at {expected_rate} Hz or resample first"
        )
    if x.ndim == 2:
        if x.shape[1] == 1:
            x = x[:, 0]
        elif mix:
            x = x.mean(axis=1)
        else:
            raise AudioError(
                f"{name}: {x.shape[1]} channels, expected mono; downmix it "
                "(e.g. `sox in.wav -c 1 out.wav`)"
            )
    elif x.ndim != 1:
        raise AudioError(f"{name}: samples must be 1-D (N,) or (N, channels), got {x.shape}")
    if np.issubdtype(x.dtype, np.unsignedinteger):  # offset binary: midscale is silence
        mid = (int(np.iinfo(x.dtype).max) + 1) / 2
        x = ((x.astype(np.float64) - mid) / mid).astype(np.float32)
    elif np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    elif not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"{name}: samples of dtype {x.dtype} are not audio")
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise AudioError(f"{name}: {bad} NaN/inf samples (first at index "
                         f"{int(np.flatnonzero(~np.isfinite(x))[0])})")
    if x.size and float(np.abs(x).max()) > 1.0:
        x = np.clip(x, -1.0, 1.0)
    return x


def probe_audio(path: str | os.PathLike) -> None:
    """The checks load_wav makes before it reads any sample (the file, its header, its
    length and rate), as AudioErrors naming the file. Headers only, so a whole folder
    can be checked before any of it is streamed or learned from."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: no such file")
    if not p.is_file():
        raise AudioError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: empty file (0 bytes)")
    _check_riff(p)
    try:
        info = sf.info(str(p))
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise AudioError(f"{p}: corrupt or unsupported audio ({exc})") from None
    if info.frames == 0:
        raise AudioError(f"{p}: empty audio (0 frames)")
    if not AUDIO_RATES[0] <= info.samplerate <= AUDIO_RATES[1]:
        raise AudioError(f"{p}: sample rate {info.samplerate} Hz is not an audio rate "
                         f"({AUDIO_RATES[0]}-{AUDIO_RATES[1]} Hz); is its header damaged?")


def load_wav(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    *,
    max_seconds: float | None = None,
    resample: bool = True,
    mix: bool = False,
    start: int = 0,
    stop: int | None = None,
) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at `sample_rate`.

    `start`/`stop` select a frame range *in the file's own rate* (used to cut 1 s
    silence clips from long background recordings without reading them whole).
    Errors are AudioError naming the file; see the module table for the policy.
    """
    p = Path(path)
    probe_audio(p)
    try:
        data, rate = sf.read(str(p), start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise AudioError(f"{p}: corrupt or unsupported audio ({exc})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{p}: empty audio (0 frames)")
    if rate != sample_rate:
        if not resample:
            raise AudioError(f"{p}: sample rate {rate} Hz, expected {sample_rate} Hz")
        import librosa

        data = check_audio(data, rate, name=str(p), expected_rate=rate, mix=mix)
        data = librosa.resample(data, orig_sr=rate, target_sr=sample_rate).astype(np.float32)
        rate = sample_rate
    x = check_audio(data, rate, name=str(p), expected_rate=sample_rate, mix=mix)
    if max_seconds is not None and x.shape[0] > round(max_seconds * sample_rate):
        raise AudioError(
            f"{p}: {x.shape[0] / sample_rate:.3f} s long, more than the allowed "
            f"{max_seconds:g} s"
        )
    return x


class StreamResampler:
    """Block-by-block resampling whose joined output equals `load_wav`'s of the whole.

    Why: many microphones capture only at 44.1 or 48 kHz. Resampling each block on its
    own would click at every block edge; a stateful soxr stream at the quality
    librosa.resample uses (soxr HQ) gives the samples a file of the same audio gives,
    so a 48 kHz microphone and a 48 kHz recording reach the frontend alike (tested).
    Output comes in bursts, a few blocks' worth at a time (a sample waits about 27 ms
    in soxr at 48 kHz, `edgeprop bench frontend`); callers cut it into fixed blocks.
    """

    def __init__(self, in_rate: int, out_rate: int):
        import soxr

        if in_rate <= 0 or out_rate <= 0:
            raise AudioError(f"sample rates must be > 0, got {in_rate} -> {out_rate}")
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self._soxr = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32",
                                         quality="HQ")

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample the next block (float32 mono); `last=True` flushes the tail. Samples
        beyond [-1, 1] are clipped first, as `load_wav` clips a file before resampling."""
        x = np.clip(np.ascontiguousarray(block, dtype=np.float32).reshape(-1), -1.0, 1.0)
        return self._soxr.resample_chunk(x, last=last)
