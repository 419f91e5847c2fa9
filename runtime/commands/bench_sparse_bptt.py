"""`edgeprop bench sparse-bptt`: sparse vs dense BPTT (and PyTorch) in one process.

Two networks: the keyword spotter (80-120-12 ALIF, T = 100, batch 64, real
speech_commands_dev features through the shipped model when both are present, else a
Gaussian input current) and an SHD-sized one (700-256-20 ALIF, T = 100, batch 64,
Bernoulli input spikes). Times are medians over --repeats calls in this process, the
compared functions called in turn (so load from other jobs hits them alike); speedups
are ratios of those medians. `backward_speedup` times each backward right after its own
(untimed) forward, the order training runs them, dense and sparse pairs interleaved;
`*_bwd_only`: the backward passes alone, interleaved (dense BPTT's 20 MB evict the
sparse pass's data from the caches in between, the most pessimistic order);
`*_warm`: the same backward called back to back (warm caches). The sparse forward is
the compiled one (`sparse_bptt.forward_fused`); the `network.step` loop version is timed too. Peak
backward memory = bytes kept from the forward pass for the backward pass + the peak of
what the backward allocates (tracemalloc; the numba kernels only use arrays allocated
beforehand in Python, so tracemalloc sees them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import tracemalloc

import numpy as np

from runtime.arg_types import int_range, pos_float
from runtime.console import add_output_flags, print_json, progress, say

SWEEP = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int_range(1, 1000), default=11,
                        help="timed repeats (median; calls interleaved; at most 1000)")
    parser.add_argument("--b-th", type=pos_float, default=0.2, help="sparse band B_th")
    # bounded: the SHD network's dense trace is ~0.6 GB at batch 1024
    parser.add_argument("--batch", type=int_range(1, 1024), default=64,
                        help="batch of both networks, 1-1024 (default 64)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the B_th sweep")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    add_output_flags(parser)


def _warm_median(fn, repeats: int) -> float:
    """Median time of `repeats` back-to-back calls (warm caches)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _paired_medians(fns, repeats: int) -> list[float]:
    """Median time of each function, calls interleaved so load drift hits all alike."""
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def _training_order_medians(pairs, repeats: int) -> list[float]:
    """Median backward time of each (forward, backward) pair, the backward timed right
    after its own (untimed) forward, as training runs them; pairs interleaved."""
    ts: list[list[float]] = [[] for _ in pairs]
    for _ in range(repeats):
        for k, (fwd, bwd) in enumerate(pairs):
            state = fwd()
            t0 = time.perf_counter()
            bwd(state)
            ts[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def _peak_alloc(fn) -> tuple[object, int]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, int(peak)


def _cosine(a, b) -> float:
    fa = np.concatenate([g.ravel() for g in a.arrays()]).astype(np.float64)
    fb = np.concatenate([g.ravel() for g in b.arrays()]).astype(np.float64)
    den = np.linalg.norm(fa) * np.linalg.norm(fb)
    return float(fa @ fb / den) if den else float("nan")


# ---------------------------------------------------------------- workloads
def kws_workload(batch: int, seed: int = 0):
    """(cfg, params, x (T, B, 80), labels, description)."""
    from edgeprop.network import ModelConfig, init_params

    try:
        from edgeprop.datasets import default_data_dir, scan_speech_commands
        from edgeprop.evaluation import checkpoint_frontend
        from edgeprop.feature_cache import FeatureCache
        from edgeprop.shipped import load_shipped

        data = default_data_dir()
        ck = load_shipped()
        if data is None:
            raise FileNotFoundError("no data")
        clips = scan_speech_commands(data).clips
        pick = np.random.default_rng(seed).choice(len(clips), batch, replace=False)
        chosen = [clips[i] for i in sorted(pick)]
        feats = FeatureCache().features(chosen, checkpoint_frontend(ck))
        x = np.ascontiguousarray(feats.transpose(1, 0, 2))
        labels = np.array([c.label_index for c in chosen])
        return ck.cfg, ck.params, x, labels, ("shipped model on real speech_commands_dev "
                                              "features")
    except Exception as exc:  # noqa: BLE001 - any missing piece falls back to synthetic
        reason = f"{type(exc).__name__}: {exc}"
    cfg = ModelConfig()
    params = init_params(cfg, seed)
    rng = np.random.default_rng(seed)
    x = (0.6 * rng.standard_normal((100, batch, cfg.n_in))).astype(np.float32)
    labels = rng.integers(0, cfg.n_out, batch)
    return cfg, params, x, labels, f"init weights, Gaussian current ({reason})"


def shd_workload(batch: int, seed: int = 0, p_in: float = 0.02):
    """700-256-20 ALIF with Bernoulli(p_in) input spikes; input gain set for a few % firing."""
    from edgeprop import bptt
    from edgeprop.network import ModelConfig, init_params

    cfg = ModelConfig(n_in=700, n_rec=256, n_out=20)
    params = init_params(cfg, seed)
    rng = np.random.default_rng(seed)
    x = (rng.random((100, batch, cfg.n_in)) < p_in).astype(np.float32)
    labels = rng.integers(0, cfg.n_out, batch)
    base = params.w_in.copy()
    rate = 0.0
    for gain in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):  # smallest gain giving >= 2 % firing
        params.w_in = (base * gain).astype(np.float32)
        rate = float(bptt.forward(cfg, params, x[:, :8]).z.mean())
        if rate >= 0.02:
            break
    return cfg, params, x, labels, (f"init weights x{gain:g} on the input, Bernoulli "
                                    f"p={p_in} input spikes, probe rate {rate:.3f}")


