"""Audio sources: microphone, file / folder replay, raw PCM on stdin.

Every source yields `Block`s of float32 mono samples at 16 kHz (the frontend's rate),
`block_ms` long (default 10 ms = one frame), each stamped with the monotonic time it
became available (for latency) and optionally a label and window id (replay of
labelled clips: the label rides along to the learner).

    list_devices() -> list[dict]             input devices (index, name, channels, rate)
    MicrophoneSource(device=None, sample_rate=16000, block_ms=10, capacity_s=2.0,
                     capture_rate=None, capture_channels=None)
        sounddevice InputStream; its callback (PortAudio's thread) writes into a
        bounded RingBuffer; when the reader falls behind, the OLDEST samples are
        overwritten and counted (`overruns`, samples at 16 kHz; `status_overflows`,
        PortAudio's own input-overflow flags). No input device -> DeviceError
        suggesting replay. A device that cannot capture at 16 kHz (many USB
        microphones: 44.1 / 48 kHz only) is opened at its default rate, or at
        `capture_rate`, and resampled (edgeprop.audio.StreamResampler); one that
        cannot capture mono is opened in stereo (or `capture_channels`) and mixed down.
    FileSource(path, block_ms=10, realtime=False, label=None)
    FolderSource(root, block_ms=10, realtime=False, gap_s=0.5, labelled=True)
        every .wav/.flac under root (but _background_noise_/ below it), sorted, with
        gap_s of silence between files; a file under a folder named like a class
        (yes/, _unknown_/ ...) is labelled.
    StdinSource(sample_rate=16000, dtype="int16", block_ms=10, stream=sys.stdin.buffer)
        raw PCM to its end (the last block may be shorter); an audio file piped in
        (its header would be read as samples) or no audio at all is an AudioError.

Replay is paced at real time with `realtime=True` (sleeping to each block's due time)
or as fast as possible (the frontend's backpressure then sets the pace).
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from edgeprop.errors import AudioError, DeviceError
from edgeprop.network import KWS_LABELS

SAMPLE_RATE = 16000
NO_LABEL = -1


@dataclass
class Block:
    samples: np.ndarray
    t_in_ns: int
    label: int = NO_LABEL
    window: int = NO_LABEL


class Source:
    sample_rate = SAMPLE_RATE
    overruns = 0

    def blocks(self) -> Iterator[Block]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- microphone

class RingBuffer:
    """Bounded single-producer / single-consumer sample buffer that overwrites the oldest.

    `write` never blocks (it runs in the audio callback); samples it has to overwrite
    before they were read are counted in `overruns`.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise AudioError("ring buffer capacity must be >= 1 sample")
        self.buf = np.zeros(capacity, np.float32)
        self.capacity = capacity
        self.read_pos = 0  # total samples consumed
        self.write_pos = 0  # total samples produced
        self.overruns = 0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)

    def write(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32).reshape(-1)
        with self._lock:
            if len(x) > self.capacity:
                self.overruns += len(x) - self.capacity
                self.write_pos += len(x) - self.capacity
                x = x[-self.capacity:]
            start = self.write_pos % self.capacity
            first = min(len(x), self.capacity - start)
            self.buf[start:start + first] = x[:first]
            self.buf[: len(x) - first] = x[first:]
            self.write_pos += len(x)
            lost = self.write_pos - self.read_pos - self.capacity
            if lost > 0:
                self.overruns += lost
                self.read_pos += lost
            self._ready.notify_all()

    def available(self) -> int:
        with self._lock:
            return self.write_pos - self.read_pos

    def read(self, n: int, timeout: float | None = None) -> np.ndarray | None:
        """n samples (oldest first), waiting up to timeout; None if not enough came."""
        with self._ready:
            if not self._ready.wait_for(lambda: self.write_pos - self.read_pos >= n, timeout):
                return None
            idx = (self.read_pos + np.arange(n)) % self.capacity
            out = self.buf[idx].copy()
            self.read_pos += n
            return out


def _sd():
    try:
        import sounddevice as sd
    except OSError as exc:  # PortAudio library missing
        raise DeviceError(f"no audio system available ({exc}); replay a file instead: "
                          "edgeprop listen --file clip.wav") from None
    return sd


