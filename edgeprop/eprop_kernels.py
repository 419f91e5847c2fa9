"""Fused numba kernel for one e-prop training step (forward + traces + accumulation).

It computes exactly what `EpropLearner` does with kernel="numpy" (forward by
`edgeprop.network.step`, then the e-prop updates of docs/learning.md), in one pass over
the synapses, without allocating. tests/test_core_eprop.py holds it to that reference.

Buffers (all float32 unless noted, shared with the NumPy path of EpropLearner):

- ``neur`` (9, n_rec) rows: v, a, z, psi, psi_prev, zbar, sum_zbar, L, z_prev
- ``pre``  (2, n_pre) rows: eps, eps_prev with n_pre = n_in + n_rec; columns
  [0, n_in) are input synapses (eps_in), [n_in, n_pre) recurrent ones (eps_rec)
- ``eps_a``, ``ebar``, ``acc`` (n_rec, n_pre): per-synapse state (eps_a unused for LIF)
- ``consts`` (8,): alpha, rho, kappa, beta, v_th, gamma/v_th, reg_coef, target_rate
- ``stats`` float64 (4,): steps this sample, labelled steps this sample, CE sum this
  sample, labelled steps since the last optimizer step
- ``spk`` int64 (n_rec,): scratch for the indices of z_prev / z spikes

Row skipping: when psi_j is 0 at t and t-1 the row's update reduces to eps_a *= rho,
ebar *= kappa (the dropped terms are exact zeros), so the kernel does just that.

The forward update, traces, readout and per_step learning signal are separate njit
functions that the emulator's per-PE kernels (firmware_model/kernels.py) call too, so
both run one implementation in one floating-point operation order. They are
inline="always" (measured: plain calls cost the reference kernel 2-4 %). numba's
cache=True keys a kernel on its own file's source only, so after editing one of these,
delete firmware_model/__pycache__/kernels.*.nb[ic] or the emulator keeps the old copy
(tests/test_emulator_equivalence.py would then fail on bit-exactness).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MODE_MEAN = 0
MODE_PER_STEP = 1


# --- pieces shared with the emulator's per-PE kernels (firmware_model/kernels.py), so that
# each idea has one implementation and both stay in the same float operation order.


@njit(cache=True, boundscheck=False, inline="always")
def spike_indices(z, spk):  # pragma: no cover - numba
    """Write the indices of z's non-zero entries to spk in ascending order; return how many."""
    n_spk = 0
    for j in range(z.shape[0]):
        if z[j] != 0:
            spk[n_spk] = j
            n_spk += 1
    return n_spk


@njit(cache=True, boundscheck=False, inline="always")
def neuron_update(x, w_in, w_rec, spk, n_spk, z_prev, v, a, z, psi, psi_prev,
                  consts):  # pragma: no cover - numba
    """Forward step of the rows of w_in, in `network.step`'s operation order.

    v_j = alpha v_j + sum_i W_in[j,i] x_i + sum_k W_rec[j,spk_k] - v_th zp_j;
    a_j = rho a_j + zp_j; z_j = H(v_j - v_th - beta a_j); psi_j = (gamma/v_th) max(0,
    1 - |v_j - thr_j| / v_th), psi_prev_j keeps the old psi_j. zp_j = z_prev[j] is read
    before z[j] is written, so z_prev may be z itself (a PE keeps no separate copy).
    """
    n_in = w_in.shape[1]
    alpha = consts[0]
    rho = consts[1]
    beta = consts[3]
    v_th = consts[4]
    gam = consts[5]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(w_in.shape[0]):
        s = zero
        for i in range(n_in):
            s += w_in[j, i] * x[i]
        r = zero
        for k in range(n_spk):
            r += w_rec[j, spk[k]]
        zp = z_prev[j]
        v[j] = alpha * v[j] + s + r - v_th * zp
        a[j] = rho * a[j] + zp
        thr = v_th + beta * a[j]
        z[j] = one if v[j] > thr else zero
        psi_prev[j] = psi[j]
        psi[j] = gam * max(zero, one - abs(v[j] - thr) / v_th)


