"""A real virtual microphone: an ALSA `file` PCM whose input is a FIFO we feed in real time.

Why: tests and demos need a microphone that PortAudio (through sounddevice) opens like
any other capture device, with real paced callbacks, on machines with no sound card.

How it works::

    writer thread --(raw PCM, paced by the wall clock)--> FIFO --> ALSA `file` PCM
        (infile = FIFO, slave = null) --> PortAudio --> sounddevice callback

- ALSA reads its configuration from ``$ALSA_CONFIG_PATH`` when set. We write a small
  top-level config that first includes the system ``alsa.conf`` (so everything else stays
  as it was) and then defines ``pcm.<name>`` of type ``file``. Setting the variable for a
  process (``VirtualMicrophone.env`` for subprocesses; ``os.environ`` plus a PortAudio
  re-initialisation in this process) makes the device appear in ``sounddevice``'s list.
- Pacing comes from the FIFO: the null slave PCM never blocks, so the only thing that
  paces capture is ``read()`` on the FIFO blocking until the writer has written. The file
  plugin fills whatever a short read did not cover with stale buffer contents, so every
  read must be satisfied in full. PortAudio reads in whole periods (1-4 blocks of 10 ms:
  160, 320, 480 or 640 frames for a 160-frame block at the usual latencies); the writer
  therefore writes chunks of ``chunk_frames`` (default 12 blocks of 10 ms, 1920 frames at
  16 kHz and 5760 at 48 kHz, a multiple of all of them) exactly on the wall clock.
  Capture is then paced at the real rate, delivered in bursts of one chunk (120 ms).
  Use ``chunk_frames=160`` for strict 10 ms pacing when the reader's period is 160
  frames (``latency="low"``).
- Readers must open the device with a 10 ms ``blocksize`` (160 frames at 16 kHz), the
  virtual microphone's sample rate, channel count (``channels``, default 1) and sample
  format (``dtype``: ``float32``, what runtime.sources.MicrophoneSource opens, or
  ``int16``); the FIFO
  carries raw samples and ALSA does not convert them. Measured here (ALSA 1.2.8,
  PortAudio 19.6): with those settings, 0 sample discontinuities over 3 s at latencies
  0.01-0.2 s; with ``blocksize=0`` PortAudio picks periods that do not divide a chunk
  and the stream is corrupted.
- PortAudio opens every device while listing them, and opening the FIFO for reading
  blocks until a writer exists. So the writer runs before anything lists devices, and it
  reopens the FIFO whenever a reader goes away. Each new connection starts with
  ``settle_s`` of silence, so audio queued with `play` is never lost to a listing probe.
- Stop readers before the virtual microphone. When the writer goes away the reader sees
  end-of-file, reads stop blocking, and PortAudio spins delivering stale buffers as fast
  as it can (measured: the demo then counts tens of thousands of dropped frames), like
  a sound card whose clock vanished.
"""

from __future__ import annotations

import errno
import os
import queue
import select
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgeprop.errors import AudioError, DeviceError

DEFAULT_NAME = "edgeprop_vmic"
_SYSTEM_ALSA_CONF = "/usr/share/alsa/alsa.conf"


def alsa_config_text(name: str, fifo: Path, system_conf: str = _SYSTEM_ALSA_CONF) -> str:
    """The top-level ALSA config: the system one, plus our file-plugin capture PCM."""
    return (
        f"<{system_conf}>\n"
        f"pcm.{name} {{\n"
        "    type file\n"
        '    slave.pcm "null"\n'
        '    file "/dev/null"\n'
        f'    infile "{fifo}"\n'
        '    format "raw"\n'
        '    hint { show on description "edgeprop virtual microphone (FIFO-fed)" }\n'
        "}\n"
    )


def _reinit_portaudio() -> None:
    """Make an already imported sounddevice re-read the ALSA config (device list)."""
    sd = sys.modules.get("sounddevice")
    if sd is None:
        return
    sd._terminate()
    sd._initialize()


