"""The reward model: r(frame t-1, frame t) from a small transformer over the two frames' representations.

    <run>/reward_model/   config.json (what to build, what it was trained on) + model.safetensors + metrics.json

A frame's representation is the agent's encoder latent (reward_model.representation 'latent') or its
grayscale pixels ('pixels'). Each of the two becomes a token (a linear projection of the standardized
representation plus a position), a learned summary token goes in front, and the reward is read from the
summary token after `layers` transformer encoder layers. Bradley-Terry fixes only differences of rewards
between frames that follow the same frame, in log-odds (a difference of 1: preferred e to 1), and leaves the
offset free: the exported model subtracts its mean over the training triples. Its scale is kept: dividing by
the spread of a model that barely separates its triples would blow up its rewards everywhere else.

`RewardSource` is how an EnvRunner gets the model (small and picklable, built inside the EnvRunner), and
`reward_source(config, encoder)` resolves it on the driver, refusing a model built for other representations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from envenc_ray.config import EnvEncConfig, RewardModelConfig, content_hash
from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.files import read_export_config, replaced_atomically, weights_sha256
from envenc_ray.layout import RunLayout
from envenc_ray.rl.observations import LATENT_KEY, grayscale_resize
from envenc_ray.storage import pull

FORMAT = "envenc-reward-model"
FORMAT_VERSION = 1


class RewardModel(nn.Module):
    """r(frame t-1, frame t) -> a scalar, from two (N, R) batches of frame representations."""

    def __init__(self, representation_dim: int, d_model: int = 64, layers: int = 2, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.representation_dim = representation_dim
        # Buffers, so they travel in model.safetensors: the input standardization (training triples' statistics)
        # and the output's offset (set at export).
        self.register_buffer("input_mean", torch.zeros(representation_dim))
        self.register_buffer("input_std", torch.ones(representation_dim))
        self.register_buffer("reward_offset", torch.zeros(()))
        self.project = nn.Linear(representation_dim, d_model)
        self.summary = nn.Parameter(torch.zeros(1, 1, d_model))
        self.position = nn.Parameter(0.02 * torch.randn(3, d_model))  # summary, frame t-1, frame t
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 1))

    def set_input_statistics(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_std.copy_(torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def forward(self, previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        frames = (torch.stack([previous, current], dim=1) - self.input_mean) / self.input_std  # (N, 2, R)
        tokens = torch.cat([self.summary.expand(len(frames), -1, -1), self.project(frames)], dim=1) + self.position
        raw = self.head(self.transformer(tokens)[:, 0]).squeeze(-1)
        return raw - self.reward_offset


def build_reward_model(settings: RewardModelConfig, representation_dim: int) -> RewardModel:
    return RewardModel(representation_dim, settings.d_model, settings.layers, settings.heads, settings.dropout)


def pixel_representation(frames_uint8: np.ndarray, size: int) -> np.ndarray:
    """RGB frames (N, H, W, 3) -> (N, size * size) float32 grayscale in [0, 1], as the agent's pixel stack sees them."""
    return np.stack([grayscale_resize(frame, size).reshape(-1) for frame in frames_uint8]).astype(np.float32) / 255


# ------------------------------------------------------------------------------------------- identity


def representation_identity(config: EnvEncConfig) -> dict:
    """What a representation of a frame depends on: for latents the agent's encoder weights and the VLM settings,
    for pixels the frame size."""
    if config.reward_model.representation == "pixels":
        return {"representation": "pixels", "pixel_size": config.reward_model.pixel_size}
    encoder_dir = RunLayout.of(config).agent_encoder
    return {"representation": "latent", "encoder_sha256": weights_sha256(encoder_dir),
            "vlm": config.section_hash("vlm", "stage2", "advise")}


def output_hash(config: EnvEncConfig) -> str:
    """What determines <run>/reward_model/: the triples' settings and the model's, without where it trains."""
    settings = config.reward_model.model_dump(mode="json", exclude={"num_workers", "cpus_per_worker", "report_poll_s"})
    payload = {"seed": config.experiment.seed,
               "env": config.env.model_dump(mode="json", include={"game", "frameskip", "full_action_space"}),
               "reward_model": settings}
    return content_hash(payload)


