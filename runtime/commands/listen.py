"""`edgeprop listen`: a frontend node from a microphone, a file, a folder or stdin.

    edgeprop listen --list-devices
    edgeprop listen                         default microphone, live mode (drop oldest)
    edgeprop listen --file clip.wav --label yes --realtime
    edgeprop listen --folder clips/ --realtime
    arecord -f S16_LE -r 16000 -c 1 | edgeprop listen --stdin

It connects to a learner (`edgeprop serve`, default tcp://127.0.0.1:5555), says hello
with the model's frontend-config hash and encoder (from --model, default the shipped
model), streams spike frames, and prints detections as they arrive. Mic and stdin run
in live mode (drop the oldest frames when the learner falls behind, counted); file and
folder replay are lossless (backpressure). --quiet prints only errors (and, with
--json, the summary object): no accepted line, detections or summary lines.
"""

from __future__ import annotations

import argparse
import time

from edgeprop.errors import ConfigError, EdgepropError
from runtime.arg_types import (
    connect_endpoint,
    device,
    int_range,
    pos_float,
    sample_rate,
    stream_id,
)
from runtime.console import add_output_flags, print_json, say
from runtime.protocol import MAX_BATCH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--device", type=device,
                     help="input device index or name (default: system default)")
    src.add_argument("--file", help="replay one audio file")
    src.add_argument("--folder", help="replay every .wav/.flac under a folder")
    src.add_argument("--stdin", action="store_true",
                     help="raw mono PCM at 16 kHz on stdin (live mode: for a file piped in, "
                          "add --mode replay, or frames the learner is late for are dropped)")
    parser.add_argument("--list-devices", action="store_true", help="list input devices, exit")
    add_mic_rate_argument(parser)
    parser.add_argument("--stdin-dtype", choices=("int16", "float32"), default=None,
                        help="sample format of --stdin (default int16)")
    parser.add_argument("--realtime", action="store_true",
                        help="pace --file / --folder replay at real time")
    parser.add_argument("--label", help="label of --file (rides along: the learner learns it)")
    parser.add_argument("--endpoint", type=connect_endpoint, default="tcp://127.0.0.1:5555",
                        help="learner/broker")
    parser.add_argument("--model", help="checkpoint whose frontend/encoder to use "
                                        "(default: the shipped model)")
    parser.add_argument("--stream", type=stream_id, default="",
                        help="stream id, at most 128 characters (default: listen-<pid>)")
    parser.add_argument("--mode", choices=("replay", "live"),
                        help="default: live for mic/stdin, replay for file/folder")
    parser.add_argument("--batch", type=int_range(1, MAX_BATCH), default=1,
                        help=f"frames per message, 1-{MAX_BATCH} (default 1)")
    parser.add_argument("--block-ms", type=block_ms, default=10.0,
                        help=f"audio block length in ms, {MIN_BLOCK_MS:g}-{MAX_BLOCK_MS:g} "
                             "(default 10)")
    parser.add_argument("--personal", action="store_true",
                        help="ask for personalised weights for this stream")
    add_output_flags(parser)


MIN_BLOCK_MS = 1000 / 16000  # one sample at 16 kHz: a shorter block holds no sample
MAX_BLOCK_MS = 1000.0  # the microphone's ring buffer holds 2 s: a longer block never fills


def block_ms(text: str) -> float:
    """--block-ms: at least one sample (0 samples per block divided by zero) and at most
    1 s (a block longer than the microphone's buffer waits forever)."""
    value = pos_float(text)
    if not MIN_BLOCK_MS <= value <= MAX_BLOCK_MS:
        raise argparse.ArgumentTypeError(f"{value:g}: must be {MIN_BLOCK_MS:g}-"
                                         f"{MAX_BLOCK_MS:g} ms (one sample to 1 s)")
    return value


