"""What every algorithm here shares on its EnvRunners: our ALE env (registered with Ray by name), its
env_config, and the common AlgorithmConfig settings (EnvRunners with the latent connector, learners, seed,
no silent EnvRunner restarts).
"""

from __future__ import annotations

import gymnasium as gym

from envenc_ray.rl.overlap import OverlappedEnvRunner
from envenc_ray.runtime import inside_ray_actor


def env_creator(env_context) -> gym.Env:
    """The env of every RLlib EnvRunner: an ALE v5 env with RGB frames (the connector does the rest), or for
    rl.obs_mode 'state' with the RAM's state vector (rl/state.py; no connector).

    Runs inside the EnvRunner before its RLModule is built, so it is also where a remote EnvRunner's torch
    threads are pinned (the driver's, when it samples itself, are left alone).
    """
    from envenc_ray.config import EnvConfig
    from envenc_ray.rl.state import make_agent_env
    from envenc_ray.runtime import set_torch_threads

    if inside_ray_actor():
        set_torch_threads(env_context.get("torch_threads"))
    env_settings = EnvConfig(**{key: env_context[key] for key in EnvConfig.model_fields})
    return make_agent_env(env_settings, env_context["obs_mode"])


ENV_NAME = "envenc-ale"


def register_env() -> str:
    """Register `env_creator` with Ray under ENV_NAME (RLlib takes a registered name, not a function)."""
    from ray.tune.registry import register_env as ray_register_env

    ray_register_env(ENV_NAME, env_creator)
    return ENV_NAME


def env_config(config) -> dict:
    """`env_config` for `env_creator`: the env section plus the EnvRunner's torch threads and observation mode."""
    return config.env.model_dump(mode="json") | {"torch_threads": config.rl.torch_threads,
                                                 "obs_mode": config.rl.obs_mode}


def with_common_settings(algo_config, config, env_to_module, rollout_fragment_length):
    """What every algorithm here shares: our ALE env, EnvRunners with the latent connector (double-buffered with
    `rl.overlap`), learners and
    GPUs from `config.rl`, the experiment seed, and EnvRunners that RLlib recreates when they die
    (`rl.env_runner_restarts`); an encoder error in one (a missing file, a Serve timeout after the client's
    retries) still reaches the user: `algorithm.train_iteration` raises it."""
    rl = config.rl
    return (
        algo_config.framework("torch")
        .environment(env=register_env(), env_config=env_config(config))
        .env_runners(
            num_env_runners=rl.num_env_runners,
            num_envs_per_env_runner=rl.num_envs_per_env_runner,
            num_cpus_per_env_runner=rl.cpus_per_env_runner,
            rollout_fragment_length=rollout_fragment_length,
            env_to_module_connector=env_to_module,
            env_runner_cls=OverlappedEnvRunner if rl.overlap else None,  # None: RLlib's SingleAgentEnvRunner
        )
        .learners(num_learners=rl.num_learners, num_gpus_per_learner=rl.num_gpus_per_learner)
        .debugging(seed=config.experiment.seed)
        .fault_tolerance(restart_failed_env_runners=rl.env_runner_restarts > 0,
                         max_num_env_runner_restarts=rl.env_runner_restarts)
    )
