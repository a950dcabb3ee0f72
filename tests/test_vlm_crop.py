"""`vlm.crop`: the processor's own center crop ("model") or the whole frame resized to the crop size ("none").

The reference for "none" is the HF processor itself with its crop turned off (do_center_crop=False, size =
the crop size as height and width); the CLIP-style processor is LLaVA-1.5's (shortest edge 336, center crop
336), which on a 210x160 frame cuts off Pong's score (rows 1-20) and the top and bottom walls.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from envenc_ray.config import VLMConfig
from envenc_ray.errors import ConfigError
from envenc_ray.vlm.backbone import TruncatedVLM
from envenc_ray.vlm.preprocess import FramePreprocessor, ReferencePreprocessor, with_crop

PONG_BACKGROUND = (144, 72, 17)
SCORE_ROWS = slice(1, 21)  # both players' digits in a 210x160 Pong frame; rows 24-33 are the top wall

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clip_processor(size: int, crop: bool):
    """LlavaImageProcessorPil as LLaVA-1.5 ships it (crop=True), or the same with its crop turned off."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    if crop:
        return LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False)


def _grey_levels(ours: torch.Tensor, reference: torch.Tensor, preprocessor: FramePreprocessor) -> torch.Tensor:
    """|difference| of normalized pixel values, converted back to grey levels of 255."""
    std = torch.tensor(preprocessor.std).view(1, 3, 1, 1)
    return (ours - reference).abs() * std / preprocessor.rescale_factor


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize(("size", "max_grey"), [(336, 2.0), (224, 1.0)])  # LLaVA-1.5's input, CLIP ViT-B's
def test_crop_none_matches_the_hf_processor_without_its_crop(pong_frames, size, max_grey):
    # The tolerances of test_vlm.py and test_vlm_families.py, in grey levels of 255: fewer than 1% of values
    # off at all, each pass within 1 level of PIL's; squashing 210x160 to 336x336 upscales both axes, where a
    # 1-level difference after the first pass can grow to 2 through the second (measured: 1 value of 21.7M,
    # the crop's resize to 441x336 stays within 1, as does everything at 224).
    model_crop = FramePreprocessor.from_image_processor(_clip_processor(size, crop=True))
    whole_frame = with_crop(model_crop, "none")
    assert (model_crop.shortest_edge, model_crop.crop_to) == (size, (size, size))
    assert (whole_frame.resize_to, whole_frame.shortest_edge, whole_frame.crop_to) == ((size, size), None, None)
    assert with_crop(model_crop, "model") is model_crop

    for preprocessor, reference_processor in ((model_crop, _clip_processor(size, crop=True)),
                                              (whole_frame, _clip_processor(size, crop=False))):
        ours = preprocessor(pong_frames)
        reference = reference_processor(images=list(pong_frames), return_tensors="pt")["pixel_values"]
        assert ours.shape == reference.shape == (len(pong_frames), 3, size, size)
        grey = _grey_levels(ours, reference, preprocessor)
        assert grey.max().item() <= max_grey + 1e-3
        assert (grey > 0.5).float().mean().item() < 0.01


def test_score_rows_reach_the_model_input_only_with_crop_none(pong_frames):
    # Which of a frame's 210 rows can change the pixel_values at all: invert one row at a time.
    model_crop = FramePreprocessor.from_image_processor(_clip_processor(336, crop=True))
    whole_frame = with_crop(model_crop, "none")
    frame = pong_frames[10]
    edited = np.repeat(frame[None], 210, axis=0)
    edited[np.arange(210), np.arange(210)] = 255 - frame  # frame i has row i inverted

    def rows_reaching(preprocessor: FramePreprocessor) -> list[int]:
        baseline = preprocessor(frame[None])
        reached = []
        for start in range(0, 210, 30):  # 30 frames at a time: 336x336 float pixels are 1.3 MB each
            changed = (preprocessor(edited[start : start + 30]) != baseline).flatten(1).any(dim=1)
            reached += [start + int(i) for i in torch.nonzero(changed).flatten()]
        return reached

    assert rows_reaching(whole_frame) == list(range(210))
    cropped = rows_reaching(model_crop)
    # measured: rows 23..185 (the crop keeps rows 52..387 of the 441x336 resize, i.e. cuts 25 of 210 at each
    # end, and the bicubic kernel reaches 2 rows further); the score and most of both walls never reach the model
    assert cropped == list(range(cropped[0], cropped[-1] + 1))
    assert 20 < cropped[0] <= 25 and 184 <= cropped[-1] < 190

    # The score itself: erasing its digits changes the input by most of their contrast only without the crop.
    erased = pong_frames.copy()
    erased[:, SCORE_ROWS] = PONG_BACKGROUND
    assert torch.equal(model_crop(erased), model_crop(pong_frames))
    assert _grey_levels(whole_frame(erased), whole_frame(pong_frames), whole_frame).max().item() > 50