def list_devices() -> list[dict]:
    """Input-capable devices as dicts (index, name, max_input_channels, default_samplerate)."""
    sd = _sd()
    out = []
    for i, d in enumerate(sd.query_devices()):
        if d.get("max_input_channels", 0) > 0:
            out.append({"index": i, "name": d["name"], "channels": d["max_input_channels"],
                        "default_samplerate": d["default_samplerate"]})
    return out


def _capture_settings(sd, device, wanted: int, rate: int | None,
                      channels: int | None) -> tuple[int, int]:
    """(rate, channels) to open the device with: `wanted` Hz mono if it takes it; else
    its default rate, and 2 channels (mixed down) for a stereo-only device. An unchecked
    choice is left to InputStream, whose error names the device and the settings."""
    try:
        default = int(round(sd.query_devices(device, "input")["default_samplerate"]))
    except Exception as exc:
        which = "the default input device" if device is None else f"input device {device!r}"
        raise DeviceError(f"cannot query {which}: {exc}; choose one with --device (see "
                          "`edgeprop listen --list-devices`)") from None
    rates = [rate] if rate else list(dict.fromkeys((wanted, default)))
    counts = [channels] if channels else [1, 2]
    for n in counts:
        for r in rates:
            try:
                sd.check_input_settings(device=device, channels=n, dtype="float32",
                                        samplerate=r)
                return r, n
            except Exception:  # PortAudioError / ValueError: not supported
                continue
    return rates[-1], counts[0]


def capture_settings(device: int | str | None = None) -> tuple[int, int]:
    """(rate, channels) MicrophoneSource opens this device with (--list-devices)."""
    return _capture_settings(_sd(), device, SAMPLE_RATE, None, None)


