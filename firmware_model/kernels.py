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
fp32 is bit-exact with `EpropLearner(kernel="numba")`. The event-driven recurrent sum
is also what the firmware does: one row add per received spike packet.

The readout PE accumulates y_k = kappa y_k + sum_{j: z_j=1} W_out[k,j] over the spikes
it received, the filtered rates zbar, and (per_step loss) the learning signals.
Rows where psi is 0 at t and t-1 skip to eps_a *= rho, ebar *= kappa (exact zeros
dropped), as in the reference; kernels return how many rows were active so the cycle
model charges the firmware's cheaper path for the others.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

MODE_MEAN = 0
MODE_PER_STEP = 1

# neuron-state rows on a neuron PE
V, A, Z, PSI, PSI_PREV = range(5)
N_NEUR_ROWS = 5


@njit(cache=True, inline="always")
def round_fp16(x):  # pragma: no cover - numba
    """float32 -> nearest-even float16 value, kept in float32 (== x.astype(f16) widened).

    Normal range: round the 13 dropped mantissa bits to nearest-even on the bit
    pattern; f16-subnormal range: (x + 0.75) - 0.75 rounds to multiples of 2^-24.
    """
    ax = abs(x)
    if ax < np.float32(6.103515625e-05):
        return (x + np.float32(0.75)) - np.float32(0.75)
    if ax >= np.float32(65520.0):
        return x * np.float32(np.inf) if x == x else x
    b = np.float32(x).view(np.uint32)
    b = np.uint32((b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1)))
                  & np.uint32(0xFFFFE000))
    return np.uint32(b).view(np.float32)


@njit(cache=True, inline="always")
def _st(x, half):  # pragma: no cover - numba
    """The value a store leaves in SRAM (fp16 traces round, fp32 keep)."""
    return round_fp16(x) if half else x


@njit(cache=True, boundscheck=False)
def pe_step_kernel(x, zin, w_in, w_rec, neur, pre, eps_a, ebar, acc, consts, spk, spk_out,
                   mode, alif, fused, half):  # pragma: no cover - numba
    """One tick of a neuron PE. Returns (spikes out, active rows, spikes received).

    zin (uint8, n_rec) holds the spikes z[t-1] received; it is consumed (cleared).
    half: traces are stored as fp16 (each store rounds; registers keep float32).
    """
    n, n_in = w_in.shape
    n_rec = zin.shape[0]
    n_pre = n_in + n_rec
    alpha = consts[0]
    rho = consts[1]
    kappa = consts[2]
    beta = consts[3]
    v_th = consts[4]
    gam = consts[5]
    one = np.float32(1.0)
    zero = np.float32(0.0)
    v = neur[V]
    a = neur[A]
    z = neur[Z]
    psi = neur[PSI]
    psi_prev = neur[PSI_PREV]
    eps = pre[0]
    eps_prev = pre[1]
    n_spk = 0
    for i in range(n_rec):
        if zin[i] != 0:
            spk[n_spk] = i
            n_spk += 1
    n_out = 0
    for j in range(n):
        s = zero
        for i in range(n_in):
            s += w_in[j, i] * x[i]
        r = zero
        for k in range(n_spk):
            r += w_rec[j, spk[k]]
        zp = z[j]
        v[j] = alpha * v[j] + s + r - v_th * zp
        a[j] = rho * a[j] + zp
        thr = v_th + beta * a[j]
        z[j] = one if v[j] > thr else zero
        if z[j] != zero:
            spk_out[n_out] = j
            n_out += 1
        psi_prev[j] = psi[j]
        psi[j] = gam * max(zero, one - abs(v[j] - thr) / v_th)
    for i in range(n_pre):
        eps_prev[i] = eps[i]
    for i in range(n_in):
        eps[i] = alpha * eps[i] + x[i]
    for i in range(n_rec):
        eps[n_in + i] = alpha * eps[n_in + i] + np.float32(zin[i])
        zin[i] = 0
    active = 0
    for j in range(n):
        pc = psi[j]
        pp = psi_prev[j]
        if pc == zero and pp == zero:
            if alif:
                for i in range(n_pre):
                    eps_a[j, i] = _st(rho * eps_a[j, i], half)
            if fused:
                continue
            if mode == MODE_MEAN:
                for i in range(n_pre):
                    eb = kappa * ebar[j, i]
                    ebar[j, i] = _st(eb, half)
                    acc[j, i] = _st(acc[j, i] + eb, half)
            else:
                for i in range(n_pre):
                    ebar[j, i] = _st(kappa * ebar[j, i], half)
            continue
        active += 1
        dec = rho - beta * pp
        for i in range(n_pre):
            if alif:
                ea = pp * eps_prev[i] + dec * eps_a[j, i]
                eps_a[j, i] = _st(ea, half)
                e = pc * (eps[i] - beta * ea)
            else:
                e = pc * eps[i]
            if fused:
                acc[j, i] = _st(acc[j, i] + e, half)
                continue
            eb = kappa * ebar[j, i] + e
            ebar[j, i] = _st(eb, half)
            if mode == MODE_MEAN:
                acc[j, i] = _st(acc[j, i] + eb, half)
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
    n_out, n_rec = w_out.shape
    zero = np.float32(0.0)
    n_spk = 0
    for j in range(n_rec):
        zbar[j] = kappa * zbar[j] + zin[j]
        sum_zbar[j] += zbar[j]
        if zin[j] != zero:
            spk[n_spk] = j
            n_spk += 1
    for k in range(n_out):
        r = zero
        for m in range(n_spk):
            r += w_out[k, spk[m]]
        y[k] = kappa * y[k] + r
        sum_y[k] += y[k]
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