# ----------------------------------------------------------------------------------------- save / load


def save_reward_model(model: RewardModel, folder: Path, description: dict, metrics: dict) -> None:
    """config.json + model.safetensors + metrics.json, filled in a staging folder and swapped in whole."""
    from safetensors.torch import save_file

    with replaced_atomically(Path(folder)) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                                     **description}, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))


def read_description(folder: Path, rerun: str) -> dict:
    """config.json of an exported reward model, without loading weights; `rerun` says how to make one."""
    return read_export_config(folder, FORMAT, FORMAT_VERSION, rerun=rerun,
                              missing=f"no reward model in {folder} (needs config.json and model.safetensors); {rerun}")


def load_reward_model(folder: Path) -> RewardModel:
    """The exported reward model (eval mode, no gradients) from config.json + model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    rerun = "run `envenc reward-model CONFIG`"
    folder = pull(folder)  # a reward model of a URI run root: fresh from the URI in an EnvRunner on any node
    description = read_description(folder, rerun)
    try:
        model = build_reward_model(RewardModelConfig.model_validate(description["settings"]),
                                   int(description["representation_dim"]))
        model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    except (KeyError, TypeError, ValueError, SafetensorError, RuntimeError, OSError) as error:
        raise ModelError(f"{folder} does not hold a reward model envenc can build ({str(error).splitlines()[0]}); "
                         f"{rerun}") from None
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------- in the EnvRunner


@dataclass(frozen=True)
class RewardSource:
    """How an EnvRunner gets the reward model and turns an observation into its representation: small and
    picklable; `build()` loads the model inside the EnvRunner."""

    model_dir: str
    mode: str  # rl.reward: 'model' or 'env+model'
    scale: float
    representation: str  # 'latent' (read after the latent connector) or 'pixels' (raw RGB frames, read before it)
    pixel_size: int = 84

    def build(self) -> RewardModel:
        return load_reward_model(Path(self.model_dir))

    def represent(self, observation) -> np.ndarray:
        """One observation's representation: the latent the agent sees, or the grayscale of the RGB frame."""
        if self.representation == "pixels":
            return pixel_representation(observation[None], self.pixel_size)[0]
        latent = observation[LATENT_KEY] if isinstance(observation, dict) else observation
        return np.asarray(latent, dtype=np.float32)


def reward_source(config: EnvEncConfig, latent_dim: int | None) -> RewardSource | None:
    """The reward model the EnvRunners use under rl.reward (None for 'env'), checked on the driver against the
    agent: `latent_dim` is its encoder's (None when it sees pixels only)."""
    if config.rl.reward == "env":
        return None
    folder = RunLayout.of(config).reward_model
    rerun = "run `envenc reward-model CONFIG` first, or set rl.reward=env"
    description = read_description(folder, f"rl.reward is {config.rl.reward!r}: {rerun}")
    representation, size = description.get("representation"), description.get("representation_dim")
    if representation == "latent":
        if latent_dim is None:
            raise ConfigError(f"the reward model in {folder} reads the agent's latents but rl.obs_mode is 'pixels'; "
                              "set reward_model.representation=pixels and rerun `envenc reward-model CONFIG`, or use "
                              "rl.obs_mode latent or latent+pixels")
        expected, what = latent_dim, "the agent's encoder gives"
    else:
        expected, what = config.reward_model.pixel_size ** 2, "reward_model.pixel_size makes"
    if size != expected:
        raise ModelError(f"the reward model in {folder} was built for {size}-d {representation} representations but "
                         f"{what} {expected}-d ones; rerun `envenc reward-model CONFIG` for this agent, or set "
                         "rl.reward=env")
    if description.get("config_hash") != output_hash(config) or \
            description.get("identity") != representation_identity(config):
        raise ModelError(f"the reward model in {folder} was made with other reward_model settings or from another "
                         f"encoder's latents than this config's; rerun `envenc reward-model CONFIG`")
    return RewardSource(model_dir=str(folder.resolve()), mode=config.rl.reward, scale=config.rl.reward_model_scale,
                        representation=representation, pixel_size=config.reward_model.pixel_size)
