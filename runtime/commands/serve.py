"""`edgeprop serve`: a learner node (or a broker in front of N learner workers).

    edgeprop serve                                  shipped model, emulator backend,
                                                    frames on tcp://127.0.0.1:5555,
                                                    control on tcp://127.0.0.1:5556
    edgeprop serve --backend reference --checkpoint-dir ckpt --checkpoint-every 10
    edgeprop serve --workers 2                      broker + 2 worker processes
    edgeprop serve --connect tcp://host:5557        one worker behind a remote broker

With --checkpoint-dir, a learner.ckpt already there is resumed from (weights, optimizer
state, update count): a learner killed with SIGKILL loses at most --checkpoint-every
seconds of learning. SIGINT / SIGTERM: a final checkpoint, then a clean exit 0. A
periodic checkpoint that cannot be written (a full disk) is logged and retried while
serving goes on; a final one that cannot be written goes to a rescue folder in the
temp dir, named on stderr, and serve exits 1. With --workers, a worker that dies is
restarted, but one that stops on a user error (exit 2: a damaged learner.ckpt, ...)
stops the broker and the other workers with it, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgeprop.errors import CheckpointError, ConfigError
from runtime.arg_types import (
    endpoint,
    learning_rate,
    new_file,
    nonneg_int,
    optional_connect_endpoint,
    optional_endpoint,
    output_folder,
    pos_float,
)
from runtime.console import add_output_flags, print_json, say
from runtime.detection import add_detector_arguments, detector_flags, detector_settings

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_CONTROL = "tcp://127.0.0.1:5556"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint to serve (default: the shipped model)")
    parser.add_argument("--backend", choices=("emulator", "reference"), default="emulator",
                        help="where learning runs: the SpiNNaker 2 emulator (default) or the "
                             "reference NumPy e-prop")
    parser.add_argument("--bind", type=endpoint, default="tcp://127.0.0.1:5555",
                        help="data_router endpoint frontends connect to "
                             "(default tcp://127.0.0.1:5555)")
    parser.add_argument("--control", type=optional_endpoint, default=None,
                        help="control_rep endpoint (default tcp://127.0.0.1:5556; '' to disable; "
                             "not served with --workers)")
    parser.add_argument("--pub", type=optional_endpoint, default="",
                        help="outputs_pub endpoint (posteriors and detections, topic = "
                             "stream id; not with --workers)")
    parser.add_argument("--connect", type=optional_connect_endpoint, default="",
                        help="run as a worker behind a broker at this endpoint (instead of "
                             "--bind)")
    parser.add_argument("--workers", type=nonneg_int, default=0,
                        help="start a broker on --bind and this many worker processes")
    parser.add_argument("--name", default=None,
                        help="name in logs and stats (default learner; not with --workers, "
                             "whose workers are worker-0, worker-1, ...)")
    parser.add_argument("--checkpoint-dir", type=output_folder,
                        help="periodic atomic checkpoints here; resume from learner.ckpt "
                             "if present")
    parser.add_argument("--personal-dir", type=output_folder, default=None,
                        help="personal weights here (default: --checkpoint-dir; with "
                             "--workers, --checkpoint-dir itself, shared by the workers so "
                             "a returning stream finds its weights on any of them)")
    parser.add_argument("--checkpoint-every", type=pos_float, default=30.0,
                        help="seconds between checkpoints (when weights changed)")
    parser.add_argument("--lr", type=learning_rate, default=1e-4,
                        help="online learning rate (Adam)")
    parser.add_argument("--no-learning", action="store_true",
                        help="inference only: no learning from labelled frames (an explicit "
                             "teach control request still learns)")
    parser.add_argument("--late-updates", choices=("wait", "defer"), default="wait",
                        help="an update not learned by its switch point: wait for it "
                             "(deterministic) or use it when ready (real time under load)")
    parser.add_argument("--apply-delay", type=nonneg_int, default=100,
                        help="frames after a labelled window ends until its update is used "
                             "(learning runs on its own thread meanwhile); 0 = inline")
    add_detector_arguments(parser)
    parser.add_argument("--peer-timeout", type=pos_float, default=10.0,
                        help="close a stream silent for this many seconds")
    parser.add_argument("--record", type=new_file,
                        help="record every message in and out to this file")
    parser.add_argument("--ready-file", type=new_file,
                        help="write the bound endpoints here (JSON) once up")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO")
    add_output_flags(parser)


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _write_ready(path: str | None, endpoints: dict) -> None:
    if not path:
        return
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(endpoints))
    os.replace(tmp, path)


def _announce_ready(node, path: str | None, stop: threading.Event, failed: list) -> None:
    """Write --ready-file once the sockets are up. One that cannot be written (disk full)
    stops the learner, its checkpoint saved: whoever waits for the file would wait for
    ever."""
    if not node.ready.wait(30):
        return
    try:
        _write_ready(path, node.endpoints)
    except OSError as exc:
        failed.append(f"cannot write the ready file {path}: {exc.strerror}")
        stop.set()


def build_core(args: argparse.Namespace):
    """The learner core from the CLI settings (resuming from --checkpoint-dir if possible)."""
    from runtime.learner_node import (
        LearnerCore,
        Model,
        base_params_hash,
        load_model,
        resume_path,
    )

    ckpt = load_model(args.model)
    if args.checkpoint_dir and resume_path(args.checkpoint_dir).exists():
        from edgeprop.checkpoint import check_model, load_checkpoint

        path = resume_path(args.checkpoint_dir)
        fix = "pass the --model it learned from, or another --checkpoint-dir"
        try:  # a damaged file is not "another model": say which it is
            resumed = load_checkpoint(path)
        except CheckpointError as exc:
            raise ConfigError(f"cannot resume: {exc}; move {path} away to start from "
                              f"{args.model or 'the shipped model'}, or pass another "
                              "--checkpoint-dir") from None
        try:  # load_checkpoint's own model check names what differs
            check_model(path, resumed.cfg, ckpt.cfg)
        except CheckpointError as exc:
            raise ConfigError(f"{path} holds another model than "
                              f"{args.model or 'the shipped model'}: {exc}; {fix}") from None
        if resumed.labels != ckpt.labels:
            raise ConfigError(f"{path} holds another model than "
                              f"{args.model or 'the shipped model'}: labels {resumed.labels} "
                              f"(expected {ckpt.labels}); {fix}")
        # same shape and labels is every model pretrained with the defaults: the weights
        # must have been learned from this --model (a checkpoint from before the base was
        # recorded: at least its frontend and encoder must be the model's)
        learned_from = (resumed.extra.get("runtime") or {}).get("base_params_hash")
        base = base_params_hash(ckpt)
        if learned_from is not None:
            if learned_from != base:
                raise ConfigError(f"{path} holds weights learned from another model (base "
                                  f"params {learned_from[:12]}, "
                                  f"{args.model or 'the shipped model'} has {base[:12]}); "
                                  f"{fix}")
        else:  # written before learners recorded their base
            was, now = Model.from_checkpoint(resumed), Model.from_checkpoint(ckpt)
            if (was.frontend_hash, was.encoder_id) != (now.frontend_hash, now.encoder_id):
                raise ConfigError(f"{path} holds another model than "
                                  f"{args.model or 'the shipped model'}: its frontend or "
                                  f"encoder differs; {fix}")
            # its base is this --model (as far as that can be checked), not its weights
            runtime = resumed.extra.get("runtime")
            resumed.extra["runtime"] = {**(runtime if isinstance(runtime, dict) else {}),
                                        "base_params_hash": base}
        ckpt = resumed
        say(f"{args.name}: resuming from {path} "
            f"(updates {ckpt.extra.get('runtime', {}).get('updates', 0)})")
    detector = detector_settings(args)
    return LearnerCore(ckpt, backend=args.backend, lr=args.lr, detector=detector,
                       learning=not args.no_learning, peer_timeout_s=args.peer_timeout,
                       checkpoint_dir=args.checkpoint_dir,
                       checkpoint_every=args.checkpoint_every, name=args.name,
                       apply_delay=args.apply_delay, late_updates=args.late_updates,
                       personal_dir=args.personal_dir)


def _install_signals(stop: threading.Event, who: str,
                     then: str = "final checkpoint, then stop") -> None:
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        logging.getLogger("edgeprop.learner").warning("%s: %s received: %s", who, name, then)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    if args.personal_dir and not args.checkpoint_dir:
        raise ConfigError("--personal-dir keeps personal weights beside the learner's "
                          "checkpoints; give --checkpoint-dir too")
    # --quiet: warnings and errors only (INFO is the default level, so it yields)
    _logging("WARNING" if args.quiet and args.log_level == "INFO" else args.log_level)
    tell = (lambda *parts: None) if args.quiet else say
    if args.workers:
        return _run_broker(args)
    args.name = args.name or "learner"
    from runtime.learner_node import LearnerNode

    core = build_core(args)
    recorder = None
    if args.record:
        from edgeprop.checkpoint import Checkpoint
        from runtime.recording import RecordingWriter, header_for

        ck = Checkpoint(core.cfg, core.params, frontend=core.model.frontend,
                        encoder=core.model.encoder, labels=core.model.labels)
        recorder = RecordingWriter(args.record, header_for(ck, note=f"serve {args.name}",
                                                           runtime=core.settings()))
    control = DEFAULT_CONTROL if args.control is None else args.control  # "" = none
    node = LearnerNode(core, bind=None if args.connect else args.bind,
                       connect=args.connect or None, control_bind=control or None,
                       pub_bind=args.pub or None, recorder=recorder)
    stop = threading.Event()
    _install_signals(stop, args.name)
    failed: list[str] = []
    ready_thread = threading.Thread(target=_announce_ready,
                                    args=(node, args.ready_file, stop, failed), daemon=True)
    ready_thread.start()
    tell(f"{args.name}: {core.backend_name} backend, params {core.params_hash()[:12]}, "
        f"learning {'on' if core.learning else 'off'}")
    node.run(stop)
    stats = core.stats()
    core.close()
    if failed:
        raise ConfigError(failed[0])
    if node.final_problem:
        # The node logged it (ERROR): the weights went to a rescue folder, or were lost.
        if args.json:
            print_json(stats)
        return 1
    tell(f"{args.name}: stopped; frames {stats['counts'].get('frames', 0)}, "
        f"updates {stats['updates']}, params {stats['params_hash'][:12]}")
    if args.json:
        print_json(stats)
    return 0


def _worker_cmd(args: argparse.Namespace, endpoint: str, k: int) -> list[str]:
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--connect", endpoint,
           "--name", f"worker-{k}", "--backend", args.backend, "--control", "",
           "--lr", str(args.lr), *detector_flags(args),
           "--peer-timeout", str(args.peer_timeout), "--log-level", args.log_level,
           "--checkpoint-every", str(args.checkpoint_every),
           "--apply-delay", str(args.apply_delay), "--late-updates", args.late_updates]
    if args.model:
        cmd += ["--model", args.model]
    if args.checkpoint_dir:
        cmd += ["--checkpoint-dir", str(Path(args.checkpoint_dir) / f"worker-{k}"),
                "--personal-dir", str(args.personal_dir or args.checkpoint_dir)]
    if args.no_learning:
        cmd.append("--no-learning")
    if args.quiet:
        cmd.append("--quiet")
    return cmd


#: a worker that exits with this code met a user error (a bad --model, ...) and said
#: so on stderr: restarting it would print the same error twice a second for ever
USER_ERROR_EXIT = 2


def _run_broker(args: argparse.Namespace) -> int:
    from runtime.broker import Broker
    from runtime.learner_node import load_model

    if args.pub:
        raise ConfigError("--pub is not served with --workers (the workers sit behind the "
                          "broker); serve one learner to publish outputs")
    if args.control:
        raise ConfigError("--control is not served with --workers (each worker's control "
                          "socket stays private); serve one learner to control it")
    if args.connect:
        raise ConfigError("--connect is not used with --workers (the broker binds --bind and "
                          "its workers connect to it); give one or the other")
    if args.name is not None:
        raise ConfigError("--name is not used with --workers (the workers are named "
                          "worker-0, worker-1, ..., as their checkpoint folders are); drop "
                          "--name")
    if args.record:
        raise ConfigError("--record is not served with --workers (each worker sees only its "
                          "own streams); serve one learner to record it, or record at the "
                          "frontend with `edgeprop record`")
    load_model(args.model)  # a bad --model is one error here, not one per worker start
    broker = Broker(args.bind, "tcp://127.0.0.1:*")
    stop = threading.Event()
    _install_signals(stop, "broker", "stopping the workers")  # the broker learns nothing
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    if not broker.ready.wait(10):
        raise ConfigError(f"broker could not bind {args.bind}")
    if broker.error is not None:
        raise broker.error
    ep = broker.endpoints["workers_router"]
    procs: list[subprocess.Popen] = []
    failed = ""
    try:  # from the first worker on: whatever happens, none is left running
        procs = [subprocess.Popen(_worker_cmd(args, ep, k)) for k in range(args.workers)]
        deadline = time.monotonic() + 60
        while (len(broker.workers) < args.workers and time.monotonic() < deadline
               and not stop.is_set()):
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.1)
        say(f"broker: {len(broker.workers)}/{args.workers} workers up; clients on "
            f"{broker.endpoints['clients_router']}")
        _write_ready(args.ready_file, dict(broker.endpoints, workers=len(broker.workers)))
        while not stop.is_set() and not failed:
            for k, p in enumerate(procs):
                if p.poll() is None or stop.is_set():
                    continue
                if p.returncode == USER_ERROR_EXIT:
                    failed = (f"worker-{k} stopped on an error (exit {p.returncode}, its "
                              "message is above); not restarting it")
                    break
                say(f"broker: worker-{k} exited ({p.returncode}); restarting it")
                procs[k] = subprocess.Popen(_worker_cmd(args, ep, k))
            stop.wait(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        stop.set()
        thread.join(5)
    if failed:
        raise ConfigError(failed)
    if args.json:
        print_json(broker.stats())
    return 0
