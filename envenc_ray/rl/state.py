"""rl.obs_mode 'state', the oracle: the game's objects read from the Atari RAM instead of seen in the frame.

An upper reference for the latent arms (what an encoder that recovered every object exactly would give the
agent), not a feature of the method: it needs the emulator's RAM and a hand-written annotator
(envs/annotate.py), so only annotated games have it.

    RAM -> annotator.decode -> the object positions (keys ending in _x / _y, screen pixels of the 210x160 frame)
        -> [positions scaled to [-1, 1] | their change since the previous step, clipped to [-1, 1] | presence flags]

A game's vector has a fixed size: every position its annotator decodes, in the annotator's order, twice, then
one flag per object that can be missing (an annotator's `<object>_in_play` key, e.g. Pong's and Breakout's
ball): a missing object is its flag 0 and zeros for its positions and their changes. The previous step's
positions live in the env wrapper, so every sub-env of an EnvRunner (and of `envenc evaluate`) keeps its own,
and a reset starts with no change. Scores, lives and clocks are left out: the agent sees where things are.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envenc_ray.config import EnvConfig, game_name
from envenc_ray.envs.annotate import ANNOTATED_GAMES, FRAME_HEIGHT, FRAME_WIDTH, get_annotator
from envenc_ray.envs.atari import make_env_from_config
from envenc_ray.errors import ConfigError

PRESENCE_SUFFIX = "_in_play"  # an annotator's flag of an object that can be off screen (the ball)
# Pixels per env step (frameskip 4) at which a change reads 1: the fastest objects (Pong's ball and paddle)
# move about this far; clipping keeps a Freeway car's jump where it wraps round the screen edge at 1.
MAX_STEP_PX = 16.0


class StateObservation(gym.ObservationWrapper):
    """An ALE env of `game` whose observation is its state vector (see the module docstring)."""

    def __init__(self, env: gym.Env, game: str):
        super().__init__(env)
        self.annotator = get_annotator(game, env.unwrapped.get_action_meanings())
        objects = self._objects()
        self.positions = [key for key in objects if key.endswith(("_x", "_y"))]
        self.flags = [key for key in objects if key.endswith(PRESENCE_SUFFIX)]
        # position -> the flag that says whether its object is on screen (None: it always is)
        self.flag_of = {key: next((flag for flag in self.flags if key.startswith(flag.removesuffix(PRESENCE_SUFFIX))),
                                  None) for key in self.positions}
        self.half_size = np.array([(FRAME_WIDTH if key.endswith("_x") else FRAME_HEIGHT) / 2 for key in self.positions],
                                  dtype=np.float32)
        size = 2 * len(self.positions) + len(self.flags)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.previous: np.ndarray | None = None  # the previous step's positions in pixels (NaN: object missing)

    def reset(self, **kwargs):
        self.previous = None
        return super().reset(**kwargs)

    def observation(self, frame: np.ndarray) -> np.ndarray:
        objects = self._objects()
        pixels = np.array([objects[key] if self._present(objects, key) else np.nan for key in self.positions],
                          dtype=np.float32)
        change = (np.zeros_like(pixels) if self.previous is None
                  else np.clip((pixels - self.previous) / MAX_STEP_PX, -1, 1))
        self.previous = pixels
        flags = np.array([objects[flag] for flag in self.flags], dtype=np.float32)
        state = np.concatenate([pixels / self.half_size - 1, change, flags])
        return np.nan_to_num(state, nan=0.0).astype(np.float32)  # a missing object: zeros (its flag says why)

    def _objects(self) -> dict[str, int | float]:
        return self.annotator.decode(self.env.unwrapped.ale.getRAM().tolist())

    def _present(self, objects: dict, key: str) -> bool:
        flag = self.flag_of[key]
        return flag is None or bool(objects[flag])


def make_agent_env(env_config: EnvConfig, obs_mode: str, render_mode: str | None = None) -> gym.Env:
    """The env an agent in `obs_mode` steps: ALE's RGB frames, or for 'state' the state vector."""
    env = make_env_from_config(env_config, render_mode=render_mode)
    return StateObservation(env, env_config.game) if obs_mode == "state" else env


def check_state_game(game: str, origin: str) -> None:
    """Refuse, in one line, rl.obs_mode 'state' on a game without RAM annotations."""
    if game_name(game) not in ANNOTATED_GAMES:
        raise ConfigError(f"{origin}: rl.obs_mode 'state' reads the objects from the RAM, which is annotated for "
                          f"{', '.join(ANNOTATED_GAMES)} only, not {game!r}; use another rl.obs_mode for this game")
