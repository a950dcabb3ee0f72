"""vlm.pooling 'spatial': the expected position of each channel's softmax over the patch grid follows a bright spot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from envenc_ray.vlm.backbone import TruncatedVLM
from envenc_ray.vlm.pooling import SPATIAL_FEATURES, pool, spatial_softmax

ROWS, COLS, CHANNELS = 6, 8, 4


def _spot(row: int, col: int) -> torch.Tensor:
    """(1, ROWS * COLS, CHANNELS) row-major token states, zero but for one bright patch."""
    states = torch.zeros(1, ROWS * COLS, CHANNELS)
    states[0, row * COLS + col] = 12.0  # softmax weight e^12 / (e^12 + 47) = 0.9997 on the spot
    return states


def _xy(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pooled[0, :CHANNELS], pooled[0, CHANNELS:2 * CHANNELS]


def test_spatial_softmax_puts_a_bright_spot_where_it_is():
    pooled = spatial_softmax(_spot(2, 5), (ROWS, COLS))
    assert pooled.shape == (1, SPATIAL_FEATURES * CHANNELS) and pooled.dtype == torch.float32
    x, y = _xy(pooled)
    torch.testing.assert_close(x, torch.full((CHANNELS,), -1 + 2 * 5 / (COLS - 1)), atol=2e-3, rtol=0)
    torch.testing.assert_close(y, torch.full((CHANNELS,), -1 + 2 * 2 / (ROWS - 1)), atol=2e-3, rtol=0)
    # the corners are the ends of [-1, 1]: left/top -1, right/bottom +1
    torch.testing.assert_close(torch.stack(_xy(spatial_softmax(_spot(0, 0), (ROWS, COLS)))), -torch.ones(2, CHANNELS),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.stack(_xy(spatial_softmax(_spot(ROWS - 1, COLS - 1), (ROWS, COLS)))),
                               torch.ones(2, CHANNELS), atol=2e-3, rtol=0)


def test_moving_the_spot_moves_the_expected_position_the_same_way():
    xs = [_xy(spatial_softmax(_spot(3, col), (ROWS, COLS)))[0] for col in range(COLS)]
    ys = [_xy(spatial_softmax(_spot(row, 3), (ROWS, COLS)))[1] for row in range(ROWS)]
    assert all((right > left).all() for left, right in zip(xs, xs[1:]))  # right: x grows
    assert all((below > above).all() for above, below in zip(ys, ys[1:]))  # down: y grows
    moved_right = spatial_softmax(_spot(3, 6), (ROWS, COLS))
    torch.testing.assert_close(_xy(moved_right)[1], _xy(spatial_softmax(_spot(3, 1), (ROWS, COLS)))[1])  # y stays


def test_pool_reads_the_image_tokens_only():
    """The prompt's text tokens around the image never enter the grid."""
    image = _spot(4, 1)
    text = torch.full((1, 3, CHANNELS), 50.0)  # brighter than the spot: would dominate any softmax over them
    hidden = torch.cat([text, image, text], dim=1)
    image_mask = torch.tensor([False] * 3 + [True] * ROWS * COLS + [False] * 3)
    torch.testing.assert_close(pool(hidden, image_mask, "spatial", (ROWS, COLS)), spatial_softmax(image, (ROWS, COLS)))


def test_the_tiny_vlm_follows_a_dot_across_the_frame(tiny_vlm_dir):
    """Through the whole truncated VLM: a white dot on a black 210x160 frame moved right moves each channel's
    expected x one way. Which way depends on the channel: the untrained model's states vary little over positions
    (std ~0.01 at layer 2), so the softmax is close to uniform and a channel whose state drops at the dot moves its
    expectation away from it; their mean is not monotone. Measured at layer 2: 122 of 128 channels monotone in x.
    Moving the dot down does not do the same for y in the untrained model (18-28% of channels monotone), so
    vertical moves are tested at the function level only (above)."""
    vlm = TruncatedVLM.from_pretrained(tiny_vlm_dir, layer=2, pooling="spatial")
    width = vlm.hidden_size // SPATIAL_FEATURES
    frames = np.zeros((4, 210, 160, 3), dtype=np.uint8)
    for frame, col in zip(frames, (10, 50, 90, 130)):
        frame[100:112, col:col + 12] = 255
    steps = vlm.embed(frames)[:, :width].diff(dim=0)
    monotone = (steps > 0).all(dim=0) | (steps < 0).all(dim=0)
    assert monotone.float().mean().item() > 0.85


def test_the_tiny_vlm_is_built_at_the_configs_patch_size(debug_config):
    """vlm.tiny_patch_size 8 (the embedded default's): a 16x16 grid read at layer 0 with no decoder layer; a run
    whose patch size changes gets its tiny VLM rebuilt, not the other size's."""
    from envenc_ray.vlm.paths import base_model_path

    fine = debug_config("vlm.tiny_patch_size=8", "vlm.layer=0", "vlm.pooling=spatial")
    vlm = TruncatedVLM.from_config(fine.vlm, model_path=base_model_path(fine))
    assert (vlm.grid, vlm.num_image_tokens, vlm.num_layers) == ((16, 16), 256, 0)
    assert vlm.embed(np.zeros((2, 210, 160, 3), dtype=np.uint8)).shape == (2, SPATIAL_FEATURES * 128)
    coarse = debug_config("vlm.tiny_patch_size=16", "vlm.pooling=spatial")  # the same run folder
    assert TruncatedVLM.from_config(coarse.vlm, model_path=base_model_path(coarse)).grid == (8, 8)


@pytest.mark.parametrize("pooling", ["spatial", "image_mean"])
def test_image_poolings_never_run_the_prompt_after_the_image(tiny_vlm_dir, pooling):
    vlm = TruncatedVLM.from_pretrained(tiny_vlm_dir, layer=2, pooling=pooling)
    plan = vlm._prompt_for((210, 160))
    assert plan.end == int(plan.image_mask.nonzero().max()) + 1 < vlm.sequence_length
    assert vlm.num_layers == 2


@pytest.mark.slow
def test_spatial_runs_through_embed_train_encoder_serve_and_ppo(ray_session, debug_config, served_run):
    """`envenc run` with vlm.pooling spatial: embed stores the 2 x D read-out, the encoder is trained on and
    records it, the Serve app computes it from frames as embed did, and PPO trains one iteration on its latents."""
    config = debug_config("vlm.pooling=spatial", "vlm.layer=2")
    result = served_run(config)
    assert not any(stage["skipped"] for stage in result.manifest["stages"].values())
    assert result.stored.shape[1:] == (SPATIAL_FEATURES * 128,)  # expected x and y of layer 2's 128 channels
    exported = json.loads((config.run_dir / "encoder" / "config.json").read_text())
    assert exported["hidden_size"] == result.info["hidden_size"] == SPATIAL_FEATURES * 128
    np.testing.assert_allclose(result.served, result.stored[:6], atol=1e-6)  # as embed read them (features ~1e-3)
    train = json.loads((config.run_dir / "agent" / "train.json").read_text())
    assert train["summary"]["iterations"] == 1 and train["summary"]["env_steps_lifetime"] > 0