class MicrophoneSource(Source):
    def __init__(self, device: int | str | None = None, sample_rate: int = SAMPLE_RATE,
                 block_ms: float = 10.0, capacity_s: float = 2.0,
                 capture_rate: int | None = None, capture_channels: int | None = None):
        from edgeprop.audio import StreamResampler

        sd = _sd()
        self.sample_rate = sample_rate
        self.block = int(round(sample_rate * block_ms / 1000))
        self.status_overflows = 0
        inputs = list_devices()
        if not inputs:
            raise DeviceError("no audio input device found on this machine; replay a "
                              "recording instead: `edgeprop listen --file clip.wav` (or "
                              "`--folder DIR`), `edgeprop demo live --replay clip.wav`, "
                              "or `edgeprop run` for the embedded clips")
        if device is not None and str(device).isdigit():
            device = int(device)
            if device not in [d["index"] for d in inputs]:
                raise DeviceError(f"device {device} is not an input device; inputs: "
                                  + ", ".join(f"{d['index']}: {d['name']}" for d in inputs))
        self.capture_rate, self.channels = _capture_settings(
            sd, device, sample_rate, capture_rate, capture_channels)
        # PortAudio's block: block_ms of the capture rate (10 ms -> 480 frames at 48 kHz)
        self.capture_block = int(round(self.capture_rate * block_ms / 1000))
        self.ring = RingBuffer(int(capacity_s * self.capture_rate))
        self._resample = (None if self.capture_rate == sample_rate
                          else StreamResampler(self.capture_rate, sample_rate))
        try:
            self.stream = sd.InputStream(samplerate=self.capture_rate, channels=self.channels,
                                         dtype="float32", blocksize=self.capture_block,
                                         device=device, callback=self.callback)
            self.stream.start()
        except Exception as exc:
            raise DeviceError(f"cannot open input device {device!r} at {self.capture_rate} "
                              f"Hz, {self.channels} channel(s): {exc}; see `edgeprop listen "
                              "--list-devices`") from None

    @property
    def overruns(self) -> int:  # type: ignore[override]
        """Samples lost to a slow reader, counted at the 16 kHz the frontend sees."""
        return self.ring.overruns * self.sample_rate // self.capture_rate

    def callback(self, indata: np.ndarray, frames: int, time_info, status) -> None:
        """PortAudio's thread: copy into the ring, count overflows. Never blocks."""
        if status and getattr(status, "input_overflow", False):
            self.status_overflows += 1
        self.ring.write(indata[:, 0] if indata.shape[1] == 1 else indata.mean(axis=1))

    def blocks(self) -> Iterator[Block]:
        pending = np.zeros(0, np.float32)  # resampled, not yet a whole block
        arrived: deque[tuple[int, int]] = deque()  # (captured samples so far, when)
        captured = sent = 0  # capture-rate samples read; 16 kHz samples yielded
        while True:
            x = self.ring.read(self.capture_block, timeout=2.0)
            if x is None:
                if not self.stream.active:
                    return
                continue
            if self._resample is None:
                yield Block(x, time.monotonic_ns())
                continue
            captured += x.size
            arrived.append((captured, time.monotonic_ns()))
            pending = np.concatenate([pending, self._resample(x)])
            while pending.size >= self.block:
                # soxr keeps output sample k at input time k / rate, so a block is stamped
                # when its last sample was captured: its latency includes soxr's hold
                sent += self.block
                last_in = -(-sent * self.capture_rate // self.sample_rate)
                while len(arrived) > 1 and arrived[0][0] < last_in:
                    arrived.popleft()
                yield Block(pending[:self.block], arrived[0][1])
                pending = pending[self.block:]

    def close(self) -> None:
        try:
            self.stream.stop()
            self.stream.close()
        except Exception:
            pass


# ---------------------------------------------------------------- replay

def _paced(blocks: Iterator[tuple[np.ndarray, int, int]], block_s: float,
           realtime: bool) -> Iterator[Block]:
    t0 = time.perf_counter()
    for k, (x, lab, win) in enumerate(blocks):
        if realtime:
            delay = t0 + k * block_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        yield Block(x, time.monotonic_ns(), lab, win)


def _split(x: np.ndarray, block: int, lab: int = NO_LABEL, win: int = NO_LABEL):
    for i in range(0, len(x) - len(x) % block, block):
        yield x[i:i + block], lab, win
    rest = len(x) % block
    if rest:
        yield x[len(x) - rest:], lab, win


def _load(path: Path) -> np.ndarray:
    from edgeprop.audio import load_wav

    return load_wav(path, SAMPLE_RATE)


class FileSource(Source):
    def __init__(self, path: str | Path, block_ms: float = 10.0, realtime: bool = False,
                 label: int | None = None):
        self.path = Path(path)
        self.audio = _load(self.path)
        self.block = int(round(SAMPLE_RATE * block_ms / 1000))
        self.realtime = realtime
        self.label = NO_LABEL if label is None else int(label)

    def blocks(self) -> Iterator[Block]:
        win = 0 if self.label != NO_LABEL else NO_LABEL
        return _paced(_split(self.audio, self.block, self.label, win),
                      self.block / SAMPLE_RATE, self.realtime)


def _probe_all(files: list[Path]) -> None:
    """Every file's header, before the first is streamed: a corrupt file found half-way
    would end a replay whose earlier files the learner already learned from."""
    from edgeprop.audio import probe_audio

    bad = []
    for f in files:
        try:
            probe_audio(f)
        except AudioError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise AudioError(f"{len(bad)} of {len(files)} audio files cannot be read, so nothing "
                         f"was streamed: {bad[0]}{more}; fix or remove them")


class FolderSource(Source):
    def __init__(self, root: str | Path, block_ms: float = 10.0, realtime: bool = False,
                 gap_s: float = 0.5, labelled: bool = True, limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise AudioError(f"{self.root}: " + ("not a folder" if self.root.exists()
                                                 else "no such folder"))
        audio = [p for p in self.root.rglob("*") if p.suffix.lower() in (".wav", ".flac")]
        # noise under the folder is skipped; the folder itself may be the noise (false alarms)
        files = sorted(p for p in audio
                       if "_background_noise_" not in p.relative_to(self.root).parts)
        if limit is not None:
            files = files[:limit]
        if not files:  # say why when there are files, all of them noise
            raise AudioError(f"{self.root}: no .wav or .flac files" + (
                f" outside _background_noise_/ (skipped: {len(audio)} noise files, not "
                "utterances)" if audio else ""))
        _probe_all(files)
        self.files = files
        self.block = int(round(SAMPLE_RATE * block_ms / 1000))
        self.realtime = realtime
        self.gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
        self.labelled = labelled

    def label_of(self, path: Path) -> int:
        name = path.parent.name
        return KWS_LABELS.index(name) if self.labelled and name in KWS_LABELS else NO_LABEL

    def _gen(self):
        for i, f in enumerate(self.files):
            lab = self.label_of(f)
            yield from _split(_load(f), self.block, lab, i if lab != NO_LABEL else NO_LABEL)
            yield from _split(self.gap, self.block)

    def blocks(self) -> Iterator[Block]:
        return _paced(self._gen(), self.block / SAMPLE_RATE, self.realtime)


class StdinSource(Source):
    """Raw little-endian PCM, mono, at the frontend's rate (e.g. `arecord -f S16_LE -r 16000`)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, dtype: str = "int16",
                 block_ms: float = 10.0, stream: IO[bytes] | None = None):
        if sample_rate != SAMPLE_RATE:
            raise AudioError(f"stdin PCM must be {SAMPLE_RATE} Hz, got {sample_rate}")
        if dtype not in ("int16", "float32"):
            raise AudioError(f"stdin PCM dtype must be int16 or float32, got {dtype!r}")
        self.dtype = np.dtype("<i2" if dtype == "int16" else "<f4")
        self.block = int(round(sample_rate * block_ms / 1000))
        self.stream = stream if stream is not None else sys.stdin.buffer
        peek = getattr(self.stream, "peek", None)  # a pipe: look without consuming
        if peek is not None:  # so a wrong input is said before a learner session opens
            head = peek(4)[:4]
            if not head:
                raise self._no_audio(0)
            _refuse_audio_file(head)

    def _no_audio(self, total: int) -> AudioError:
        return AudioError(f"stdin: no audio ({total} bytes before it ended); expected raw "
                          f"16 kHz mono {self.dtype.name} PCM piped in")

    def blocks(self) -> Iterator[Block]:
        nbytes = self.block * self.dtype.itemsize
        carry = head = b""  # head: the stream's first bytes, to tell an audio file
        total = 0
        while True:
            chunk = self.stream.read(nbytes - len(carry))
            if not chunk:
                break
            if len(head) < 4:
                head += chunk[:4 - len(head)]
                _refuse_audio_file(head)
            total += len(chunk)
            carry += chunk
            if len(carry) < nbytes:
                continue
            yield Block(self._samples(carry), time.monotonic_ns())
            carry = b""
        whole = len(carry) - len(carry) % self.dtype.itemsize
        if whole:  # the last, shorter block (a file is replayed to its end too)
            yield Block(self._samples(carry[:whole]), time.monotonic_ns())
        if total < self.dtype.itemsize:
            raise self._no_audio(total)
        if len(carry) > whole:  # a byte lost on the way, or a wrong --stdin-dtype
            warnings.warn(f"stdin ended mid-sample: its last {len(carry) - whole} byte(s), "
                          f"less than one {self.dtype.name} sample, were dropped (is "
                          "--stdin-dtype right?)", stacklevel=2)

    def _samples(self, raw: bytes) -> np.ndarray:
        x = np.frombuffer(raw, self.dtype)
        if self.dtype.kind == "i":
            return x.astype(np.float32) / 32768.0
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise AudioError("stdin PCM contains NaN/inf samples")
        return x


# the first bytes of audio files: piped to --stdin, their header would be read as samples
# (and a 44.1 kHz file played at the wrong speed)
_FILE_MAGIC = {b"RIFF": "WAV", b"RIFX": "WAV", b"fLaC": "FLAC", b"OggS": "Ogg",
               b"FORM": "AIFF", b"ID3": "MP3"}


def _refuse_audio_file(head: bytes) -> None:
    kind = next((k for magic, k in _FILE_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None:
        raise AudioError(f"stdin holds a {kind} file, not raw PCM: replay it with "
                         "`edgeprop listen --file PATH`, or pipe raw samples (e.g. sox "
                         "IN -t raw -r 16000 -c 1 -e signed -b 16 -)")
