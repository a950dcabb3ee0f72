"""Latents into RLlib episodes: an env-to-module ConnectorV2 that turns each sub-env's newest RGB frame into
the agent's observation, for all sub-envs of an EnvRunner in ONE encoder call per vector step.

The connector rewrites the last observation of every episode in place (`set_observations(at_indices=-1)`),
so everything downstream of the EnvRunner -- the RLModule's forward pass, the learner batch, replay
buffers, checkpointed episodes -- holds latents (and/or the 84x84 grayscale stack), never 210x160 RGB.
Per-episode state (encoder windows, frame stacks) is the `EpisodeObserver`'s, keyed by episode id.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2

from envenc_ray.rl.encoder_source import EncoderSource
from envenc_ray.rl.observations import EpisodeObserver, check_obs_mode, observation_space
from envenc_ray.rl.reward.connector import ModelRewards
from envenc_ray.rl.reward.model import RewardSource
from envenc_ray.rl.runner_errors import report_runner_error


class LatentObservations(ConnectorV2):
    """Env-to-module ConnectorV2: newest RGB frame of every sub-env episode -> latent / pixel stack / both.

    One encoder call per vector step for all of this EnvRunner's episodes; the results are written back into
    the episodes (so the learner trains on them) and the output observation space is the agent's.
    Counters (`num_calls`, `observer.encode_calls`, ...) and the EnvRunner metrics `envenc_encode_calls`,
    `envenc_encode_ms`, `envenc_frames_encoded` (sums per iteration) make the batching checkable. Encoder
    errors (a Serve timeout after the client's retries, a bad encoder file) are not caught here.
    """

    def __init__(
        self,
        input_observation_space: gym.Space | None = None,
        input_action_space: gym.Space | None = None,
        *,
        obs_mode: str = "latent",
        source: EncoderSource | None = None,
        frame_stack: int = 4,
        pixel_size: int = 84,
        error_key: str | None = None,
        **kwargs,
    ):
        check_obs_mode(obs_mode, source, "an encoder source")  # on the driver, before any EnvRunner starts
        self.obs_mode, self.source = obs_mode, source
        self.frame_stack, self.pixel_size = frame_stack, pixel_size
        self.error_key = error_key
        self._observer: EpisodeObserver | None = None
        self.num_calls = 0  # calls that had at least one new frame, i.e. vector steps (and resets)
        super().__init__(input_observation_space, input_action_space, **kwargs)

    def recompute_output_observation_space(self, input_observation_space, input_action_space) -> gym.Space:
        latent_dim = self.source.latent_dim if self.source is not None else None
        return observation_space(self.obs_mode, latent_dim, self.frame_stack, self.pixel_size)

    @property
    def observer(self) -> EpisodeObserver:
        if self._observer is None:  # first call: we are inside the EnvRunner now
            encoder = self.source.build() if self.source is not None else None
            self._observer = EpisodeObserver(self.obs_mode, encoder, self.frame_stack, self.pixel_size)
        return self._observer

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, metrics=None, **kwargs):
        all_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        pending = [episode for episode in all_episodes if self._is_raw(episode.get_observations(-1))]
        if pending:
            try:
                observer = self.observer
                calls_before, seconds_before = observer.encode_calls, observer.encode_seconds
                observations = observer.observe(
                    keys=[episode.id_ for episode in pending],
                    frames=[episode.get_observations(-1) for episode in pending],
                    fresh=[episode.t == 0 for episode in pending],
                )
            except Exception as error:
                # RLlib ends a remote EnvRunner on any exception and the driver only learns "actor died":
                # leave the real message where train() looks for it, then fail as usual.
                report_runner_error(self.error_key, error)
                raise
            for episode, observation in zip(pending, observations):
                episode.set_observations(at_indices=-1, new_data=observation)
                # Like RLlib's ObservationPreprocessor: the episode's space becomes ours, so later
                # fills/validation of the rewritten observations use the right space.
                episode.observation_space = self.observation_space
            # Ended episodes, and those an env reset abandoned, leave the EnvRunner: so do their windows.
            observer.retain(episode.id_ for episode in all_episodes if not episode.is_done)
            self.num_calls += 1
            if metrics is not None and observer.uses_encoder:
                calls = observer.encode_calls - calls_before
                metrics.log_value("envenc_encode_calls", calls, reduce="sum")
                metrics.log_value("envenc_frames_encoded", len(pending), reduce="sum")
                metrics.log_value("envenc_encode_ms", 1000 * (observer.encode_seconds - seconds_before), reduce="sum")
                metrics.log_value("envenc_connector_calls", 1, reduce="sum")
        return batch

    def _is_raw(self, observation) -> bool:
        """A frame the env returned (not yet rewritten): calling twice on a step must not encode twice."""
        raw_space = self.input_observation_space
        return (isinstance(observation, np.ndarray) and observation.dtype == np.uint8
                and (raw_space is None or observation.shape == raw_space.shape)
                and observation.ndim == 3 and observation.shape[-1] == 3)

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        return {}  # per-episode windows are rollout state, not agent state: a restored agent starts fresh

    def set_state(self, state: dict) -> None:
        pass


def make_env_to_module(obs_mode: str, source: EncoderSource | None, frame_stack: int = 4, pixel_size: int = 84,
                       error_key: str | None = None, rewards: RewardSource | None = None):
    """The `env_to_module_connector` callable for `AlgorithmConfig.env_runners` (called in every EnvRunner).

    With `rewards` (rl.reward 'model' or 'env+model') the reward model's connector joins the pipeline where its
    representation is: after this one for latents, before it for the raw frames it turns into pixels.
    None for rl.obs_mode 'state': the env itself returns the observation (rl/state.py)."""
    if obs_mode == "state":
        return None

    def build(env=None, spaces=None, device=None):
        observations = LatentObservations(obs_mode=obs_mode, source=source, frame_stack=frame_stack,
                                          pixel_size=pixel_size, error_key=error_key)
        if rewards is None:
            return [observations]
        model_rewards = ModelRewards(source=rewards, error_key=error_key)
        return [model_rewards, observations] if rewards.representation == "pixels" else [observations, model_rewards]

    return build
