"""Autoencoders over VLM hidden states, and the windows of consecutive frames the temporal ones read.

Five kinds share one small interface (`Autoencoder`):

  encode(x)         -> latent (B, latent_dim)                     what the agent sees
  forward(x)        -> (reconstruction, latent, aux_loss)         what training optimises
  normalize(x)      -> the reconstruction target                  z-scores of the training hidden states
  encoder_module()  -> `Encoder`, the part that is exported       (the decoder is dropped)

`x` is (B, D) for the per-frame kinds (mlp, vq, linear), (B, k, D) for `temporal` (the frame's k most
recent pooled hidden states, oldest first) and (B, k, T, D) for `tokens` (the same window of per-token
states, vlm.pooling 'tokens'). Reconstructions are in normalized units, so the loss weighs every hidden
dimension alike instead of letting a few large-variance dimensions dominate.

The mean/std of the training hidden states (per dim; per (token, dim) for `tokens`) live as buffers
inside `Encoder`, so an exported encoder needs no side data at inference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envenc_ray.config import EncoderConfig, check_hidden_kind
from envenc_ray.errors import DataError, InputError

KINDS = ("mlp", "temporal", "vq", "linear", "tokens")
WINDOWED_KINDS = ("temporal", "tokens")  # read a window of the k most recent frames; the others one frame
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
    """(B, k, *frame) -> (B, latent): one frame network shared by the k frames, then an MLP over their concatenation.

    Sharing the frame network keeps the parameter count ~k times smaller than one big layer over k*D
    inputs (D is a VLM width, thousands on real models); the concatenation keeps the frames' order.
    `frame_net` maps one frame to `frame_features` numbers (any shape, flattened here).
    """

    def __init__(self, frame_net: nn.Module, frame_features: int, window: int, hidden_dims: list[int], latent_dim: int):
        super().__init__()
        self.frame_projection = frame_net
        self.mix = mlp([window * frame_features, *hidden_dims[1:], latent_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.frame_projection(x).flatten(1))


class TemporalDecoderNet(nn.Module):
    """(B, latent) -> (B, k, *frame): the mirror of `TemporalEncoderNet`; `frame_net` maps (..., width) to a frame."""

    def __init__(self, frame_net: nn.Module, width: int, window: int, hidden_dims: list[int], latent_dim: int):
        super().__init__()
        self.window, self.width = window, width
        self.unmix = nn.Sequential(mlp([latent_dim, *reversed(hidden_dims[1:]), window * width]), nn.GELU())
        self.frame_projection = frame_net

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.frame_projection(self.unmix(latent).view(-1, self.window, self.width))


class AttentionPooling(nn.Module):
    """(..., T, D) token states -> (..., queries, width): learned queries cross-attend over one frame's tokens.

    Tokens are projected to `width` first (D is thousands on real VLMs) and get a learned per-position
    embedding: attention alone is blind to order, and a token's position says where on the screen its
    image patch is. The queries start small, so at first every query is about the mean of the tokens.
    """

    def __init__(self, tokens: int, hidden_size: int, width: int, queries: int):
        super().__init__()
        self.token_projection = nn.Linear(hidden_size, width)
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.attention = nn.MultiheadAttention(width, num_heads=1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-2]
        tokens = self.norm(self.token_projection(x.reshape(-1, *x.shape[-2:])) + self.position)
        pooled, _ = self.attention(self.queries.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
        return pooled.reshape(*leading, *pooled.shape[1:])


class TokenReadout(nn.Module):
    """(..., width) -> (..., T, D): every position's learned embedding is added to the frame's code, then read out.

    The target is the full normalized token states: they are what the encoder reads, and a pooled target
    would let the latent drop where on the screen things are. The per-(token, dim) normalisation makes the
    prompt's constant tokens zero, so they cost the decoder nothing to reconstruct.
    """

    def __init__(self, tokens: int, width: int, hidden_size: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.output = nn.Linear(width, hidden_size)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(code.unsqueeze(-2) + self.position))


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
    """The exported half: normalisation buffers + encoder network (+ codebook for `vq`); x -> latent.

    `hidden_shape` is one frame's hidden state: (D,) pooled, (T, D) per token (kind `tokens`).
    """

    def __init__(self, kind: str, hidden_shape: tuple[int, ...], latent_dim: int, window: int, net: nn.Module,
                 quantizer: VectorQuantizer | None = None):
        super().__init__()
        self.kind, self.hidden_shape, self.latent_dim, self.window = kind, tuple(hidden_shape), latent_dim, window
        self.hidden_size = self.hidden_shape[-1]
        self.inputs = "llm"  # encoder.inputs of the states it reads (build_autoencoder sets it)
        self.vlm_dtype: str | None = None  # the dtype its training states were computed in (load_encoder sets it)
        self.register_buffer("input_mean", torch.zeros(self.hidden_shape))
        self.register_buffer("input_std", torch.ones(self.hidden_shape))
        self.net = net
        self.quantizer = quantizer

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: (k, *hidden_shape) for the windowed kinds, hidden_shape otherwise."""
        return (self.window, *self.hidden_shape) if self.kind in WINDOWED_KINDS else self.hidden_shape

    def set_normalization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Per-dim (per token and dim) statistics of the training hidden states; a (near-)constant one keeps
        std 1, not 1/0 (the prompt's tokens before the image are constant: they normalize to 0)."""
        std = np.where(std > 1e-6, std, 1.0)
        self.input_mean.copy_(torch.tensor(np.array(mean, dtype=np.float32)))
        self.input_std.copy_(torch.tensor(np.array(std, dtype=np.float32)))

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise InputError(
                f"the {self.kind} encoder takes hidden states of shape (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}; hidden size {self.hidden_size} (hidden state shape {self.hidden_shape}) must "
                "match the VLM that made the hidden states"
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


def build_autoencoder(config: EncoderConfig, hidden_shape: int | tuple[int, ...]) -> Autoencoder:
    """The autoencoder of `config.kind` for hidden states of one frame's shape: (D,) (an int D is the same)
    for the pooled kinds, (T, D) for `tokens`. Its encoder records `config.inputs` (which VLM states it reads:
    what a loader asks the VLM for)."""
    autoencoder = _build_autoencoder(config, hidden_shape)
    autoencoder.encoder.inputs = config.inputs
    return autoencoder


def _build_autoencoder(config: EncoderConfig, hidden_shape: int | tuple[int, ...]) -> Autoencoder:
    if config.kind not in KINDS:
        raise InputError(f"unknown encoder kind {config.kind!r}; use one of {', '.join(KINDS)}")
    hidden_shape = (hidden_shape,) if isinstance(hidden_shape, int) else tuple(hidden_shape)
    check_hidden_kind(config.kind, len(hidden_shape) == 2, f"hidden states of shape {hidden_shape} are")
    dims, latent, hidden_size = list(config.hidden_dims), config.latent_dim, hidden_shape[-1]
    width = dims[0] if dims else latent
    if config.kind == "temporal":
        k = config.window
        net = TemporalEncoderNet(nn.Sequential(nn.Linear(hidden_size, width), nn.GELU()), width, k, dims, latent)
        decoder: nn.Module = TemporalDecoderNet(nn.Linear(width, hidden_size), width, k, dims, latent)
        return Autoencoder(Encoder("temporal", hidden_shape, latent, k, net), decoder)
    if config.kind == "tokens":
        k, tokens, queries = config.window, hidden_shape[0], config.token_queries
        pooling = AttentionPooling(tokens, hidden_size, width, queries)
        net = TemporalEncoderNet(pooling, queries * width, k, dims, latent)
        decoder = TemporalDecoderNet(TokenReadout(tokens, width, hidden_size), width, k, dims, latent)
        return Autoencoder(Encoder("tokens", hidden_shape, latent, k, net), decoder)
    if config.kind == "linear":  # a learned linear projection: PCA-like, the baseline the others must beat
        return Autoencoder(Encoder("linear", hidden_shape, latent, 1, nn.Linear(hidden_size, latent)),
                           nn.Linear(latent, hidden_size))
    net, decoder = mlp([hidden_size, *dims, latent]), mlp([latent, *reversed(dims), hidden_size])
    quantizer = VectorQuantizer(config.codebook_size, latent) if config.kind == "vq" else None
    return Autoencoder(Encoder(config.kind, hidden_shape, latent, 1, net, quantizer), decoder)


def effective_window(config: EncoderConfig) -> int:
    """Frames per sample: `window` for the windowed kinds (temporal, tokens), 1 for the per-frame kinds."""
    return config.window if config.kind in WINDOWED_KINDS else 1


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