def test_crop_none_leaves_processors_that_do_not_crop_unchanged(tiny_vlm_dir):
    # Qwen2-VL (smart resize), Idefics3 (its own processor: resize and tiles) and the built-in tiny VLM (a
    # squash) already show the whole frame: "none" is what they do, so it neither changes nor fails them.
    from transformers import AutoImageProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    unchanged = [
        FramePreprocessor.from_qwen2_vl_image_processor(Qwen2VLImageProcessorPil()),
        ReferencePreprocessor(Idefics3ImageProcessorPil()),
        FramePreprocessor.from_image_processor(AutoImageProcessor.from_pretrained(tiny_vlm_dir)),
    ]
    for preprocessor in unchanged:
        assert with_crop(preprocessor, "none") is preprocessor

    with pytest.raises(ConfigError, match="vlm.crop must be one of model, none; got 'pad'"):
        with_crop(unchanged[0], "pad")


# ------------------------------------------------------------------------------------------ TruncatedVLM


@pytest.fixture(scope="module")
def clip_style_dir(tiny_vlm_dir, tmp_path_factory):
    """The tiny VLM with a CLIP-style processor: shortest edge 128, then a 128x128 center crop."""
    model_dir = tmp_path_factory.mktemp("clip-style") / "vlm"
    shutil.copytree(tiny_vlm_dir, model_dir)
    config_path = model_dir / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"].update(size={"shortest_edge": 128}, do_center_crop=True)
    config_path.write_text(json.dumps(config, indent=2))
    return model_dir


def test_truncated_vlm_with_crop_none_sees_the_whole_frame(clip_style_dir, tiny_vlm_dir, pong_frames):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cropping = TruncatedVLM.from_pretrained(clip_style_dir, layer=2)
    whole = TruncatedVLM.from_config(VLMConfig(layer=2, crop="none"), model_path=clip_style_dir)
    assert cropping.preprocessor.crop_to == (128, 128) and whole.preprocessor.crop_to is None
    assert cropping.image_size == whole.image_size == (128, 128)  # the vision tower's fixed input
    assert cropping.num_image_tokens == whole.num_image_tokens == 64
    # "none" on the cropping processor is exactly the built-in tiny VLM's own squash of the whole frame
    assert whole.preprocessor == TruncatedVLM.from_pretrained(tiny_vlm_dir, layer=2).preprocessor

    # Against the full HF model on its processor's pixels with the crop turned off (the unmodified tiny
    # VLM's processor): the same up to the <=1 grey level pixel differences, as in test_vlm.py.
    model = AutoModelForImageTextToText.from_pretrained(clip_style_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_vlm_dir)
    frames = pong_frames[:6]
    text = whole.family.prompt_text(processor, whole.prompt)
    inputs = processor(images=list(frames), text=[text] * len(frames), return_tensors="pt")
    with torch.inference_mode():
        hidden_states = model(**inputs, output_hidden_states=True).hidden_states[2]
    reference = hidden_states[:, inputs["input_ids"][0] == model.config.image_token_id].mean(dim=1)
    cosine = torch.nn.functional.cosine_similarity(whole.embed(frames), reference)
    assert cosine.min().item() > 0.999

    # The score changes the hidden states only when it reaches the vision tower.
    erased = frames.copy()
    erased[:, SCORE_ROWS] = PONG_BACKGROUND
    assert torch.equal(cropping.embed(erased), cropping.embed(frames))
    assert not torch.allclose(whole.embed(erased), whole.embed(frames))


def test_replica_resizes_the_whole_frame_client_side(clip_style_dir, pong_frames, tmp_path):
    # Serve clients resize frames with the replica's preprocessor description: with "none" it is the squash.
    from envenc_ray.config import EncoderConfig
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
    from envenc_ray.encoder.models import build_autoencoder
    from envenc_ray.encoder.served import ServedPair
    from envenc_ray.serve.replica import EncoderCore, ReplicaSpec

    vlm_config = VLMConfig(layer=2, crop="none")
    settings = EncoderConfig(kind="mlp", latent_dim=4, hidden_dims=[16])
    torch.manual_seed(0)
    encoder = build_autoencoder(settings, 128).encoder_module()
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "mlp", "latent_dim": 4,
                   "hidden_size": 128, "window": 1, "encoder": settings.model_dump(mode="json")}
    save_encoder(encoder, tmp_path / "encoder", description, metrics={})
    core = EncoderCore(ReplicaSpec(ServedPair(str(clip_style_dir), str(tmp_path / "encoder"), vlm_config, "pong"), 1))

    client_side = FramePreprocessor(**core.info()["preprocessor"])
    assert (client_side.resize_to, client_side.crop_to) == ((128, 128), None)
    frames = pong_frames[:3]
    resized = client_side._resize(torch.from_numpy(frames).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    raw_latents, _ = core.run_batch([core.check(frames, None, False, "latents")])[0]
    resized_latents, _ = core.run_batch([core.check(np.ascontiguousarray(resized), None, True, "latents")])[0]
    np.testing.assert_allclose(resized_latents, raw_latents, atol=1e-6)


def test_bad_crop_values_fail_before_the_model_loads(tmp_path, debug_config):
    with pytest.raises(ConfigError, match="vlm.crop must be one of model, none; got 'center'"):
        TruncatedVLM.from_pretrained(tmp_path / "no-model-here", crop="center")
    with pytest.raises(ConfigError, match="vlm.crop"):
        debug_config("vlm.crop=pad")
    assert debug_config("vlm.crop=none").vlm.crop == "none"
    assert VLMConfig().crop == "model"
