"""ALE v5 environments by game name, as gymnasium envs with RGB frames (210x160x3 uint8)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envenc_ray.config import EnvConfig
from envenc_ray.errors import UnsupportedGameError

_registered = False


def ale_id(game: str) -> str:
    """'pong', 'Pong', 'ALE/Pong-v5' -> 'ALE/Pong-v5'; 'space_invaders' -> 'ALE/SpaceInvaders-v5'."""
    if game.startswith("ALE/"):
        return game
    return "ALE/" + "".join(part.capitalize() for part in game.replace("-", "_").split("_")) + "-v5"


def make_env(
    game: str,
    *,
    seed: int | None = None,
    repeat_action_probability: float = 0.25,
    frameskip: int = 4,
    full_action_space: bool = False,
    max_episode_steps: int | None = None,
    fire_on_life_start: bool = False,
    render_mode: str | None = None,
) -> gym.Env:
    """An ALE v5 env with RGB observations; ROMs ship with ale-py, nothing is downloaded."""
    global _registered
    if not _registered:
        import ale_py

        gym.register_envs(ale_py)
        ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner per env, in every process
        _registered = True
    env_id = ale_id(game)
    if env_id not in gym.registry:
        raise UnsupportedGameError(
            f"unknown game {game!r} (looked for {env_id}); use an ALE game name such as 'pong', 'breakout', "
            "'boxing', 'freeway' or a full id like 'ALE/Pong-v5'"
        )
    env = gym.make(
        env_id,
        obs_type="rgb",
        repeat_action_probability=repeat_action_probability,
        frameskip=frameskip,
        full_action_space=full_action_space,
        max_episode_steps=max_episode_steps,
        render_mode=render_mode,
    )
    if fire_on_life_start and "FIRE" in env.unwrapped.get_action_meanings():
        env = FireOnLifeStart(env)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_env_from_config(config: EnvConfig, seed: int | None = None, render_mode: str | None = None) -> gym.Env:
    return make_env(
        config.game,
        seed=seed,
        repeat_action_probability=config.repeat_action_probability,
        frameskip=config.frameskip,
        full_action_space=config.full_action_space,
        max_episode_steps=config.max_episode_steps,
        fire_on_life_start=config.fire_on_life_start,
        render_mode=render_mode,
    )


class FireOnLifeStart(gym.Wrapper):
    """Presses FIRE once after each reset and each lost life, inside the step the agent sees.

    Games such as Breakout wait for FIRE before serving: a greedy policy that never presses it stands still
    until ALE's 27,000-step cap. The standard Atari wrappers (FireResetEnv, as in CleanRL's ppo_atari) press it
    at reset and rely on one-life training episodes for the rest; here episodes keep all their lives, so the
    press follows each lost life too. The FIRE step's reward counts, it is not an agent step.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.fire = env.unwrapped.get_action_meanings().index("FIRE")
        self.lives = 0

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        observation, _, terminated, truncated, info = self.env.step(self.fire)
        if terminated or truncated:  # cannot happen at a game's start; the plain reset is then the honest answer
            observation, info = self.env.reset(**kwargs)
        self.lives = info["lives"]
        return observation, info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        if info["lives"] < self.lives and not (terminated or truncated):
            observation, fire_reward, terminated, truncated, info = self.env.step(self.fire)
            reward += fire_reward
        self.lives = info["lives"]
        return observation, reward, terminated, truncated, info


def random_rollout_frames(config: EnvConfig, seed: int, count: int) -> np.ndarray:
    """`count` consecutive RGB frames (count, 210, 160, 3) uint8 of a seeded random policy, resets included:
    real frames for tests and benchmarks without a recorded data set."""
    env = make_env_from_config(config, seed=seed)
    observation, _ = env.reset(seed=seed)
    frames = []
    for _ in range(count):
        frames.append(observation)
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            observation, _ = env.reset()
    env.close()
    return np.stack(frames)
