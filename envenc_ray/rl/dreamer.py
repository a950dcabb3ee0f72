"""RLlib DreamerV3 (torch) on latents: 1-D float32 Box observations written by the latent connector.

DreamerV3 learns a world model of its observations; on latents that is an MLP world model over a few
dozen floats instead of a CNN autoencoder over frames, which is what makes it affordable on a CPU.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # RLlib's dreamerv3 package builds a debug CartPole at import time (utils/debugging.py) whose Box bounds and
    # reset observations are float64, and gymnasium warns about that env; ours are float32 Boxes (latents).
    warnings.filterwarnings("ignore", category=UserWarning,
                            message=r".*(precision lowered by casting to float32|obs returned by the `reset\(\)`)")
    from ray.rllib.algorithms.dreamerv3 import DreamerV3Config

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import ConfigError
from envenc_ray.rl.connector import make_env_to_module
from envenc_ray.rl.encoder_source import EncoderSource
from envenc_ray.rl.reward.model import RewardSource
from envenc_ray.rl.runners import with_common_settings


def build_dreamer_config(config: EnvEncConfig, source: EncoderSource | None,
                                    error_key: str | None = None, rewards: RewardSource | None = None
                                    ) -> DreamerV3Config:
    rl = config.rl
    if rl.obs_mode != "latent" or source is None:
        raise ConfigError(f"DreamerV3 here trains on 1-D latents only: set rl.obs_mode=latent (got "
                          f"{rl.obs_mode!r}) or use rl.algo=ppo for pixels")
    if rl.num_learners > 1 and rl.dreamer_batch_size_B % rl.num_learners:
        raise ConfigError(f"rl.dreamer_batch_size_B ({rl.dreamer_batch_size_B}) must be a multiple of "
                          f"rl.num_learners ({rl.num_learners})")
    return with_common_settings(
        DreamerV3Config(),
        config,
        make_env_to_module("latent", source, error_key=error_key, rewards=rewards),
        # Dreamer samples a little, trains a lot (training_ratio); 1 step per sub-env is its default.
        rollout_fragment_length=rl.rollout_fragment_length or 1,
    ).training(
        model_size=rl.dreamer_model_size,
        training_ratio=rl.dreamer_training_ratio,
        batch_size_B=rl.dreamer_batch_size_B,
        batch_length_T=rl.dreamer_batch_length_T,
        horizon_H=rl.dreamer_horizon_H,
        gamma=rl.gamma,
    )