def refuse_source_options(args: argparse.Namespace, source: str | None) -> None:
    """Options that only apply to one kind of source would be silently ignored with
    another (`source`: the source flag given, None for the microphone): say so."""
    where = source or "the microphone"
    if args.label is not None and source != "--file":
        why = ("labels each clip by its class folder (yes/, no/ ...)" if source == "--folder"
               else "is not a labelled clip")
        raise ConfigError(f"--label labels the clip of --file, but {where} {why}; "
                          "drop --label")
    if args.realtime and source not in ("--file", "--folder"):
        hint = " (a file piped in: --mode replay reads it losslessly)" if source else ""
        raise ConfigError(f"--realtime paces a --file or --folder replay, but {where} is "
                          f"read as it arrives; drop --realtime{hint}")
    if args.stdin_dtype is not None and source != "--stdin":
        raise ConfigError(f"--stdin-dtype is the sample format of --stdin, but the audio "
                          f"comes from {where}; drop --stdin-dtype")


def add_mic_rate_argument(parser) -> None:
    """--mic-rate of the audio commands: the microphone's capture rate."""
    parser.add_argument("--mic-rate", type=sample_rate, default=None,
                        help="capture the microphone at this rate, Hz, resampled to 16 kHz "
                             "(default: 16 kHz if the device offers it, else the device's "
                             "default rate)")


def refuse_mic_options(args: argparse.Namespace, source: str) -> None:
    """--device and --mic-rate set up a microphone. When the audio comes from `source`
    instead (a file, a folder, stdin) they would be silently ignored: say so."""
    given = [flag for flag, name in (("--device", "device"), ("--mic-rate", "mic_rate"))
             if getattr(args, name, None) is not None]
    if given:
        flags = " and ".join(given)
        verb = "set" if len(given) > 1 else "sets"
        raise ConfigError(f"{flags} {verb} up a microphone, but the audio comes from "
                          f"{source}; drop {flags}")


# what listen and record take that --list-devices (list, then exit) would ignore
AUDIO_FLAGS = (("--file", "file"), ("--folder", "folder"), ("--stdin", "stdin"),
               ("--device", "device"), ("--mic-rate", "mic_rate"), ("--label", "label"),
               ("--realtime", "realtime"), ("--stdin-dtype", "stdin_dtype"))


def refuse_beside_list_devices(args: argparse.Namespace, flags) -> None:
    """--list-devices lists the inputs and exits. An audio source or setting given with
    it (`flags`: (flag, attribute) pairs) would be silently ignored: say so."""
    given = [flag for flag, name in flags if getattr(args, name, None) not in (None, False)]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise ConfigError(f"--list-devices only lists the input devices and exits, so "
                          f"{' and '.join(given)} would be ignored; drop {them}, or "
                          "--list-devices")


def show_input_devices(as_json: bool, none_hint: str) -> int:
    """--list-devices of the audio commands: one line per input device on stderr
    (none_hint if there is none), {"devices": [...]} on stdout with --json. Returns 0."""
    from runtime.sources import capture_settings, list_devices

    devs = list_devices()
    for d in devs:
        d["capture_rate"], d["capture_channels"] = capture_settings(d["index"])
        how = ("16 kHz mono" if (d["capture_rate"], d["capture_channels"]) == (16000, 1)
               else f"{d['capture_rate']} Hz x{d['capture_channels']}, resampled to 16 kHz mono")
        say(f"  {d['index']:>3}  {d['name']}  ({d['channels']} ch, "
            f"{d['default_samplerate']:.0f} Hz; captured as {how})")
    if not devs:
        say(none_hint)
    if as_json:
        print_json({"devices": devs})
    return 0


def _open_source(args: argparse.Namespace, labels: list[str]):
    from runtime import sources

    if args.file:
        label = None
        if args.label is not None:
            if args.label not in labels:
                raise ConfigError(f"unknown label {args.label!r}; labels: {', '.join(labels)}")
            label = labels.index(args.label)
        return sources.FileSource(args.file, args.block_ms, args.realtime, label), "replay"
    if args.folder:
        return sources.FolderSource(args.folder, args.block_ms, args.realtime), "replay"
    if args.stdin:
        import sys

        if sys.stdin is None or sys.stdin.isatty():  # reading a terminal waits for typing
            raise ConfigError("--stdin reads raw PCM piped in, but stdin is a terminal; "
                              "e.g. arecord -f S16_LE -r 16000 -c 1 | edgeprop listen --stdin")
        return sources.StdinSource(dtype=args.stdin_dtype or "int16",
                                   block_ms=args.block_ms), "live"
    return sources.MicrophoneSource(args.device, block_ms=args.block_ms,
                                    capture_rate=args.mic_rate), "live"


