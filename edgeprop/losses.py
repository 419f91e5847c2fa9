"""Losses shared by dense BPTT, sparse BPTT and e-prop (equations in docs/learning.md).

Every function returns ``(loss, gradient)`` where the gradient has the shape and dtype
of its input, so BPTT can seed its backward pass with it. Batches are averaged:

- ``mean_readout_ce``: E = (1/B) sum_b -log softmax(ybar_b)[label_b], ybar = (1/T) sum_t y[t].
- ``per_step_ce``: E = (1/N) sum over the N labelled (t, b) entries of
  -log softmax(y[t, b])[label]; N is pooled over the whole batch (label -1 = unlabelled).
- ``rate_reg``: zbar_j[t] = kappa zbar_j[t-1] + z_j[t], f_j = (1 - kappa)/T sum_t zbar_j[t],
  E = (1/B) sum_b (c/2) sum_j (f_bj - f*)^2.

Arithmetic is float64 inside (these are O(T B K) and cheap); gradients are cast back.
"""

from __future__ import annotations

import numpy as np

from edgeprop.errors import ConfigError


def _log_softmax(y: np.ndarray) -> np.ndarray:
    m = y.max(axis=-1, keepdims=True)
    return y - m - np.log(np.exp(y - m).sum(axis=-1, keepdims=True))


def softmax(y: np.ndarray) -> np.ndarray:
    """Class probabilities along the last axis, in float64 (posteriors, gates)."""
    y = np.asarray(y, dtype=np.float64)
    e = np.exp(y - y.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _check_labels(labels: np.ndarray, n_classes: int, shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ConfigError(f"labels must have shape {shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.max() >= n_classes or labels.min() < -1):
        raise ConfigError(f"labels must lie in [-1, {n_classes - 1}]")
    return labels.astype(np.int64)


def mean_ce(ybar: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy of (B, K) float64 mean readouts: (loss, softmax(ybar) - onehot).

    The core of `mean_readout_ce`; sparse BPTT keeps ybar itself and calls it directly.
    """
    B, K = ybar.shape
    labels = _check_labels(labels, K, (B,))
    if (labels < 0).any():
        raise ConfigError("mean loss needs a label for every sample (got -1)")
    logp = _log_softmax(ybar)
    rows = np.arange(B)
    loss = -logp[rows, labels].mean()
    d = np.exp(logp)
    d[rows, labels] -= 1.0
    return float(loss), d


def mean_readout_ce(y: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy on the time-averaged readout (the paper's KWS loss).

    y: (T, B, K) readout; labels: (B,) ints in [0, K). Returns (loss, dE/dy (T, B, K)),
    where dE/dy[t] = (softmax(ybar) - onehot) / (T B) for every t.
    """
    T, B, K = y.shape
    loss, d = mean_ce(y.astype(np.float64).mean(axis=0), labels)
    grad = np.broadcast_to(d / (T * B), (T, B, K)).astype(y.dtype)
    return loss, grad


def per_step_ce(y: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Cross-entropy at every labelled step (streams), pooled mean over labelled entries.

    y: (T, B, K); labels: (T, B) ints, -1 = unlabelled. With no labelled step the loss
    is 0 and the gradient is zero.
    """
    T, B, K = y.shape
    labels = _check_labels(labels, K, (T, B))
    mask = labels >= 0
    n = int(mask.sum())
    grad = np.zeros((T, B, K), dtype=np.float64)
    if n == 0:
        return 0.0, grad.astype(y.dtype)
    logp = _log_softmax(y.astype(np.float64))
    tt, bb = np.nonzero(mask)
    ll = labels[tt, bb]
    loss = -logp[tt, bb, ll].sum() / n
    grad[tt, bb] = np.exp(logp[tt, bb])
    grad[tt, bb, ll] -= 1.0
    grad /= n
    return float(loss), grad.astype(y.dtype)


def filtered_rate(z: np.ndarray, kappa: float) -> np.ndarray:
    """f_j = (1 - kappa)/T sum_t zbar_j[t]: the firing rate read through the readout filter.

    z: (T, B, n). Returns (B, n) in spikes per step (float64).
    """
    T = z.shape[0]
    # sum_t zbar[t] = sum_s z[s] (1 - kappa^(T - s)) / (1 - kappa)
    w = (1.0 - kappa ** (T - np.arange(T, dtype=np.float64))) / (1.0 - kappa)
    return (1.0 - kappa) / T * np.einsum("t,tbn->bn", w, z.astype(np.float64))


def rate_reg(
    z: np.ndarray, kappa: float, coef: float, target_rate: float
) -> tuple[float, np.ndarray]:
    """Firing-rate regulariser E = (1/B) sum_b (c/2) sum_j (f_bj - f*)^2.

    z: (T, B, n) spikes. Returns (loss, dE/dz (T, B, n)). Through the filter,
    dE/dz_j[s] = (c/B)(f_j - f*)(1 - kappa)/T sum_{t>=s} kappa^(t-s).
    """
    T, B, n = z.shape
    if coef == 0.0:
        return 0.0, np.zeros_like(z)
    f = filtered_rate(z, kappa)
    diff = f - target_rate
    loss = 0.5 * coef * (diff**2).sum() / B
    tail = (1.0 - kappa ** (T - np.arange(T, dtype=np.float64))) / (1.0 - kappa)
    g = (coef / B) * diff * (1.0 - kappa) / T  # dE/dzbar, (B, n)
    grad = tail[:, None, None] * g[None, :, :]
    return float(loss), grad.astype(z.dtype)
