"""`ServedPair`: the served VLM + encoder resolved once on the driver, and its checks as one-line errors."""

import pickle

import pytest
import torch

from envenc_ray.config import EncoderConfig
from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
from envenc_ray.encoder.models import build_autoencoder
from envenc_ray.errors import ModelError


def export(encoder_dir, hidden_size: int):
    settings = EncoderConfig(kind="mlp", latent_dim=4, hidden_dims=[16])
    torch.manual_seed(0)
    save_encoder(build_autoencoder(settings, hidden_size).encoder_module(), encoder_dir,
                 {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "mlp", "hidden_size": hidden_size,
                  "latent_dim": 4, "window": 1, "encoder": settings.model_dump(mode="json")}, metrics={})
    return encoder_dir


def test_the_pair_is_resolved_once_and_pickles(tiny_vlm_dir, tmp_path, debug_config):
    from envenc_ray.encoder.served import ServedPair
    from envenc_ray.rl.encoder_source import encoder_source
    from envenc_ray.serve.replica import replica_spec

    # the debug preset's read-out: spatial pooling of the tiny VLM's 128-wide decoder -> 2 x 128 features
    encoder_dir = export(tmp_path / "encoder", 256)
    config = debug_config(f"vlm.model={tiny_vlm_dir}", f"rl.encoder_dir={encoder_dir}", "rl.encoder_source=in_process")
    pair = ServedPair.of(config)
    assert (pair.kind, pair.hidden_size, pair.latent_dim, pair.window, pair.joint) == ("mlp", 256, 4, 1, False)
    assert pair.model_path == str(tiny_vlm_dir.resolve()) and pair.encoder_dir == str(encoder_dir.resolve())
    assert pickle.loads(pickle.dumps(pair)) == pair
    assert replica_spec(config).pair == pair == encoder_source(config).pair


def test_an_encoder_of_another_width_is_one_line_on_the_driver(tiny_vlm_dir, tmp_path, debug_config):
    from envenc_ray.rl.encoder_source import encoder_source
    from envenc_ray.serve.replica import replica_spec

    encoder_dir = export(tmp_path / "encoder", 128)  # pooled width, but the config reads spatial: 2 x 128
    config = debug_config(f"vlm.model={tiny_vlm_dir}", f"rl.encoder_dir={encoder_dir}", "rl.encoder_source=in_process")
    for resolve in (lambda: replica_spec(config), lambda: encoder_source(config)):
        with pytest.raises(ModelError, match=rf"encoder in {encoder_dir} reads 128-wide hidden states, but .* "
                                             r"vlm.pooling=spatial .* gives 256-wide ones; .*retrain it") as error:
            resolve()
        assert "\n" not in str(error.value)