class VirtualMicrophone:
    """Context manager: a FIFO-fed ALSA capture device that plays queued audio in real time.

    ``play(audio)`` queues float audio in [-1, 1] at ``samplerate``; between queued
    pieces it plays silence (or seeded noise at ``noise_dbfs``). ``env`` is the
    environment a subprocess needs to see the device; inside ``with`` this process sees
    it too (``os.environ`` is set and PortAudio re-initialised, both undone on exit).
    """

    def __init__(self, *, name: str = DEFAULT_NAME, samplerate: int = 16000,
                 dtype: str = "float32", chunk_frames: int | None = None,
                 channels: int = 1, settle_s: float = 0.3,
                 noise_dbfs: float | None = None, seed: int = 0,
                 workdir: str | os.PathLike | None = None) -> None:
        if dtype not in ("int16", "float32"):
            raise DeviceError(f"virtual microphone dtype must be int16 or float32, got {dtype!r}")
        if chunk_frames is None:
            chunk_frames = 12 * (int(samplerate) // 100)  # 12 blocks of 10 ms
        if chunk_frames < 1 or samplerate < 1 or channels < 1:
            raise DeviceError("chunk_frames, samplerate and channels must be >= 1")
        if not os.path.exists(_SYSTEM_ALSA_CONF):
            raise DeviceError(f"{_SYSTEM_ALSA_CONF} not found: install libasound2 / alsa-utils")
        self.name = name
        self.samplerate = int(samplerate)
        self.dtype = dtype
        self.chunk_frames = int(chunk_frames)
        self.channels = int(channels)  # every channel carries the same audio
        self.settle_s = float(settle_s)
        self.noise_dbfs = noise_dbfs
        self._rng = np.random.default_rng(seed)
        self._workdir_arg = workdir
        self._dir: Path | None = None
        self._queue: queue.Queue[np.ndarray] = queue.Queue()
        self._pending = np.zeros(0, dtype=np.float32)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_env: str | None = None
        self._lock = threading.Lock()
        self.connections = 0          # times a reader opened the FIFO
        self.frames_written = 0       # all frames (silence included)
        self.audio_frames_played = 0  # frames of queued audio written
        self._queued_frames = 0

    # -- paths and environment ---------------------------------------------------
    @property
    def fifo(self) -> Path:
        return self._require_dir() / "mic.fifo"

    @property
    def config_path(self) -> Path:
        return self._require_dir() / "asound.conf"

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus ALSA_CONFIG_PATH pointing at our config (for subprocesses)."""
        e = dict(os.environ)
        e["ALSA_CONFIG_PATH"] = str(self.config_path)
        return e

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise DeviceError("virtual microphone is not started (use it as a context manager)")
        return self._dir

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> "VirtualMicrophone":
        base = self._workdir_arg
        self._dir = Path(tempfile.mkdtemp(prefix="edgeprop-vmic-", dir=base))
        os.mkfifo(self.fifo)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(alsa_config_text(self.name, self.fifo))
        os.replace(tmp, self.config_path)
        self._stop.clear()
        self._thread = threading.Thread(target=self._writer, name="vmic-writer", daemon=True)
        self._thread.start()
        self._saved_env = os.environ.get("ALSA_CONFIG_PATH")
        os.environ["ALSA_CONFIG_PATH"] = str(self.config_path)
        _reinit_portaudio()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._saved_env is None:
            os.environ.pop("ALSA_CONFIG_PATH", None)
        else:
            os.environ["ALSA_CONFIG_PATH"] = self._saved_env
        _reinit_portaudio()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "VirtualMicrophone":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- audio in --------------------------------------------------------------------
    def play(self, audio: np.ndarray) -> None:
        """Queue mono float audio (samples in [-1, 1], at `samplerate`) to be spoken."""
        a = np.asarray(audio, dtype=np.float32)
        if a.ndim != 1:
            raise AudioError(f"virtual microphone plays mono audio, got shape {a.shape}")
        if not np.all(np.isfinite(a)):
            raise AudioError("audio contains NaN or inf")
        with self._lock:
            self._queued_frames += a.size
        self._queue.put(np.clip(a, -1.0, 1.0))

    def play_file(self, path: str | os.PathLike, gap_s: float = 0.0) -> None:
        """Queue a WAV file (resampled to `samplerate` by edgeprop.audio.load_wav)."""
        from edgeprop.audio import load_wav

        x = load_wav(path, self.samplerate)
        self.play(np.asarray(x, dtype=np.float32).reshape(-1))
        if gap_s > 0:
            self.play(np.zeros(int(gap_s * self.samplerate), dtype=np.float32))

    @property
    def queued_frames_left(self) -> int:
        with self._lock:
            return self._queued_frames - self.audio_frames_played

    def wait_played(self, timeout: float) -> bool:
        """Block until all queued audio has been written to the FIFO (or timeout)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.queued_frames_left <= 0:
                return True
            time.sleep(0.02)
        return self.queued_frames_left <= 0

    # -- the writer thread ---------------------------------------------------------------
    def _silence(self, n: int) -> np.ndarray:
        if self.noise_dbfs is None:
            return np.zeros(n, dtype=np.float32)
        amp = 10.0 ** (self.noise_dbfs / 20.0)
        return (amp * self._rng.standard_normal(n)).astype(np.float32)

    def _next_chunk(self, allow_audio: bool) -> np.ndarray:
        n = self.chunk_frames
        out = self._silence(n)
        if not allow_audio:
            return out
        filled = 0
        while filled < n:
            if self._pending.size == 0:
                try:
                    self._pending = self._queue.get_nowait()
                except queue.Empty:
                    break
            take = min(n - filled, self._pending.size)
            out[filled:filled + take] = self._pending[:take]
            self._pending = self._pending[take:]
            filled += take
        with self._lock:
            self.audio_frames_played += filled
        return out

    def _encode(self, x: np.ndarray) -> bytes:
        x = np.repeat(x, self.channels)  # interleaved frames: the sample once per channel
        if self.dtype == "int16":
            return np.round(x * 32767.0).astype("<i2").tobytes()
        return x.astype("<f4").tobytes()

    def _open_writer(self) -> int | None:
        """Open the FIFO for writing once a reader has it open; None when stopping."""
        while not self._stop.is_set():
            try:
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
            time.sleep(0.005)
        return None

    def _write_all(self, fd: int, data: bytes) -> bool:
        """Write every byte (waiting while the pipe is full); False if the reader left."""
        view = memoryview(data)
        while view and not self._stop.is_set():
            _, ready, _ = select.select([], [fd], [], 0.05)
            if not ready:
                continue
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return False
            view = view[n:]
        return True

    def _writer(self) -> None:
        chunk_s = self.chunk_frames / self.samplerate
        while not self._stop.is_set():
            fd = self._open_writer()
            if fd is None:
                return
            self.connections += 1
            t0 = time.monotonic()
            k = 0
            try:
                while not self._stop.is_set():
                    settled = k * chunk_s >= self.settle_s
                    chunk = self._next_chunk(allow_audio=settled)
                    if not self._write_all(fd, self._encode(chunk)):
                        # the reader left: queued audio in this chunk is lost only if it
                        # was a real stream that stopped, never during a listing probe
                        break
                    self.frames_written += self.chunk_frames
                    k += 1
                    delay = t0 + k * chunk_s - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
            finally:
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.virtual_mic FILE...`: speak WAV files into a virtual microphone,
    then keep it open (silence) until Ctrl-C or SIGTERM: a reader still recording when the
    device vanished would see end-of-file and spin (see the module docstring)."""
    import argparse
    import signal

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="WAV files to play, in order")
    p.add_argument("--gap", type=float, default=1.0, help="seconds of silence between files")
    p.add_argument("--dtype", default="float32", choices=["int16", "float32"],
                   help="the reader's sample format (MicrophoneSource: float32)")
    p.add_argument("--rate", type=int, default=16000,
                   help="the device's sample rate, Hz (default 16000; e.g. 48000 to try a "
                        "microphone that the readers resample)")
    a = p.parse_args(argv)
    if a.rate < 100:
        p.error(f"--rate {a.rate}: a sample rate in Hz, e.g. 16000 or 48000")
    with VirtualMicrophone(dtype=a.dtype, samplerate=a.rate) as vm:
        print(f"export ALSA_CONFIG_PATH={vm.config_path}  # device: {vm.name}", flush=True)
        print(f"# the files play once something records from {vm.name}, e.g. in another "
              f"shell: edgeprop demo live --device {vm.name}", file=sys.stderr, flush=True)
        for f in a.files:
            vm.play_file(f, gap_s=a.gap)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):  # either way the FIFO folder goes
            signal.signal(sig, lambda *_: stop.set())
        played = False
        while not stop.wait(0.5):
            if not played and vm.wait_played(timeout=0):
                played = True
                print(f"# played {len(a.files)} file(s); {vm.name} stays open (silence) "
                      "until Ctrl-C", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
