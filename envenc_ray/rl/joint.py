"""stage2.method 'joint': the VLM's multimodal projector trained alongside the agent, inside its PPO RLModule.

    observation (B, k * P * Dv)   the window of the vision tower's per-patch output before the projector
                                  (encoder/environment.AdapterFeatures, in the EnvRunner or the Serve replica:
                                  the tower is frozen, so it runs once per frame there)
    -> ImageAdapter, per frame    projector (trainable) -> frozen truncated decoder -> pooling
                                  (+ the frame's patch mean, encoder.inputs 'both')
    -> encoder                    the one train-encoder pretrained; trainable with stage2.train_encoder
    -> latent (B, latent_dim)     -> RLlib's default PPO model: fcnet_hiddens, pi and vf heads

Every frame of the window goes through the decoder on every forward pass, in the Learner too: the projector
changes with every SGD step, so the hidden states cannot be computed once, as they are for the other methods
(there the learner sees precomputed latents). That is what joint costs; the README gives the measured factor.

The adapter starts from the weights of the VLM the run reads (`vlm.paths.resolve_model_path`): the model as
given, or with stage2.joint_from 'finetuned' the one `advise` made. The truncated decoder and the prompt stay
out of the module tree (`vlm.adapter.FrozenDecoder`): the optimizer, checkpoints and RLlib's weight sync hold
the projector, the encoder and the heads only.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from envenc_ray.config import EnvEncConfig
from envenc_ray.encoder.served import ServedPair
from envenc_ray.rl.modules import EnvEncPPOCatalog, EnvEncPPOTorchRLModule, ppo_module_spec

JOINT_KEY = "envenc_joint"  # the model_config entry with what the module loads (paths, settings)


class JointPPOCatalog(EnvEncPPOCatalog):
    """RLlib's PPO encoder and heads built over the latent, not over the flat features the module receives."""

    @classmethod
    def _get_encoder_config(cls, observation_space: gym.Space, model_config_dict: dict, action_space=None):
        latent_dim = model_config_dict[JOINT_KEY]["latent_dim"]
        latent = gym.spaces.Box(-np.inf, np.inf, (latent_dim,), np.float32)
        return super()._get_encoder_config(latent, model_config_dict, action_space)


class JointPPOTorchRLModule(EnvEncPPOTorchRLModule):
    """PPO with the VLM's projector (and optionally the encoder) among its trainable weights; see the module
    docstring. `adapter.projector` and `env_encoder` are its own submodules beside RLlib's `encoder`, `pi`, `vf`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("catalog_class", JointPPOCatalog)
        super().__init__(*args, **kwargs)

    def setup(self):
        from envenc_ray.config import VLMConfig
        from envenc_ray.encoder.export import load_encoder
        from envenc_ray.encoder.models import WINDOWED_KINDS
        from envenc_ray.vlm.adapter import ImageAdapter
        from envenc_ray.vlm.backbone import TruncatedVLM

        super().setup()
        joint = self.model_config[JOINT_KEY]
        vlm = TruncatedVLM.from_config(VLMConfig(**joint["vlm"]), model_path=joint["model_path"], game=joint["game"],
                                       output="patches")
        self.patch_shape = tuple(vlm.patch_shape)
        self.adapter = ImageAdapter.of(vlm, joint["inputs"], trainable=True)  # the vision tower is not kept
        self.env_encoder = load_encoder(joint["encoder_dir"]).requires_grad_(joint["train_encoder"])
        self.windowed = self.env_encoder.kind in WINDOWED_KINDS

    def _encoder_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        batch[Columns.OBS] = self.latents(batch[Columns.OBS])
        return batch

    def latents(self, observations: torch.Tensor) -> torch.Tensor:
        """(B, k * P * Dv) features -> (B, latent_dim): the adapter on each of the k frames, then the encoder."""
        hidden = self.adapter(observations.reshape(-1, *self.patch_shape))  # (B * k, D)
        if self.windowed:
            hidden = hidden.reshape(len(observations), self.env_encoder.window, -1)  # (B, k, D), oldest first
        latent = self.env_encoder.pre_quantization(hidden)
        if self.env_encoder.quantizer is not None:  # the code forward, the straight-through gradient backward
            latent = self.env_encoder.quantizer(latent)[0]
        return latent


def joint_module_spec(config: EnvEncConfig) -> RLModuleSpec:
    """The RLModuleSpec of stage2.method 'joint': PPO's (ppo_module_spec) with what the module loads; runs on
    the driver, so every path is absolute and the encoder is checked (`ServedPair.of`) before any actor starts."""
    pair = ServedPair.of(config)
    # vlm.dtype 'auto': the dtype the encoder's training states were computed in (data/embed.py decides), so the
    # module starts at the latents the frozen pipeline gives
    dtype = (pair.trained_dtype or "float32") if pair.vlm.dtype == "auto" else pair.vlm.dtype
    joint = {
        "model_path": pair.model_path,
        # loaded on the CPU: RLlib moves the module to its Learner's device, and the frozen decoder follows the
        # features there (ImageAdapter.forward); the process's torch threads stay as RLlib set them
        "vlm": pair.vlm.model_dump(mode="json") | {"device": "cpu", "num_threads": None, "dtype": dtype},
        "game": pair.game,
        "encoder_dir": pair.encoder_dir,
        "inputs": pair.inputs,
        "train_encoder": config.stage2.train_encoder,
        "latent_dim": pair.latent_dim,
    }
    spec = ppo_module_spec(config.rl)
    return RLModuleSpec(module_class=JointPPOTorchRLModule, catalog_class=JointPPOCatalog,
                        model_config=spec.model_config | {JOINT_KEY: joint})
