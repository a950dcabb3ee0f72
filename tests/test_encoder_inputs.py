"""encoder.inputs llm | vision | both: the VLM split at its multimodal projector (the vision tower's view, the LLM's,
or both), on the tiny Llava and real Pong frames, and `both` through embed, train-encoder, Serve and PPO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from envenc_ray.config import load_config
from envenc_ray.errors import ConfigError, DataError
from envenc_ray.vlm.backbone import TruncatedVLM, patch_shape_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("layer", [2, -1])
def test_split_at_the_projector_equals_the_full_path(tiny_vlm_dir, pong_frames, layer):
    frames = pong_frames[:8]
    read_outs = {output: TruncatedVLM.from_pretrained(tiny_vlm_dir, layer=layer, pooling="last", output=output)
                 for output in ("llm", "vision", "both", "patches")}
    llm, vision, both, patches = (read_outs[name].embed(frames) for name in ("llm", "vision", "both", "patches"))

    # the two halves of the split, composed, are HF's own image features, bit for bit
    vlm = read_outs["llm"]
    pixel_values = vlm.preprocessor.pixel_values(torch.from_numpy(frames))
    with torch.no_grad():
        projected = vlm.backbone.multi_modal_projector(vlm.family.vision_features(vlm.backbone, pixel_values=pixel_values))
        assert torch.equal(projected, vlm.family.image_features(vlm.backbone, pixel_values=pixel_values))

    assert patches.shape == (8, *patch_shape_of(str(tiny_vlm_dir))) == (8, 64, 128)  # 8x8 patches, CLIP width
    assert torch.equal(vision, patches.mean(dim=1))  # the vision tower's view: its patches, averaged
    assert torch.equal(both, torch.cat([llm, vision], dim=1))  # [llm, vision], the LLM half as the llm read-out
    sizes = {name: vlm.hidden_size for name, vlm in read_outs.items()}
    assert sizes == {"llm": 128, "vision": 128, "both": 256, "patches": 128}
    assert not torch.equal(vision, llm)


def test_bad_combinations_are_one_line_config_errors():
    cases = {
        ("encoder.inputs=both", "vlm.pooling=tokens"): "set vlm.pooling to last, mean, image_mean or spatial",
        ("encoder.inputs=vision", "serve.backend=vllm"): "set serve.backend=transformers",
        ("encoder.inputs=bogus",): "encoder.inputs",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message) as error:
            load_config([], list(overrides))
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="output must be one of"):
        TruncatedVLM.from_pretrained("unused", output="logits")


@pytest.mark.slow
def test_both_runs_through_embed_train_encoder_serve_and_ppo(ray_session, debug_config, served_run):
    """`envenc run` with encoder.inputs both: embed stores [llm, vision] states, the encoder is trained on and
    records them, the Serve app computes them from frames, and PPO trains one iteration on its latents."""
    config = debug_config("encoder.inputs=both", "vlm.layer=2")
    result = served_run(config)
    stored, info = result.stored, result.info
    assert not any(stage["skipped"] for stage in result.manifest["stages"].values())
    assert stored.shape[1:] == (384,)  # 2 x 128 (LLM at layer 2, spatial pooling) + 128 (vision tower)
    assert json.loads((config.run_dir / "hidden" / "_embed.json").read_text())["inputs"] == "both"
    exported = json.loads((config.run_dir / "encoder" / "config.json").read_text())
    assert exported["hidden_size"] == 384 and exported["encoder"]["inputs"] == "both"
    assert info["hidden_size"] == 384 and info["output"] == "both"
    np.testing.assert_allclose(result.served, stored[:6], atol=1e-4)  # the service reads frames the way embed did
    vlm = TruncatedVLM.from_config(config.vlm, model_path=str(config.run_dir / "vlm"), output="both")
    np.testing.assert_allclose(vlm.embed(result.frames).numpy(), stored[:6], atol=1e-4)
    train = json.loads((config.run_dir / "agent" / "train.json").read_text())
    assert train["summary"]["iterations"] == 1 and train["summary"]["env_steps_lifetime"] > 0

    # an encoder of other inputs on these hidden states: refused before training, saying what to rerun
    from envenc_ray.encoder.train import train_encoder

    with pytest.raises(DataError, match=r"holds 'both' states but encoder.inputs is 'vision'; rerun `envenc embed`"):
        train_encoder(debug_config("encoder.inputs=vision", "vlm.layer=2"))
