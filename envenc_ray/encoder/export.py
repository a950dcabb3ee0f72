"""The exported encoder: <run>/encoder/ = config.json + model.safetensors (encoder only) + metrics.json.

config.json says what to build (kind, hidden_shape, latent_dim, window and the encoder settings), the
safetensors file holds the encoder's weights and its input-normalisation buffers; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

from envenc_ray.config import EncoderConfig, EnvEncConfig
from envenc_ray.encoder.models import Encoder, build_autoencoder
from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.files import json_safe, read_export_config, replaced_atomically
from envenc_ray.storage import pull
from envenc_ray.train_jobs import checkpoint_weights

FORMAT = "envenc-encoder"
FORMAT_VERSION = 1


def export_encoder(checkpoint, encoder_dir: Path, config: EnvEncConfig, hidden_shape: tuple[int, ...],
                   config_hash: str, input_fingerprint: str, metrics: dict, vlm_dtype: str) -> None:
    """Write the encoder half of a training checkpoint (a Ray `Checkpoint`) into `encoder_dir`, atomically.

    `hidden_shape` is one frame's hidden state: (D,), or (T, D) for the tokens encoder; `vlm_dtype` the dtype the
    VLM computed them in (what vlm.dtype 'auto' loads the VLM in wherever this encoder runs).
    """
    autoencoder = build_autoencoder(config.encoder, hidden_shape)
    autoencoder.load_state_dict(checkpoint_weights(checkpoint))
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": config.encoder.kind,
        "hidden_size": hidden_shape[-1],
        "hidden_shape": list(hidden_shape),
        "latent_dim": config.encoder.latent_dim,
        "window": autoencoder.encoder_module().window,
        "vlm_dtype": vlm_dtype,
        "encoder": config.encoder.model_dump(mode="json"),
        "config_hash": config_hash,
        "input_fingerprint": input_fingerprint,
        "best_epoch": metrics.get("best_epoch"),
    }
    save_encoder(autoencoder.encoder_module(), encoder_dir, description, metrics)


def save_encoder(encoder: Encoder, encoder_dir: Path, description: dict, metrics: dict) -> None:
    """Fill a temporary folder, then swap it in (files.replaced_atomically)."""
    from safetensors.torch import save_file

    with replaced_atomically(Path(encoder_dir)) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(description, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))


def load_encoder(encoder_dir: str | Path) -> Encoder:
    """Rebuild an exported encoder (eval mode, no gradients) from config.json + model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    encoder_dir = pull(encoder_dir)  # an encoder of a URI run root: fresh from the URI on any node
    config_path, weights_path = encoder_dir / "config.json", encoder_dir / "model.safetensors"
    description = read_export_config(
        encoder_dir, FORMAT, FORMAT_VERSION, rerun="rerun `envenc train-encoder`",
        missing=f"{encoder_dir} is not an exported encoder (needs config.json and model.safetensors); run `envenc "
        "train-encoder` first")
    try:
        settings = EncoderConfig.model_validate(description["encoder"])
        # exports from before the tokens encoder name only hidden_size: (D,)
        hidden_shape = tuple(int(n) for n in description.get("hidden_shape", [description["hidden_size"]]))
        encoder = build_autoencoder(settings, hidden_shape).encoder_module()
    except (KeyError, TypeError, ValueError, ConfigError) as error:  # a hand edit or another tool's file
        raise ModelError(f"{config_path} does not describe an encoder envenc can build "
                         f"({str(error).splitlines()[0]}); rerun `envenc train-encoder`") from None
    try:
        weights = load_file(str(weights_path))
        encoder.load_state_dict(weights)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise ModelError(f"{weights_path} does not hold the weights of this {settings.kind} encoder "
                         f"({str(error).splitlines()[0]}); rerun `envenc train-encoder`") from None
    # the dtype its training states were computed in (absent before vlm.dtype 'auto': float32 ones)
    encoder.vlm_dtype = description.get("vlm_dtype")
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder
