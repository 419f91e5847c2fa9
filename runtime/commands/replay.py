"""`edgeprop replay REC`: replay a recording through a checkpoint, deterministically.

Offline (default): every inbound message of the recording (hello, frames with their
labels, control, end-of-stream) goes, in recorded order, through a fresh learner core
loaded from --model (default: the shipped model); no sockets and no clocks, so the
posteriors and the final weights are a pure function of (recording, checkpoint). The
result is compared with the outputs in the recording: `identical` means bitwise-equal
posteriors and the same detections.

With --endpoint the inbound messages are sent, in order, to a running learner instead
(lossless: one DEALER, blocking sends), and its outputs are compared the same way; a
learner that does not answer the hello within 10 s is an error, as for `listen`. That
learner keeps its own settings and weights: --backend, --no-learning, --save and the
detector options are refused with --endpoint rather than ignored.

The learner settings (backend, detector, learning, ...) are the recorded learner's
(the header's, completed from the recorded hello_reply), so a replay reproduces what
was recorded; --backend, --no-learning and each of
--window, --threshold, --hold, --refractory replace only the setting it names. A
recording made before the detector had --hold replays with hold 1, the rule it ran.

A recording with no frames or no outputs is an error; one cut short (a killed
recorder's `.part`) is compared over the frames it holds outputs for. A replay that
compares nothing is an error too (exit 2, like every error; DIFFERENT exits 0): a
hello the learner rejects (another model, a damaged hello), or recorded messages it
rejects (damaged, wrong shape) so that no posteriors line up. Posteriors are matched by
stream and seq. Rejected messages are always reported, with the first reason.
"""

from __future__ import annotations

import argparse
import time

from edgeprop.errors import ConfigError, EdgepropError, ProtocolError
from runtime.arg_types import connect_endpoint, new_file
from runtime.console import add_output_flags, print_json, say
from runtime.detection import add_detector_arguments, detector_settings
from runtime.frontend_node import CONNECT_TIMEOUT_S, no_learner_error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recording", help="file written by `edgeprop record` or serve --record")
    parser.add_argument("--model", help="checkpoint (default: the shipped model)")
    parser.add_argument("--backend", choices=("emulator", "reference"), default=None,
                        help="offline replay backend (default: the one the recording's "
                             "learner ran, else reference; another one gives other outputs)")
    parser.add_argument("--no-learning", action="store_true",
                        help="replay without learning (default: as the recording's learner)")
    parser.add_argument("--endpoint", type=connect_endpoint,
                        help="send to a running learner instead of offline")
    # serve's defaults (window 50, ...) would replace the recording's settings although
    # the user did not ask for them: unset options stay None (see _detector)
    add_detector_arguments(parser, default_from="the recording's")
    parser.add_argument("--save", type=new_file,
                        help="write the weights after the replay to this checkpoint")
    add_output_flags(parser)


def _detector(args: argparse.Namespace, recorded: dict) -> dict | None:
    """The recorded detector with the options the user gave put in; None if none given
    (replay_recording then takes the recorded one as it is)."""
    given = {k: v for k, v in detector_settings(args).items() if v is not None}
    return {**(recorded.get("detector") or {}), **given} if given else None


