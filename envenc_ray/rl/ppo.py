"""RLlib PPO (new API stack, torch) configured from our config, in any observation mode."""

from __future__ import annotations

from ray.rllib.algorithms.ppo import PPOConfig

from envenc_ray.config import EnvEncConfig
from envenc_ray.rl.connector import EncoderSource, env_config, make_env_to_module, register_env
from envenc_ray.rl.modules import ppo_module_spec


def build_ppo_config(config: EnvEncConfig, source: EncoderSource | None,
                                error_key: str | None = None) -> PPOConfig:
    """PPO on `config.env`'s game; observations come from the latent connector fed by `source`.

    `error_key`: where the EnvRunners report an encoder error for the driver (see `train.train_iteration`).
    """
    rl = config.rl
    learners = max(1, rl.num_learners)
    return (
        PPOConfig()
        .framework("torch")
        .environment(env=register_env(), env_config=env_config(config))
        .env_runners(
            num_env_runners=rl.num_env_runners,
            num_envs_per_env_runner=rl.num_envs_per_env_runner,
            num_cpus_per_env_runner=rl.cpus_per_env_runner,
            rollout_fragment_length=rl.rollout_fragment_length or "auto",
            env_to_module_connector=make_env_to_module(rl.obs_mode, source, rl.frame_stack, rl.pixel_size,
                                                       error_key),
        )
        .learners(num_learners=rl.num_learners, num_gpus_per_learner=rl.num_gpus_per_learner)
        .training(
            train_batch_size_per_learner=max(1, rl.train_batch_size // learners),
            minibatch_size=rl.minibatch_size,
            num_epochs=rl.num_epochs,
            lr=rl.lr,
            gamma=rl.gamma,
            lambda_=rl.gae_lambda,
            entropy_coeff=rl.entropy_coeff,
        )
        .rl_module(rl_module_spec=ppo_module_spec(rl))
        .debugging(seed=config.experiment.seed)
        # An encoder error (a missing file, a Serve timeout after the client's retries) must reach the user,
        # not be papered over by restarting the EnvRunner forever.
        .fault_tolerance(restart_failed_env_runners=False)
    )
