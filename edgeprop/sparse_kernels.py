"""The sequential part of sparse BPTT: a numba kernel and its plain NumPy reference.

Both compute, from the active entries of a forward pass (sorted by time, flat index
b * n + j, surrogate psi) the per-entry adjoint

    h[b,t,j] = psi[b,t,j] * (g_direct[b,t,j] + r[b,t,j] + q[b,t,j])

where r = W_rec^T v_adj[t+1] (recurrent path) and q = a_adj[t+1] (adaptation path),
and then the weight gradients dW_in = sum h eps_in, dW_rec = sum h eps_rec over the
active entries, with eps_in[t] = alpha eps_in[t-1] + x[t] and eps_rec[t] = alpha
eps_rec[t-1] + z[t-1] the presynaptic traces. Why this is exact: v_adj[t] = h[t] +
alpha v_adj[t+1] is non-zero everywhere (the leak), but v_adj[t] = sum_{s>=t}
alpha^(s-t) h[s], so sum_t v_adj[t] x[t]^T = sum_s h[s] eps_in[s]^T, and the same for
the recurrent input; nothing but h at the active entries is ever needed.

Recurrences r[t-1] = alpha r[t] + W_rec^T h[t] and q[t-1] = rho q[t] - beta h[t] carry
the leak as a time-dependent scale (the kernel stores R = alpha^(s - base) sums and
reads them back with alpha^(base - t - 1); `base` moves every REBASE steps so the
scales stay within a factor alpha^-REBASE), so no dense decay runs per step: the
kernel's work is O(A (2 n_rec + n_in)) for A active entries plus one pass of the
input/spike traces, O(T B (n_in + n_rec)), which touches every input once (dense x
must be read), and an O(T B n_rec / REBASE) rescale.

The reference keeps dense (B, n) r and q and decays them every step: obviously right,
and the test holds the kernel to it.

The kernels' float arithmetic and its order are frozen (the shipped model was trained
with them; tests/test_sparse_bptt_bitexact.py checks hashes): speed-ups may change
layout, passes and dispatch, not which additions happen in which order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

REBASE = 32  # steps between rescales of the lazy leak accumulators
#: ln of the largest scale alpha^-(t - base) may reach between rescales (e^30 = 1e13):
#: a fast leak (small tau_m, alpha^-32 past float32's 3e38) rescales more often
MAX_LOG_SCALE = 30.0


def kernel_fits(alpha: float, rho: float) -> bool:
    """Whether the kernel's lazy scales stay in float32 range even when rescaled every
    step: a leak faster than e^-30 per step (tau_m < 0.034 steps) is the reference's."""
    return all(not 0.0 < d < 1.0 or -math.log(d) <= MAX_LOG_SCALE for d in (alpha, rho))


def adjoint_reference(
    alpha: float, rho: float, beta: float, n: int, B: int,
    act_ptr: np.ndarray, act_idx: np.ndarray, act_psi: np.ndarray,
    w_rec: np.ndarray, tail: np.ndarray, g_coef: np.ndarray,
    y_adj: np.ndarray, w_out: np.ndarray,
) -> np.ndarray:
    """h at every active entry (float64), dense per-step recursion (reference).

    g_direct[b,t,j] = tail[t] g_coef[b,j] (+ y_adj[t,b] . w_out[:, j] when y_adj is
    not empty).
    """
    T = len(act_ptr) - 1
    h = np.zeros(len(act_idx), np.float64)
    r = np.zeros((B, n), np.float64)
    q = np.zeros((B, n), np.float64)
    wr = w_rec.astype(np.float64)
    per_step = y_adj.size > 0
    for t in range(T - 1, -1, -1):
        sl = slice(act_ptr[t], act_ptr[t + 1])
        b, j = np.divmod(act_idx[sl].astype(np.int64), n)
        gd = tail[t] * g_coef[b, j]
        if per_step:
            gd = gd + np.einsum("ak,ka->a", y_adj[t, b].astype(np.float64),
                                w_out[:, j].astype(np.float64))
        h[sl] = act_psi[sl] * (gd + r[b, j] + q[b, j])
        dense_h = np.zeros((B, n))
        dense_h[b, j] = h[sl]
        r = alpha * r + dense_h @ wr
        q = rho * q - beta * dense_h
    return h


