"""The reward model's rewards into RLlib episodes: an env-to-module ConnectorV2 (rl.reward 'model' or 'env+model').

Why env-to-module and not a learner connector: the EnvRunner already holds what the model reads. With the
latent representation the latent connector has just written every episode's newest latent (the reward model
costs no encoder call of its own); with pixels the raw RGB frame is there before the latent connector
replaces it, and a learner never sees it. Rewriting the reward where the step happens also makes everything
downstream consistent: the episodes RLlib ships to the learners, its episode-return metrics and any replay
buffer hold the rewards the agent trains on. One forward pass per vector step covers all of this EnvRunner's
episodes that stepped, as for the encoder.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2

from envenc_ray.rl.reward.model import RewardSource
from envenc_ray.rl.runner_errors import report_runner_error


class ModelRewards(ConnectorV2):
    """Env-to-module ConnectorV2: each episode's newest reward <- r(observation t-1, observation t) x
    rl.reward_model_scale (plus the game's reward with 'env+model').

    Each episode's previous representation is kept here by episode id (the latent connector overwrites raw
    frames, and a new episode chunk starts without its predecessor's observations); a step is rewritten once,
    however often the connector runs on it. EnvRunner metrics (sums per iteration): `envenc_env_reward`,
    `envenc_model_reward` (what was written, scaled), `envenc_reward_steps`.
    """

    def __init__(self, input_observation_space: gym.Space | None = None, input_action_space: gym.Space | None = None,
                 *, source: RewardSource, error_key: str | None = None, **kwargs):
        self.source, self.error_key = source, error_key
        self._model = None
        self._last: dict = {}  # episode id -> (t, representation of its observation at t)
        super().__init__(input_observation_space, input_action_space, **kwargs)

    @property
    def model(self):
        if self._model is None:  # first call: we are inside the EnvRunner now
            self._model = self.source.build()
        return self._model

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, metrics=None, **kwargs):
        all_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        stepped, previous, current = [], [], []
        model_rewards = np.zeros(0)
        try:
            for episode in all_episodes:
                last = self._last.get(episode.id_)
                if last is not None and last[0] == episode.t:
                    continue  # no new step since the last call
                representation = self.source.represent(episode.get_observations(-1))
                if last is not None:
                    stepped.append(episode)
                    previous.append(last[1])
                    current.append(representation)
                self._last[episode.id_] = (episode.t, representation)
            if stepped:
                with torch.no_grad():
                    rewards = self.model(torch.from_numpy(np.stack(previous)), torch.from_numpy(np.stack(current)))
                model_rewards = self.source.scale * rewards.numpy().astype(np.float64)
        except Exception as error:
            report_runner_error(self.error_key, error)  # the driver raises it (see runner_errors)
            raise
        env_rewards = [float(episode.get_rewards(-1)) for episode in stepped]
        for episode, env_reward, model_reward in zip(stepped, env_rewards, model_rewards):
            written = env_reward + model_reward if self.source.mode == "env+model" else model_reward
            episode.set_rewards(new_data=float(written), at_indices=-1)
        ongoing = {episode.id_ for episode in all_episodes if not episode.is_done}
        self._last = {key: value for key, value in self._last.items() if key in ongoing}
        if metrics is not None and stepped:
            metrics.log_value("envenc_env_reward", float(sum(env_rewards)), reduce="sum")
            metrics.log_value("envenc_model_reward", float(model_rewards.sum()), reduce="sum")
            metrics.log_value("envenc_reward_steps", len(stepped), reduce="sum")
        return batch

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        return {}  # per-episode representations are rollout state, not agent state

    def set_state(self, state: dict) -> None:
        pass
