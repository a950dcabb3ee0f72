"""Issue 25's hypotheses on the spatial read-out, measured on one run's frames (after `envenc collect`):
the tiny VLM's layer-0 image tokens (patch 8, 16x16 grid, the embedded default's) -> read-out variants ->
held-out ridge-probe R^2 (train-encoder's episode split and probe rows) of one frame's features and of
[f_t, f_t - f_(t-1)] (a linear window of two frames: the velocities).

Usage: python benchmarks/spatial-variants/variants.py CONFIG.yaml [--set k=v ...]  (writes <game>.json here)
Variants:
  raw          the default: per channel a softmax over the grid of the raw states, expected x and y
  std_T{T}     each channel standardized over the frame's positions, softmax at temperature T (sharper maps)
  std+lse      std_T1 plus a presence feature per channel: log-sum-exp of the standardized map
  moments_xy   no softmax: per channel the centred states' mean times x and times y (the flat-softmax limit)
  fourier2     moments against cos(pi k (u + 1) / 2), k = 1, 2, for u = x and y (4 features per channel)
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from envenc_ray.bench.readouts import tiny_model
from envenc_ray.config import load_config
from envenc_ray.encoder.diagnostics import AnnotatedFrames
from envenc_ray.layout import RunLayout
from envenc_ray.vlm.backbone import TruncatedVLM

args = sys.argv[1:]
config = load_config([args[0]], [value for flag, value in zip(args[1:], args[2:]) if flag == "--set"])
torch.set_num_threads(config.vlm.num_threads)
layout = RunLayout.of(config)
frames = AnnotatedFrames.of(config)
cache = layout.bench / "layer0-tokens.npy"  # (N, 256, 128): embedding is the slow part, so a rerun reuses it
started = time.perf_counter()
if not cache.is_file():
    model = tiny_model(layout.bench / "tiny-patch8", config.vlm.tiny_seed, 8)
    vlm = TruncatedVLM.from_config(config.vlm.model_copy(update={"layer": 0, "pooling": "tokens"}), model_path=model,
                                   game=layout.game)
    np.save(cache, frames.embed(vlm, config.embed.batch_size, "layer-0 tokens")[:, vlm.image_mask.cpu()])
tokens = torch.from_numpy(np.load(cache))
tokens_s = time.perf_counter() - started  # embedding, or reading the cache
rows = cols = 16  # patch 8: the 128x128 image's 16x16 grid
x = torch.linspace(-1, 1, cols).repeat(rows)  # row-major positions, as spatial_softmax lays them out
y = torch.linspace(-1, 1, rows).repeat_interleave(cols)


def expected_xy(weights):
    return torch.cat([torch.einsum("npd,p->nd", weights, x), torch.einsum("npd,p->nd", weights, y)], 1)


def standardized(states):
    return (states - states.mean(1, keepdim=True)) / states.std(1, keepdim=True).clamp_min(1e-6)


def moments(bases):
    centred = tokens - tokens.mean(1, keepdim=True)
    return torch.cat([torch.einsum("npd,p->nd", centred, basis) / len(basis) for basis in bases], 1)


def fourier(k):
    return [torch.cos(np.pi * j * (u + 1) / 2) for j in range(1, k + 1) for u in (x, y)]


VARIANTS = {
    "raw": lambda: expected_xy(torch.softmax(tokens, 1)),
    "std_T1": lambda: expected_xy(torch.softmax(standardized(tokens), 1)),
    "std_T0.5": lambda: expected_xy(torch.softmax(standardized(tokens) / 0.5, 1)),
    "std+lse": lambda: torch.cat([expected_xy(torch.softmax(standardized(tokens), 1)),
                                  torch.logsumexp(standardized(tokens), 1)], 1),
    "moments_xy": lambda: moments([x, y]),
    "fourier2": lambda: moments(fourier(2)),
}
episodes = frames.episode_ids
first = np.r_[True, episodes[1:] != episodes[:-1]]
previous = np.arange(len(episodes)) - 1
previous[first] = np.flatnonzero(first)  # an episode's first frame is its own previous one (as build_windows pads)
results = {"command": " ".join(["python", *sys.argv]), "frames": len(episodes), "tokens_s": tokens_s, "variants": {}}
for name, make in VARIANTS.items():
    features = make().numpy()
    one = frames.probe_r2(features, config)
    two = frames.probe_r2(np.c_[features, features - features[previous]], config)
    results["variants"][name] = {"features": int(features.shape[1]), "one_frame": one, "two_frames": two}
    print(name, features.shape[1], {k: round(v, 2) for k, v in one.items()},
          "| two frames:", {k: round(v, 2) for k, v in two.items() if k.endswith(("_dx", "_dy"))}, flush=True)
out = Path(__file__).parent / f"{layout.game}.json"
out.write_text(json.dumps(results, indent=1) + "\n")
print("wrote", out)
