"""`edgeprop bench eprop`: online e-prop training speed, memory and exactness.

Runs the reference keyword spotter (80-120-12 ALIF, 25,440 weights) on random Gaussian
input currents (mean 0.1, sd 0.3 per channel and step, giving a few % firing) and
reports, as medians over repeats on one core:

- train_steps_per_s: timesteps/s of `EpropLearner.train_sample` + `apply` (numba kernel;
  one optimizer step per sample, the online setting); realtime_factor = 0.01 s x that.
- step_api_steps_per_s: the same through `EpropLearner.step` one frame per call (the
  streaming path, which pays Python call overhead every step).
- numpy_steps_per_s and speedup_vs_numpy: the NumPy reference in the same run.
- grad_rel_err_vs_bptt: W_rec = 0, symmetric feedback, mean loss with the rate
  regulariser on, batch of 4: max over (w_in, w_rec, w_out) of max|g_eprop - g_bptt| /
  max|g_bptt| (per-matrix values in grad_rel_err_by_matrix; also for the per_step loss).
- cosine_vs_bptt_with_recurrence: cosine between e-prop and BPTT grads of the hidden
  weights (w_in and w_rec flattened together) with the initial W_rec.
- bytes_per_synapse: all learning state (weights, Adam m and v, traces, accumulators,
  neuron state) / n_weights, after a sample and its apply.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from runtime.arg_types import int_range, nonneg_int, pos_int
from runtime.console import add_output_flags, print_json, progress, say

# samples x steps of one repeat: 640 MB of float32 inputs (about 3x that while they
# are drawn in float64), a minute or two per repeat on one core
MAX_TIMESTEPS = 2_000_000
EXACTNESS_BATCH = 4  # the batch grad_rel_err_vs_bptt is defined on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # bounded: the benchmark holds (samples, steps, inputs) arrays in memory
    parser.add_argument("--steps", type=int_range(1, 100_000), default=100,
                        help="timesteps per sample (100 = 1 s; at most 100000)")
    parser.add_argument("--repeats", type=int_range(1, 1000), default=5,
                        help="timed repeats (median reported; at most 1000)")
    parser.add_argument("--samples", type=pos_int, default=20,
                        help="samples per timed repeat of the numba learner (samples x "
                             f"steps at most {MAX_TIMESTEPS:,})")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    add_output_flags(parser)


def _inputs(rng: np.random.Generator, n: int, steps: int, n_in: int) -> np.ndarray:
    return (rng.standard_normal((n, steps, n_in)) * 0.3 + 0.1).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _exactness(cfg, params, xs, labels) -> dict:
    from edgeprop import bptt
    from edgeprop.eprop import EpropLearner

    p0 = params.copy()
    p0.w_rec[:] = 0.0
    x_tb = xs.transpose(1, 0, 2)
    out: dict = {}
    for loss, reg in (("mean", 0.1), ("per_step", 0.0)):
        lab = labels if loss == "mean" else np.broadcast_to(labels, (xs.shape[1], len(labels)))
        _, g_ref, trace = bptt.loss_and_grads(cfg, p0, x_tb, lab, loss=loss, reg_coef=reg)
        learner = EpropLearner(cfg, p0.copy(), loss=loss, reg_coef=reg)
        for b in range(len(labels)):
            learner.train_sample(xs[b], int(labels[b]))
        g = learner.grads()
        out[loss] = {n: _rel(a, r) for n, a, r in
                     zip(("w_in", "w_rec", "w_out"), g.arrays(), g_ref.arrays(), strict=True)}
    _, g_ref, trace = bptt.loss_and_grads(cfg, params, x_tb, labels, loss="mean")
    learner = EpropLearner(cfg, params.copy())
    for b in range(len(labels)):
        learner.train_sample(xs[b], int(labels[b]))
    g = learner.grads()
    a = np.concatenate([g.w_in.ravel(), g.w_rec.ravel()]).astype(np.float64)
    r = np.concatenate([g_ref.w_in.ravel(), g_ref.w_rec.ravel()]).astype(np.float64)
    out["cosine"] = float(a @ r / (np.linalg.norm(a) * np.linalg.norm(r)))
    out["firing_rate"] = float(trace.z.mean())
    return out


def _time_train(learner, xs, labels) -> float:
    t0 = time.perf_counter()
    for x, lab in zip(xs, labels, strict=True):
        learner.train_sample(x, int(lab))
        learner.apply()
    return xs.shape[0] * xs.shape[1] / (time.perf_counter() - t0)


def _time_step_api(learner, xs, labels) -> float:
    t0 = time.perf_counter()
    for x, lab in zip(xs, labels, strict=True):
        learner.reset()
        for frame in x:
            learner.step(frame)
        learner.end_sample(int(lab))
        learner.apply()
    return xs.shape[0] * xs.shape[1] / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    from edgeprop.eprop import EpropLearner
    from edgeprop.errors import ConfigError
    from edgeprop.network import ModelConfig, init_params

    if args.samples * args.steps > MAX_TIMESTEPS:  # the inputs are held in memory at once
        raise ConfigError(f"--samples {args.samples} x --steps {args.steps} = "
                          f"{args.samples * args.steps:,} timesteps per repeat "
                          f"({args.samples * args.steps * 320 / 1e9:.1f} GB of input, about 3x "
                          "that while it is drawn); "
                          f"at most {MAX_TIMESTEPS:,}")
    cfg = ModelConfig()  # the reference KWS network: 80-120-12 ALIF
    params = init_params(cfg, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    n_numpy = max(1, args.samples // 10)
    # at least the exactness batch is drawn (the same draw as --samples 4), timing the first
    drawn = _inputs(rng, max(args.samples, EXACTNESS_BATCH), args.steps, cfg.n_in)
    drawn_labels = rng.integers(0, cfg.n_out, len(drawn))
    xs, labels = drawn[:args.samples], drawn_labels[:args.samples]

    learner = EpropLearner(cfg, params.copy(), kernel="numba")
    stepper = EpropLearner(cfg, params.copy(), kernel="numba")
    ref = EpropLearner(cfg, params.copy(), kernel="numpy")
    if not args.quiet:
        say("compiling / warming up the numba kernel ...")
    _time_train(learner, xs[:1], labels[:1])
    _time_step_api(stepper, xs[:1], labels[:1])
    fast, api, slow = [], [], []
    with progress("timing e-prop", args.repeats, args.quiet) as advance:
        for _ in range(args.repeats):
            fast.append(_time_train(learner, xs, labels))
            api.append(_time_step_api(stepper, xs[:n_numpy], labels[:n_numpy]))
            slow.append(_time_train(ref, xs[:n_numpy], labels[:n_numpy]))
            advance()
    nb = learner.state_nbytes()
    # defined on a batch of 4, whatever --samples times
    ex = _exactness(cfg, params, drawn[:EXACTNESS_BATCH], drawn_labels[:EXACTNESS_BATCH])
    steps_s = statistics.median(fast)
    numpy_s = statistics.median(slow)
    rel_err = max(ex["mean"].values())
    result = {
        "network": f"{cfg.n_in}-{cfg.n_rec}-{cfg.n_out} {cfg.neuron.upper()}",
        "n_weights": cfg.n_weights,
        "steps_per_sample": args.steps,
        "repeats": args.repeats,
        "kernel": "numba",
        "firing_rate": ex["firing_rate"],
        "train_steps_per_s": steps_s,
        "us_per_step": 1e6 / steps_s,
        "realtime_factor": 0.01 * steps_s,
        "step_api_steps_per_s": statistics.median(api),
        "numpy_steps_per_s": numpy_s,
        "speedup_vs_numpy": steps_s / numpy_s,
        "grad_rel_err_vs_bptt": rel_err,
        "grad_rel_err_definition": "max over w_in,w_rec,w_out of max|eprop-bptt|/max|bptt|; "
                                   "W_rec=0, symmetric, mean loss + rate reg, batch 4",
        "grad_rel_err_by_matrix": ex["mean"],
        "grad_rel_err_per_step_loss": max(ex["per_step"].values()),
        "cosine_vs_bptt_with_recurrence": ex["cosine"],
        "bytes_per_synapse": sum(nb.values()) / cfg.n_weights,
        "state_bytes": nb,
    }
    say(f"{result['network']}: {steps_s:,.0f} train steps/s "
        f"({result['us_per_step']:.1f} us/step, realtime x{result['realtime_factor']:.0f}); "
        f"step API {result['step_api_steps_per_s']:,.0f}/s; numpy {numpy_s:,.0f}/s "
        f"(x{result['speedup_vs_numpy']:.1f})")
    say(f"e-prop vs BPTT (W_rec=0): rel err {rel_err:.2e}; with recurrence cosine "
        f"{ex['cosine']:.3f}; {result['bytes_per_synapse']:.1f} bytes/synapse; "
        f"firing {100 * ex['firing_rate']:.1f} %")
    if args.json:
        print_json(result)
    return 0
