"""What a latent keeps: reconstruction quality, smoothness in time, and linearly decodable game state.

Pure numpy, so the Train workers, the driver and the tests compute the same numbers the same way.
"""

from __future__ import annotations

import math

import numpy as np

RIDGE_ALPHAS = np.logspace(-4, 2, 7)  # times the mean squared singular value: from almost OLS to heavy shrinkage


def consecutive_pairs(episode_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(P, 2) pairs of rows (t, t+1) of the same episode, for rows sorted by (episode, step)."""
    rows = np.asarray(rows)
    same = episode_ids[rows[1:]] == episode_ids[rows[:-1]]
    return np.stack([rows[:-1][same], rows[1:][same]], axis=1)


def mean_cosine(vectors: np.ndarray, pairs: np.ndarray, centred: bool = False) -> float:
    """Mean cosine similarity of the vector pairs (each sample flattened); high means smooth change in time.

    centred=True first subtracts the mean over the evaluated rows (those in `pairs`). VLM hidden states
    share a large component (prompt, layout), so uncentred cosines sit near 1 for any two frames and cannot
    tell a representation that follows the game from one that hardly changes; centred, a static one scores
    about 0 (what is left is noise) and a smoothly moving one stays high.
    """
    if len(pairs) == 0:
        return float("nan")
    flat = vectors.reshape(len(vectors), -1)
    a, b = flat[pairs[:, 0]].astype(np.float64), flat[pairs[:, 1]].astype(np.float64)
    if centred:
        mean = flat[np.unique(pairs)].mean(0, dtype=np.float64)
        a, b = a - mean, b - mean
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean((a * b).sum(1) / np.maximum(norms, 1e-12)))


def probe_targets(objects: dict[str, np.ndarray], train_rows: np.ndarray, val_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The annotated numbers worth probing: those that vary on both the train and the validation rows."""
    return {
        key: values
        for key, values in objects.items()
        if np.ptp(values[train_rows]) > 0 and np.ptp(values[val_rows]) > 0
    }


def ridge_probe_r2(features: np.ndarray, targets: dict[str, np.ndarray], train_rows: np.ndarray,
                   val_rows: np.ndarray) -> dict[str, float]:
    """Validation R^2 of a closed-form ridge regression per target, fit on the train rows only.

    Features (each sample flattened) are standardized with train statistics. Each target's ridge strength
    is chosen from RIDGE_ALPHAS by exact leave-one-out error on the train rows (one SVD serves every alpha
    and target), so the validation rows stay unseen and a wide raw hidden state is not unfairly overfit.
    """
    if not targets:
        return {}
    x = features.reshape(len(features), -1).astype(np.float64)
    mean, std = x[train_rows].mean(0), x[train_rows].std(0)
    std[std < 1e-12] = 1.0
    x_train, x_val = (x[train_rows] - mean) / std, (x[val_rows] - mean) / std
    del x  # token states are ~10^4 wide: keep one standardized copy, not two
    keys = list(targets)
    y = np.stack([targets[k] for k in keys], axis=1).astype(np.float64)
    y_mean = y[train_rows].mean(0)
    y_train, y_val = y[train_rows] - y_mean, y[val_rows] - y_mean

    u, s, val_projection = _thin_svd(x_train, x_val)
    uty = u.T @ y_train
    n = len(x_train)
    best_loo, best_predicted = np.full(len(keys), np.inf), np.zeros((len(val_rows), len(keys)))
    for alpha in RIDGE_ALPHAS * max(float((s**2).sum() / min(x_train.shape)), 1e-12):
        shrink = s**2 / (s**2 + alpha)
        fitted = u @ (shrink[:, None] * uty)
        leverage = np.minimum((u**2) @ shrink, 1 - 1e-9)
        # centring uses all train rows, so this LOO is approximate by O(1/n); fine for choosing alpha
        loo = (((y_train - fitted) / (1 - leverage)[:, None]) ** 2).mean(0) if n > 1 else np.zeros(len(keys))
        better = loo < best_loo
        if better.any():
            predicted = val_projection @ ((s / (s**2 + alpha))[:, None] * uty)
            best_predicted[:, better] = predicted[:, better]
            best_loo[better] = loo[better]
    total = ((y_val - y_val.mean(0)) ** 2).sum(0)
    r2 = 1 - ((y_val - best_predicted) ** 2).sum(0) / total
    return {key: float(value) for key, value in zip(keys, r2)}


def _thin_svd(x_train: np.ndarray, x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U and s of x_train = U diag(s) V^T (nonzero s only), and x_val @ V, from the smaller Gram matrix.

    Pooled states are narrower than there are train rows, so their (P, P) Gram matrix is the small one;
    flattened token states (P = T*D ~ 10^4) are wider, and the rows' (n, n) one is: the cost is
    n * P * min(n, P) either way, and no (n, P) factor is ever formed besides the data.
    """
    wide = x_train.shape[1] > len(x_train)
    gram = x_train @ x_train.T if wide else x_train.T @ x_train
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    keep = eigenvalues > max(eigenvalues.max(), 0.0) * 1e-12  # null directions (constant features, centring)
    s, eigenvectors = np.sqrt(eigenvalues[keep]), eigenvectors[:, keep]
    if wide:  # the eigenvectors are U; V = x_train^T U / s
        return eigenvectors, s, (x_val @ x_train.T) @ eigenvectors / s
    return x_train @ eigenvectors / s, s, x_val @ eigenvectors  # the eigenvectors are V


def mean_or_none(values: dict[str, float]) -> float | None:
    finite = [v for v in values.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def json_safe(value):
    """NaN/inf -> None recursively: metrics.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
