"""Upper bounds for linear encoders, on the same hidden states: held-out ridge R^2 of the top-k principal components
(what a linear autoencoder of latent k keeps at best) and of [h_t, h_t - h_{t-1}] (a linear window of two frames).

Usage: python benchmarks/encoder-kinds/linear_bounds.py RUN_DIR   (after run.sh; writes linear_bounds.json here)
"""

import json
import sys
from pathlib import Path

import numpy as np

from envenc_ray.encoder.metrics import probe_targets, ridge_probe_r2, with_velocities
from envenc_ray.encoder.train import check_shards, read_hidden, split_by_episode

TARGETS = ("ball_x", "ball_y", "player_y", "enemy_y", "ball_dx", "ball_dy")

shards, shape, _ = check_shards(Path(sys.argv[1]) / "hidden")
data = read_hidden(shards, shape)  # rows sorted by (episode, step), as train-encoder reads them
train_rows, val_rows = split_by_episode(data.episode_ids, 0.25, 0)  # encoder.val_fraction and seed of run.sh
targets = probe_targets(with_velocities(data.objects, data.episode_ids, data.steps), train_rows, val_rows)
targets = {name: targets[name] for name in TARGETS}
hidden = data.hidden - data.hidden[train_rows].mean(0)
hidden /= np.maximum(data.hidden[train_rows].std(0), 1e-6)
components = np.linalg.svd(hidden[train_rows], full_matrices=False)[2]
results = {f"pca{k}": ridge_probe_r2(hidden @ components[:k].T, targets, train_rows, val_rows) for k in (64, 128, 256)}
previous = np.arange(len(hidden)) - 1
first = np.r_[True, data.episode_ids[1:] != data.episode_ids[:-1]]
previous[first] = np.flatnonzero(first)  # an episode's first frame is its own previous one (as build_windows pads)
results["hidden_and_difference"] = ridge_probe_r2(np.c_[hidden, hidden - hidden[previous]], targets, train_rows, val_rows)
(Path(__file__).parent / "linear_bounds.json").write_text(json.dumps(results, indent=1) + "\n")
for name, r2 in results.items():
    print(name, {key: round(value, 2) for key, value in r2.items()})
