"""`edgeprop bench detector`: keyword accuracy and false alarms of streaming detection.

A clip classifier is scored on 1 s clips with the network reset; the live demo and
`edgeprop run` see a continuous stream instead, and what the user meets is the detector
(runtime/detection.py) reading the network's running readout. This measures that, on
streams built as `edgeprop run` builds them (runtime/stream.py: voiced part of each
clip, 0.3-0.8 s gaps, kitchen noise under everything) from clips of the speakers the
model was **not** pretrained on (its recorded speaker split; all speakers when the
checkpoint records none for this folder):

- per `--holds` value, with the other detector settings as given: keyword accuracy,
  false alarms (per stream and in total) and the median detection delay after the
  word's end, all from `score_detections`, as `edgeprop run` scores; the top-level
  `accuracy`, `false_alarms_per_stream` and `median_delay_ms` are those at `--hold`
  (default: the detector's default), which is always among them, and
  `false_alarm_kinds` splits its false alarms by where they fell (score_detections);
- each of them with and without the pause resets (edgeprop.pauses: a frontend flags
  the frame that ends a pause and the learner zeroes the stream's state after it);
  the top-level numbers are with them, as a frontend node sends, and
  `*_without_pause_reset` without;
- `pauses`, and `words_with_a_pause_inside`: utterances whose voiced part holds a pause
  flag (a quiet stretch inside the word, where the reset cuts the word in two);
- `oracle_window_accuracy`: the argmax of the readout (without pause resets) averaged
  over the 1 s centred on each utterance, the ceiling of any detector reading that
  readout with the words' times known.

The readout is the learner's, frame by frame: the checkpoint's frontend and encoder
(runtime.regress.encode_stream, batch == stream), one `edgeprop.network.step` per
encoder sub-step with the weights a learner of `--backend` infers with (the emulator's
int8 copy by default), no learning. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from edgeprop.errors import DatasetError
from runtime.arg_types import folder, nonneg_float, nonneg_int, pos_int
from runtime.backends import BACKENDS, make_backend
from runtime.console import add_output_flags, print_json, progress, say
from runtime.detection import (
    DEFAULT_IGNORE,
    MAX_DETECTOR_FRAMES,
    DetectorConfig,
    add_detector_arguments,
)


def _holds(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated frame counts, e.g. "
                                         f"1,10,20") from None
    if not out or min(out) < 1 or max(out) > MAX_DETECTOR_FRAMES:
        raise argparse.ArgumentTypeError(f"{text!r}: every hold must be 1-"
                                         f"{MAX_DETECTOR_FRAMES} frames")
    return sorted(set(out))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint (default: the shipped model)")
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder (default ../shared/data/speech_commands_dev)")
    parser.add_argument("--backend", choices=BACKENDS, default="emulator",
                        help="whose inference weights (default emulator: its int8 copy)")
    parser.add_argument("--streams", type=pos_int, default=10, help="streams (default 10)")
    parser.add_argument("--clips-per-stream", type=pos_int, default=40,
                        help="clips per stream (default 40)")
    parser.add_argument("--holds", type=_holds, default=_holds("1,10,20,30,40"),
                        help="hold values to compare, frames (default 1,10,20,30,40; "
                             "--hold is always among them)")
    parser.add_argument("--noise-gain", type=nonneg_float, default=0.1,
                        help="background noise under the streams (default 0.1, as run)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="clip draw and gaps")
    add_detector_arguments(parser)
    add_output_flags(parser)


def _clips(ckpt, data: Path):
    """Non-silence clips of the speakers the checkpoint was not pretrained on."""
    from edgeprop.evaluation import scan_for_model
    from runtime.personalization import pretraining_speakers

    every = scan_for_model(data, ckpt)
    seen = pretraining_speakers(ckpt, every)  # recomputed from all clips, silence included
    clips = [c for c in every if c.label != "_silence_"]
    if seen is None:
        return clips, "all (the checkpoint records no pretraining split of this folder)"
    return [c for c in clips if c.speaker not in seen], "not seen in pretraining"


def _readout(cfg, params, frames: np.ndarray, pauses: np.ndarray) -> np.ndarray:
    """(T, substeps, n_in) frames -> (T, n_out) readout, frame by frame as the learner
    steps a stream (`step_frame`: the state is zeroed after a frame that ends a pause)."""
    from edgeprop.network import init_state
    from runtime.learner_node import step_frame

    state = init_state(cfg)
    ys = np.empty((len(frames), cfg.n_out), np.float64)
    for i, rows in enumerate(frames):
        state, ys[i] = step_frame(cfg, params, state, rows, bool(pauses[i]))
    return ys


def _oracle_hits(ys: np.ndarray, events, hop_s: float) -> int:
    half = int(round(0.5 / hop_s))
    hits = 0
    for e in events:
        c = int(round((e.t_start + e.t_end) / 2 / hop_s))
        hits += int(np.argmax(ys[max(0, c - half):c + half].mean(axis=0)) == e.label_index)
    return hits


def _words_with_a_pause_inside(events, pauses: np.ndarray, hop_s: float) -> int:
    t = (np.flatnonzero(pauses) + 1) * hop_s  # the end of each flagged frame
    return sum(bool(np.any((t > e.t_start) & (t < e.t_end))) for e in events)


def run(args: argparse.Namespace) -> int:
    from edgeprop.checkpoint import load_checkpoint, params_hash
    from edgeprop.datasets import require_data_dir
    from edgeprop.evaluation import checkpoint_frontend, model_labels
    from edgeprop.shipped import SHIPPED_MODEL, load_shipped
    from runtime.detection import Detector, Event, score_detections
    from runtime.regress import encode_stream
    from runtime.stream import ClipRef, build_stream

    base = {"window": args.window, "threshold": args.threshold, "refractory": args.refractory}
    configs = {h: DetectorConfig(**base, hold=h) for h in sorted({*args.holds, args.hold})}
    ckpt = load_checkpoint(args.model) if args.model is not None else load_shipped()
    data = require_data_dir(args.data)
    labels = list(model_labels(ckpt))
    keywords = [lb for lb in labels if lb not in DEFAULT_IGNORE]
    pool, who = _clips(ckpt, data)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pool))
    if not any(c.label in keywords for c in pool):  # accuracy would divide by zero
        raise DatasetError(f"{data}: no keyword clips ({', '.join(keywords)}) of speakers "
                           f"{who}; the accuracy needs some")
    n_streams = min(args.streams, len(pool) // args.clips_per_stream)
    if n_streams == 0:
        raise DatasetError(f"{data}: only {len(pool)} clips of speakers {who}; one stream "
                           f"needs {args.clips_per_stream} (--clips-per-stream)")
    if n_streams < args.streams:  # not silently fewer than asked
        say(f"bench detector: only {len(pool)} clips of speakers {who}: {n_streams} of the "
            f"{args.streams} streams asked for (--streams) of {args.clips_per_stream} clips")
    backend = make_backend(args.backend, ckpt.cfg, ckpt.params.copy())
    params = backend.params  # what a learner of this backend infers with (no learning)
    backend.close()
    fcfg = checkpoint_frontend(ckpt)  # a clear error when the checkpoint has none
    hop_s = fcfg.hop / fcfg.sample_rate
    variants = [(h, pr) for pr in (True, False) for h in configs]  # pr: pause reset
    totals = {v: {"detected": 0, "false_alarms": 0, "delays": [], "kinds": Counter()}
              for v in variants}
    n_kw = n_events = oracle = n_pauses = n_cut = 0
    with progress("streams", n_streams, args.quiet) as adv:
        for s in range(n_streams):
            pick = order[s * args.clips_per_stream:(s + 1) * args.clips_per_stream]
            refs = [ClipRef(pool[i].path, pool[i].label, str(pool[i].path)) for i in pick]
            stream = build_stream(refs, noise_gain=args.noise_gain, seed=args.seed * 1000 + s)
            frames, _, _, pauses = encode_stream(stream.audio, [], ckpt)
            ys = {pr: _readout(ckpt.cfg, params, frames, pauses if pr else np.zeros_like(pauses))
                  for pr in (True, False)}
            events = [Event(e.t_start, e.t_end, e.label) for e in stream.events]
            oracle += _oracle_hits(ys[False], stream.events, hop_s)
            n_events += len(events)
            n_pauses += int(pauses.sum())
            n_cut += _words_with_a_pause_inside(stream.events, pauses, hop_s)
            for h, pr in variants:
                _, hits = Detector(labels, configs[h]).run(ys[pr], hop_s=hop_s)
                sc = score_detections(events, [(x.t, x.label) for x in hits], keywords)
                totals[h, pr]["detected"] += sc["detected"]
                totals[h, pr]["false_alarms"] += sc["false_alarms"]
                totals[h, pr]["delays"] += sc["delays_s"]
                totals[h, pr]["kinds"].update(sc["false_alarm_kinds"])
            n_kw += sc["keyword_utterances"]
            adv()
    if n_kw == 0:  # the draw held no keyword (a folder with very few of them)
        raise DatasetError(f"{data}: the {n_streams} streams drawn hold no keyword clip; "
                           "use a folder with more keyword clips, or more --streams")
    by_hold = [{"hold": h, "pause_reset": pr, "accuracy": t["detected"] / n_kw,
                "detected": t["detected"],
                "false_alarms": t["false_alarms"],
                "false_alarms_per_stream": t["false_alarms"] / n_streams,
                "median_delay_ms": round(1000 * float(np.median(t["delays"])), 1)
                if t["delays"] else None}
               for (h, pr), t in totals.items()]
    chosen = next(r for r in by_hold if r["hold"] == args.hold and r["pause_reset"])
    unpaused = next(r for r in by_hold if r["hold"] == args.hold and not r["pause_reset"])
    for r in by_hold:
        delay = "-" if r["median_delay_ms"] is None else f"{r['median_delay_ms']:.0f}"
        say(f"{'pause reset' if r['pause_reset'] else 'no reset   '}, "
            f"hold {r['hold']:3d} frames: accuracy {r['accuracy']:.1%} "
            f"({r['detected']}/{n_kw}), {r['false_alarms']} false alarms, median delay "
            f"{delay} ms after the word")
    kinds = totals[args.hold, True]["kinds"]
    say(f"false alarms at hold {args.hold} with pause resets: "
        + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in kinds.items()))
    say(f"{n_streams} streams of {args.clips_per_stream} clips of speakers {who}; "
        f"oracle 1 s window accuracy {oracle / n_events:.1%} of {n_events} utterances; "
        f"{n_pauses} pauses; {n_cut} utterances with one inside the word")
    if args.json:
        print_json({
            "model": str(args.model or SHIPPED_MODEL), "params_hash": params_hash(ckpt.params),
            "backend": args.backend, "data": str(data), "speakers": who,
            "streams": n_streams, "clips_per_stream": args.clips_per_stream,
            "noise_gain": args.noise_gain, "seed": args.seed, "keyword_utterances": n_kw,
            "utterances": n_events, "oracle_window_accuracy": oracle / n_events,
            "detector": {**base, "hold": args.hold},
            "pauses": n_pauses, "words_with_a_pause_inside": n_cut,
            "accuracy": chosen["accuracy"],
            "false_alarms_per_stream": chosen["false_alarms_per_stream"],
            "false_alarm_kinds": dict(kinds),
            "median_delay_ms": chosen["median_delay_ms"],
            "accuracy_without_pause_reset": unpaused["accuracy"],
            "false_alarms_per_stream_without_pause_reset":
                unpaused["false_alarms_per_stream"],
            "by_hold": by_hold})
    return 0
