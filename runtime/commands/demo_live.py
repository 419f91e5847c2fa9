"""`edgeprop demo live`: live keyword spotting from the microphone, in the terminal.

The real pipeline, in one process: MicrophoneSource (or --replay FILE, paced at real
time as if it were the microphone) -> FrontendNode (features -> encoder -> ZeroMQ over
tcp://127.0.0.1) -> LearnerNode (emulator backend by default) -> posteriors and
detections back. A rich Live panel shows a bar per keyword posterior, the latest
detection, the input level (dBFS) and the dropped-frame count (frames the frontend
dropped drop-oldest + samples the microphone ring overwrote, in 10 ms frames).

    edgeprop demo live                      default input device
    edgeprop demo live --list-devices
    edgeprop demo live --device 3 --seconds 30 --json
    edgeprop demo live --replay clip.wav    a file instead of the microphone
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np

from runtime.arg_types import device, pos_float
from runtime.commands.listen import add_mic_rate_argument, refuse_mic_options
from runtime.console import add_output_flags, print_json, say
from runtime.detection import add_detector_arguments, detector_settings

LEVEL_FLOOR_DBFS = -100.0
CLIP_LEVEL = 0.999  # |sample| at or above this: the input hit full scale
CLIP_WARN_FRACTION = 1e-3  # more clipped samples than this: say so at the end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint (default: the shipped model)")
    parser.add_argument("--device", type=device, default=None,
                        help="input device (index or name)")
    parser.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    add_mic_rate_argument(parser)
    parser.add_argument("--replay", type=Path, default=None,
                        help="feed this audio file as if it were the microphone (real time)")
    parser.add_argument("--seconds", type=pos_float, default=None,
                        help="stop after this many seconds (default: until Ctrl-C, or the "
                             "end of --replay)")
    parser.add_argument("--backend", choices=("emulator", "reference"), default="emulator")
    add_detector_arguments(parser)
    parser.add_argument("--no-ui", action="store_true",
                        help="no live panel; print detections as lines (default when stderr "
                             "is not a terminal)")
    add_output_flags(parser)


def level_dbfs(x: np.ndarray) -> float:
    """RMS level of a block in dB relative to full scale (a full-scale sine is -3 dBFS)."""
    if x.size == 0:
        return LEVEL_FLOOR_DBFS
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return max(LEVEL_FLOOR_DBFS, 20.0 * math.log10(rms)) if rms > 0 else LEVEL_FLOOR_DBFS


class LiveState:
    """What the panel shows; written by the I/O thread and the audio loop, read by the UI."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.lock = threading.Lock()
        self.probs = np.zeros(len(labels), np.float32)
        self.detections: list[dict] = []
        self.level = LEVEL_FLOOR_DBFS
        self.peak_level = LEVEL_FLOOR_DBFS
        self.clipped = 0  # samples at full scale (distorted: features and scores suffer)
        self.samples = 0
        self.frames = 0
        self.posterior_frames = 0

    def on_output(self, msg) -> None:
        from runtime import protocol as P

        with self.lock:
            if isinstance(msg, P.Posteriors) and len(msg.probs):
                self.probs = np.asarray(msg.probs[-1], np.float32)
                self.posterior_frames += len(msg.probs)
            elif isinstance(msg, P.Detection):
                self.detections.append({"t": round(float(msg.t), 3), "label": msg.label,
                                        "score": round(float(msg.score), 4),
                                        "wall": time.monotonic()})


