"""What a latent keeps: reconstruction quality, smoothness in time, and linearly decodable game state.

Plain numpy (and torch for the AtariARI classifiers), so the Train workers, the driver and the tests compute
the same numbers the same way.
"""

from __future__ import annotations

import math

import numpy as np

# Annotated objects whose motion is game state (annotate.py names them so). Freeway's cars are left out: each
# lane drives at its own fixed speed, so a car's velocity is a constant of its lane (and jumps where it wraps).
MOVING_OBJECTS = ("player", "enemy", "ball")
# AtariARI (Anand et al. 2019) drops RAM variables whose label entropy over the recorded frames is below this,
# in nats (their label_preprocess.remove_low_entropy_labels: torch Categorical.entropy of the value counts).
ATARIARI_MIN_ENTROPY = 0.6
# L2 penalty of the probe's linear classifier on standardized features: weak, because each of a position's ~100
# byte values has only tens of frames (1e-3 cut the tiny VLM's Pong position F1 from ~.18 to ~.13 here).
ATARIARI_L2 = 1e-4
ATARIARI_STEPS = 100  # L-BFGS iterations: the L2-regularised logistic regression is convex, this converges it


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


def with_velocities(objects: dict[str, np.ndarray], episode_ids: np.ndarray, steps: np.ndarray) -> dict[str, np.ndarray]:
    """`objects` plus each moving object's velocity, in screen pixels per env step, for rows sorted by (episode, step).

    `<name>_dx` / `<name>_dy` at row t is the position at t minus the position at t-1: the frames a latent at t
    has seen. NaN where row t-1 is not the previous step of the same episode, or where either frame lacks the
    object (`<name>_in_play` 0: annotate.py's -1 coordinates are no place). Derived here, at probe time, from
    the recorded positions: the frames' schema and the collect hash stay as they are, and old runs get them too.
    """
    follows = np.zeros(len(episode_ids), dtype=bool)
    follows[1:] = (episode_ids[1:] == episode_ids[:-1]) & (steps[1:] == steps[:-1] + 1)
    velocities = {}
    for name in MOVING_OBJECTS:
        present = objects.get(f"{name}_in_play", np.ones(len(episode_ids))) > 0
        defined = follows.copy()
        defined[1:] &= present[1:] & present[:-1]
        for axis in ("x", "y"):
            position = objects.get(f"{name}_{axis}")
            if position is not None:
                velocity = np.full(len(position), np.nan)
                velocity[1:] = position[1:] - position[:-1]
                velocity[~defined] = np.nan
                velocities[f"{name}_d{axis}"] = velocity
    return {**objects, **velocities}


def atariari_f1(features: np.ndarray, ram: np.ndarray, addresses: dict[str, int], train_rows: np.ndarray,
                test_rows: np.ndarray) -> dict[str, float]:
    """AtariARI's probe (Anand et al. 2019): per RAM variable (name -> index into the RAM, a game's
    `annotate.ATARIARI_RAM`), held-out weighted F1 of a linear classifier of the byte's value from the features.

    `ram` is (N, 128) uint8. As in AtariARI, a variable whose labels (train and test rows) have an entropy below
    ATARIARI_MIN_ENTROPY nats is dropped, and the score is sklearn's weighted F1 over the test rows. Unlike their
    minibatch Adam with early stopping, the classifier is the converged L2-regularised multinomial logistic
    regression (`_linear_classifier`) over the byte values seen on the train rows, on standardized features.
    """
    import torch

    x = features.reshape(len(features), -1).astype(np.float32)
    mean, std = x[train_rows].mean(0), x[train_rows].std(0)
    std[std < 1e-6] = 1.0
    x_train, x_test = torch.from_numpy((x[train_rows] - mean) / std), torch.from_numpy((x[test_rows] - mean) / std)
    f1 = {}
    for name, address in addresses.items():
        labels = ram[:, address]
        if label_entropy(labels[np.concatenate([train_rows, test_rows])]) < ATARIARI_MIN_ENTROPY:
            continue
        classes, train_classes = np.unique(labels[train_rows], return_inverse=True)
        classifier = _linear_classifier(x_train, torch.from_numpy(train_classes), len(classes))
        predicted = classes[classifier(x_test).argmax(1).numpy()]
        f1[name] = weighted_f1(predicted, labels[test_rows])
    return f1


def _linear_classifier(x, y, classes: int):
    """A linear layer from features x (N, D) to `classes` logits, trained on the class indices y (N,) by full-batch
    L-BFGS on cross-entropy + ATARIARI_L2 / 2 * |W|^2 from zeros (convex: the same data gives the same layer)."""
    import torch
    import torch.nn.functional as F

    layer = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    # a short history: the layer is D x classes wide, and each remembered step stores two copies of it
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=ATARIARI_STEPS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(layer(x), y) + ATARIARI_L2 / 2 * layer.weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return layer.requires_grad_(False)


def label_entropy(labels: np.ndarray) -> float:
    """Entropy in nats of the distribution of the label values."""
    p = np.unique(labels, return_counts=True)[1] / len(labels)
    return float((p * np.log(1 / p)).sum())


def weighted_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    """sklearn's f1_score(average='weighted'), AtariARI's score: each true class's F1, weighted by its count."""
    classes, support = np.unique(labels, return_counts=True)
    hits = np.array([np.sum((predicted == c) & (labels == c)) for c in classes])
    predicted_count = np.array([np.sum(predicted == c) for c in classes])
    f1 = 2 * hits / (support + predicted_count)  # 2PR / (P + R); 0 where a class is never predicted right
    return float((f1 * support).sum() / support.sum())


def mean_or_none(values: dict[str, float]) -> float | None:
    finite = [v for v in values.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def is_velocity(name: str) -> bool:
    """A `with_velocities` variable (`<object>_dx`, `<object>_dy`)."""
    return name.endswith(("_dx", "_dy"))


def probe_means(r2: dict[str, float]) -> tuple[float | None, float | None]:
    """(mean over the annotated state variables, mean over the velocities): kept apart, so the state mean means what
    it meant before velocities were probed, and a representation that sees one frame is not hidden in it."""
    return (mean_or_none({k: v for k, v in r2.items() if not is_velocity(k)}),
            mean_or_none({k: v for k, v in r2.items() if is_velocity(k)}))
