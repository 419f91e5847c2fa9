"""`edgeprop pretrain`: train the keyword spotter offline with sparse (or dense) BPTT.

Thin shell over `edgeprop.training`: argument parsing, progress bars, the periodic
resume checkpoint (`<out>.resume.npz`, written atomically after every epoch with the
optimizer state and the next epoch; removed when the run completes) and the final
checkpoint plus its training record (`<out>.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import threading
import time
from pathlib import Path

from runtime.arg_types import (
    below,
    folder,
    fraction,
    learning_rate,
    new_file,
    nonneg_float,
    nonneg_int,
    output_folder,
    pos_float,
    pos_int,
)
from runtime.console import add_output_flags, print_json, progress, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgeprop.training import TrainConfig

    d = TrainConfig()  # the defaults the help names are the ones training uses
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder (default ../shared/data/speech_commands_dev)")
    parser.add_argument("--out", type=new_file, default=Path("kws_srnn.npz"),
                        help="checkpoint to write (default ./kws_srnn.npz)")
    parser.add_argument("--epochs", type=pos_int, default=None, help=f"epochs (default {d.epochs})")
    parser.add_argument("--seed", type=nonneg_int, default=0,
                        help="seed of split, init, order, noise")
    parser.add_argument("--b-th", type=pos_float, default=None,
                        help=f"sparse BPTT band |v - A| < B_th (default {d.b_th:g})")
    parser.add_argument("--dense", action="store_true", help="dense BPTT instead of sparse")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>.resume.npz written by an interrupted run")
    parser.add_argument("--synth", type=folder, default=None,
                        help="extra folder of synthetic voices (Speech Commands layout), "
                             "training only")
    parser.add_argument("--lr", type=learning_rate, default=None,
                        help=f"Adam learning rate (default {d.lr:g})")
    parser.add_argument("--batch-size", type=pos_int, default=None,
                        help=f"clips per batch (default {d.batch_size})")
    parser.add_argument("--n-aug", type=nonneg_int, default=None,
                        help=f"background-noise copies per training clip (default {d.n_aug})")
    parser.add_argument("--reg-coef", type=nonneg_float, default=None,
                        help=f"firing-rate regulariser (default {d.reg_coef:g})")
    parser.add_argument("--ema", type=fraction, default=None,
                        help="ship an exponential moving average of the weights (per step; "
                             f"default {d.ema:g}, 0 = off)")
    parser.add_argument("--speed", type=fraction, default=None,
                        help="speed perturbation of the augmented copies, U(1-s, 1+s) "
                             f"(default {d.speed:g})")
    parser.add_argument("--freq-warp", type=below(0.5), default=None,
                        help="vocal-tract-length warp of the mel axis, factor U(1-w, 1+w)")
    parser.add_argument("--weight-decay", type=nonneg_float, default=None,
                        help=f"L2 on the input and recurrent weights (default {d.weight_decay:g})")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also train the same recipe with dense BPTT (or sparse with "
                             "--dense) and record its accuracy beside this one's")
    parser.add_argument("--max-clips", type=pos_int, default=None,
                        help="use a seeded random subset of this many clips (quick runs)")
    parser.add_argument("--stop-after", type=pos_int, default=None,
                        help="stop after this many epochs of this run, keeping "
                             "<out>.resume.npz for --resume (splits a long run: repeat the "
                             "command with --resume)")
    parser.add_argument("--cache-dir", type=output_folder, default=None,
                        help="feature cache folder (default $EDGEPROP_CACHE or ~/.cache/edgeprop)")
    add_output_flags(parser)


class _DeferredInterrupt:
    """Ctrl-C during training takes effect between batches: raised inside a numba
    kernel, KeyboardInterrupt comes out as a SystemError traceback. The handler only
    notes the signal; `check`, called from the training callbacks, raises it. Leaving
    the block on a Ctrl-C calls `on_interrupt` (to say how to go on), whichever way
    it was raised."""

    def __init__(self, on_interrupt) -> None:
        self.hit = False
        self.old = None
        self.on_interrupt = on_interrupt

    def _note(self, signum, frame) -> None:
        self.hit = True

    def check(self) -> None:
        if self.hit:
            self.hit = False
            raise KeyboardInterrupt

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.old = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            self.old = None
        if exc_type is None and self.hit:  # noted after the last check: raised here
            self.hit = False
            self.on_interrupt()
            raise KeyboardInterrupt
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.on_interrupt()


def _resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume.npz")


def _record_path(out: Path) -> Path:
    return out.with_suffix(".json") if out.suffix == ".npz" else out.with_name(out.name + ".json")


def _train_config(args):
    from edgeprop.training import TrainConfig

    kw = {"seed": args.seed, "sparse": not args.dense}
    for name in ("epochs", "b_th", "lr", "ema", "speed", "batch_size", "n_aug", "reg_coef",
                 "freq_warp", "weight_decay"):  # argparse dest == TrainConfig field
        val = getattr(args, name)
        if val is not None:
            kw[name] = val
    return TrainConfig(**kw)


def _flag(name: str, value) -> str:
    """A TrainConfig setting as the flag that sets it (sparse=False is --dense)."""
    if name == "sparse":
        return "sparse BPTT" if value else "--dense"
    return f"--{name.replace('_', '-')} {value}"


def _same_folder(a, b) -> bool:
    """Two optional folder names, one relative and one absolute alike, name the same."""
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


def _check_resume(ck, resume_file: Path, tcfg, data_dir: Path, args) -> None:
    """Refuse a resume file of another run (settings or data), naming what differs,
    before any data is prepared: resuming it would silently train a different recipe.
    --epochs may change (to lengthen a run)."""
    from edgeprop.errors import CheckpointError
    from edgeprop.training import TrainConfig

    saved = TrainConfig.from_dict(ck.extra.get("train_config", {})).to_dict()
    now = tcfg.to_dict()
    diffs = [f"{_flag(k, saved[k])} (now {_flag(k, now[k])})"
             for k in now if k != "epochs" and saved[k] != now[k]]
    info = ck.extra.get("data_info", {})
    if "data" in info and not _same_folder(info["data"], data_dir):
        diffs.append(f"--data {info['data']} (now {data_dir})")
    if "synth" in info and not _same_folder(info["synth"], args.synth):
        diffs.append(f"--synth {info['synth']} (now {args.synth})")
    if "max_clips" in ck.extra and ck.extra["max_clips"] != args.max_clips:
        diffs.append(f"--max-clips {ck.extra['max_clips']} (now {args.max_clips})")
    if diffs:
        raise CheckpointError(f"{resume_file} was written by a run with other settings: "
                              f"{', '.join(diffs)}; resume with that run's flags, or delete "
                              "it to start over")
    done = int(ck.extra.get("next_epoch", 0))
    if tcfg.epochs < done:  # it would write a model of more epochs than asked for
        raise CheckpointError(f"{resume_file} has already run {done} epochs, more than "
                              f"--epochs {tcfg.epochs}; give --epochs {done} or more (the "
                              "learning-rate schedule then follows the new length)")


def run(args) -> int:
    import json
    import os

    import numpy as np

    from edgeprop import training
    from edgeprop.atomic_file import atomic_write_text
    from edgeprop.checkpoint import load_checkpoint, save_checkpoint
    from edgeprop.datasets import require_data_dir, skipped_note
    from edgeprop.errors import CheckpointError, ConfigError, DatasetError
    from edgeprop.network import KWS_LABELS, Params
    from edgeprop.optim import Adam

    t_start = time.perf_counter()
    data_dir = require_data_dir(args.data)
    if args.synth is not None and not args.synth.is_dir():
        what = "not a folder" if args.synth.exists() else "no such folder"
        raise DatasetError(f"--synth {args.synth}: {what} (expected a folder of synthetic "
                           "voices in the Speech Commands layout, e.g. from edgeprop data "
                           "synth)")
    if args.dense and args.b_th is not None and not args.compare_dense:
        raise ConfigError("--b-th is the band of sparse BPTT, which --dense does not use; "
                          "drop one of them (or add --compare-dense)")
    tcfg = _train_config(args)
    cfg = training.kws_model_config()
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CheckpointError(f"cannot write {out}: folder {out.parent} does not exist")
    resume_file = _resume_path(out)
    # all said before the data is prepared
    if args.resume and not resume_file.is_file():
        raise CheckpointError(f"nothing to resume: {resume_file} does not exist")
    if not args.resume and resume_file.exists():  # a fresh run would overwrite it
        raise CheckpointError(f"{resume_file} holds an interrupted run: add --resume to "
                              "continue it, or delete it to start over")
    ck = None
    if args.resume:
        ck = load_checkpoint(resume_file, expect=cfg)
        _check_resume(ck, resume_file, tcfg, data_dir, args)

    def stage(name: str, total: int):
        while stages:  # one bar at a time: close the previous stage
            stages.pop().__exit__(None, None, None)
        ctx = progress(name, total, args.quiet)
        adv = ctx.__enter__()
        stages.append(ctx)
        return adv

    stages: list = []
    try:
        data = training.prepare_data(data_dir, tcfg, synth_dir=args.synth,
                                     cache_dir=args.cache_dir, max_clips=args.max_clips,
                                     stage=stage)
    finally:
        for ctx in reversed(stages):
            ctx.__exit__(None, None, None)
    say(f"data: {data.info['n_train']} train clips ({data.info['train_speakers']} speakers) "
        f"x {data.train_x.shape[0]} versions, {data.info['n_val']} val clips "
        f"({data.info['val_speakers']} speakers, disjoint)")
    for note in (skipped_note(data.skipped), data.cache_note):
        if note:
            say(note)
    absent = [lab for i, lab in enumerate(KWS_LABELS) if not (data.train_y == i).any()]
    if absent:
        say(f"note: no training clips of {', '.join(absent)}; the model will not learn "
            "to tell them")

    state = None
    if ck is not None:
        then = ck.extra.get("data_info", {})
        keys = ("n_train", "n_val", "augmented_copies", "noise_recordings")
        if any(k in then and then[k] != data.info[k] for k in keys):
            raise CheckpointError(
                f"{resume_file} was written for other data ({then.get('n_train')} train / "
                f"{then.get('n_val')} val clips, now {data.info['n_train']} / "
                f"{data.info['n_val']}): the folder changed; delete it to start over")
        opt = Adam(lr=tcfg.lr)
        opt.load_state_dict(ck.optimizer_state or {})
        state = training.TrainState(ck.params, opt, int(ck.extra["next_epoch"]),
                                    list(ck.extra.get("history", [])))
        if "ema" in ck.extra:
            state.ema = Params(*(np.asarray(a, np.float32) for a in ck.extra["ema"]))
        say(f"resuming at epoch {state.epoch} from {resume_file}")

    extra_common = {"train_config": tcfg.to_dict(), "data_info": data.info,
                    "max_clips": args.max_clips}
    tell = (lambda *parts: None) if args.quiet else say  # per-epoch lines are progress

    def on_epoch_start(epoch: int):
        ctx = progress(f"epoch {epoch + 1}/{tcfg.epochs}", data.train_y.shape[0], args.quiet)
        bars.append(ctx)
        adv = ctx.__enter__()

        def advance(n: int = 1) -> None:
            adv(n)
            interrupt.check()

        return advance

    def interrupted() -> None:
        if resume_file.is_file():  # the finished epochs are not lost: say how to go on
            say(f"the finished epochs are kept in {resume_file}; continue with the same "
                "flags plus --resume")

    def on_epoch_end(rec: dict, st) -> None:
        while bars:
            bars.pop().__exit__(None, None, None)
        tell(f"epoch {rec['epoch'] + 1}/{tcfg.epochs}: loss {rec['loss']:.3f} "
            f"train {rec['train_acc']:.3f} val {rec['val_acc']:.3f} "
            f"active {rec['active_fraction']:.3f} rate {rec['rate']:.3f} "
            f"({rec['seconds']:.1f} s)")
        save_checkpoint(resume_file, cfg, st.params, optimizer_state=st.optimizer.state_dict(),
                        frontend=data.frontend.to_dict(), encoder={"name": "current",
                                                                   "n_in": cfg.n_in},
                        labels=list(KWS_LABELS),
                        extra=extra_common | {"next_epoch": st.epoch, "history": st.history}
                        | ({"ema": list(st.ema.arrays())} if st.ema is not None else {}))
        interrupt.check()  # after the epoch is saved

    bars: list = []
    interrupt = _DeferredInterrupt(on_interrupt=interrupted)
    try:
        with interrupt:
            state = training.train(cfg, data, tcfg, state, on_epoch_start=on_epoch_start,
                                   on_epoch_end=on_epoch_end, stop_after=args.stop_after)
    finally:
        while bars:
            bars.pop().__exit__(None, None, None)
    if state.epoch < tcfg.epochs:
        say(f"stopped after epoch {state.epoch} of {tcfg.epochs}; continue with the same "
            f"flags plus --resume ({resume_file})")
        if args.json:
            print_json({"stopped_after": state.epoch, "epochs": tcfg.epochs,
                        "resume": str(resume_file)})
        return 0
    seconds = time.perf_counter() - t_start
    with interrupt:  # all epochs are in the resume file: Ctrl-C here is said the same way
        val_acc = training.accuracy(cfg, state.model(), data.val_x, data.val_y)
    comparison = None
    if args.compare_dense:
        other = dataclasses.replace(tcfg, sparse=not tcfg.sparse)
        name = "sparse" if other.sparse else "dense"
        say(f"comparison: the same run with {name} BPTT (not saved)")
        t0 = time.perf_counter()

        def cmp_end(rec: dict, st) -> None:
            while bars:
                bars.pop().__exit__(None, None, None)
            tell(f"{name} epoch {rec['epoch'] + 1}/{tcfg.epochs}: train "
                f"{rec['train_acc']:.3f} val {rec['val_acc']:.3f}")
            interrupt.check()

        try:
            with interrupt:
                st2 = training.train(cfg, data, other, on_epoch_start=on_epoch_start,
                                     on_epoch_end=cmp_end)
        finally:
            while bars:
                bars.pop().__exit__(None, None, None)
        comparison = {"method": f"{name}_bptt",
                      "val_accuracy": training.accuracy(cfg, st2.model(), data.val_x,
                                                        data.val_y),
                      "seconds": time.perf_counter() - t0,
                      "final_train_acc": st2.history[-1]["train_acc"] if st2.history else None}
    record = {
        "command": args.command_line,
        "seed": tcfg.seed,
        "method": "sparse_bptt" if tcfg.sparse else "dense_bptt",
        "val_accuracy": val_acc,
        "n_val": int(data.val_y.shape[0]),
        "seconds": seconds,
        "epochs_run": len(state.history),
        "train_config": tcfg.to_dict(),
        "model_config": cfg.to_dict(),
        "data_info": data.info,
        "comparison": comparison,
        "history": state.history,
        "cpu_count": os.cpu_count(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_checkpoint(out, cfg, state.model(), frontend=data.frontend.to_dict(),
                    encoder={"name": "current", "n_in": cfg.n_in}, labels=list(KWS_LABELS),
                    extra={k: record[k] for k in ("command", "seed", "method", "val_accuracy",
                                                  "n_val", "seconds", "train_config",
                                                  "data_info", "comparison")}
                    | {"frontend_stats": data.frontend_stats})
    rec_path = _record_path(out)
    atomic_write_text(rec_path, json.dumps(record, indent=1))
    if resume_file.exists():
        resume_file.unlink()
    say(f"wrote {out} (val accuracy {val_acc:.4f} on {record['n_val']} clips of unseen "
        f"speakers, {seconds:.0f} s)")
    if args.json:
        print_json({k: v for k, v in record.items() if k != "history"}
                   | {"out": str(out), "record": str(rec_path)})
    return 0