# ---------------------------------------------------------------- torch baseline
def torch_step_fn(cfg, params, x, labels):
    """A closure running PyTorch autograd BPTT (same network, reset detached) once."""
    import torch

    class Spike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, d):
            ctx.save_for_backward(d)
            return (d > 0).to(d.dtype)

        @staticmethod
        def backward(ctx, g):
            (d,) = ctx.saved_tensors
            psi = (cfg.gamma / cfg.v_th) * torch.clamp(1.0 - d.abs() / cfg.v_th, min=0.0)
            return g * psi

    w_in = torch.tensor(params.w_in, requires_grad=True)
    w_rec = torch.tensor(params.w_rec, requires_grad=True)
    w_out = torch.tensor(params.w_out, requires_grad=True)
    xt = torch.tensor(x)
    lt = torch.tensor(labels, dtype=torch.long)
    T, B, _ = x.shape
    alpha, rho, kappa = cfg.alpha, cfg.rho, cfg.kappa
    beta, v_th = cfg.beta_eff, cfg.v_th

    def run():
        for w in (w_in, w_rec, w_out):
            w.grad = None
        v = torch.zeros(B, cfg.n_rec)
        a = torch.zeros(B, cfg.n_rec)
        z = torch.zeros(B, cfg.n_rec)
        y = torch.zeros(B, cfg.n_out)
        ysum = torch.zeros(B, cfg.n_out)
        for t in range(T):
            v = alpha * v + xt[t] @ w_in.T + z @ w_rec.T - v_th * z.detach()
            a = rho * a + z
            z = Spike.apply(v - (v_th + beta * a))
            y = kappa * y + z @ w_out.T
            ysum = ysum + y
        loss = torch.nn.functional.cross_entropy(ysum / T, lt)
        loss.backward()
        return [w_in.grad.numpy().copy(), w_rec.grad.numpy().copy(),
                w_out.grad.numpy().copy()]

    return run