def _offline_only(args: argparse.Namespace) -> None:
    """Refuse the options a running learner (--endpoint) cannot take: its backend,
    learning, detector and weights are its own, so they would be silently ignored."""
    given = [flag for flag, value in (("--backend", args.backend), ("--save", args.save),
                                      ("--no-learning", args.no_learning or None),
                                      *((f"--{k}", v) for k, v in detector_settings(args).items()))
             if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not used with --endpoint (the running learner "
                          "keeps its own settings and weights; ask it for a checkpoint over "
                          "its control socket); leave --endpoint out to replay offline")


def _over_wire(rec, endpoint: str, timeout_s: float = 120.0,
               connect_timeout_s: float = CONNECT_TIMEOUT_S) -> list:
    """Send the recording's inbound messages to a running learner; return its outputs.

    The handshake is `edgeprop listen`'s (FrontendNode.start): the learner must answer
    the first hello within connect_timeout_s, else "no reply from a learner". Without
    it, blocking sends to an endpoint nobody listens on would wait forever.
    """
    import zmq

    from runtime import protocol as P
    from runtime.learner_node import is_replayed_input
    from runtime.recording import check_hello_reply

    ctx = zmq.Context.instance()
    frames_dealer = ctx.socket(zmq.DEALER)
    frames_dealer.setsockopt(zmq.LINGER, 0)
    frames_dealer.setsockopt(zmq.SNDHWM, 100)
    frames_dealer.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # a learner gone mid-way
    frames_dealer.connect(endpoint)
    outs: list = []
    recorded = rec.outputs()
    open_streams: set[str] = set()

    def take(raw: bytes) -> None:
        m = P.decode(raw, max_bytes=1 << 24)
        check_hello_reply(m, recorded, f"learner at {endpoint}")
        outs.append(m)

    try:
        for e in rec.entries:
            if e.direction != "in" or not is_replayed_input(e.payload):
                continue  # never a checkpoint or shutdown of the learner at --endpoint
            msg = e.message()
            if isinstance(msg, P.Heartbeat):
                continue
            if isinstance(msg, P.Hello):
                open_streams.add(msg.stream)
            try:
                frames_dealer.send(e.payload)  # blocking: lossless
            except zmq.Again:
                raise EdgepropError(f"learner at {endpoint} took no message for {timeout_s:g} "
                                    "s (did it stop?)") from None
            if isinstance(msg, P.Hello) and not outs and \
                    not frames_dealer.poll(int(connect_timeout_s * 1000)):
                raise no_learner_error(endpoint, connect_timeout_s)
            while frames_dealer.poll(0):
                take(frames_dealer.recv())
        deadline = time.monotonic() + timeout_s
        ended: set[str] = set()
        while ended < open_streams and time.monotonic() < deadline:
            if frames_dealer.poll(200):
                take(frames_dealer.recv())
                if isinstance(outs[-1], P.EndOfStream):
                    ended.add(outs[-1].stream)
        if ended < open_streams:
            raise EdgepropError(f"learner at {endpoint} did not finish the replay in "
                                f"{timeout_s:g} s")
    finally:
        frames_dealer.close(0)
    return outs


def _model_warning(rec, result, ckpt, replay_backend: str) -> str:
    """Why the replay's learner did not start from the recorded learner's weights, or "".

    Like is compared with like: the params_hash each learner announced in its
    hello_reply, i.e. of the weights it really infers with. The emulator's are its int8
    SRAM copy of the checkpoint (firmware_model.precision), so they hash differently
    from the checkpoint file even when the model is the same.
    """
    from edgeprop.checkpoint import model_differences
    from runtime.recording import first_hello_reply, header_for

    recorded_labels = list(rec.header.labels or [])
    if recorded_labels and ckpt.labels and recorded_labels != list(ckpt.labels):
        return (f"the recording's model named its outputs {recorded_labels}, this model "
                f"{list(ckpt.labels)}: its detections will carry other names")
    recorded_model = rec.header.model
    diffs = (model_differences(recorded_model, ckpt.cfg.to_dict())
             if isinstance(recorded_model, dict) else [])
    if diffs:  # the same weights under another neuron model or time constants hash alike
        said = ", ".join(f"{k} {v!r} (this model: {w!r})" for k, v, w in diffs)
        return f"the recording's model had {said}: outputs will differ"
    was, now = first_hello_reply(rec.outputs()), first_hello_reply(result.outputs)
    if was is None or now is None:  # no learner hash to go by: compare the model files
        want, have = rec.header.params_hash, header_for(ckpt).params_hash
        if want and want != have:
            return (f"the recording was made against model {want[:12]}, this model is "
                    f"{have[:12]}: outputs will differ")
        return ""
    if was.params_hash == now.params_hash:
        return ""
    rec_backend = (was.settings or {}).get("backend", "")
    if rec_backend and rec_backend != replay_backend:
        return (f"the recording's learner ran the {rec_backend} backend (starting weights "
                f"{was.params_hash[:12]}), this replay the {replay_backend} backend "
                f"({now.params_hash[:12]}): outputs will differ (replay with --backend "
                f"{rec_backend})")
    return (f"the learner had params {was.params_hash[:12]} when this stream began, this "
            f"replay started from {now.params_hash[:12]}: outputs will differ (replay with "
            "a checkpoint of those weights, e.g. the learner.ckpt that serve "
            "--checkpoint-dir writes)")


def run(args: argparse.Namespace) -> int:
    """--quiet keeps the replay's own warnings and verdict, not the learner's per-fault
    log lines (a damaged recording would print one per rejected message)."""
    import logging

    learner_log = logging.getLogger("edgeprop.learner")
    level = learner_log.level
    if args.quiet:
        learner_log.setLevel(logging.ERROR)
    try:
        return _replay(args)
    finally:
        learner_log.setLevel(level)


def _replay(args: argparse.Namespace) -> int:
    from edgeprop.checkpoint import params_hash, save_checkpoint
    from runtime.learner_node import load_model
    from runtime.recording import (
        ReplayResult,
        collect_posteriors,
        compare_replay,
        first_hello_reply,
        header_for,
        read_recording,
        recorded_settings,
        replay_recording,
    )

    if args.endpoint:
        _offline_only(args)
    rec = read_recording(args.recording)
    rec.require_frames()
    ckpt = load_model(args.model)
    t0 = time.perf_counter()
    if args.endpoint:
        from runtime import protocol as P

        outs = _over_wire(rec, args.endpoint)
        result = ReplayResult(collect_posteriors(outs),
                              [m for m in outs if isinstance(m, P.Detection)], None, "", outs)
        reply = first_hello_reply(outs)
        backend = (reply.settings or {}).get("backend", "?") if reply is not None else "?"
    else:
        recorded = recorded_settings(rec)
        backend = args.backend or recorded.get("backend", "reference")
        result = replay_recording(rec, ckpt, backend=backend,
                                  learning=False if args.no_learning else None,
                                  detector=_detector(args, recorded))
        if args.save:
            save_checkpoint(args.save, ckpt.cfg, result.params, frontend=ckpt.frontend,
                            encoder=ckpt.encoder, labels=ckpt.labels,
                            extra={"replayed": str(args.recording)})
    warning = _model_warning(rec, result, ckpt, backend)
    if warning:
        say(f"replay: warning: {warning}")
    cmp = compare_replay(rec, result)
    started = first_hello_reply(result.outputs)
    out = {"recording": str(rec.path), "entries": len(rec.entries),
           "recorded_params_hash": rec.learner_params_hash(),
           "model_params_hash": header_for(ckpt).params_hash,
           "replay_params_hash": started.params_hash if started is not None else None,
           "final_params_hash": result.params_hash or None,
           "frames": cmp["frames_compared"], "frames_replayed": cmp["frames_replayed"],
           "detections": len(result.detections), "rejected": cmp["rejected"],
           "max_abs_diff": cmp["max_abs_diff"], "detections_equal": cmp["detections_equal"],
           "identical": cmp["identical"], "wall_s": time.perf_counter() - t0,
           "updates": result.stats.get("updates") if result.stats else None,
           "detector": (started.settings or {}).get("detector") if started is not None
           else None}
    if result.params is not None:
        out["final_params_hash"] = params_hash(result.params)
    if cmp["rejected"]:
        rejected = (f"the learner rejected {cmp['rejected']} of the recording's "
                    f"{sum(e.direction == 'in' for e in rec.entries)} inbound messages "
                    f"(first: {cmp['first_rejected']})")
        if not out["frames"]:  # the posteriors do not line up: nothing was compared
            raise ProtocolError(f"{rec.path}: nothing to compare: {rejected}")
        say(f"replay: warning: {rejected}")
    elif not out["frames"]:
        raise ProtocolError(f"{rec.path}: nothing to compare: the replay's posteriors "
                            f"({out['frames_replayed']} frames) do not line up with the "
                            "recorded ones")
    elif out["frames"] < out["frames_replayed"]:
        say(f"replay: the recording was cut short: compared the {out['frames']} of "
            f"{out['frames_replayed']} frames it holds outputs for")
    say(f"replay: {out['frames']} frames, {out['detections']} detections, max |diff| "
        f"{out['max_abs_diff']:.3g}, {'IDENTICAL' if out['identical'] else 'DIFFERENT'} to "
        f"the recording")
    if args.json:
        print_json(out)
    return 0
