"""What the agent observes: its spaces, the 84x84 grayscale frames, and `EpisodeObserver`, which turns the
newest RGB frame of many episodes into their observations with one encoder call for all.

State lives with the episode, not in the encoder: a windowed encoder's window of hidden states ((k-1, D)
pooled, (k-1, T, D) per-token for the tokens encoder: the observer keeps whatever the encoder returns)
and the pixel frame stack are kept per episode key, start fresh at an episode's reset, and are dropped when
an episode ends (or disappears), so a long run does not leak them. The RLlib connector and the gymnasium /
SB3 wrappers share this one implementation.
"""

from __future__ import annotations

import time
from typing import Any, Hashable

import gymnasium as gym
import numpy as np

from envenc_ray.config import LATENT_OBS_MODES
from envenc_ray.errors import InputError, ModelError

OBS_MODES = ("latent", "latent+pixels", "pixels", "state")
LATENT_KEY, PIXELS_KEY = "latent", "pixels"


def observation_space(obs_mode: str, latent_dim: int | None, frame_stack: int = 4, pixel_size: int = 84) -> gym.Space:
    """The agent's observation space: Box(latent_dim,) float32, Box(84, 84, k) uint8, or a Dict of both (for
    'state' the env's own space is the agent's: StateObservation.observation_space)."""
    if obs_mode not in OBS_MODES:
        raise InputError(f"unknown observation mode {obs_mode!r}; use one of {', '.join(OBS_MODES)}")
    pixels = gym.spaces.Box(0, 255, (pixel_size, pixel_size, frame_stack), np.uint8)
    if obs_mode == "pixels":
        return pixels
    latent = gym.spaces.Box(-np.inf, np.inf, (int(latent_dim),), np.float32)
    if obs_mode == "latent":
        return latent
    return gym.spaces.Dict({LATENT_KEY: latent, PIXELS_KEY: pixels})


def grayscale_resize(frame_uint8: np.ndarray, size: int) -> np.ndarray:
    """RGB (H, W, 3) -> (size, size) uint8, as RLlib's Atari wrappers do it (cv2 gray, area resize)."""
    import cv2

    gray = cv2.cvtColor(frame_uint8, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)


def check_obs_mode(obs_mode: str, encoder, what: str) -> None:
    """A known observation mode, with the encoder (or its source) the latent modes need."""
    if obs_mode not in OBS_MODES:
        raise InputError(f"unknown observation mode {obs_mode!r}; use one of {', '.join(OBS_MODES)}")
    if obs_mode in LATENT_OBS_MODES and encoder is None:
        raise ModelError(f"observation mode {obs_mode!r} needs {what}; none was given")


class EpisodeObserver:
    """Turns the newest RGB frame of many episodes into their observations, with one encoder call for all.

    Keys name episodes (RLlib episode ids, or sub-env indices in the gym wrapper). `fresh[i]` says frame i
    is its episode's first (reset) frame: its temporal window and frame stack start over. In 'state' mode the
    env already returns the observation (rl/state.py) and it passes through.
    """

    def __init__(self, obs_mode: str, encoder=None, frame_stack: int = 4, pixel_size: int = 84):
        check_obs_mode(obs_mode, encoder, "an encoder")
        self.obs_mode, self.encoder = obs_mode, encoder
        self.frame_stack, self.pixel_size = frame_stack, pixel_size
        self.windows: dict[Hashable, Any] = {}  # episode -> a windowed encoder's state (None: fresh)
        self.stacks: dict[Hashable, np.ndarray] = {}  # episode -> (size, size, k) uint8 grayscale stack
        self.encode_calls = 0
        self.frames_encoded = 0
        self.encode_seconds = 0.0
        self.last_call_seconds = 0.0

    @property
    def uses_encoder(self) -> bool:
        return self.obs_mode in LATENT_OBS_MODES

    def observe(self, keys: list[Hashable], frames: list[np.ndarray], fresh: list[bool]) -> list[Any]:
        if not keys:
            return []
        if self.obs_mode == "state":
            return list(frames)
        latents = self._latents(keys, frames, fresh) if self.uses_encoder else None
        stacks = self._stacks(keys, frames, fresh) if self.obs_mode != "latent" else None
        if self.obs_mode == "latent":
            return list(latents)
        if self.obs_mode == "pixels":
            return stacks
        return [{LATENT_KEY: latent, PIXELS_KEY: stack} for latent, stack in zip(latents, stacks)]

    def _latents(self, keys, frames, fresh) -> np.ndarray:
        frames_uint8 = np.stack(frames)
        windows = [None if is_fresh else self.windows.get(key) for key, is_fresh in zip(keys, fresh)]
        started = time.perf_counter()
        latents, new_windows = self.encoder.encode(frames_uint8, windows)
        self.last_call_seconds = time.perf_counter() - started
        self.encode_seconds += self.last_call_seconds
        self.encode_calls += 1
        self.frames_encoded += len(keys)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != (len(keys), self.encoder.latent_dim):
            raise ModelError(f"the encoder returned latents of shape {latents.shape} for {len(keys)} frames; "
                             f"expected ({len(keys)}, {self.encoder.latent_dim})")
        for i, key in enumerate(keys):
            self.windows[key] = None if new_windows is None else new_windows[i]
        return latents

    def _stacks(self, keys, frames, fresh) -> list[np.ndarray]:
        stacks = []
        for key, frame, is_fresh in zip(keys, frames, fresh):
            small = grayscale_resize(frame, self.pixel_size)
            previous = None if is_fresh else self.stacks.get(key)
            if previous is None:  # a fresh episode: its first frame fills the stack, as the encoder's window does
                stack = np.repeat(small[:, :, None], self.frame_stack, axis=2)
            else:
                stack = np.concatenate([previous[:, :, 1:], small[:, :, None]], axis=2)
            self.stacks[key] = stack
            stacks.append(stack)
        return stacks

    def drop(self, key: Hashable) -> None:
        self.windows.pop(key, None)
        self.stacks.pop(key, None)

    def retain(self, keys) -> None:
        """Forget every episode not in `keys` (ended, or abandoned by an env reset)."""
        keys = set(keys)
        for table in (self.windows, self.stacks):
            for key in [k for k in table if k not in keys]:
                del table[key]

    @property
    def num_tracked(self) -> int:
        return len(set(self.windows) | set(self.stacks))
