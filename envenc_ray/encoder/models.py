"""Autoencoders over VLM hidden states, and the windows of consecutive frames the temporal one reads.

Four kinds share one small interface (`Autoencoder`):

  encode(x)         -> latent (B, latent_dim)                     what the agent sees
  forward(x)        -> (reconstruction, latent, aux_loss)         what training optimises
  normalize(x)      -> the reconstruction target                  z-scores of the training hidden states
  encoder_module()  -> `Encoder`, the part that is exported       (the decoder is dropped)

`x` is (B, D) for the per-frame kinds (mlp, vq, linear) and (B, k, D) for `temporal` (the frame's k most
recent hidden states, oldest first). Reconstructions are in normalized units, so the loss weighs every
hidden dimension alike instead of letting a few large-variance dimensions dominate.

The per-dim mean/std of the training hidden states live as buffers inside `Encoder`, so an exported
encoder needs no side data at inference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envenc_ray.config import EncoderConfig
from envenc_ray.errors import DataError, InputError

KINDS = ("mlp", "temporal", "vq", "linear")
COMMITMENT_COST = 0.25  # VQ-VAE's beta (van den Oord et al. 2017): how hard the encoder is pulled to its code


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with GELU between them (none after the last: latents and reconstructions are unbounded)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class TemporalEncoderNet(nn.Module):
    """(B, k, D) -> (B, latent): one projection shared by the k frames, then an MLP over their concatenation.

    Sharing the first projection keeps the parameter count ~k times smaller than one big layer over k*D
    inputs (D is a VLM width, thousands on real models); the concatenation keeps the frames' order.
    """

    def __init__(self, hidden_size: int, window: int, hidden_dims: list[int], latent_dim: int):
        super().__init__()
        width = hidden_dims[0] if hidden_dims else latent_dim
        self.frame_projection = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU())
        self.mix = mlp([window * width, *hidden_dims[1:], latent_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.frame_projection(x).flatten(1))


class TemporalDecoderNet(nn.Module):
    """(B, latent) -> (B, k, D): the mirror of `TemporalEncoderNet`."""

    def __init__(self, hidden_size: int, window: int, hidden_dims: list[int], latent_dim: int):
        super().__init__()
        width = hidden_dims[0] if hidden_dims else latent_dim
        self.window, self.width = window, width
        self.unmix = nn.Sequential(mlp([latent_dim, *reversed(hidden_dims[1:]), window * width]), nn.GELU())
        self.frame_projection = nn.Linear(width, hidden_size)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.frame_projection(self.unmix(latent).view(-1, self.window, self.width))


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with the straight-through gradient and the VQ-VAE codebook/commitment losses."""

    def __init__(self, codebook_size: int, latent_dim: int):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(codebook_size, latent_dim) / latent_dim**0.5)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cdist(z, self.codebook).argmin(dim=1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes = self.codes(z)
        quantized = self.codebook[codes]
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())
        straight_through = z + (quantized - z).detach()  # forward: the code; backward: identity into z
        return straight_through, codes, codebook_loss + COMMITMENT_COST * commitment_loss