def render(state: LiveState, dropped: int, source_name: str, elapsed: float):
    """The rich renderable: bars, latest detection, level, drops."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    with state.lock:
        probs = state.probs.copy()
        last = state.detections[-1] if state.detections else None
        level = state.level
        clipped = state.clipped
        n_det = len(state.detections)
    table = Table.grid(padding=(0, 1))
    table.add_column(width=10)
    table.add_column(width=42)
    table.add_column(justify="right", width=6)
    for lab, p in zip(state.labels, probs, strict=True):
        n = int(round(float(p) * 40))
        style = "bold green" if last and last["label"] == lab and \
            time.monotonic() - last["wall"] < 1.5 else "cyan"
        table.add_row(lab, Text("█" * n + "·" * (40 - n), style=style), f"{p:.2f}")
    lvl = max(0, min(40, int(round((level + 80.0) / 80.0 * 40))))  # -80..0 dBFS
    det = (f"[bold green]{last['label']}[/] at {last['t']:.2f} s (score {last['score']:.2f})"
           if last else "[dim]none yet[/]")
    info = Text.from_markup(
        f"latest detection: {det}   ({n_det} so far)\n"
        f"input level: {level:6.1f} dBFS  " + "▮" * lvl
        + (f"  [bold red]clipping ({clipped} samples)[/]" if clipped else "") + "\n"
        f"dropped frames: {dropped}   source: {source_name}   {elapsed:5.1f} s")
    return Panel(Group(table, info), title="edgeprop live keyword spotting",
                 subtitle="Ctrl-C to stop")


def replay_rate(path: Path) -> int:
    """The replay file's own sample rate (it is resampled to 16 kHz on loading)."""
    import soundfile as sf

    return int(sf.info(str(path)).samplerate)


def _open_source(args):
    """(source, its name for the panel, the replay file's own rate or None)."""
    from runtime.sources import FileSource, MicrophoneSource

    if args.replay is not None:
        if not args.replay.is_file():
            from edgeprop.errors import AudioError

            what = "a folder, not an audio file" if args.replay.is_dir() else "no such audio file"
            raise AudioError(f"{args.replay}: {what}")
        src = FileSource(args.replay, realtime=True)  # checks and loads it (AudioError)
        name = f"replay {args.replay.name}"
        rate = replay_rate(args.replay)
        if rate != src.sample_rate:  # said, as for a microphone, not done silently
            name += f" ({rate} Hz, resampled to {src.sample_rate // 1000} kHz)"
        return src, name, rate
    src = MicrophoneSource(device=args.device, capture_rate=args.mic_rate)
    name = f"microphone {args.device if args.device is not None else '(default)'}"
    if (src.capture_rate, src.channels) != (src.sample_rate, 1):
        name += f" ({src.capture_rate} Hz x{src.channels}, resampled to 16 kHz mono)"
    return src, name, None