def run(args: argparse.Namespace, recorder_path: str | None = None) -> int:
    import os

    if args.list_devices:
        refuse_beside_list_devices(args, AUDIO_FLAGS + (("OUT", "out"),))
        return show_input_devices(
            args.json, "no audio input devices found; replay instead: "
                       "edgeprop listen --file clip.wav")
    source_flag = next((f for f, on in (("--file", args.file), ("--folder", args.folder),
                                        ("--stdin", args.stdin)) if on), None)
    if source_flag is not None:
        refuse_mic_options(args, source_flag)
    refuse_source_options(args, source_flag)
    from edgeprop.encoders import encoder_from_dict
    from edgeprop.frontend import FrontendConfig
    from runtime import protocol as P
    from runtime.frontend_node import FrontendNode
    from runtime.learner_node import Model, load_model

    ckpt = load_model(args.model)
    model = Model.from_checkpoint(ckpt)  # the learner's reading of it: same defaults
    fe = FrontendConfig.from_dict(model.frontend)
    labels = model.labels
    source, default_mode = _open_source(args, labels)
    recorder = None
    if recorder_path:
        from runtime.recording import RecordingWriter, header_for

        recorder = RecordingWriter(recorder_path, header_for(ckpt, note="edgeprop record"))

    verb = "record" if recorder_path else "listen"  # the command the user typed
    tell = (lambda *parts: None) if args.quiet else say

    def show(msg) -> None:
        if isinstance(msg, P.Detection):
            tell(f"  {msg.t:8.2f} s  {msg.label:<8} p={msg.score:.2f}")

    node = FrontendNode(args.endpoint, fe, encoder_from_dict(model.encoder),
                        stream=args.stream or f"{verb}-{os.getpid()}",
                        mode=args.mode or default_mode, batch=args.batch,
                        personal=args.personal, recorder=recorder, on_output=show)
    node.keep_posteriors = False
    t0 = time.perf_counter()
    try:
        reply = node.start()
        tell(f"{verb}: stream {node.stream!r} accepted by {reply.session or 'learner'} "
            f"(params {reply.params_hash[:12]}), {node.mode} mode")
        try:
            for blk in source.blocks():
                node.feed(blk.samples, label=blk.label, window=blk.window, t_in_ns=blk.t_in_ns)
        except KeyboardInterrupt:
            tell(f"{verb}: interrupted; ending the stream")
        stats = node.finish()
        if not stats["eos_confirmed"]:
            raise EdgepropError(f"the learner at {args.endpoint} did not confirm the end of "
                                "the stream (did it stop?): its last outputs are missing")
    except BaseException:
        if recorder is not None:
            recorder.abort()  # a failed session leaves no recording (nor its .part)
        raise
    finally:
        source.close()
        node.close()
        if recorder is not None:
            recorder.close()  # no-op after abort
    if stats["frames_unanswered"]:
        say(f"{verb}: warning: {stats['frames_unanswered']} of {stats['frames_sent']} frames "
            "sent got no posteriors (the learner refused them, dropped its answers or "
            "lost them: did it restart mid-stream? its stats and log say which)")
    stats["wall_s"] = time.perf_counter() - t0
    stats["source_overruns"] = int(getattr(source, "overruns", 0))
    if recorder is not None:
        stats["recording"] = str(recorder.path)
    p50, p99 = stats["latency_p50_ms"], stats["latency_p99_ms"]
    tell(f"{verb}: {stats['frames']} frames, {stats['dropped']} dropped, "
        f"{stats['detections']} detections"
        + (f", latency p50 {p50:.2f} ms p99 {p99:.2f} ms" if p50 is not None else ""))
    if args.json:
        print_json(stats)
    return 0