class Encoder(nn.Module):
    """The exported half: normalisation buffers + encoder network (+ codebook for `vq`); x -> latent."""

    def __init__(self, kind: str, hidden_size: int, latent_dim: int, window: int, net: nn.Module,
                 quantizer: VectorQuantizer | None = None):
        super().__init__()
        self.kind, self.hidden_size, self.latent_dim, self.window = kind, hidden_size, latent_dim, window
        self.register_buffer("input_mean", torch.zeros(hidden_size))
        self.register_buffer("input_std", torch.ones(hidden_size))
        self.net = net
        self.quantizer = quantizer

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (k, D) for the temporal encoder, (D,) otherwise."""
        return (self.window, self.hidden_size) if self.kind == "temporal" else (self.hidden_size,)

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-dim statistics of the training hidden states; a (near-)constant dim keeps std 1, not 1/0."""
        std = np.where(std > 1e-6, std, 1.0)
        self.input_mean.copy_(torch.tensor(np.array(mean, dtype=np.float32)))
        self.input_std.copy_(torch.tensor(np.array(std, dtype=np.float32)))

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise InputError(
                f"the {self.kind} encoder takes hidden states of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}; hidden size {self.hidden_size} must match the VLM that made the hidden states"
            )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def pre_quantization(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.net(self.normalize(x))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Code index per sample (vq only)."""
        if self.quantizer is None:
            raise InputError(f"a {self.kind} encoder has no codebook; codes exist for kind 'vq' only")
        return self.quantizer.codes(self.pre_quantization(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre_quantization(x)
        if self.quantizer is not None:
            z = self.quantizer.codebook[self.quantizer.codes(z)]
        return z


class Autoencoder(nn.Module):
    """Encoder + decoder; see the module docstring for the interface."""

    def __init__(self, encoder: Encoder, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    @property
    def kind(self) -> str:
        return self.encoder.kind

    def encoder_module(self) -> Encoder:
        return self.encoder

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.normalize(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder.pre_quantization(x)
        aux_loss = z.new_zeros(())
        if self.encoder.quantizer is not None:
            z, _, aux_loss = self.encoder.quantizer(z)
        return self.decoder(z), z, aux_loss

    @torch.no_grad()
    def init_codebook(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """VQ only: start the codes at encoder outputs of real samples, so no code starts far from the data.

        Call it with the same samples on every data-parallel worker (the codebook must start identical).
        """
        if self.encoder.quantizer is None:
            return
        z = self.encoder.pre_quantization(x)
        codebook = self.encoder.quantizer.codebook
        picks = torch.randint(len(z), (len(codebook),), generator=generator)
        noise = torch.randn(codebook.shape, generator=generator) * z.std(0, keepdim=True) * 0.1
        codebook.copy_(z[picks] + noise)


def build_autoencoder(config: EncoderConfig, hidden_size: int) -> Autoencoder:
    """The autoencoder of `config.kind` for hidden states of width `hidden_size`."""
    if config.kind not in KINDS:
        raise InputError(f"unknown encoder kind {config.kind!r}; use one of {', '.join(KINDS)}")
    dims, latent = list(config.hidden_dims), config.latent_dim
    if config.kind == "temporal":
        k = config.window
        net = TemporalEncoderNet(hidden_size, k, dims, latent)
        decoder: nn.Module = TemporalDecoderNet(hidden_size, k, dims, latent)
        return Autoencoder(Encoder("temporal", hidden_size, latent, k, net), decoder)
    if config.kind == "linear":  # a learned linear projection: PCA-like, the baseline the others must beat
        return Autoencoder(Encoder("linear", hidden_size, latent, 1, nn.Linear(hidden_size, latent)),
                           nn.Linear(latent, hidden_size))
    net, decoder = mlp([hidden_size, *dims, latent]), mlp([latent, *reversed(dims), hidden_size])
    quantizer = VectorQuantizer(config.codebook_size, latent) if config.kind == "vq" else None
    return Autoencoder(Encoder(config.kind, hidden_size, latent, 1, net, quantizer), decoder)


def effective_window(config: EncoderConfig) -> int:
    """Frames per sample: `window` for the temporal encoder, 1 for the per-frame kinds."""
    return config.window if config.kind == "temporal" else 1


def build_windows(episode_ids: np.ndarray, steps: np.ndarray, window: int) -> np.ndarray:
    """Row indices (N, k) of each frame's window: its k most recent frames of the same episode, oldest first.

    Row i's window ends with i itself. Frames are ordered by step within their episode, whatever the row
    order. The first k-1 frames of an episode are padded by repeating the episode's first frame: that is
    exactly what a fresh per-episode window at reset gives at serving time (EnvironmentEncoder fills a new
    episode's window with its first hidden state), so training and serving see the same inputs. Windows
    never cross episode boundaries.
    """
    episode_ids, steps = np.asarray(episode_ids), np.asarray(steps)
    if len(episode_ids) != len(steps):
        raise InputError(f"episode_ids ({len(episode_ids)}) and steps ({len(steps)}) must have the same length")
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    n = len(steps)
    if n == 0:
        return np.zeros((0, window), dtype=np.int64)
    order = np.lexsort((steps, episode_ids))  # by episode, then by step
    sorted_episodes, sorted_steps = episode_ids[order], steps[order]
    duplicate = (sorted_episodes[1:] == sorted_episodes[:-1]) & (sorted_steps[1:] == sorted_steps[:-1])
    if duplicate.any():
        at = int(np.flatnonzero(duplicate)[0])
        raise DataError(f"episode {sorted_episodes[at]} holds step {sorted_steps[at]} twice; the hidden states are "
                        "not one row per frame (rerun `envenc embed`)")
    starts = np.r_[0, np.flatnonzero(sorted_episodes[1:] != sorted_episodes[:-1]) + 1]
    lengths = np.diff(np.r_[starts, n])
    if window > lengths.max():
        raise DataError(f"encoder.window={window} is longer than every episode (the longest has {lengths.max()} "
                        "frames); use a smaller window or record longer episodes")
    episode_start = np.repeat(starts, lengths)  # sorted position of each frame's episode start
    position = np.arange(n)
    offsets = np.arange(-window + 1, 1)  # oldest ... newest
    sorted_windows = np.maximum(position[:, None] + offsets[None, :], episode_start[:, None])
    windows = np.empty((n, window), dtype=np.int64)
    windows[order] = order[sorted_windows]
    return windows