@njit(cache=True, boundscheck=False, inline="always")
def presynaptic_traces(x, z_in, eps, eps_prev, alpha):  # pragma: no cover - numba
    """eps_prev = eps; eps_in = alpha eps_in + x; eps_rec = alpha eps_rec + z[t-1] (z_in).

    eps holds the n_in input traces, then one per entry of z_in (any 0/1 dtype).
    """
    n_in = eps.shape[0] - z_in.shape[0]
    for i in range(eps.shape[0]):
        eps_prev[i] = eps[i]
    for i in range(n_in):
        eps[i] = alpha * eps[i] + x[i]
    for i in range(z_in.shape[0]):
        eps[n_in + i] = alpha * eps[n_in + i] + np.float32(z_in[i])


@njit(cache=True, boundscheck=False, inline="always")
def filtered_rates(z, zbar, sum_zbar, kappa):  # pragma: no cover - numba
    """zbar_j = kappa zbar_j + z_j and its running sum over the sample."""
    for j in range(z.shape[0]):
        zbar[j] = kappa * zbar[j] + z[j]
        sum_zbar[j] += zbar[j]


@njit(cache=True, boundscheck=False, inline="always")
def leaky_readout(w_out, spk, n_spk, y, sum_y, kappa):  # pragma: no cover - numba
    """y_k = kappa y_k + sum_m W_out[k, spk_m] (spikes in ascending id) and its running sum."""
    zero = np.float32(0.0)
    for k in range(w_out.shape[0]):
        r = zero
        for m in range(n_spk):
            r += w_out[k, spk[m]]
        y[k] = kappa * y[k] + r
        sum_y[k] += y[k]


@njit(cache=True, boundscheck=False, inline="always")
def learning_signal(y, fb, zbar, sum_zbar, out_acc, L, consts, stats,
                    target):  # pragma: no cover - numba
    """per_step loss: this step's learning signals L (n_rec,); True if any may be non-zero.

    Labelled step (target >= 0): delta = softmax(y) - onehot(target) in float64, CE into
    stats[1:4], L_j = sum_k fb[k,j] delta_k, out_acc += delta zbar^T. Regulariser:
    L_j += c (1-kappa)((1-kappa) sum_zbar_j / t - f*), t = stats[0] steps so far.
    """
    n_out, n_rec = fb.shape
    kappa = consts[2]
    reg = consts[6]
    f_star = consts[7]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(n_rec):
        L[j] = zero
    any_l = False
    if target >= 0:
        ym = -np.inf
        for k in range(n_out):
            ym = max(ym, np.float64(y[k]))
        se = 0.0
        for k in range(n_out):
            se += math.exp(np.float64(y[k]) - ym)
        lse = ym + math.log(se)
        stats[1] += 1.0
        stats[2] += lse - np.float64(y[target])
        stats[3] += 1.0
        for k in range(n_out):
            d = math.exp(np.float64(y[k]) - lse)
            if k == target:
                d -= 1.0
            dk = np.float32(d)
            for j in range(n_rec):
                L[j] += fb[k, j] * dk
                out_acc[k, j] += dk * zbar[j]
        any_l = True
    if reg != zero:
        c = reg * (one - kappa)
        inv_t = one / np.float32(stats[0])
        for j in range(n_rec):
            L[j] += c * ((one - kappa) * sum_zbar[j] * inv_t - f_star)
        any_l = True
    return any_l


# --- the reference kernel


