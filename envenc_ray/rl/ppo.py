"""RLlib PPO (new API stack, torch) configured from our config, in any observation mode."""

from __future__ import annotations

from ray.rllib.algorithms.ppo import PPOConfig

from envenc_ray.config import EnvEncConfig
from envenc_ray.rl.connector import make_env_to_module
from envenc_ray.rl.encoder_source import EncoderSource
from envenc_ray.rl.joint import joint_module_spec
from envenc_ray.rl.modules import ppo_module_spec
from envenc_ray.rl.reward.model import RewardSource
from envenc_ray.rl.runners import with_common_settings


def build_ppo_config(config: EnvEncConfig, source: EncoderSource | None,
                                error_key: str | None = None, rewards: RewardSource | None = None) -> PPOConfig:
    """PPO on `config.env`'s game; observations come from the latent connector fed by `source`, rewards from
    the game or (`rewards`) the reward model.

    `error_key`: where the EnvRunners report an encoder error for the driver (see `algorithm.train_iteration`).
    """
    rl = config.rl
    learners = max(1, rl.num_learners)
    # RLlib's schedule format: [[env steps, value], ...], linear in between (its lifetime env-step count, which
    # a checkpoint restores, so a resumed run continues the schedule where it was).
    lr = rl.lr if rl.lr_anneal_steps is None else [[0, rl.lr], [rl.lr_anneal_steps, 0.0]]
    connector = make_env_to_module(rl.obs_mode, source, rl.frame_stack, rl.pixel_size, error_key, rewards)
    # observations that are vision features (stage2.method 'joint'): the module also holds the VLM's projector, the
    # frozen decoder and the encoder
    module_spec = joint_module_spec(config) if source is not None and source.joint else ppo_module_spec(rl)
    return (
        with_common_settings(PPOConfig(), config, connector, rl.rollout_fragment_length or "auto")
        .training(
            train_batch_size_per_learner=max(1, rl.train_batch_size // learners),
            minibatch_size=rl.minibatch_size,
            num_epochs=rl.num_epochs,
            lr=lr,
            gamma=rl.gamma,
            lambda_=rl.gae_lambda,
            entropy_coeff=rl.entropy_coeff,
            clip_param=rl.clip_param,
            vf_loss_coeff=rl.vf_loss_coeff,
            grad_clip=rl.grad_clip,  # None: RLlib clips nothing
        )
        .rl_module(rl_module_spec=module_spec)
    )
