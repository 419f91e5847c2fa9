"""`edgeprop run`: the main job, on an embedded default.

Starts a learner node (a subprocess, real sockets on loopback) and a frontend node,
builds a continuous stream from the real clips shipped in runtime/assets/clips (gaps
and background noise between them), streams it through the shipped model with online
learning on (each utterance's label rides along with its frames), prints the
detections and a summary, and exits 0. Works on a fresh install with no ../shared.

Numbers (`--json`):
  frames            frames sent, all streams
  dropped           frames lost: frontend drops (live mode) + learner-side seq gaps
  detections        detections fired (stream 0's list is printed)
  accuracy          stream 0: keyword utterances detected with the right label within
                    [onset, offset + 0.5 s], over all keyword utterances (_unknown_ words
                    are not targets); false_alarms: every other detection
  latency_p50_ms / latency_p99_ms
                    per frame, from the audio block entering the frontend (time stamp
                    before feature extraction) to its posterior arriving back
  realtime_factor   audio seconds streamed (all streams) / (frontend compute + learner
                    busy time): how many times faster than real time the pipeline
                    computes (> 1 keeps up), as in `bench eprop` and `profile`
  achieved_speed    audio seconds per wall second the sender kept up (x real time);
                    below 0.9 x --speed it fell behind the pacing, and run says so
  load              learner busy time / wall time: the share of one core it needed
  latency_histogram_ms
                    {edges, counts}: per-frame latencies binned at fixed edges (ms)
With --streams N > 1, the N streams replay the same audio; features are computed once
and the spike frames are sent paced per stream (latency then starts at the send).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgeprop.errors import CheckpointError, EdgepropError
from runtime.arg_types import (
    folder,
    int_range,
    learning_rate,
    nonneg_float,
    nonneg_int,
    pos_int,
)
from runtime.console import add_output_flags, print_json, say
from runtime.detection import add_detector_arguments, detector_flags, detector_settings
from runtime.protocol import MAX_BATCH

MAX_STREAMS = 64  # each stream is a frontend node with its own socket and thread
# Fixed edges (ms) so histograms from different runs line up in docs/BENCHMARKS.md;
# latencies above the last edge are counted in the last bin.
LATENCY_EDGES_MS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0,
                    100.0)


def _histogram(lat_ms: np.ndarray) -> dict:
    """Per-frame latency counts between LATENCY_EDGES_MS (overflow in the last bin)."""
    edges = np.asarray(LATENCY_EDGES_MS)
    counts, _ = np.histogram(np.clip(lat_ms, 0.0, edges[-1]), bins=edges)
    return {"edges": list(LATENCY_EDGES_MS), "counts": counts.tolist()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--backend", choices=("emulator", "reference"), default="emulator")
    parser.add_argument("--clips", type=folder,
                        help="a Speech Commands folder to take clips from instead of the "
                             "embedded ones")
    parser.add_argument("--per-label", type=pos_int, default=3, help="clips per label with --clips")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="stream order and gaps")
    parser.add_argument("--noise-gain", type=nonneg_float, default=0.1,
                        help="background noise level under the stream (0: none)")
    parser.add_argument("--speed", type=nonneg_float, default=2.0,
                        help="pacing: x real time (1 = live rate); 0 = as fast as possible")
    parser.add_argument("--streams", type=int_range(1, MAX_STREAMS), default=1,
                        help=f"concurrent streams, 1-{MAX_STREAMS}")
    parser.add_argument("--seconds", type=nonneg_float, default=0.0,
                        help="stream only the first S seconds (0: all of it)")
    parser.add_argument("--batch", type=int_range(1, MAX_BATCH), default=1,
                        help=f"frames per message (10 ms each), 1-{MAX_BATCH}")
    parser.add_argument("--no-learning", action="store_true")
    parser.add_argument("--no-pause-reset", action="store_true",
                        help="do not flag pauses: the network state is never zeroed in the "
                             "stream (the rule before 2026-12-03)")
    parser.add_argument("--lr", type=learning_rate, default=1e-4,
                        help="online learning rate (Adam)")
    parser.add_argument("--late-updates", choices=("wait", "defer"), default="wait",
                        help="an update not learned by its switch point: wait for it "
                             "(deterministic) or use it when ready (real time under load)")
    parser.add_argument("--apply-delay", type=int, default=100,
                        help="frames until a learned update is used (0: learn inline)")
    add_detector_arguments(parser)
    parser.add_argument("--inprocess", action="store_true",
                        help="learner in a thread of this process (still over loopback TCP)")
    parser.add_argument("--mode", choices=("replay", "live"), default="replay",
                        help="replay: lossless with backpressure; live: drop oldest")
    add_output_flags(parser)


def _fallback_model(stream) -> object:
    """No shipped model: an untrained one with a frontend normalised on the stream."""
    from edgeprop.checkpoint import Checkpoint
    from edgeprop.encoders import make_encoder
    from edgeprop.frontend import FrontendConfig, features
    from edgeprop.network import KWS_LABELS, ModelConfig, init_params

    fe = FrontendConfig()
    f = features(stream.audio, fe)
    fe = fe.with_normalization(f.mean(axis=0), np.maximum(f.std(axis=0), 1e-3))
    cfg = ModelConfig()
    return Checkpoint(cfg, init_params(cfg, 0), frontend=fe.to_dict(),
                      encoder=make_encoder("current", fe.n_features).to_dict(),
                      labels=list(KWS_LABELS), extra={"note": "untrained fallback"})


def _load(args: argparse.Namespace, stream) -> tuple[object, str]:
    from runtime.learner_node import load_model

    if args.model:
        return load_model(args.model), args.model
    try:
        from edgeprop.shipped import SHIPPED_MODEL

        return load_model(None), str(SHIPPED_MODEL)
    except CheckpointError as exc:
        say(f"edgeprop run: {exc}")
        say("edgeprop run: FALLING BACK to an UNTRAINED model (random weights): the pipeline "
            "runs, but detections are meaningless until `edgeprop pretrain` ships a model")
        return _fallback_model(stream), "untrained-fallback"


class _Learner:
    """The learner, as a subprocess (default) or a thread; endpoints after start()."""

    def __init__(self, args: argparse.Namespace, ckpt, tmp: Path):
        self.args, self.ckpt, self.tmp = args, ckpt, tmp
        self.proc: subprocess.Popen | None = None
        self.node = None

    def start(self) -> dict:
        a = self.args
        if a.inprocess:
            from runtime.learner_node import LearnerCore, LearnerNode

            core = LearnerCore(self.ckpt, backend=a.backend, lr=a.lr, learning=not a.no_learning,
                               apply_delay=a.apply_delay, late_updates=a.late_updates,
                               detector=detector_settings(a))
            self.node = LearnerNode(core, bind="tcp://127.0.0.1:*",
                                    control_bind="tcp://127.0.0.1:*")
            self.node.start()
            return dict(self.node.endpoints)
        from edgeprop.checkpoint import save_checkpoint

        c = self.ckpt
        if c.path is not None:  # the file itself, so the learner's messages name it
            model = Path(c.path)
        else:
            model = self.tmp / "model.ckpt"
            save_checkpoint(model, c.cfg, c.params, optimizer_state=c.optimizer_state,
                            frontend=c.frontend, encoder=c.encoder, labels=c.labels,
                            extra=c.extra)
        ready = self.tmp / "ready.json"
        cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model", str(model),
               "--backend", a.backend, "--bind", "tcp://127.0.0.1:*",
               "--control", "tcp://127.0.0.1:*", "--ready-file", str(ready),
               "--lr", str(a.lr), *detector_flags(a), "--log-level", "WARNING",
               "--apply-delay", str(a.apply_delay), "--late-updates", a.late_updates]
        if a.no_learning:
            cmd.append("--no-learning")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None:
                raise EdgepropError(f"the learner subprocess exited ({self.proc.returncode}) "
                                    "before it was ready; see its messages above")
            if time.monotonic() > deadline:
                raise EdgepropError("the learner subprocess did not come up in 120 s")
            time.sleep(0.05)
        return json.loads(ready.read_text())

    def control(self, endpoint: str, cmd: str, **kw) -> dict:
        import zmq

        from runtime import protocol as P

        ctx = zmq.Context.instance()
        control_req = ctx.socket(zmq.REQ)
        control_req.setsockopt(zmq.LINGER, 0)
        control_req.setsockopt(zmq.RCVTIMEO, 20000)
        control_req.connect(endpoint)
        try:
            control_req.send(P.encode(P.ControlRequest(cmd, args=kw)))
            rep = P.decode(control_req.recv(), max_bytes=1 << 24)
        finally:
            control_req.close(0)
        if not isinstance(rep, P.ControlReply) or not rep.ok:
            raise EdgepropError(f"learner control {cmd} failed: {getattr(rep, 'error', rep)}")
        return rep.result

    def stop(self, endpoint: str | None) -> None:
        if self.node is not None:
            self.node.stop()
            self.node.core.close()
            return
        if self.proc is not None and self.proc.poll() is None:
            try:
                if endpoint:
                    self.control(endpoint, "shutdown")
                self.proc.wait(20)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


def run(args: argparse.Namespace) -> int:
    from edgeprop.encoders import encoder_from_dict
    from edgeprop.frontend import FrontendConfig, StreamingFrontend
    from edgeprop.pauses import PauseDetector
    from runtime import protocol as P
    from runtime.detection import Event, score_detections
    from runtime.frontend_node import FrontendNode
    from runtime.learner_node import Model
    from runtime.stream import build_stream, embedded_clips, folder_clips, truncate

    clips = folder_clips(args.clips, args.per_label, args.seed) if args.clips \
        else embedded_clips()
    stream = build_stream(clips, seed=args.seed, noise_gain=args.noise_gain)
    if args.seconds > 0:
        stream = truncate(stream, args.seconds)
    ckpt, model_name = _load(args, stream)
    model = Model.from_checkpoint(ckpt)  # the learner's reading of it: same defaults
    fe = FrontendConfig.from_dict(model.frontend)
    if fe.sample_rate != stream.sample_rate:
        raise EdgepropError(f"model frontend expects {fe.sample_rate} Hz, clips are "
                            f"{stream.sample_rate} Hz")
    labels = model.labels
    lab, win = stream.frame_labels(fe.hop)
    say(f"edgeprop run: {len(stream.events)} clips, {stream.duration_s:.1f} s stream, model "
        f"{Path(model_name).name}, {args.backend} backend, {args.streams} stream(s), speed "
        f"{'max' if args.speed <= 0 else f'{args.speed:g}x'}, learning "
        f"{'off' if args.no_learning else 'on'}")
    tmp = Path(tempfile.mkdtemp(prefix="edgeprop-run-"))
    learner = _Learner(args, ckpt, tmp)
    endpoints: dict = {}
    nodes: list[FrontendNode] = []
    try:
        t_up = time.perf_counter()
        endpoints = learner.start()
        say(f"edgeprop run: learner up in {time.perf_counter() - t_up:.1f} s at "
            f"{endpoints['data_router']}")
        before = learner.control(endpoints["control_rep"], "stats")
        for i in range(args.streams):
            node = FrontendNode(endpoints["data_router"], fe, encoder_from_dict(model.encoder),
                                stream=f"s{i}", mode=args.mode, batch=args.batch,
                                pause_reset=not args.no_pause_reset)
            node.keep_posteriors = False
            node.start()
            nodes.append(node)
        pre = None
        if args.streams > 1:  # features once; every stream sends the same spike frames
            sf, enc = StreamingFrontend(fe), encoder_from_dict(model.encoder)
            feats = sf.push(stream.audio)
            pre = np.stack([enc.step(f) for f in feats])
            if enc.name != "current":
                pre = pre.astype(np.uint8)
            pre_pauses = (np.zeros(len(feats), bool) if args.no_pause_reset
                          else PauseDetector(fe).run(feats))
        hop = fe.hop
        block = hop * args.batch
        n_blocks = len(stream.audio) // block
        fe_busy = 0.0
        t0 = time.perf_counter()
        for k in range(n_blocks):
            if args.speed > 0:
                due = t0 + k * (block / fe.sample_rate) / args.speed
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            sl = slice(k * args.batch, (k + 1) * args.batch)
            if pre is None:
                tb = time.perf_counter()
                frames_lab = lab[sl]
                # one block = `batch` frames; labels are per frame, so feed frame by frame
                for j, f0 in enumerate(range(k * block, (k + 1) * block, hop)):
                    nodes[0].feed(stream.audio[f0:f0 + hop], label=int(frames_lab[j]),
                                  window=int(win[sl][j]))
                fe_busy += time.perf_counter() - tb
            else:
                for node in nodes:
                    node.send_spikes(pre[sl], labels=[int(x) for x in lab[sl]],
                                     windows=[int(x) for x in win[sl]],
                                     pauses=P.pause_flags(pre_pauses[sl]))
        sent_s = time.perf_counter() - t0
        results = [node.finish(timeout_s=120) for node in nodes]
        wall = time.perf_counter() - t0
        after = learner.control(endpoints["control_rep"], "stats")
    finally:
        for node in nodes:
            node.close()
        learner.stop(endpoints.get("control_rep"))
        shutil.rmtree(tmp, ignore_errors=True)  # the learner's model copy, even on failure
    events = [Event(e.t_start, e.t_end, e.label) for e in stream.events]
    keywords = [lb for lb in labels if lb not in ("_silence_", "_unknown_")]
    scores = [score_detections(events, [(d.t, d.label) for d in n.detections], keywords)
              for n in nodes]
    lat = np.concatenate([np.asarray(n.latencies_ns, np.float64) for n in nodes]) / 1e6
    audio_s = stream.duration_s * args.streams
    learner_busy = after["busy_s"] - before["busy_s"]
    counts = after["counts"]
    _print_detections(nodes[0].detections, stream.events)
    out = {
        "model": model_name, "backend": args.backend, "streams": args.streams,
        "speed": args.speed, "mode": args.mode, "learning": not args.no_learning,
        "audio_s": round(stream.duration_s, 3), "wall_s": round(wall, 3),
        "frames": int(sum(n.frames_made for n in nodes)),
        "dropped": int(sum(n.dropped for n in nodes) + counts.get("frames_missing", 0)),
        "detections": int(sum(len(n.detections) for n in nodes)),
        "accuracy": scores[0]["accuracy"], "false_alarms": scores[0]["false_alarms"],
        "false_alarm_kinds": scores[0]["false_alarm_kinds"],
        "keyword_utterances": scores[0]["keyword_utterances"],
        "detected": scores[0]["detected"],
        "median_delay_s": scores[0]["median_delay_s"],
        "accuracy_mean_streams": float(np.mean([s["accuracy"] for s in scores])),
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "latency_max_ms": float(lat.max()) if lat.size else None,
        "latency_histogram_ms": _histogram(lat),
        "realtime_factor": audio_s / max(fe_busy + learner_busy, 1e-9),
        "achieved_speed": round(n_blocks * block / fe.sample_rate / max(sent_s, 1e-9), 2),
        "learner_busy_s": learner_busy,
        "learner_swap_wait_s": after.get("swap_wait_s", 0.0) - before.get("swap_wait_s", 0.0),
        "updates_deferred": counts.get("updates_deferred", 0),
        "windows_skipped": counts.get("windows_skipped", 0),
        "load": learner_busy / wall if wall > 0 else None,
        "updates": after["updates"] - before["updates"],
        "params_hash_before": before["params_hash"], "params_hash_after": after["params_hash"],
        "eos_confirmed": all(r.get("eos_confirmed") for r in results),
        "learner_faults": {k: v for k, v in counts.items() if k in (
            "malformed", "version", "oversized", "shape", "config_mismatch", "seq_gaps",
            "seq_dups", "unknown_stream", "outputs_dropped")},
        "detector": detector_settings(args),
        "pause_reset": not args.no_pause_reset,
        "pause_resets": counts.get("pause_resets", 0),
    }
    lat_txt = (f"latency p50 {out['latency_p50_ms']:.2f} ms, p99 {out['latency_p99_ms']:.2f} ms"
               if lat.size else "no latency samples")
    acc_txt = (f"accuracy {out['accuracy']:.2%} ({out['detected']}/"
               f"{out['keyword_utterances']} keywords, " if out["keyword_utterances"]
               else "no keyword in the stream (")
    say(f"edgeprop run: {out['frames']} frames, {out['dropped']} dropped, "
        f"{out['detections']} detections, {acc_txt}"
        f"{out['false_alarms']} false alarms), {lat_txt}, realtime factor "
        f"x{out['realtime_factor']:.0f}, {out['updates']} online updates")
    if args.speed > 0 and out["achieved_speed"] < 0.9 * args.speed:
        say(f"edgeprop run: warning: the stream was paced at x{args.speed:g} but went out at "
            f"x{out['achieved_speed']:.3g} (the sender fell behind: a busy machine, or too many "
            "streams); latencies include that backlog. Try a lower --speed or fewer --streams")
    if args.json:
        print_json(out)
    return 0


def _print_detections(dets, events) -> None:
    for d in dets:
        truth = next((e for e in events if e.t_start <= d.t <= e.t_end + 0.5), None)
        mark = "ok " if truth is not None and truth.label == d.label else "-- "
        say(f"  {mark}{d.t:7.2f} s  {d.label:<6} p={d.score:.2f}   "
            f"(heard: {truth.label if truth else 'nothing'})")
