"""Per-PE firmware kernels (numba) with their plain NumPy references.

A neuron PE owning rows [r0, r0 + n) runs, per timer tick t (symbols of
docs/learning.md; `zin` is the spike vector z[t-1] it received as packets):

    v_j = alpha v_j + sum_i W_in[j,i] x_i + sum_{i: zin_i=1} W_rec[j,i] - v_th z_j
    a_j = rho a_j + z_j;  A_j = v_th + beta a_j;  z_j = H(v_j - A_j)
    psi_j = (gamma/v_th) max(0, 1 - |v_j - A_j| / v_th)
    eps_i = alpha eps_i + (x_i | zin_i)                      (one per presynaptic unit)
    eps_a_ji = psi_prev_j eps_prev_i + (rho - beta psi_prev_j) eps_a_ji     (ALIF)
    ebar_ji = kappa ebar_ji + psi_j (eps_i - beta eps_a_ji);  mean loss: acc_ji += ebar_ji

in the same floating-point operation order as `edgeprop.eprop_kernels.step_kernel`
(sequential sums over inputs, spikes in ascending neuron id), so that the emulator in
fp32 is bit-exact with `EpropLearner(kernel="numba")`. The neuron update, traces,
readout and learning signal are the reference's own njit pieces (`neuron_update`,
`presynaptic_traces`, `leaky_readout`, `learning_signal`, ...), called on a PE's slice;
only the eligibility loop is the emulator's own (fp16 stores, fused traces). numba's
cache does not see edits to those pieces (another file): after changing them, delete
this folder's __pycache__/kernels.*.nb[ic]. The event-driven recurrent sum is also what
the firmware does: one row add per received spike packet.

The readout PE accumulates y_k = kappa y_k + sum_{j: z_j=1} W_out[k,j] over the spikes
it received, the filtered rates zbar, and (per_step loss) the learning signals.
Rows where psi is 0 at t and t-1 skip to eps_a *= rho, ebar *= kappa (exact zeros
dropped), as in the reference; kernels return how many rows were active so the cycle
model charges the firmware's cheaper path for the others.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from edgeprop.eprop import mean_loss_terms
from edgeprop.eprop_kernels import (
    filtered_rates,
    leaky_readout,
    learning_signal,
    neuron_update,
    presynaptic_traces,
    spike_indices,
)

MODE_MEAN = 0
MODE_PER_STEP = 1

# neuron-state rows on a neuron PE
V, A, Z, PSI, PSI_PREV = range(5)
N_NEUR_ROWS = 5


@njit(cache=True, inline="always")
def round_fp16(x):  # pragma: no cover - numba
    """float32 -> nearest-even float16 value, kept in float32 (== x.astype(f16) widened).

    Normal range: round the 13 dropped mantissa bits to nearest-even on the bit
    pattern; f16-subnormal range: (x + 0.75) - 0.75 rounds to multiples of 2^-24;
    beyond the f16 range: inf. All three are computed and one selected: no branch in
    the eligibility loops, which call this on every store.
    """
    ax = abs(x)
    b = np.float32(x).view(np.uint32)
    b = np.uint32((b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1)))
                  & np.uint32(0xFFFFE000))
    normal = np.uint32(b).view(np.float32)
    sub = (x + np.float32(0.75)) - np.float32(0.75)
    big = x * np.float32(np.inf)
    r = sub if ax < np.float32(6.103515625e-05) else normal
    return big if ax >= np.float32(65520.0) else r


@njit(cache=True, inline="always")
def _st(x, half):  # pragma: no cover - numba
    """The value a store leaves in SRAM (fp16 traces round, fp32 keep)."""
    return round_fp16(x) if half else x


@njit(cache=True, inline="always")
def _scale_row(row, c, half):  # pragma: no cover - numba
    """row *= c, stored (the idle row's eps_a decay)."""
    if half:
        for i in range(row.size):
            row[i] = round_fp16(c * row[i])
    else:
        for i in range(row.size):
            row[i] = c * row[i]


@njit(cache=True, inline="always")
def _decay_row(ebar, acc, kappa, mean, half):  # pragma: no cover - numba
    """An idle row's ebar *= kappa (and, mean loss, acc += ebar), stored."""
    if mean:
        if half:
            for i in range(ebar.size):
                eb = kappa * ebar[i]
                ebar[i] = round_fp16(eb)
                acc[i] = round_fp16(acc[i] + eb)
        else:
            for i in range(ebar.size):
                eb = kappa * ebar[i]
                ebar[i] = eb
                acc[i] = acc[i] + eb
    else:
        _scale_row(ebar, kappa, half)


@njit(cache=True, inline="always")
def _alif_row(eps_a, eps, eps_prev, e, pc, pp, dec, beta, half):  # pragma: no cover - numba
    """An active ALIF row: eps_a updated and stored; e = its eligibility (registers)."""
    if half:
        for i in range(eps_a.size):
            ea = pp * eps_prev[i] + dec * eps_a[i]
            eps_a[i] = round_fp16(ea)
            e[i] = pc * (eps[i] - beta * ea)
    else:
        for i in range(eps_a.size):
            ea = pp * eps_prev[i] + dec * eps_a[i]
            eps_a[i] = ea
            e[i] = pc * (eps[i] - beta * ea)


@njit(cache=True, inline="always")
def _add_row(acc, e, half):  # pragma: no cover - numba
    """Fused traces: acc += e, stored."""
    if half:
        for i in range(acc.size):
            acc[i] = round_fp16(acc[i] + e[i])
    else:
        for i in range(acc.size):
            acc[i] = acc[i] + e[i]


@njit(cache=True, inline="always")
def _filter_row(ebar, acc, e, kappa, mean, half):  # pragma: no cover - numba
    """ebar = kappa ebar + e (and, mean loss, acc += ebar), stored."""
    if half:
        for i in range(ebar.size):
            eb = kappa * ebar[i] + e[i]
            ebar[i] = round_fp16(eb)
            if mean:
                acc[i] = round_fp16(acc[i] + eb)
    else:
        for i in range(ebar.size):
            eb = kappa * ebar[i] + e[i]
            ebar[i] = eb
            if mean:
                acc[i] = acc[i] + eb


@njit(cache=True, boundscheck=False)
def pe_step_kernel(x, zin, w_in, w_rec, neur, pre, eps_a, ebar, acc, consts, spk, spk_out,
                   mode, alif, fused, half):  # pragma: no cover - numba
    """One tick of a neuron PE. Returns (spikes out, active rows, spikes received).

    zin (uint8, n_rec) holds the spikes z[t-1] received; it is consumed (cleared).
    half: traces are stored as fp16 (each store rounds; registers keep float32).
    """
    n = w_in.shape[0]
    n_pre = pre.shape[1]
    rho = consts[1]
    kappa = consts[2]
    beta = consts[3]
    zero = np.float32(0.0)
    psi = neur[PSI]
    psi_prev = neur[PSI_PREV]
    eps = pre[0]
    eps_prev = pre[1]
    n_spk = spike_indices(zin, spk)
    # z is its own z_prev: row j's old spike is read before it is overwritten
    neuron_update(x, w_in, w_rec, spk, n_spk, neur[Z], neur[V], neur[A], neur[Z], psi,
                  psi_prev, consts)
    n_out = spike_indices(neur[Z], spk_out)
    presynaptic_traces(x, zin, eps, eps_prev, consts[0])
    for i in range(zin.shape[0]):
        zin[i] = 0
    active = 0
    e = np.empty(n_pre, np.float32)
    for j in range(n):
        pc = psi[j]
        pp = psi_prev[j]
        if pc == zero and pp == zero:
            if alif:
                _scale_row(eps_a[j], rho, half)
            if not fused:
                _decay_row(ebar[j], acc[j], kappa, mode == MODE_MEAN, half)
            continue
        active += 1
        if alif:
            _alif_row(eps_a[j], eps, eps_prev, e, pc, pp, rho - beta * pp, beta, half)
        else:
            for i in range(n_pre):
                e[i] = pc * eps[i]
        if fused:
            _add_row(acc[j], e, half)
        else:
            _filter_row(ebar[j], acc[j], e, kappa, mode == MODE_MEAN, half)
    return n_out, active, n_spk


@njit(cache=True, boundscheck=False)
def tick_batch_kernel(x, x_idx, spike_idx, take, x_bufs, zins, w_ins, w_recs, neurs, pres,
                      eps_as, ebars, accs, consts, spks, spk_outs, mode, alif, fused, half,
                      counts):  # pragma: no cover - numba
    """Several PEs' ticks in one call (the single-process fast path; same maths).

    Each PE p first takes the multicast packets delivered to it into its own buffers
    (take[p, 0]: input payloads x at channels x_idx; take[p, 1]: spikes at spike_idx),
    then runs `pe_step_kernel` on its own arrays only.
    counts[p] = (spikes out, active rows, spikes received).
    """
    for p in range(len(neurs)):
        xb = x_bufs[p]
        if take[p, 0]:
            for k in range(x_idx.size):
                xb[x_idx[k]] = x[k]
        zi = zins[p]
        if take[p, 1]:
            for k in range(spike_idx.size):
                zi[spike_idx[k]] = 1
        n_out, active, n_rx = pe_step_kernel(
            xb, zi, w_ins[p], w_recs[p], neurs[p], pres[p], eps_as[p], ebars[p], accs[p],
            consts, spks[p], spk_outs[p], mode, alif, fused, half)
        counts[p, 0] = n_out
        counts[p, 1] = active
        counts[p, 2] = n_rx


@njit(cache=True, boundscheck=False)
def sample_batch_kernel(xs, x_idx, take, r0s, x_bufs, zins, w_ins, w_recs, neurs, pres,
                        eps_as, ebars, accs, consts, spks, spk_outs, mode, alif, fused, half,
                        counts, spike_idx, zin_ro, w_out, y, sum_y, zbar, sum_zbar, ro_spk,
                        ro_counts):  # pragma: no cover - numba
    """A whole sample's ticks and readout steps in one call (mean loss; same maths).

    Step t is `tick_batch_kernel` with the frame xs[t] and the spikes of step t-1
    (global ids in spike_idx), then the readout PE's `readout_step_kernel` on the spikes
    of step t. counts[t] is that tick's per-PE counts, ro_counts[t] the readout's
    spikes. The last step's spikes end in the receivers' buffers, as delivered packets.
    """
    n_prev = 0
    for t in range(xs.shape[0]):
        tick_batch_kernel(xs[t], x_idx, spike_idx[:n_prev], take, x_bufs, zins, w_ins, w_recs,
                          neurs, pres, eps_as, ebars, accs, consts, spks, spk_outs, mode, alif,
                          fused, half, counts[t])
        n_s = 0
        for p in range(len(neurs)):
            so = spk_outs[p]
            for k in range(counts[t, p, 0]):
                spike_idx[n_s] = r0s[p] + so[k]
                n_s += 1
        zin_ro[:] = 0.0
        for k in range(n_s):
            zin_ro[spike_idx[k]] = 1.0
        ro_counts[t] = readout_step_kernel(zin_ro, w_out, y, sum_y, zbar, sum_zbar, consts[2],
                                           ro_spk)
        n_prev = n_s
    for p in range(len(zins)):
        if take[p, 1]:
            zi = zins[p]
            for k in range(n_prev):
                zi[spike_idx[k]] = 1


def pe_step_numpy(x, zin, w_in, w_rec, neur, pre, eps_a, ebar, acc, consts, mode, alif, fused):
    """NumPy reference of `pe_step_kernel` with fp32 traces (same sequential sum order).

    zin is the received spike vector (any dtype, 0/1); it is not cleared here.
    """
    zin = np.asarray(zin, np.float32)
    alpha, rho, kappa, beta, v_th, gam = (consts[k] for k in range(6))
    one, zero = np.float32(1.0), np.float32(0.0)
    n, n_in = w_in.shape
    s = np.zeros(n, np.float32)
    for i in range(n_in):
        s = s + w_in[:, i] * x[i]
    r = np.zeros(n, np.float32)
    for i in np.flatnonzero(zin):
        r = r + w_rec[:, i]
    zp = neur[Z].copy()
    neur[V] = alpha * neur[V] + s + r - v_th * zp
    neur[A] = rho * neur[A] + zp
    thr = v_th + beta * neur[A]
    neur[Z] = (neur[V] > thr).astype(np.float32)
    neur[PSI_PREV] = neur[PSI]
    neur[PSI] = gam * np.maximum(zero, one - np.abs(neur[V] - thr) / v_th)
    pre[1] = pre[0]
    pre[0, :n_in] = alpha * pre[0, :n_in] + x
    pre[0, n_in:] = alpha * pre[0, n_in:] + zin
    pp, pc = neur[PSI_PREV][:, None], neur[PSI][:, None]
    if alif:
        eps_a[:] = pp * pre[1][None, :] + (rho - beta * pp) * eps_a
        e = pc * (pre[0][None, :] - beta * eps_a)
    else:
        e = pc * pre[0][None, :]
    if fused:
        acc += e
    else:
        ebar[:] = kappa * ebar + e
        if mode == MODE_MEAN:
            acc += ebar
    return np.flatnonzero(neur[Z])


@njit(cache=True, boundscheck=False)
def pe_lsig_kernel(L, ebar, acc, half):  # pragma: no cover - numba
    """per_step loss: acc_ji += L_j ebar_ji for rows with a non-zero learning signal."""
    n, n_pre = ebar.shape
    rows = 0
    for j in range(n):
        lj = L[j]
        if lj != np.float32(0.0):
            rows += 1
            for i in range(n_pre):
                acc[j, i] = _st(acc[j, i] + lj * ebar[j, i], half)
    return rows


@njit(cache=True, boundscheck=False)
def round_fp16_array(a):  # pragma: no cover - numba
    """Round a float32 array in place to float16 values (what an fp16 store keeps)."""
    f = a.reshape(-1)
    for i in range(f.size):
        f[i] = round_fp16(f[i])


@njit(cache=True, boundscheck=False)
def readout_step_kernel(zin, w_out, y, sum_y, zbar, sum_zbar, kappa, spk):  # pragma: no cover
    """Readout PE: leaky readout over received spikes, running sums, filtered rates."""
    filtered_rates(zin, zbar, sum_zbar, kappa)
    n_spk = spike_indices(zin, spk)
    leaky_readout(w_out, spk, n_spk, y, sum_y, kappa)
    return n_spk


def readout_step_numpy(zin, w_out, y, sum_y, zbar, sum_zbar, kappa):
    """NumPy reference of `readout_step_kernel`."""
    zbar[:] = kappa * zbar + zin
    sum_zbar += zbar
    r = np.zeros(w_out.shape[0], np.float32)
    for j in np.flatnonzero(zin):
        r = r + w_out[:, j]
    y[:] = kappa * y + r
    sum_y += y


#: Readout PE, per_step loss: the learning signals L (n_rec,) of this step, computed by the
#: reference's own `edgeprop.eprop_kernels.learning_signal` (True when any L_j may be non-zero).
readout_lsig_kernel = learning_signal


#: Readout PE, mean loss: (loss, d, coef, zsum/T, ybar) at the end of a sample, the
#: reference's own maths (double precision; the M4F would run it as soft-float on
#: 12 + 120 values once per sample, and costs.py charges it as such).
mean_end_sample = mean_loss_terms