def weight_grads_reference(
    alpha: float, n: int, x: np.ndarray,
    act_ptr: np.ndarray, act_idx: np.ndarray, h: np.ndarray,
    spk_ptr: np.ndarray, spk_idx: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """dW_in, dW_rec (float64) from h and the input / spike traces (reference)."""
    T, B, n_in = x.shape
    g_in = np.zeros((n, n_in))
    g_rec = np.zeros((n, n))
    eps_in = np.zeros((B, n_in))
    eps_rec = np.zeros((B, n))
    for t in range(T):
        eps_in = alpha * eps_in + x[t]
        eps_rec = alpha * eps_rec
        if t > 0:
            sb, sj = np.divmod(spk_idx[spk_ptr[t - 1]:spk_ptr[t]].astype(np.int64), n)
            eps_rec[sb, sj] += 1.0
        sl = slice(act_ptr[t], act_ptr[t + 1])
        b, j = np.divmod(act_idx[sl].astype(np.int64), n)
        dense_h = np.zeros((B, n))
        dense_h[b, j] = h[sl]
        g_in += dense_h.T @ eps_in
        g_rec += dense_h.T @ eps_rec
    np.fill_diagonal(g_rec, 0.0)
    return g_in, g_rec


def split_flat_reference(flat: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, j) = divmod(flat, n) as int32 (reference of `split_flat`)."""
    b, j = np.divmod(flat.astype(np.int64), n)
    return b.astype(np.int32), j.astype(np.int32)


@njit(cache=True)
def split_flat(flat, n, out_b, out_j):  # pragma: no cover - compiled
    """out_b, out_j = divmod(flat, n), once per backward.

    The kernels below used to divide per use (an integer division per active entry in
    each pass and per spike); here each index is split once, by a float reciprocal
    multiply with a one-step correction (exact for int32 indices).
    """
    inv = 1.0 / n
    for k in range(flat.shape[0]):
        f = np.int64(flat[k])
        b = np.int64(np.float64(f) * inv)
        if (b + 1) * n <= f:
            b += 1
        elif b * n > f:
            b -= 1
        out_b[k] = b
        out_j[k] = f - b * n


@njit(cache=True, fastmath=True)
def adjoint_kernel(
    alpha, rho, beta, n, B, act_ptr, act_b, act_j, act_psi, w_rec, tail, g_coef, y_adj,
    w_out, h, h32, acc_r, acc_q,
):  # pragma: no cover - compiled
    """Kernel twin of `adjoint_reference`; writes h and h32 = float32(h), uses acc_r/acc_q
    (B, n) as work. Entries come pre-split into (act_b, act_j) (`split_flat`).

    The arithmetic and its order are frozen: the shipped model was trained with exactly
    these gradients (tests/test_sparse_bptt_bitexact.py holds them bit for bit).
    """
    T = act_ptr.shape[0] - 1
    K = w_out.shape[0]
    per_step = y_adj.shape[0] > 0
    acc_r[:, :] = 0.0
    acc_q[:, :] = 0.0
    base = T  # R = sum_s alpha^(s - base) W^T h[s];  r[t] = alpha^(base - t - 1) R
    span = REBASE  # (the shipped constants keep 32: their gradients stay bit for bit)
    for decay in (alpha, rho):
        if 0.0 < decay < 1.0:
            span = max(1, min(span, int(MAX_LOG_SCALE / -math.log(decay))))
    ops = 0
    for t in range(T - 1, -1, -1):
        if base - t > span:
            nb = t + 1
            fr = alpha ** (base - nb)
            fq = rho ** (base - nb)
            for b in range(B):
                for i in range(n):
                    acc_r[b, i] *= fr
                    acc_q[b, i] *= fq
            ops += B * n
            base = nb
        read_r = alpha ** (base - t - 1)
        read_q = rho ** (base - t - 1)
        p0 = act_ptr[t]
        p1 = act_ptr[t + 1]
        tt = tail[t]
        for k in range(p0, p1):
            b = act_b[k]
            j = act_j[k]
            gd = tt * g_coef[b, j]
            if per_step:
                for c in range(K):
                    gd += y_adj[t, b, c] * w_out[c, j]
            hk = act_psi[k] * (gd + read_r * acc_r[b, j] + read_q * acc_q[b, j])
            h[k] = hk
            h32[k] = np.float32(hk)
        write_r = alpha ** (t - base)
        write_q = rho ** (t - base)
        for k in range(p0, p1):
            b = act_b[k]
            j = act_j[k]
            cr = np.float32(h[k] * write_r)  # acc_r is float32: keep the axpy in float32
            if cr != 0.0:
                for i in range(n):
                    acc_r[b, i] += cr * w_rec[j, i]
            acc_q[b, j] -= beta * h[k] * write_q
        ops += (p1 - p0) * (n + 2)
    return ops


@njit(cache=True, fastmath=True)
def weight_grads_kernel(
    alpha, x, act_ptr, act_b, act_j, h32, spk_ptr, spk_b, spk_j, g_in, g_rec, eps_in,
    eps_rec,
):  # pragma: no cover - compiled
    """Kernel twin of `weight_grads_reference`; accumulates into g_in, g_rec (float32).

    Every g element gets its float32 additions in time order, as when the shipped model
    was trained (bit-identical, tests/test_sparse_bptt_bitexact.py). Two passes over
    time, dW_in then dW_rec, so each pass's working set (eps and g) is half as large.
    """
    T, B, n_in = x.shape
    n = g_rec.shape[0]
    eps_in[:, :] = 0.0
    eps_rec[:, :] = 0.0
    ops = 0
    t_end = 0  # nothing after the last active step can contribute
    for t in range(T):
        if act_ptr[t + 1] > act_ptr[t]:
            t_end = t + 1
    for t in range(t_end):
        for b in range(B):
            for i in range(n_in):
                eps_in[b, i] = alpha * eps_in[b, i] + x[t, b, i]
        for k in range(act_ptr[t], act_ptr[t + 1]):
            hk = h32[k]
            if hk == 0.0:
                continue
            b = act_b[k]
            j = act_j[k]
            for i in range(n_in):
                g_in[j, i] += hk * eps_in[b, i]
    for t in range(t_end):
        for b in range(B):
            for i in range(n):
                eps_rec[b, i] *= alpha
        if t > 0:
            for s in range(spk_ptr[t - 1], spk_ptr[t]):
                eps_rec[spk_b[s], spk_j[s]] += 1.0
        for k in range(act_ptr[t], act_ptr[t + 1]):
            hk = h32[k]
            if hk == 0.0:
                continue
            b = act_b[k]
            j = act_j[k]
            for i in range(n):
                g_rec[j, i] += hk * eps_rec[b, i]
    ops += t_end * B * (n_in + n) + (act_ptr[t_end] - act_ptr[0]) * (n_in + n)
    for j in range(n):
        g_rec[j, j] = 0.0
    return ops


@njit(cache=True)
def backward_kernel(
    alpha, rho, beta, alpha32, x, act_ptr, act_idx, act_psi, spk_ptr, spk_idx, w_rec, tail,
    g_coef, y_adj, w_out, act_b, act_j, spk_b, spk_j, h, h32, acc_r, acc_q, g_in, g_rec,
    eps_in, eps_rec,
):  # pragma: no cover - compiled
    """split_flat, adjoint_kernel and weight_grads_kernel in one call (one dispatch from
    Python instead of four); returns the operation count of the two kernels."""
    n = g_rec.shape[0]
    B = acc_r.shape[0]
    split_flat(act_idx, n, act_b, act_j)
    split_flat(spk_idx, n, spk_b, spk_j)
    ops = adjoint_kernel(alpha, rho, beta, n, B, act_ptr, act_b, act_j, act_psi, w_rec, tail,
                         g_coef, y_adj, w_out, h, h32, acc_r, acc_q)
    ops += weight_grads_kernel(alpha32, x, act_ptr, act_b, act_j, h32, spk_ptr, spk_b, spk_j,
                               g_in, g_rec, eps_in, eps_rec)
    return ops


@njit(cache=True, fastmath=True)
def out_grads_kernel(n, spk_ptr, spk_idx, y_adj, g_out):  # pragma: no cover - compiled
    """dW_out[:, j] += y_adj[t, b] for every spike (b, t, j) (per-step losses)."""
    T = spk_ptr.shape[0] - 1
    K = g_out.shape[0]
    for t in range(T):
        for s in range(spk_ptr[t], spk_ptr[t + 1]):
            flat = spk_idx[s]
            b = flat // n
            j = flat - b * n
            for c in range(K):
                g_out[c, j] += y_adj[t, b, c]


@njit(cache=True, fastmath=False)
def forward_kernel(
    alpha, rho, beta, kappa, v_th, gamma, band, i_in, w_rec_t, w_out_t, tail, keep_y,
    act_ptr, spk_ptr, ysum, zw, y_all,
):  # pragma: no cover - compiled
    """Fused forward of `edgeprop.network.step` over time, keeping the sparse trace.

    i_in = x @ W_in^T for all steps (T, B, n), precomputed by one matrix product;
    the recurrent input and the readout are summed over the spikes only (w_rec_t, w_out_t
    are the transposed, pre-major weights). Same equations as `network.step`, float32;
    only the summation order differs (tests hold it to the step loop).
    Returns (act_idx, act_psi, spk_idx) trimmed to size (copies; the scratch is freed).
    """
    T, B, n = i_in.shape
    K = w_out_t.shape[1]
    # worst-case capacity, uninitialised: only the pages written are ever committed, and
    # a growable buffer (rebinding arrays inside the loop) made the kernel 10x slower
    act_idx = np.empty(T * B * n, np.int32)
    act_psi = np.empty(T * B * n, np.float32)
    spk_idx = np.empty(T * B * n, np.int32)
    v = np.zeros((B, n), np.float32)
    a = np.zeros((B, n), np.float32)
    z = np.zeros((B, n), np.float32)
    rec = np.zeros((B, n), np.float32)
    y = np.zeros((B, K), np.float32)
    zp = np.zeros((B, n), np.float32)
    g = np.float32(gamma / v_th)  # scalars arrive as float32: float32 arithmetic as in step
    na = 0
    ns = 0
    for t in range(T):
        for b in range(B):
            for j in range(n):
                zp[b, j] = z[b, j]
        # recurrent input of z[t-1], summed over its spikes
        rec[:, :] = 0.0
        for s in range(spk_ptr[t - 1] if t > 0 else 0, spk_ptr[t] if t > 0 else 0):
            flat = spk_idx[s]
            b = flat // n
            i = flat - b * n
            for j in range(n):
                rec[b, j] += w_rec_t[i, j]
        for b in range(B):
            for j in range(n):
                vv = alpha * v[b, j] + i_in[t, b, j] + rec[b, j] - v_th * zp[b, j]
                aa = rho * a[b, j] + zp[b, j]
                thr = v_th + beta * aa
                v[b, j] = vv
                a[b, j] = aa
                d = vv - thr
                zz = np.float32(1.0) if vv > thr else np.float32(0.0)
                z[b, j] = zz
                ad = abs(d)
                if ad < band:
                    act_idx[na] = b * n + j
                    act_psi[na] = g * max(np.float32(0.0), np.float32(1.0) - ad / v_th)
                    na += 1
                if zz != 0.0:
                    spk_idx[ns] = b * n + j
                    ns += 1
                    zw[b, j] += tail[t]
        act_ptr[t + 1] = na
        spk_ptr[t + 1] = ns
        # readout y[t] = kappa y[t-1] + W_out z[t], over the spikes of step t
        for b in range(B):
            for k in range(K):
                y[b, k] *= kappa
        for s in range(spk_ptr[t], ns):
            flat = spk_idx[s]
            b = flat // n
            j = flat - b * n
            for k in range(K):
                y[b, k] += w_out_t[j, k]
        for b in range(B):
            for k in range(K):
                ysum[b, k] += y[b, k]
                if keep_y:
                    y_all[t, b, k] = y[b, k]
    return act_idx[:na].copy(), act_psi[:na].copy(), spk_idx[:ns].copy()
