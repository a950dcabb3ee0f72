"""Stable-Baselines3 adapter: our ALE envs with latent (or pixel, or both) observations as an SB3 `VecEnv`.

SB3 takes its own `VecEnv` type, not a gymnasium `VectorEnv`, and its API differs: `reset()` returns only
observations, `step()` returns `(obs, rewards, dones, infos)` with a list of per-env info dicts, and a
finished sub-env is reset in the SAME step (`infos[i]["terminal_observation"]` holds its last observation,
the returned one is the next episode's first). `EnvEncVectorEnv` resets one step later (gymnasium's
NEXT_STEP mode), so this adapter uses its sub-envs, observer and spaces but steps them itself: every step's
frames, the final frames of episodes that just ended and the reset frames of their successors, go to the
encoder in ONE call (`observer.encode_calls` counts them), the final frame continuing its episode's window.

    from envenc_ray.rl.sb3 import EnvEncSB3VecEnv
    from stable_baselines3 import PPO
    PPO("MlpPolicy", EnvEncSB3VecEnv(config, num_envs=8)).learn(100_000)  # latent+pixels: "MultiInputPolicy"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from envenc_ray.config import EnvEncConfig
from envenc_ray.rl.gym_wrapper import EnvEncVectorEnv

try:
    from stable_baselines3.common.env_util import is_wrapped
    from stable_baselines3.common.vec_env import VecEnv
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn
except ImportError as error:  # an optional extra
    raise ImportError("envenc_ray.rl.sb3 needs Stable-Baselines3: pip install 'envenc-ray[sb3]'") from error


class EnvEncSB3VecEnv(VecEnv):
    """`num_envs` ALE envs in lockstep as an SB3 VecEnv; one encoder call per step for all of them."""

    def __init__(self, config: EnvEncConfig, num_envs: int, encoder=None):
        self.venv = EnvEncVectorEnv(config, num_envs, encoder=encoder)
        self.envs: list[gym.Env] = self.venv.envs
        self.observer = self.venv.observer
        self._actions: np.ndarray | None = None
        super().__init__(num_envs, self.venv.single_observation_space, self.venv.single_action_space)

    # ------------------------------------------------------------------ stepping

    def reset(self) -> VecEnvObs:
        frames = []
        for i, env in enumerate(self.envs):
            frame, self.reset_infos[i] = env.reset(seed=self._seeds[i], options=self._options[i] or None)
            frames.append(frame)
        self._reset_seeds()  # seeds and options are used once, as in SB3's own VecEnvs
        self._reset_options()
        return self._batch(self.observer.observe(list(range(self.num_envs)), frames, [True] * self.num_envs))

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async()")
        actions, self._actions = self._actions, None
        frames: list[np.ndarray] = []
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        dones = np.zeros(self.num_envs, dtype=bool)
        infos: list[dict[str, Any]] = []
        for i, env in enumerate(self.envs):
            frame, reward, terminated, truncated, info = env.step(actions[i])
            frames.append(frame)
            rewards[i], dones[i] = reward, terminated or truncated
            infos.append({**info, "TimeLimit.truncated": bool(truncated and not terminated)})
        ended = [int(i) for i in np.flatnonzero(dones)]
        reset_frames = []
        for i in ended:
            frame, self.reset_infos[i] = self.envs[i].reset()
            reset_frames.append(frame)
        # One call: key i's final frame continues its window; the same key's reset frame, later in the call,
        # starts a fresh one (the observer reads all windows first and stores them in order).
        keys = list(range(self.num_envs)) + ended
        fresh = [False] * self.num_envs + [True] * len(ended)
        observations = self.observer.observe(keys, frames + reset_frames, fresh)
        for n, i in enumerate(ended):
            infos[i]["terminal_observation"] = observations[i]
            observations[i] = observations[self.num_envs + n]
        return self._batch(observations[: self.num_envs]), rewards, dones, infos

    def close(self) -> None:
        self.venv.close()

    def _batch(self, observations: list[Any]) -> VecEnvObs:
        if isinstance(self.observation_space, gym.spaces.Dict):
            return {key: np.stack([o[key] for o in observations]) for key in self.observation_space.spaces}
        return np.stack(observations)

    # ------------------------------------------------------------------ sub-env access, as SB3 requires

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [env.get_wrapper_attr(attr_name) for env in self._targets(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        for env in self._targets(indices):
            setattr(env, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs
                   ) -> list[Any]:
        return [env.get_wrapper_attr(method_name)(*method_args, **method_kwargs) for env in self._targets(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [is_wrapped(env, wrapper_class) for env in self._targets(indices)]

    def _targets(self, indices: VecEnvIndices) -> Sequence[gym.Env]:
        return [self.envs[i] for i in self._get_indices(indices)]
