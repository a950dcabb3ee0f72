"""Pooling: how a VLM's token states (N, T, D) become one frame's read-out, the same code for every backend.

TruncatedVLM (backbone.py) and VLLMBackend (vllm_backend.py) both hand their token states to `pool`, so that
'last', 'mean', 'image_mean', 'spatial' and 'tokens' mean the same whichever computed the states. Nothing here
knows a model: 'spatial' takes the image tokens' grid as an argument (`families.spatial_grid` finds it).
"""

from __future__ import annotations

import torch

POOLINGS = ("last", "mean", "image_mean", "spatial", "tokens")
# the poolings that read the image tokens only: the prompt after the image never runs for them
IMAGE_POOLINGS = ("image_mean", "spatial")
# 'spatial' pooling gives the expected x and y of each channel (`spatial_softmax`), no presence feature: on 2,400
# Pong frames (6 episodes, held-out ridge probe, tiny VLM, patch 16) adding each channel's log-sum-exp or max over
# the grid moved ball_x by -0.08..+0.05 and ball_y / ball_in_play by -0.08..0.00 at layers 0 and 2: no consistent
# gain for 1.5x the features every consumer reads. No sharpening either: each channel standardized over the grid
# before the softmax lowers Pong's ball_x 0.84 -> 0.81 (0.65 at temperature 0.5) and does not find Breakout's ball
# (patch 8, layer 0; benchmarks/spatial-variants/, README "Sharper maps, presence, more moments"): the raw maps are
# nearly flat, and a flat softmax's expectation is linear in the states, which a linear probe unmixes
SPATIAL_FEATURES = 2


def pool(hidden: torch.Tensor, image_mask: torch.Tensor, pooling: str,
         grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, T, D) token states -> float32 (N, D) ('last', 'mean', 'image_mean'), (N, SPATIAL_FEATURES * D)
    ('spatial', over the image tokens laid out on `grid`) or (N, T, D) ('tokens')."""
    if pooling == "last":
        pooled = hidden[:, -1]
    elif pooling == "mean":
        pooled = hidden.float().mean(dim=1)
    elif pooling == "image_mean":
        pooled = hidden[:, image_mask].float().mean(dim=1)
    elif pooling == "spatial":
        pooled = spatial_softmax(hidden[:, image_mask], grid)
    else:  # tokens
        pooled = hidden
    return pooled.float().contiguous()


def spatial_softmax(image_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, rows * cols, D) image-token states in row-major order -> float32 (N, SPATIAL_FEATURES * D): per channel,
    a softmax over the grid's positions and the expected column and row under it, each in [-1, 1] (left/top -1),
    as [x (D), y (D)].

    Why: a mean over the tokens washes out an object that fills one patch (Pong's ball), while the softmax of a
    channel that responds to it peaks at its patch, so the expected position follows the object (Levine et al.
    2016's spatial soft-argmax, here without learned parameters).
    """
    rows, cols = grid
    states = image_states.float()
    weights = torch.softmax(states, dim=1)  # over positions, per channel
    xs = torch.linspace(-1.0, 1.0, cols, device=states.device).repeat(rows)  # column of each row-major position
    ys = torch.linspace(-1.0, 1.0, rows, device=states.device).repeat_interleave(cols)
    expected_x = torch.einsum("npd,p->nd", weights, xs)
    expected_y = torch.einsum("npd,p->nd", weights, ys)
    return torch.cat([expected_x, expected_y], dim=1)


def pooled_width(pooling: str, hidden_size: int) -> int:
    """Features per frame of a pooled read-out of `hidden_size`-wide token states (per token for 'tokens')."""
    return SPATIAL_FEATURES * hidden_size if pooling == "spatial" else hidden_size
