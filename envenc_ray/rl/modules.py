"""PPO RLModules for the three observation modes, built from RLlib's default PPO module and catalog.

  latent         Box(latent_dim,) float32  -> RLlib's default MLP encoder (fcnet_hiddens), pi and vf heads.
  pixels         Box(84, 84, k) uint8      -> RLlib's CNN encoder with the Nature-DQN filters, then 512 units.
  latent+pixels  Dict(latent, pixels)      -> RLlib's MultiStreamEncoder: the MLP and the CNN above, one per
                                              stream, concatenated and fused by an MLP (fusionnet_hiddens).

Why not RLlib's default filters for 84x84: new-stack RLlib pads every layer "same", so its last
[256, 11x11, stride 1] layer runs over an 11x11 map (about 120M multiply-adds per frame, 15x the Nature
CNN's 8M) -- measured here, it made the CNN, not the env or the encoder, the bottleneck of a CPU run.

Pixel stacks stay uint8 in episodes and batches (4x less memory and object-store traffic than float32);
the module scales them to [0, 1] on the way into the CNN. That scaling, and handing the Dict streams to
the multi-stream encoder, is all this file adds to RLlib's defaults.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from ray.rllib.algorithms.ppo.ppo_catalog import PPOCatalog
from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.configs import MultiStreamEncoderConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from envenc_ray.config import RLConfig
from envenc_ray.rl.observations import LATENT_KEY, PIXELS_KEY

# Mnih et al. 2015 (Nature DQN): [filters, kernel, stride, padding]; 84x84 -> 20 -> 9 -> 7x7x64.
NATURE_CNN_FILTERS = [[32, 8, 4, "valid"], [64, 4, 2, "valid"], [64, 3, 1, "valid"]]
# rl.pixel_size >= 36 (config): the smallest side these three valid convolutions leave a 1x1 map of.


class EnvEncPPOCatalog(PPOCatalog):
    """PPOCatalog that also builds an encoder for our Dict observation (one stream per key, then fusion)."""

    @classmethod
    def _get_encoder_config(cls, observation_space: gym.Space, model_config_dict: dict, action_space=None):
        if not isinstance(observation_space, gym.spaces.Dict):
            return super()._get_encoder_config(observation_space, model_config_dict, action_space)
        streams = {
            key: super(EnvEncPPOCatalog, cls)._get_encoder_config(space, dict(model_config_dict), action_space)
            for key, space in observation_space.spaces.items()
        }
        return MultiStreamEncoderConfig(
            base_encoder_configs=streams,
            hidden_layer_dims=list(model_config_dict["fusionnet_hiddens"]),
            hidden_layer_activation=model_config_dict["fusionnet_activation"],
        )


class EnvEncPPOTorchRLModule(DefaultPPOTorchRLModule):
    """RLlib's default PPO module; uint8 pixel stacks are scaled to [0, 1] and Dict streams are unpacked."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("catalog_class", EnvEncPPOCatalog)
        super().__init__(*args, **kwargs)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return super()._forward(self._encoder_inputs(batch), **kwargs)

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return super()._forward_train(self._encoder_inputs(batch), **kwargs)

    def compute_values(self, batch: dict[str, Any], embeddings=None):
        return super().compute_values(self._encoder_inputs(batch) if embeddings is None else batch, embeddings)

    @staticmethod
    def _encoder_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        observations = batch[Columns.OBS]
        batch = dict(batch)
        if isinstance(observations, dict):
            # RLlib's MultiStreamEncoder reads each stream from the top level of its input dict.
            batch[LATENT_KEY] = observations[LATENT_KEY]
            batch[PIXELS_KEY] = _scaled(observations[PIXELS_KEY])
        else:
            batch[Columns.OBS] = _scaled(observations)
        return batch


def _scaled(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor


def ppo_module_spec(rl: RLConfig) -> RLModuleSpec:
    """The RLModuleSpec for PPO in `rl.obs_mode` (spaces come from the env-to-module connector)."""
    model_config = {
        "fcnet_hiddens": list(rl.fcnet_hiddens),
        "fcnet_activation": "relu",
        "conv_filters": NATURE_CNN_FILTERS,
        "conv_activation": "relu",
        "fusionnet_hiddens": [256],
        "fusionnet_activation": "relu",
        # Nature DQN's 512-unit layer after the CNN; latents (alone or fused) already end in an MLP.
        "head_fcnet_hiddens": [512] if rl.obs_mode == "pixels" else [],
        "vf_share_layers": True,
    }
    return RLModuleSpec(module_class=EnvEncPPOTorchRLModule, catalog_class=EnvEncPPOCatalog, model_config=model_config)