@njit(cache=True, boundscheck=False)
def readout_lsig_kernel(y, fb, zbar, sum_zbar, out_acc, L, consts, stats,
                        target):  # pragma: no cover - numba
    """Readout PE, per_step loss: learning signals L (n_rec,) for this step, as the reference.

    Returns True when any L_j may be non-zero (a labelled step or the regulariser).
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


def mean_end_sample(sum_y, sum_zbar, fb, T, label, kappa, reg_coef, target_rate):
    """Readout PE, mean loss: (loss, d, coef (n_rec,) float32, zsum/T) as the reference.

    Double precision like `EpropLearner.end_sample` (the M4F would run it as soft-float
    on 12 + 120 values once per sample; costs.py charges it as such).
    """
    ybar = sum_y.astype(np.float64) / T
    lse = ybar.max() + math.log(np.exp(ybar - ybar.max()).sum())
    d = np.exp(ybar - lse)
    d[label] -= 1.0
    loss = lse - ybar[label]
    zsum = sum_zbar.astype(np.float64)
    f = (1.0 - kappa) * zsum / T
    coef = fb.T.astype(np.float64) @ d
    if reg_coef:
        coef += reg_coef * (1.0 - kappa) * (f - target_rate)
        loss += 0.5 * reg_coef * float(((f - target_rate) ** 2).sum())
    coef = (coef / T).astype(np.float32)
    return float(loss), d, coef, zsum / T, ybar


def adam_update(p, g, m, v, t, lr, b1, b2, eps, tmp):
    """In-place Adam on one PE's arrays, in `edgeprop.optim.Adam.step`'s operation order."""
    c1 = 1.0 - b1**t
    c2 = 1.0 - b2**t
    step_size = np.float32(lr / c1)
    sq = np.float32(np.sqrt(c2))
    m *= np.float32(b1)
    m += np.float32(1.0 - b1) * g
    np.multiply(g, g, out=tmp)
    v *= np.float32(b2)
    tmp *= np.float32(1.0 - b2)
    v += tmp
    np.sqrt(v, out=tmp)
    tmp /= sq
    tmp += np.float32(eps)
    np.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp
