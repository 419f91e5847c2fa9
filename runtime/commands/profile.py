"""`edgeprop profile`: map the SRNN onto SpiNNaker 2 PEs; memory, time, energy, traffic.

Trains the mapped network with e-prop on a few real clips (speech_commands_dev, the
shipped model's frontend and weights when present) and prints the placement, bytes
by SRAM region per PE and in total, the modelled chip time per step and real-time
margin, energy per sample, packets per step, and how fast the emulator itself ran
(`emulator_realtime_factor`: audio seconds per wall second while training).

`--variants` instead measures every storage variant's memory and validation accuracy
after a short online fine-tuning (see firmware_model/variants.py).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgeprop.errors import ConfigError, DatasetError
from runtime.arg_types import folder, int_range, learning_rate, nonneg_int, pos_float, pos_int
from runtime.console import add_output_flags, print_json, progress, say

WALL_FIELDS = ("emulator_realtime_factor", "emulator_wall_s_per_step", "wall_s",
               "emulator_realtime_factor_cpu", "one_call_speedup")


MAX_CLOCK_MHZ = 300.0  # the Cortex-M4F range the chip model accepts (firmware_model.chip)
# options of one mode only, and their defaults: given in the other mode they are refused
PROFILE_ONLY = {"precision": None, "clock": 150.0, "loss": "mean", "samples": 3,
                "multiprocess": False}
VARIANTS_ONLY = {"train_clips": 200, "val_clips": 0}


def clock_mhz(text: str) -> float:
    """A PE clock in MHz, in (0, 300]: checked before the model loads."""
    value = pos_float(text)  # finite, > 0
    if value > MAX_CLOCK_MHZ:
        raise argparse.ArgumentTypeError(f"{value:g}: a PE clock in MHz, in (0, "
                                         f"{MAX_CLOCK_MHZ:g}] (the Cortex-M4F range; default 150)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from firmware_model.chip import PES_PER_CHIP
    from firmware_model.precision import DEFAULT_PRECISION, VARIANTS

    parser.add_argument("--pes", type=int_range(1, PES_PER_CHIP), default=12,
                        help="number of PEs (default 12)")
    parser.add_argument("--precision", default=None, choices=list(VARIANTS),
                        help=f"storage variant (default {DEFAULT_PRECISION}; --variants "
                             "measures them all)")
    parser.add_argument("--clock", type=clock_mhz, default=None,
                        help="PE clock in MHz (default 150)")
    parser.add_argument("--loss", default=None, choices=["mean", "per_step"],
                        help="e-prop loss (default mean)")
    parser.add_argument("--samples", type=pos_int, default=None,
                        help="training samples to run for the time/energy/traffic figures "
                             "(default 3)")
    parser.add_argument("--data", type=folder, default=None,
                        help="Speech Commands folder (default: ../shared/data/speech_commands_dev)")
    parser.add_argument("--multiprocess", action="store_true",
                        help="run PE groups in worker processes (ZeroMQ)")
    parser.add_argument("--variants", action="store_true",
                        help="memory and validation accuracy of every storage variant")
    parser.add_argument("--train-clips", type=pos_int, default=None,
                        help="--variants: clips to fine-tune on (default 200)")
    parser.add_argument("--val-clips", type=nonneg_int, default=None,
                        help="--variants: validation clips (0 = all of the split)")
    parser.add_argument("--lr", type=learning_rate, default=1e-4, help="Adam learning rate")
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint to map (default: the shipped kws_srnn.npz)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    add_output_flags(parser)


def _data_dir(arg: Path | None) -> Path | None:
    """--data (which must exist), else the dev set if it is here: profile runs without it."""
    from edgeprop.datasets import default_data_dir, require_data_dir

    return require_data_dir(arg) if arg is not None else default_data_dir()


def _model(path: Path | None = None):
    """(cfg, params, checkpoint or None, source text): shipped model, else seeded init."""
    from edgeprop.network import ModelConfig, init_params

    if path is not None:
        from edgeprop.checkpoint import load_checkpoint

        return *_unpack(load_checkpoint(path)), str(path)
    try:
        from edgeprop.shipped import load_shipped

        return *_unpack(load_shipped()), "shipped kws_srnn.npz"
    except Exception as exc:  # noqa: BLE001 - fall back, and say so in the output
        cfg = ModelConfig()
        return cfg, init_params(cfg, 0), None, f"init_params(seed 0) (no shipped model: {exc})"


def _unpack(ck):
    return ck.cfg, ck.params, ck


def _features(ck, clips) -> np.ndarray:
    from edgeprop.feature_cache import FeatureCache
    from edgeprop.frontend import FrontendConfig

    if ck is not None:
        from edgeprop.evaluation import checkpoint_frontend, encode_batch

        return encode_batch(ck, FeatureCache().features(clips, checkpoint_frontend(ck)))
    return FeatureCache().features(clips, FrontendConfig())


def _profile_inputs(cfg, ck, data: Path | None, n: int, seed: int):
    """n real clips (fixed choice), or seeded random spikes when no data folder exists."""
    if data is not None:
        if ck is not None:
            from edgeprop.evaluation import scan_for_model

            clips = scan_for_model(data, ck)  # one label per output, or a one-line error
        else:
            from edgeprop.datasets import scan_speech_commands

            clips = scan_speech_commands(data).clips
        clips = sorted(clips, key=lambda c: c.key)
        if n > len(clips):
            raise ConfigError(f"--samples {n}: {data} holds only {len(clips)} clips")
        pick = np.random.default_rng(seed).choice(len(clips), size=n, replace=False)
        chosen = [clips[i] for i in sorted(pick)]
        return _features(ck, chosen), [c.label_index for c in chosen], f"{n} clips of {data.name}"
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 100, cfg.n_in)) < 0.05).astype(np.float32)
    return x, list(rng.integers(0, cfg.n_out, n)), "seeded random input (no data folder)"


def _settle(args, variants: bool) -> None:
    """Refuse the options the other mode would silently ignore, then fill in the defaults
    (None means "not given")."""
    from firmware_model.precision import DEFAULT_PRECISION

    unused = VARIANTS_ONLY if not variants else PROFILE_ONLY
    given = [f"--{k.replace('_', '-')}" for k in unused
             if getattr(args, k) is not None and getattr(args, k) is not False]
    if given:
        mode = "--variants" if not variants else "the profile (without --variants)"
        raise ConfigError(f"{', '.join(given)} only set{'s' if len(given) == 1 else ''} "
                          f"{mode}: drop {', '.join(given)}"
                          + ("" if variants else " or add --variants"))
    for k, default in (PROFILE_ONLY | VARIANTS_ONLY | {"precision": DEFAULT_PRECISION}).items():
        if getattr(args, k) is None:
            setattr(args, k, default)


def run_profile(args) -> dict:
    from firmware_model import EmulatedLearner

    _settle(args, variants=False)
    cfg, params, ck, source = _model(args.model)
    xs, labels, input_desc = _profile_inputs(cfg, ck, _data_dir(args.data), args.samples,
                                             args.seed)
    opts = dict(n_pes=args.pes, precision=args.precision, clock_mhz=args.clock,
                loss=args.loss, lr=args.lr, seed=args.seed)
    warm = EmulatedLearner(cfg, params.copy(), **opts)  # compiles the kernels, untimed
    warm.train_sample(xs[0][:2], labels[0])
    warm.apply()
    _stepwise_wall(warm, xs[0][:2], labels[0])  # and the frame-by-frame baseline's
    emu = EmulatedLearner(cfg, params.copy(), multiprocess=args.multiprocess, **opts)
    # the baseline in the same run: the same samples stepped frame by frame
    stepwise = EmulatedLearner(cfg, params.copy(), **opts) if emu.trains_in_one_call else None
    try:
        wall = cpu = 0.0
        frames = 0
        ratios = []
        with progress("training on the emulated chip", len(xs), args.quiet) as advance:
            for x, lab in zip(xs, labels, strict=True):
                t0, c0 = time.perf_counter(), time.process_time()
                emu.train_sample(x, lab)
                emu.apply()
                dt = time.perf_counter() - t0
                wall += dt
                cpu += time.process_time() - c0
                frames += x.shape[0]
                if stepwise is not None:
                    ratios.append(_stepwise_wall(stepwise, x, lab) / dt)
                advance()
        prof = emu.profile()
    finally:
        emu.close()
    audio_s = frames * 0.010
    prof.update({
        "model": source,
        "input": input_desc,
        "samples": len(xs),
        "multiprocess": bool(args.multiprocess),
        "wall_s": wall,
        "emulator_realtime_factor": audio_s / wall if wall > 0 else None,
        # the same per CPU second of this process: less sensitive to other jobs' load
        "emulator_realtime_factor_cpu": audio_s / cpu if cpu > 0 else None,
        # train_sample's one-call path against stepping frame by frame (mean loss, single
        # process): median over the samples of the per-sample wall-time ratio
        "one_call_speedup": float(np.median(ratios)) if ratios else None,
    })
    return prof


def _stepwise_wall(learner, x: np.ndarray, label: int) -> float:
    """Wall time of one sample through step() frame by frame (+ end_sample, apply)."""
    t0 = time.perf_counter()
    learner.reset()
    for frame in x:
        learner.step(frame)
    learner.end_sample(label)
    learner.apply()
    return time.perf_counter() - t0


#: fewer validation clips than this and one clip is over 1 accuracy point
MIN_VAL_CLIPS = 100


def _refuse_variants_that_do_not_fit(cfg, params, n_pes: int, variants) -> None:
    """--variants compares every precision: on too few PEs the leanest may fit and the
    rest not. Said before the features are computed, with the one fix that applies
    (--precision, which the overflow's own message suggests, is not a --variants option)."""
    from firmware_model import EmulatedLearner, SramOverflowError

    tight = []
    for name in variants:
        try:
            EmulatedLearner(cfg, params.copy(), n_pes=n_pes, precision=name).close()
        except SramOverflowError:
            tight.append(name)
    if tight:
        raise ConfigError(f"--variants compares every precision, and on --pes {n_pes} "
                          f"{', '.join(tight)} {'does' if len(tight) == 1 else 'do'} not "
                          "fit a PE's SRAM; use more PEs (the "
                          "default 12 fits them all)")


def run_variants(args) -> dict:
    from edgeprop.datasets import speaker_split
    from edgeprop.evaluation import scan_for_model
    from firmware_model.precision import DEFAULT_PRECISION, VARIANTS
    from firmware_model.variants import accuracy, choose_default, measure_variant

    _settle(args, variants=True)
    cfg, params, ck, source = _model(args.model)
    if ck is None:
        raise ConfigError(f"--variants needs the shipped pretrained model ({source})")
    _refuse_variants_that_do_not_fit(cfg, params, args.pes, VARIANTS)
    data = _data_dir(args.data)
    if data is None:
        raise DatasetError("--variants needs speech_commands_dev (pass --data)")
    train, val = speaker_split(scan_for_model(data, ck), 0.2, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    train = [train[i] for i in sorted(rng.choice(len(train), min(args.train_clips, len(train)),
                                                 replace=False))]
    if args.val_clips:
        val = [val[i] for i in sorted(rng.choice(len(val), min(args.val_clips, len(val)),
                                                 replace=False))]
    short = [f"{what} {n}" for what, n, got in (("--train-clips", args.train_clips, len(train)),
                                                ("--val-clips", args.val_clips, len(val)))
             if n > got]
    say(f"features: {len(train)} train, {len(val)} validation clips (speaker-disjoint)"
        + (f"; the split holds fewer than {' and '.join(short)}" if short else ""))
    if not val:
        raise DatasetError(f"{data}: no validation clips in the speaker split; --variants "
                           "needs a folder with more speakers")
    if len(val) < MIN_VAL_CLIPS:
        fix = (f"use --val-clips {MIN_VAL_CLIPS} or more (0 = the whole split)"
               if args.val_clips else "the split holds no more: use a folder with more "
                                      "speakers")
        say(f"warning: with {len(val)} validation clips an accuracy moves in steps of "
            f"{100 / len(val):.1f} points, so the variants' differences (and the "
            f"recommendation) are mostly chance; {fix}")
    tx, vx = _features(ck, train), _features(ck, val)
    ty = np.array([c.label_index for c in train])
    vy = np.array([c.label_index for c in val])
    rows = []
    base_acc = accuracy(cfg, params, vx, vy)
    with progress("variants", len(VARIANTS) * len(train), args.quiet) as advance:
        for name in VARIANTS:
            rows.append(measure_variant(name, cfg, params, tx, ty, vx, vy, n_pes=args.pes,
                                        lr=args.lr, seed=args.seed, progress=advance))
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    for r in rows:
        r["accuracy_delta_points"] = 100 * (r["val_accuracy"] - fp32["val_accuracy"])
    return {
        "model": source,
        "data": f"{data.name}: speaker_split(0.2, seed {args.seed})",
        "train_clips": len(train),
        "val_clips": len(val),
        "accuracy_step_points": 100 / len(val),
        "lr": args.lr,
        "pes": args.pes,
        "shipped_val_accuracy": base_acc,
        "variants": rows,
        "recommended": choose_default(rows),
        "current_default": DEFAULT_PRECISION,
    }


def run(args) -> int:
    out = run_variants(args) if args.variants else run_profile(args)
    if args.json:
        print_json(out)
    else:
        _print_human(out)
    return 0


def _print_human(out: dict) -> None:
    """The table once (not also while measuring), with what it was measured on."""
    say(f"model: {out['model']}; input: {out.get('input') or out.get('data')}")
    if "variants" in out:
        say(f"{out['train_clips']} fine-tuning clips, {out['val_clips']} validation clips "
            f"(one clip = {out['accuracy_step_points']:.2f} points); the model before "
            f"fine-tuning: {100 * out['shipped_val_accuracy']:.2f} %")
        say(f"{'variant':12s} {'bytes':>8s}  validation accuracy (points vs fp32)")
        for r in out["variants"]:
            say(f"{r['precision']:12s} {r['memory_total_bytes']:8d} B  "
                f"acc {100 * r['val_accuracy']:.2f} % ({r['accuracy_delta_points']:+.2f})")
        say(f"recommended: {out['recommended']} (current default {out['current_default']})")
        return
    say(f"{out['pes']} PEs at {out['clock_mhz']:.0f} MHz, precision {out['precision']}")
    for pe in out["placement"]:
        regions = " ".join(f"{k}={v}" for k, v in pe["bytes_by_region"].items())
        roles = ", ".join(pe["roles"])
        say(f"  PE {pe['pe']:3d} (QPE {pe['qpe']}) neurons {pe['neurons'][0]:3d}-"
            f"{pe['neurons'][1] - 1:3d} {roles}: {pe['bytes_total']} B [{regions}]")
    for k in ("memory_total_bytes", "memory_max_pe_bytes", "step_time_us", "realtime_margin",
              "energy_per_sample_uj", "packets_per_step", "emulator_realtime_factor"):
        v = out[k]
        say(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