def run(args) -> int:
    from edgeprop.encoders import encoder_from_dict
    from edgeprop.frontend import FrontendConfig
    from runtime.frontend_node import FrontendNode
    from runtime.learner_node import LearnerCore, LearnerNode, load_model

    if args.list_devices:
        from runtime.commands.listen import refuse_beside_list_devices, show_input_devices

        refuse_beside_list_devices(args, (("--replay", "replay"), ("--device", "device"),
                                          ("--mic-rate", "mic_rate"),
                                          ("--seconds", "seconds")))
        return show_input_devices(args.json, "no input devices")
    if args.replay is not None:
        refuse_mic_options(args, f"--replay {args.replay}")

    ckpt = load_model(args.model)
    labels = list(ckpt.labels or [])
    core = LearnerCore(ckpt, backend=args.backend, learning=False,
                       detector=detector_settings(args))
    node = LearnerNode(core, bind="tcp://127.0.0.1:*")
    node.start()
    endpoint = next(iter(node.endpoints.values()))
    fcfg = FrontendConfig.from_dict(ckpt.frontend)
    encoder = encoder_from_dict(ckpt.encoder or {"name": "current", "n_in": ckpt.cfg.n_in})
    state = LiveState(labels or [str(i) for i in range(ckpt.cfg.n_out)])
    front = FrontendNode(endpoint, fcfg, encoder, stream="live", mode="live",
                         on_output=state.on_output)
    source = file_rate = None
    t_start = time.monotonic()
    interrupted = False
    levels: list[float] = []
    try:
        front.start()
        source, source_name, file_rate = _open_source(args)
        ui = not (args.no_ui or args.quiet or not sys.stderr.isatty())
        live = None
        if not ui and not args.quiet:  # the panel shows it; the lines say it once
            say(f"source: {source_name}")
        if ui:
            from rich.console import Console
            from rich.live import Live

            live = Live(render(state, 0, source_name, 0.0), console=Console(stderr=True),
                        refresh_per_second=10, transient=False)
            live.start()
        shown = 0
        next_ui = 0.0
        try:
            for block in source.blocks():
                lvl = level_dbfs(block.samples)
                levels.append(lvl)
                with state.lock:
                    state.level = lvl
                    state.peak_level = max(state.peak_level, lvl)
                    state.clipped += int(np.count_nonzero(np.abs(block.samples) >= CLIP_LEVEL))
                    state.samples += len(block.samples)
                state.frames += front.feed(block.samples, t_in_ns=block.t_in_ns)
                now = time.monotonic()
                elapsed = now - t_start
                dropped = front.dropped + source.overruns // 160
                if live is not None and now >= next_ui:
                    live.update(render(state, dropped, source_name, elapsed))
                    next_ui = now + 0.1
                elif live is None:
                    with state.lock:
                        new = state.detections[shown:]
                        shown = len(state.detections)
                    for d in new:
                        say(f"detected {d['label']} at {d['t']:.2f} s (score {d['score']:.2f})")
                if args.seconds is not None and elapsed >= args.seconds:
                    break
            else:
                if args.replay is not None:  # let the last word finish: 0.5 s of silence
                    for _ in range(50):
                        state.frames += front.feed(np.zeros(160, np.float32))
                        time.sleep(0.01)  # paced like the file: live mode drops a backlog
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if live is not None:
                live.update(render(state, front.dropped + source.overruns // 160, source_name,
                                   time.monotonic() - t_start))
                live.stop()
        stats = front.finish(timeout_s=10.0)
        if live is None:
            with state.lock:
                new = state.detections[shown:]
            for d in new:
                say(f"detected {d['label']} at {d['t']:.2f} s (score {d['score']:.2f})")
    finally:
        if source is not None:
            source.close()
        front.close()
        node.stop()
        core.close()
    overruns = int(getattr(source, "overruns", 0) or 0)
    summary = {
        "source": "replay" if args.replay is not None else "microphone",
        "device": args.device, "replay": str(args.replay) if args.replay else None,
        "backend": args.backend, "seconds": time.monotonic() - t_start,
        "frames": stats.get("frames"), "posterior_frames": state.posterior_frames,
        "dropped_frames": int(stats.get("dropped", 0)) + overruns // 160,
        "frontend_dropped": stats.get("dropped"), "mic_overrun_samples": overruns,
        "mic_status_overflows": int(getattr(source, "status_overflows", 0) or 0),
        "mic_rate": getattr(source, "capture_rate", None),
        "mic_channels": getattr(source, "channels", None),
        "replay_rate": file_rate,
        "latency_p50_ms": stats.get("latency_p50_ms"),
        "latency_p99_ms": stats.get("latency_p99_ms"),
        "level_dbfs_max": max(levels) if levels else None,
        "level_dbfs_median": float(np.median(levels)) if levels else None,
        "clipped_samples": state.clipped,
        "detections": [{k: d[k] for k in ("t", "label", "score")} for d in state.detections],
        "interrupted": interrupted,
        "detector": detector_settings(args),
    }
    if state.clipped > CLIP_WARN_FRACTION * max(state.samples, 1):
        fix = ("the file was recorded too loud" if args.replay is not None
               else "lower the microphone's input gain")
        say(f"note: the input clipped: {state.clipped} of {state.samples} samples at full "
            f"scale ({fix}); distorted audio lowers the scores")
    say(f"{len(state.detections)} detections: "
        + (", ".join(d["label"] for d in state.detections) or "-")
        + f"; dropped frames {summary['dropped_frames']}")
    if args.json:
        print_json(summary)
    return 130 if interrupted else 0
