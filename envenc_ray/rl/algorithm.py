"""One algorithm builder for PPO and DreamerV3: what train, tune, experiment, evaluate and the rollout
benchmark all build their RLlib algorithm (or only its RLModule spec) from."""

from __future__ import annotations

from envenc_ray.config import EnvEncConfig
from envenc_ray.rl.encoder_source import EncoderSource, described_source, encoder_source
from envenc_ray.rl.reward.model import RewardSource, reward_source
from envenc_ray.rl.runner_errors import raise_runner_error


def algorithm_config(config: EnvEncConfig, source: EncoderSource | None, error_key: str | None = None,
                     rewards: RewardSource | None = None):
    """The AlgorithmConfig of `config.rl.algo`; observations come from the latent connector fed by `source`,
    rewards from the game or (`rewards`, rl.reward) the reward model's connector.

    `error_key`: where the EnvRunners report an encoder error for the driver (see `train_iteration`).
    """
    if config.rl.algo == "dreamerv3":
        from envenc_ray.rl.dreamer import build_dreamer_config

        return build_dreamer_config(config, source, error_key, rewards)
    from envenc_ray.rl.ppo import build_ppo_config

    return build_ppo_config(config, source, error_key, rewards)


def offline_algorithm_config(config: EnvEncConfig):
    """The AlgorithmConfig for what runs no EnvRunner (RLlib's validation, the RLModule spec of a checkpoint):
    its encoder source only says that observations are latents; it is never built."""
    return algorithm_config(config, described_source(config))


def build_algorithm(config: EnvEncConfig, error_key: str | None = None):
    """The RLlib Algorithm of `config.rl` (not yet trained); Ray must be running."""
    from envenc_ray.envs.atari import make_env

    make_env(config.env.game).close()  # an unknown game fails here, in one line, not inside an EnvRunner
    if config.rl.obs_mode == "state":
        from envenc_ray.rl.state import check_state_game

        check_state_game(config.env.game, "env.game")
    source = encoder_source(config)
    rewards = reward_source(config, source.latent_dim if source is not None else None)
    return algorithm_config(config, source, error_key, rewards).build_algo()


def train_iteration(algo, error_key: str) -> dict:
    """algo.train(), except that an EnvRunner's encoder error raises that error.

    RLlib would report it as "actor died", or recreate the EnvRunner (rl.env_runner_restarts) straight into
    the same error; the connector stored it under `error_key` (runner_errors), so it is raised here whether
    the iteration failed or RLlib carried on. An EnvRunner that died for another reason is recreated.
    """
    try:
        result = algo.train()
    except Exception:
        raise_runner_error(error_key)
        raise
    raise_runner_error(error_key)
    return result