# ---------------------------------------------------------------- one network
def bench_network(name, workload, b_th: float, repeats: int, do_sweep: bool, use_torch: bool,
                  torch_reason: str | None) -> dict:
    from edgeprop import bptt, sparse_bptt
    from edgeprop.bptt import Grads

    cfg, params, x, labels, desc = workload
    T, B, _ = x.shape
    say(f"{name}: {cfg.n_in}-{cfg.n_rec}-{cfg.n_out} {cfg.neuron}, T={T}, B={B}: {desc}")
    band = min(b_th, float(cfg.v_th))  # what sparse_bptt keeps: psi is 0 beyond v_th
    if band < b_th:
        say(f"  note: B_th {b_th:g} is above this network's v_th {cfg.v_th:g}, so the band is "
            f"v_th: every neuron-step with a nonzero surrogate is kept (sparse equals dense)")

    def dense_fwd():
        return bptt.forward(cfg, params, x)

    trace = dense_fwd()

    def dense_bwd(tr=trace):
        return bptt.backward(cfg, params, tr, labels)

    def sparse_fwd(bt=b_th):
        return sparse_bptt.forward_fused(cfg, params, x, b_th=bt)

    def sparse_fwd_steploop():
        return sparse_bptt.forward(cfg, params, x, b_th=b_th)

    def sparse_bwd(st):
        return sparse_bptt.backward(cfg, params, st, labels)

    g_dense, dense_work = _peak_alloc(dense_bwd)
    st = sparse_fwd()
    sparse_bwd(st)  # compile / warm
    g_sparse, sparse_work = _peak_alloc(lambda: sparse_bwd(st))
    t_df, t_sf, t_sf_loop = _paired_medians([dense_fwd, sparse_fwd, sparse_fwd_steploop],
                                            repeats)
    t_db, t_sb = _training_order_medians([(dense_fwd, dense_bwd), (sparse_fwd, sparse_bwd)],
                                         repeats)
    t_db_bo, t_sb_bo = _paired_medians([dense_bwd, lambda: sparse_bwd(st)], repeats)
    t_db_warm = _warm_median(dense_bwd, repeats)
    t_sb_warm = _warm_median(lambda: sparse_bwd(st), repeats)
    kept_dense = sum(a.nbytes for a in (trace.x, trace.v, trace.thr, trace.z, trace.y))
    kept_sparse = st.nbytes()
    stats: list = []
    sparse_bptt.backward(cfg, params, st, labels, stats=stats)
    n_syn = cfg.n_rec * (cfg.n_in + cfg.n_rec)
    out = {
        "network": f"{cfg.n_in}-{cfg.n_rec}-{cfg.n_out} {cfg.neuron}",
        "T": T, "batch": B, "input": desc, "b_th": b_th, "band": band,
        "active_fraction": st.active_fraction,
        "firing_rate": st.firing_rate,
        "dense_forward_s": t_df, "dense_backward_s": t_db,
        "sparse_forward_s": t_sf, "sparse_backward_s": t_sb,
        "sparse_forward_steploop_s": t_sf_loop,
        "step_speedup_vs_dense_steploop_forward": (t_df + t_db) / (t_sf_loop + t_sb),
        "backward_speedup": t_db / t_sb,
        "backward_timing": "each backward right after its own forward (training order), "
                           "dense and sparse interleaved",
        "dense_backward_bwd_only_s": t_db_bo, "sparse_backward_bwd_only_s": t_sb_bo,
        "backward_speedup_bwd_only": t_db_bo / t_sb_bo,
        "dense_backward_warm_s": t_db_warm, "sparse_backward_warm_s": t_sb_warm,
        "backward_speedup_warm": t_db_warm / t_sb_warm,
        "step_speedup_vs_dense": (t_df + t_db) / (t_sf + t_sb),
        "peak_bytes_dense": int(kept_dense + dense_work),
        "peak_bytes_sparse": int(kept_sparse + sparse_work),
        "kept_bytes_dense": int(kept_dense), "kept_bytes_sparse": int(kept_sparse),
        "dense_min_kept_bytes": int(trace.x.nbytes + 2 * trace.z.nbytes),  # x, z, psi only
        "memory_saving": 1.0 - (kept_sparse + sparse_work) / (kept_dense + dense_work),
        "grad_cosine_vs_dense": _cosine(g_sparse, g_dense),
        "sparse_backward_ops": stats[0].ops,
        "dense_backward_macs": int(T * B * (n_syn + cfg.n_rec * cfg.n_rec)),
    }
    if use_torch:
        import torch

        fn = torch_step_fn(cfg, params, x, labels)
        g_torch = fn()
        t_torch, t_sf2, t_sb2 = _paired_medians([fn, sparse_fwd, lambda: sparse_bwd(st)],
                                                repeats)
        out["torch_step_s"] = t_torch
        out["step_speedup_vs_torch"] = t_torch / (t_sf2 + t_sb2)
        out["torch_grad_cosine_vs_dense"] = _cosine(Grads(*g_torch), g_dense)
        out["torch_threads"] = torch.get_num_threads()
    else:
        out["torch_step_s"] = None
        out["step_speedup_vs_torch"] = None
        out["torch_reason"] = torch_reason
    if do_sweep:
        sweep = []
        for bt in SWEEP:
            s2 = sparse_fwd(bt)
            g2 = sparse_bwd(s2)
            t_d2, t2 = _training_order_medians(
                [(dense_fwd, dense_bwd), (lambda bt=bt: sparse_fwd(bt), sparse_bwd)], repeats)
            sweep.append({"b_th": bt, "active_fraction": s2.active_fraction,
                          "sparse_backward_s": t2, "dense_backward_s": t_d2,
                          "backward_speedup": t_d2 / t2,
                          "grad_cosine_vs_dense": _cosine(g2, g_dense)})
        out["sweep"] = sweep
    say(f"  active {out['active_fraction']:.4f}, backward {t_db * 1e3:.1f} ms dense vs "
        f"{t_sb * 1e3:.2f} ms sparse ({out['backward_speedup']:.1f}x after own forward; "
        f"{out['backward_speedup_bwd_only']:.1f}x backward-only interleaved; back-to-back "
        f"{out['backward_speedup_warm']:.1f}x), step "
        f"{out['step_speedup_vs_dense']:.2f}x vs dense"
        + (f", {out['step_speedup_vs_torch']:.2f}x vs torch" if use_torch else "")
        + f", memory -{100 * out['memory_saving']:.0f} %, cosine "
          f"{out['grad_cosine_vs_dense']:.4f}")
    return out


def run(args) -> int:
    torch_reason = None
    use_torch = not args.no_torch
    if use_torch:
        try:
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        except ImportError as exc:
            use_torch, torch_reason = False, f"torch not importable ({exc}); pip install " \
                                             f"'edgeprop[bench]'"
    else:
        torch_reason = "--no-torch"
    results = {}
    with progress("networks", 2, args.quiet) as adv:
        for name, make in (("kws", kws_workload), ("shd", shd_workload)):
            results[name] = bench_network(name, make(args.batch), args.b_th, args.repeats,
                                          not args.no_sweep, use_torch, torch_reason)
            adv()
    out = {"benchmark": "sparse_bptt", "repeats": args.repeats, "b_th": args.b_th,
           "cpu_count": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "torch": None if not use_torch else __import__("torch").__version__,
           "torch_reason": torch_reason, **results}
    if args.json:
        print_json(out)
    return 0