@njit(cache=True, boundscheck=False)
def step_kernel(x, w_in, w_rec, w_out, fb, neur, y, pre, eps_a, ebar, acc, out_acc, sum_y,
                consts, stats, spk, target, mode, alif):  # pragma: no cover - numba
    n_rec = w_in.shape[0]
    n_pre = pre.shape[1]
    rho = consts[1]
    kappa = consts[2]
    beta = consts[3]
    zero = np.float32(0.0)
    z = neur[2]
    psi = neur[3]
    psi_prev = neur[4]
    zbar = neur[5]
    sum_zbar = neur[6]
    L = neur[7]
    z_prev = neur[8]
    eps = pre[0]
    eps_prev = pre[1]

    for j in range(n_rec):
        z_prev[j] = z[j]
    n_spk = spike_indices(z_prev, spk)
    # forward, same operation order as network.step
    neuron_update(x, w_in, w_rec, spk, n_spk, z_prev, neur[0], neur[1], z, psi, psi_prev,
                  consts)
    filtered_rates(z, zbar, sum_zbar, kappa)
    n_spk = spike_indices(z, spk)
    leaky_readout(w_out, spk, n_spk, y, sum_y, kappa)
    stats[0] += 1.0
    presynaptic_traces(x, z_prev, eps, eps_prev, consts[0])
    # learning signal (per_step only; the mean loss forms it at the end of the sample)
    any_l = False
    if mode == MODE_PER_STEP:
        any_l = learning_signal(y, fb, zbar, sum_zbar, out_acc, L, consts, stats, target)
    # per-synapse eligibility, filtered trace and accumulator
    for j in range(n_rec):
        pc = psi[j]
        pp = psi_prev[j]
        lj = L[j]
        do_acc = mode == MODE_MEAN or (any_l and lj != zero)
        if pc == zero and pp == zero:
            if alif:
                for i in range(n_pre):
                    eps_a[j, i] = rho * eps_a[j, i]
            if mode == MODE_MEAN:
                for i in range(n_pre):
                    eb = kappa * ebar[j, i]
                    ebar[j, i] = eb
                    acc[j, i] += eb
            elif do_acc:
                for i in range(n_pre):
                    eb = kappa * ebar[j, i]
                    ebar[j, i] = eb
                    acc[j, i] += lj * eb
            else:
                for i in range(n_pre):
                    ebar[j, i] = kappa * ebar[j, i]
            continue
        if alif:
            dec = rho - beta * pp
            if mode == MODE_MEAN:
                for i in range(n_pre):
                    ea = pp * eps_prev[i] + dec * eps_a[j, i]
                    eps_a[j, i] = ea
                    eb = kappa * ebar[j, i] + pc * (eps[i] - beta * ea)
                    ebar[j, i] = eb
                    acc[j, i] += eb
            elif do_acc:
                for i in range(n_pre):
                    ea = pp * eps_prev[i] + dec * eps_a[j, i]
                    eps_a[j, i] = ea
                    eb = kappa * ebar[j, i] + pc * (eps[i] - beta * ea)
                    ebar[j, i] = eb
                    acc[j, i] += lj * eb
            else:
                for i in range(n_pre):
                    ea = pp * eps_prev[i] + dec * eps_a[j, i]
                    eps_a[j, i] = ea
                    ebar[j, i] = kappa * ebar[j, i] + pc * (eps[i] - beta * ea)
        else:
            if mode == MODE_MEAN:
                for i in range(n_pre):
                    eb = kappa * ebar[j, i] + pc * eps[i]
                    ebar[j, i] = eb
                    acc[j, i] += eb
            elif do_acc:
                for i in range(n_pre):
                    eb = kappa * ebar[j, i] + pc * eps[i]
                    ebar[j, i] = eb
                    acc[j, i] += lj * eb
            else:
                for i in range(n_pre):
                    ebar[j, i] = kappa * ebar[j, i] + pc * eps[i]


@njit(cache=True, boundscheck=False)
def run_kernel(xs, targets, w_in, w_rec, w_out, fb, neur, y, pre, eps_a, ebar, acc, out_acc,
               sum_y, consts, stats, spk, mode, alif):  # pragma: no cover - numba
    """step_kernel over xs (T, n_in) with per-step targets (T,) (-1 = none)."""
    for t in range(xs.shape[0]):
        step_kernel(xs[t], w_in, w_rec, w_out, fb, neur, y, pre, eps_a, ebar, acc, out_acc,
                    sum_y, consts, stats, spk, targets[t], mode, alif)
