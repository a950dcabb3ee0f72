"""Linear probes of the annotated game state: the held-out split, which targets, and ridge R^2.

Here in data/, below encoder/: embed's bfloat16 check (data/embed.py) and advise's held-out split
(data/advise.py) use them as the encoder's metrics (encoder/train.py, encoder/diagnostics.py) do, one copy for
both. Plain numpy, so the Train workers, the driver and the tests compute the same numbers the same way.
"""

from __future__ import annotations

import numpy as np

from envenc_ray.errors import DataError

RIDGE_ALPHAS = np.logspace(-4, 2, 7)  # times the mean squared singular value: from almost OLS to heavy shrinkage


def split_by_episode(episode_ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (sorted) of the train and validation episodes: a seeded draw of whole episodes."""
    episodes = np.unique(episode_ids)
    if len(episodes) < 2:
        raise DataError(f"the hidden states hold {len(episodes)} episode; the validation split holds out whole "
                        "episodes, so record at least 2 (collect.episodes)")
    n_val = min(max(1, round(val_fraction * len(episodes))), len(episodes) - 1)
    val_episodes = np.random.default_rng(seed).choice(episodes, size=n_val, replace=False)
    is_val = np.isin(episode_ids, val_episodes)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def probe_targets(objects: dict[str, np.ndarray], train_rows: np.ndarray, val_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The annotated numbers worth probing: those that vary on both the train and the validation rows (where
    they are defined: a velocity is NaN where it is not)."""
    return {key: values for key, values in objects.items() if _varies(values[train_rows]) and _varies(values[val_rows])}


def _varies(values: np.ndarray) -> bool:
    defined = values[np.isfinite(values)]
    return len(defined) > 1 and np.ptp(defined) > 0


def ridge_probe_r2(features: np.ndarray, targets: dict[str, np.ndarray], train_rows: np.ndarray,
                   val_rows: np.ndarray) -> dict[str, float]:
    """Validation R^2 of a closed-form ridge regression per target, fit on the train rows only.

    A target that is NaN on some rows (a velocity where it is undefined) is fit and scored on the rows where
    it is defined; targets defined on the same rows share one fit (`_ridge_r2`).
    """
    groups: dict[bytes, list[str]] = {}
    for key, values in targets.items():
        groups.setdefault(np.isfinite(values).tobytes(), []).append(key)
    r2 = {}
    for keys in groups.values():
        defined = np.isfinite(targets[keys[0]])
        r2 |= _ridge_r2(features, {key: targets[key] for key in keys}, train_rows[defined[train_rows]],
                        val_rows[defined[val_rows]])
    return {key: r2[key] for key in targets}


def _ridge_r2(features: np.ndarray, targets: dict[str, np.ndarray], train_rows: np.ndarray,
              val_rows: np.ndarray) -> dict[str, float]:
    """Validation R^2 of ridge regressions of targets defined on every train and validation row.

    Features (each sample flattened) are standardized with train statistics. Each target's ridge strength
    is chosen from RIDGE_ALPHAS by exact leave-one-out error on the train rows (one SVD serves every alpha
    and target), so the validation rows stay unseen and a wide raw hidden state is not unfairly overfit.
    """
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
