"""Plain gymnasium envs that see what our RLlib agents see, for code outside RLlib (evaluation, CleanRL-style
scripts, notebooks).

`EnvEncVectorEnv` steps N ALE envs and turns their N newest frames into observations with ONE encoder call
per step (the same `EpisodeObserver` the RLlib connector uses: per-episode temporal windows and pixel
stacks, fresh at every reset). `EnvEncEnv` is the single-env variant; it passes gymnasium's env checker.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from envenc_ray.config import EnvEncConfig
from envenc_ray.rl.encoder_source import encoder_source
from envenc_ray.rl.observations import LATENT_KEY, PIXELS_KEY, EpisodeObserver, observation_space
from envenc_ray.rl.state import make_agent_env


def build_observer(config: EnvEncConfig, encoder=None) -> EpisodeObserver:
    """An observer for `config.rl.obs_mode`; the encoder is built from the config unless one is given. With
    stage2.method 'joint' its observations are the adapter's input (windows of per-patch vision features), which
    the PPO RLModule of rl/joint.py turns into latents (`envenc evaluate` plays it through this wrapper)."""
    rl = config.rl
    if encoder is None and rl.reads_latents:
        encoder = encoder_source(config).build()
    return EpisodeObserver(rl.obs_mode, encoder if rl.reads_latents else None, rl.frame_stack, rl.pixel_size)


def agent_space(config: EnvEncConfig, env: gym.Env, observer: EpisodeObserver) -> gym.Space:
    """What the agent sees of `env`: the env's own space in 'state' mode (rl/state.py), else the observer's."""
    if config.rl.obs_mode == "state":
        return env.observation_space
    latent_dim = observer.encoder.latent_dim if observer.uses_encoder else None
    return observation_space(config.rl.obs_mode, latent_dim, config.rl.frame_stack, config.rl.pixel_size)


class EnvEncEnv(gym.Env):
    """One ALE env whose observations are latents, a grayscale frame stack, or both (Dict)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}

    def __init__(self, config: EnvEncConfig, encoder=None, render_mode: str | None = None):
        self.env = make_agent_env(config.env, config.rl.obs_mode, render_mode=render_mode)
        self.observer = build_observer(config, encoder)
        self.observation_space = agent_space(config, self.env, self.observer)
        self.action_space = self.env.action_space
        self.render_mode = render_mode
        self.last_frame: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frame, info = self.env.reset(seed=seed, options=options)
        return self._observe(frame, fresh=True), info

    def step(self, action):
        frame, reward, terminated, truncated, info = self.env.step(action)
        return self._observe(frame, fresh=False), float(reward), terminated, truncated, info

    def render(self):
        return self.env.render()

    def close(self):
        self.env.close()

    def _observe(self, frame: np.ndarray, fresh: bool):
        self.last_frame = frame
        return self.observer.observe([0], [frame], [fresh])[0]


class EnvEncVectorEnv(VectorEnv):
    """N ALE envs stepped in lockstep; all N newest frames are encoded in one call per step.

    Autoreset follows gymnasium's default NEXT_STEP mode: the step after an episode ends resets that sub-env
    (its action is ignored) and returns the reset observation, whose window/stack start fresh.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, config: EnvEncConfig, num_envs: int, encoder=None):
        self.envs = [make_agent_env(config.env, config.rl.obs_mode) for _ in range(num_envs)]
        self.observer = build_observer(config, encoder)
        self.num_envs = num_envs
        self.single_observation_space = agent_space(config, self.envs[0], self.observer)
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self.last_frames: list[np.ndarray] = []

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        seeds = seed if isinstance(seed, (list, tuple)) else (
            [None] * self.num_envs if seed is None else [seed + i for i in range(self.num_envs)])
        frames, infos = [], {}
        for i, (env, env_seed) in enumerate(zip(self.envs, seeds)):
            frame, info = env.reset(seed=env_seed, options=options)
            frames.append(frame)
            infos = self._add_info(infos, info, i)
        self._needs_reset[:] = False
        return self._observe(frames, fresh=[True] * self.num_envs), infos

    def step(self, actions):
        actions = np.asarray(actions)
        frames, infos = [], {}
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminateds = np.zeros(self.num_envs, dtype=bool)
        truncateds = np.zeros(self.num_envs, dtype=bool)
        fresh = list(self._needs_reset)
        for i, env in enumerate(self.envs):
            if self._needs_reset[i]:
                frame, info = env.reset()
            else:
                frame, rewards[i], terminateds[i], truncateds[i], info = env.step(actions[i])
            frames.append(frame)
            infos = self._add_info(infos, info, i)
        self._needs_reset = terminateds | truncateds
        return self._observe(frames, fresh), rewards, terminateds, truncateds, infos

    def request_reset(self, index: int) -> None:
        """Make the next step reset sub-env `index` (as after its episode's end), e.g. to cut an episode."""
        self._needs_reset[index] = True

    def close_extras(self, **kwargs):
        for env in self.envs:
            env.close()

    def _observe(self, frames: list[np.ndarray], fresh: list[bool]) -> Any:
        self.last_frames = frames
        observations = self.observer.observe(list(range(self.num_envs)), frames, fresh)
        if isinstance(self.single_observation_space, gym.spaces.Dict):
            return {key: np.stack([o[key] for o in observations]) for key in (LATENT_KEY, PIXELS_KEY)}
        return np.stack(observations)
