"""serve.backend 'vllm': vLLM's pooling runner gives TruncatedVLM's states (tiny VLM, real vLLM on CPU).

The checkpoint and settings tests run everywhere. The parity tests need vLLM, which lives in its own
virtual environment (it pins an older transformers): `.ci/run` builds it and runs this file there
(README: "The vLLM backend"); elsewhere they are skipped with that reason.

Stated tolerance, vLLM against TruncatedVLM with `vlm.final_norm: true`, both fed the model's own HF
processor output (vLLM preprocesses PIL images with it): max abs difference 1e-4 on states whose largest
entries are ~4 (measured: 3e-6). From uint8 frames through TruncatedVLM's tensor preprocessing (at most a
grey level per pixel apart from the HF processor's): cosine similarity above 0.999 per frame.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from envenc_ray.config import VLMConfig
from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.vlm.backbone import TruncatedVLM
from envenc_ray.vlm.pooling import POOLINGS, pool
from envenc_ray.vlm.vllm_backend import DECODER_LAYER, check_vllm_settings, vllm_checkpoint

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed in this environment: .ci/run runs "
                                "this file in its own vLLM virtual environment (README: 'The vLLM backend')")
TOTAL_LAYERS = 4  # the tiny VLM's decoder
TRUNCATED = VLMConfig(layer=2, final_norm=True, pooling="tokens")


def tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_checkpoint_keeps_everything_but_the_decoder_layers_above_k(tiny_vlm_dir, tmp_path):
    checkpoint = vllm_checkpoint(TRUNCATED, tiny_vlm_dir, tmp_path / "cache")
    full, kept = tensors(tiny_vlm_dir), tensors(checkpoint)
    layers = {int(m.group(1)) for name in kept if (m := DECODER_LAYER.search(name))}
    assert layers == {0, 1}  # hidden_states[2] is the output of decoder layers 1..2 (indices 0, 1)
    dropped = set(full) - set(kept)
    assert dropped and all(int(DECODER_LAYER.search(name).group(1)) >= 2 for name in dropped)
    assert any("vision_tower" in name and ".layers." in name for name in kept)  # vision layers never match
    for name, tensor in kept.items():
        assert torch.equal(tensor, full[name])
    # config.json is unchanged (vLLM's hf_overrides sets the layer count); the processor files come along
    assert json.loads((checkpoint / "config.json").read_text()) == json.loads((tiny_vlm_dir / "config.json").read_text())
    assert {p.name for p in tiny_vlm_dir.iterdir()} == {p.name for p in checkpoint.iterdir()}

    assert vllm_checkpoint(TRUNCATED, tiny_vlm_dir, tmp_path / "cache") == checkpoint  # made once
    assert vllm_checkpoint(VLMConfig(layer=-1), tiny_vlm_dir, tmp_path / "cache") == tiny_vlm_dir  # nothing to cut


def test_settings_vllm_cannot_match_are_refused_with_the_fix(tiny_vlm_dir, tmp_path):
    assert check_vllm_settings(TRUNCATED, tiny_vlm_dir) == (2, TOTAL_LAYERS)
    assert check_vllm_settings(VLMConfig(layer=-1), tiny_vlm_dir) == (TOTAL_LAYERS, TOTAL_LAYERS)
    with pytest.raises(ConfigError, match="set vlm.final_norm: true"):
        check_vllm_settings(VLMConfig(layer=2), tiny_vlm_dir)
    with pytest.raises(ConfigError, match="vlm.crop must be 'model'"):
        check_vllm_settings(VLMConfig(layer=-1, crop="none"), tiny_vlm_dir)
    with pytest.raises(ConfigError, match="out of range"):
        check_vllm_settings(VLMConfig(layer=9), tiny_vlm_dir)
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {}}))
    with pytest.raises(ConfigError, match="supports the llava family.*serve.backend 'transformers'"):
        check_vllm_settings(VLMConfig(), other)
    with pytest.raises(ModelError, match="needs a local model directory"):
        check_vllm_settings(VLMConfig(), tmp_path / "nothing-here")


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message of an environment without vLLM")
def test_without_vllm_the_error_says_how_to_install_it(tiny_vlm_dir):
    from envenc_ray.vlm.vllm_backend import VLLMBackend

    with pytest.raises(ModelError, match=r"install envenc-ray\[vllm\] in its own virtual environment"):
        VLLMBackend.from_config(VLMConfig(layer=-1), tiny_vlm_dir, tiny_vlm_dir)


# ------------------------------------------------------------------------------------ with vLLM


@pytest.fixture(scope="module", params=[2, -1], ids=["layer2-of-4", "all-layers"])
def backends(request, tiny_vlm_dir, tmp_path_factory):
    """(vLLM backend, TruncatedVLM) reading the same layer of the tiny VLM with per-token states."""
    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed in this environment")
    from envenc_ray.vlm.vllm_backend import VLLMBackend

    settings = VLMConfig(layer=request.param, final_norm=True, pooling="tokens", prompt="a game of pong.")
    checkpoint = vllm_checkpoint(settings, tiny_vlm_dir, tmp_path_factory.mktemp("vllm-cache"))
    vlm = VLLMBackend.from_config(settings, tiny_vlm_dir, checkpoint)
    yield vlm, TruncatedVLM.from_config(settings, model_path=tiny_vlm_dir)
    vlm.close()


@needs_vllm
@pytest.mark.slow
def test_vllm_states_equal_the_transformers_backend(backends, pong_frames):
    vlm, reference = backends
    assert (vlm.hidden_size, vlm.sequence_length, vlm.num_image_tokens) == (
        reference.hidden_size, reference.sequence_length, reference.num_image_tokens)
    frames = pong_frames[::8]  # 8 frames spread over the rollout
    tokens = vlm.embed(frames)
    assert tokens.shape == (len(frames), reference.sequence_length, reference.hidden_size)
    assert tokens.dtype == torch.float32

    # Same pixels in (the HF processor's): the same states, truncated or not.
    text = reference.family.prompt_text(reference.processor, reference.prompt)
    pixel_values = reference.processor(images=list(frames), text=[text] * len(frames), return_tensors="pt")[
        "pixel_values"]
    expected = reference.embed_vision_inputs({"pixel_values": pixel_values})
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=0)
    for pooling in POOLINGS:  # one pooling code for both backends, on the image mask of the same prompt
        vlm.pooling = pooling
        torch.testing.assert_close(vlm.embed(frames[:2]), pool(expected[:2], reference.image_mask, pooling, vlm.grid),
                                   atol=1e-4, rtol=0)
    vlm.pooling = "tokens"

    # From uint8 frames through TruncatedVLM's own tensor preprocessing.
    cosine = torch.nn.functional.cosine_similarity(tokens.flatten(1), reference.embed(frames).flatten(1))
    assert cosine.min().item() > 0.999


@needs_vllm
@pytest.mark.slow
def test_serve_backend_vllm_serves_the_same_latents(ray_session, tiny_vlm_dir, pong_frames, tmp_path):
    from ray import serve

    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import load_encoder
    from envenc_ray.serve.client import deploy_encoder
    from test_serve import TEMPORAL, make_config, save_untrained_encoder

    config = make_config(tmp_path, tiny_vlm_dir, TEMPORAL, "vllm-app")
    config = config.model_copy(update={
        "vlm": config.vlm.model_copy(update={"layer": 2, "final_norm": True}),
        "serve": config.serve.model_copy(update={"backend": "vllm", "http": False, "max_replicas": 1}),
    })
    save_untrained_encoder(TEMPORAL, config.run_dir / "encoder")
    reference_vlm = TruncatedVLM.from_config(config.vlm, model_path=tiny_vlm_dir, game="pong")
    reference = EnvironmentEncoder(reference_vlm, load_encoder(config.run_dir / "encoder"))
    try:
        client = deploy_encoder(config, timeout_s=300)
        assert client.info["preprocessor"] is None  # vLLM resizes: the client sends raw frames
        frames = pong_frames[:6]
        text = reference_vlm.family.prompt_text(reference_vlm.processor, reference_vlm.prompt)
        pixel_values = reference_vlm.processor(images=list(frames), text=[text] * len(frames),
                                               return_tensors="pt")["pixel_values"]
        hidden = reference_vlm.embed_vision_inputs({"pixel_values": pixel_values}).numpy()
        np.testing.assert_allclose(client.hidden(frames), hidden, atol=1e-4, rtol=0)
        latents, windows = client.encode(frames)
        expected, _ = reference.encode_hidden(hidden)
        np.testing.assert_allclose(latents, expected, atol=1e-4, rtol=0)
        assert len(windows) == len(frames)
    finally:
        serve.shutdown()
