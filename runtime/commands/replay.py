"""`edgeprop replay REC`: replay a recording through a checkpoint, deterministically.

Offline (default): every inbound message of the recording (hello, frames with their
labels, control, end-of-stream) goes, in recorded order, through a fresh learner core
loaded from --model (default: the shipped model); no sockets and no clocks, so the
posteriors and the final weights are a pure function of (recording, checkpoint). The
result is compared with the outputs in the recording: `identical` means bitwise-equal
posteriors and the same detections.

With --endpoint the inbound messages are sent, in order, to a running learner instead
(lossless: one DEALER, blocking sends), and its outputs are compared the same way.
"""

from __future__ import annotations

import argparse
import time

from edgeprop.errors import EdgepropError
from runtime.console import add_output_flags, print_json, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", help="file written by `edgeprop record` or serve --record")
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--backend", choices=("emulator", "reference"), default="reference",
                        help="offline replay backend (default reference: the recording's "
                             "learner may have used either; use the same one for identity)")
    parser.add_argument("--no-learning", action="store_true")
    parser.add_argument("--endpoint", help="send to a running learner instead of offline")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--refractory", type=int, default=100)
    parser.add_argument("--save", help="write the weights after the replay to this checkpoint")
    add_output_flags(parser)


def _over_wire(rec, endpoint: str, timeout_s: float = 120.0) -> list:
    import zmq

    from runtime import protocol as P

    ctx = zmq.Context.instance()
    frames_dealer = ctx.socket(zmq.DEALER)
    frames_dealer.setsockopt(zmq.LINGER, 0)
    frames_dealer.setsockopt(zmq.SNDHWM, 100)
    frames_dealer.connect(endpoint)
    outs: list = []
    open_streams: set[str] = set()
    try:
        for e in rec.entries:
            if e.direction != "in":
                continue
            msg = e.message()
            if isinstance(msg, P.Heartbeat):
                continue
            if isinstance(msg, P.Hello):
                open_streams.add(msg.stream)
            frames_dealer.send(e.payload)  # blocking: lossless
            while frames_dealer.poll(0):
                outs.append(P.decode(frames_dealer.recv(), max_bytes=1 << 24))
        deadline = time.monotonic() + timeout_s
        ended: set[str] = set()
        while ended < open_streams and time.monotonic() < deadline:
            if frames_dealer.poll(200):
                m = P.decode(frames_dealer.recv(), max_bytes=1 << 24)
                outs.append(m)
                if isinstance(m, P.EndOfStream):
                    ended.add(m.stream)
        if ended < open_streams:
            raise EdgepropError(f"learner at {endpoint} did not finish the replay in "
                                f"{timeout_s:g} s")
    finally:
        frames_dealer.close(0)
    return outs


def run(args: argparse.Namespace) -> int:
    from edgeprop.checkpoint import params_hash, save_checkpoint
    from runtime.learner_node import load_model
    from runtime.recording import (
        ReplayResult,
        collect_posteriors,
        compare_replay,
        header_for,
        read_recording,
        replay_recording,
    )

    rec = read_recording(args.recording)
    ckpt = load_model(args.model)
    want = rec.learner_params_hash()
    have = header_for(ckpt).params_hash
    if want and want != have:
        say(f"replay: warning: the learner had params {want[:12]} when this stream began, "
            f"this model is {have[:12]}: outputs will differ (replay with a checkpoint of "
            "those weights, e.g. from `control checkpoint` or serve --checkpoint-dir)")
    t0 = time.perf_counter()
    if args.endpoint:
        from runtime import protocol as P

        outs = _over_wire(rec, args.endpoint)
        result = ReplayResult(collect_posteriors(outs),
                              [m for m in outs if isinstance(m, P.Detection)], None, "", outs)
    else:
        result = replay_recording(rec, ckpt, backend=args.backend,
                                  learning=not args.no_learning,
                                  detector={"window": args.window, "threshold": args.threshold,
                                            "refractory": args.refractory})
        if args.save:
            save_checkpoint(args.save, ckpt.cfg, result.params, frontend=ckpt.frontend,
                            encoder=ckpt.encoder, labels=ckpt.labels,
                            extra={"replayed": str(args.recording)})
    cmp = compare_replay(rec, result)
    out = {"recording": str(rec.path), "entries": len(rec.entries),
           "recorded_params_hash": want, "model_params_hash": have,
           "final_params_hash": result.params_hash or None,
           "frames": cmp["frames_compared"], "detections": len(result.detections),
           "max_abs_diff": cmp["max_abs_diff"], "detections_equal": cmp["detections_equal"],
           "identical": cmp["identical"], "wall_s": time.perf_counter() - t0,
           "updates": result.stats.get("updates") if result.stats else None}
    if result.params is not None:
        out["final_params_hash"] = params_hash(result.params)
    say(f"replay: {out['frames']} frames, {out['detections']} detections, max |diff| "
        f"{out['max_abs_diff']:.3g}, {'IDENTICAL' if out['identical'] else 'DIFFERENT'} to "
        f"the recording")
    if args.json:
        print_json(out)
    return 0
