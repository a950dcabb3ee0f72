"""TruncatedVLM on the Idefics3 (SmolVLM) and Qwen2-VL families: tiny random models built here, saved, reloaded.

Each model is built from its transformers config classes with head size 32, a few layers and a small image size,
with a processor assembled from the project's locally trained tokenizer (plus the special tokens the family's
processor needs) and the family's real image processor class and chat template style. The reference is always
the full HF model (`output_hidden_states`) on the inputs of the model's own processor.

Qwen2-VL's full processor cannot be built here: `Qwen2VLProcessor` also owns a video processor, which needs
torchvision (not installed). TruncatedVLM does not need it (see `Qwen2VLFamily`); the reference inputs below
come from the genuine `Qwen2VLProcessor` class with only its constructor's class check bypassed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envenc_ray.errors import InputError
from envenc_ray.vlm.backbone import TruncatedVLM
from envenc_ray.vlm.preprocess import FramePreprocessor, ReferencePreprocessor

PROMPT = "a game of pong. describe the state."
LAYERS = 4  # decoder layers of both tiny models: layer 2 is a real truncation, -1 keeps all and the final norm

# SmolVLM's chat template (HuggingFaceTB/SmolVLM-256M-Instruct) and Qwen2-VL's, without its video branch.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tokenizer(special_tokens: list[str], **named_tokens: str):
    """The built-in tiny VLM's byte-level BPE (trained on the advice corpus) with this family's special tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from envenc_ray.vlm.tiny import _train_tokenizer

    backend = Tokenizer.from_str(_train_tokenizer(seed=0).backend_tokenizer.to_str())
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", **named_tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    return tokenizer


def _seeded(model_class, config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config).eval()


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory):
    """A tiny Idefics3 (SmolVLM v1 layout) with SmolVLM's processor settings, scaled down: Lanczos, image splitting.

    A 210x160 frame -> longest edge 128 (128x98) -> 128x128 -> 2x2 tiles of 64 + a 64x64 global image; each
    64x64 image is 8x8 patches, pixel-shuffled 2x2 -> 16 tokens: 5 x 16 = 80 image tokens per frame.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
    from transformers import LlamaConfig
    from transformers.image_utils import PILImageResampling
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows_cols = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    tokenizer = _tokenizer(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<|im_start|>", *rows_cols],
        bos_token="<s>", eos_token="</s>",
    )
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": 128},  # SmolVLM: 2048
        max_image_size={"longest_edge": 64},  # SmolVLM: 512 (its vision tower's image size)
        resample=PILImageResampling.LANCZOS,
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=16, chat_template=SMOLVLM_CHAT_TEMPLATE)
    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("idefics3") / "vlm"
    _seeded(Idefics3ForConditionalGeneration, config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    """A tiny Qwen2-VL with Qwen2-VL's default image processor: 210x160 -> 224x168 -> 16x12 patches -> 48 tokens.

    Saved as a real checkpoint directory is laid out: config + weights, tokenizer (with chat_template.jinja) and
    preprocessor_config.json; no processor_config.json (its processor cannot be built here, see the module doc).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(
        ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    config = Qwen2VLConfig(
        vision_config={
            "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 64,  # out: the text width
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            # head size 32 -> 16 rotary frequencies, split over (temporal, height, width)
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    out = tmp_path_factory.mktemp("qwen2-vl") / "vlm"
    _seeded(Qwen2VLForConditionalGeneration, config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil().save_pretrained(out)  # Qwen2-VL's defaults: bicubic, 56*56..28*28*1280 pixels
    return out


def _qwen2_vl_processor(model_dir):
    """The genuine Qwen2VLProcessor on the saved parts, without a video processor (that needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Qwen2VLProcessor, "check_argument_for_proper_class", lambda self, name, value: None)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return Qwen2VLProcessor(
            AutoImageProcessor.from_pretrained(model_dir), tokenizer, None, chat_template=tokenizer.chat_template
        )


@pytest.fixture(scope="module")
def references(idefics3_dir, qwen2_vl_dir):
    """family -> (model dir, full HF model, HF processor): what TruncatedVLM must agree with."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def full(model_dir):
        return AutoModelForImageTextToText.from_pretrained(model_dir).eval()

    return {
        "idefics3": (idefics3_dir, full(idefics3_dir), AutoProcessor.from_pretrained(idefics3_dir)),
        "qwen2_vl": (qwen2_vl_dir, full(qwen2_vl_dir), _qwen2_vl_processor(qwen2_vl_dir)),
    }


def _reference_hidden(model, processor, frames: np.ndarray, text: str, layer: int):
    inputs = processor(images=list(frames), text=[text] * len(frames), return_tensors="pt")
    with torch.inference_mode():
        return inputs, model(**inputs, output_hidden_states=True).hidden_states[layer]


def _vision_inputs(family: str, inputs) -> dict:
    keys = {"idefics3": ("pixel_values", "pixel_attention_mask"), "qwen2_vl": ("pixel_values", "image_grid_thw")}
    return {key: inputs[key] for key in keys[family]}


# ------------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
@pytest.mark.parametrize("layer", [2, -1])
def test_truncated_hidden_states_equal_the_full_model(references, pong_frames, family, layer):
    model_dir, model, processor = references[family]
    vlm = TruncatedVLM.from_pretrained(model_dir, layer=layer, pooling="tokens")
    kept = layer % (LAYERS + 1)

    # Physically truncated: fewer decoder layers, no final norm below the top, no LM head.
    assert vlm.family.name == family
    assert vlm.num_layers == kept
    assert isinstance(vlm.decoder.norm, torch.nn.Identity) == (kept < LAYERS)
    assert not any("lm_head" in name for name, _ in vlm.backbone.named_modules())

    frames = pong_frames[:4]
    text = vlm.family.prompt_text(processor, vlm.prompt)
    inputs, reference = _reference_hidden(model, processor, frames, text, layer)
    assert torch.equal(inputs["input_ids"][0], vlm.input_ids[0])  # the static prompt, expanded as HF does
    assert reference.shape == (4, vlm.sequence_length, vlm.hidden_size)

    # The same processed inputs: equal up to float reassociation.
    ours = vlm.embed_vision_inputs(_vision_inputs(family, inputs))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)

    # From uint8 frames through the family's own preprocessing.
    from_frames = vlm.embed(frames)
    if family == "idefics3":  # the HF image processor itself: the same pixels, so the same tolerance
        torch.testing.assert_close(from_frames, reference, atol=1e-5, rtol=1e-4)
    else:  # tensor resize: pixels within 1 grey level of PIL's (test below)
        cosine = torch.nn.functional.cosine_similarity(from_frames.flatten(1), reference.flatten(1))
        assert cosine.min().item() > 0.999


def test_qwen2_vl_rope_positions_are_the_models_own(references, pong_frames):
    # 3-D rope: image tokens share the temporal index and count rows/columns; text after them resumes from the max.
    model_dir, model, processor = references["qwen2_vl"]
    vlm = TruncatedVLM.from_pretrained(model_dir, layer=1)
    frames = pong_frames[:2]
    inputs = processor(images=list(frames), text=[vlm.family.prompt_text(processor, PROMPT)] * 2, return_tensors="pt")
    expected, _ = model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    ours = vlm.family.position_ids(vlm.backbone, vlm.input_ids.expand(2, -1), vlm.family.vision_inputs(
        vlm.preprocessor, torch.from_numpy(frames), vlm.device))
    assert torch.equal(ours, expected)
    image_positions = ours[:, 0, vlm.image_mask]
    assert image_positions[0].unique().numel() == 1  # one temporal index (a still image)
    assert image_positions[1].unique().numel() == 8 and image_positions[2].unique().numel() == 6  # 224x168 / 28


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize(("source", "max_grey"), [("pong", 1.0), ("random", 2.0)])
def test_qwen2_vl_preprocessing_matches_its_processor(references, pong_frames, source, max_grey):
    # Smart resize + bicubic + patch flattening in torch vs Qwen2VLImageProcessorPil: the flat patches are the
    # same values in the same order. Tolerance in grey levels of 255: each resize pass is within 1 of PIL's
    # (uint8 rounding of the fixed-point weights); 210x160 -> 224x168 upscales both axes, and on noise a 1-level
    # difference after the first pass can grow to 2 through the second (measured: Pong max 1, noise max 2, 0.6%
    # of noise values off at all).
    _, _, processor = references["qwen2_vl"]
    preprocessor = FramePreprocessor.from_qwen2_vl_image_processor(processor.image_processor)
    assert preprocessor.smart_resize == (28, 56 * 56, 28 * 28 * 1280)
    assert preprocessor.output_size_for(210, 160) == (224, 168)

    frames = pong_frames if source == "pong" else np.random.default_rng(0).integers(0, 256, (16, 210, 160, 3), np.uint8)
    patches, grid_thw = preprocessor.to_patches(preprocessor(frames))
    reference = processor.image_processor(images=list(frames), return_tensors="pt")
    assert torch.equal(grid_thw, reference["image_grid_thw"])
    assert patches.shape == reference["pixel_values"].shape == (len(frames) * 16 * 12, 3 * 2 * 14 * 14)
    std = torch.tensor(preprocessor.std).repeat_interleave(2 * 14 * 14)  # patch values are channel-major
    grey = (patches - reference["pixel_values"]).abs() * std / preprocessor.rescale_factor
    assert grey.max().item() <= max_grey + 1e-3
    assert (grey > 0.5).float().mean().item() < 0.01


@pytest.mark.parametrize(
    ("size", "frame_hw"),
    [
        ({"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, (210, 160)),  # over budget: scaled down
        ({"shortest_edge": 300 * 300, "longest_edge": 28 * 28 * 1280}, (97, 301)),  # under budget: scaled up
    ],
)
def test_qwen2_vl_smart_resize_follows_the_pixel_budget(size, frame_hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(size=size)
    preprocessor = FramePreprocessor.from_qwen2_vl_image_processor(image_processor)
    frames = np.random.default_rng(1).integers(0, 256, (2, *frame_hw, 3), np.uint8)
    patches, grid_thw = preprocessor.to_patches(preprocessor(frames))
    reference = image_processor(images=list(frames), return_tensors="pt")
    assert torch.equal(grid_thw, reference["image_grid_thw"])
    assert tuple(grid_thw[0, 1:] * 14) == preprocessor.output_size_for(*frame_hw)
    std = torch.tensor(preprocessor.std).repeat_interleave(2 * 14 * 14)
    assert ((patches - reference["pixel_values"]).abs() * std / preprocessor.rescale_factor).max().item() <= 2.0 + 1e-3


def test_idefics3_preprocessing_is_its_processor(references, pong_frames):
    _, _, processor = references["idefics3"]
    preprocessor = ReferencePreprocessor(processor.image_processor)
    encoded = preprocessor(pong_frames[:3])
    reference = processor.image_processor(images=[[frame] for frame in pong_frames[:3]], return_tensors="pt")
    assert encoded["pixel_values"].shape == (3, 5, 3, 64, 64)  # 2x2 tiles + the global image per frame
    assert torch.equal(encoded["pixel_values"], reference["pixel_values"])
    assert preprocessor.output_size_for(210, 160) == (64, 64)


# ------------------------------------------------------------------------------------------ poolings and real frames


@pytest.mark.parametrize(("family", "image_tokens"), [("idefics3", 80), ("qwen2_vl", 48)])
def test_poolings_shapes_dtypes_and_meaning(references, pong_frames, family, image_tokens):
    model_dir = references[family][0]
    frames = pong_frames[:3]
    tokens_vlm = TruncatedVLM.from_pretrained(model_dir, layer=3, pooling="tokens")
    tokens = tokens_vlm.embed(frames)
    count, length, width = 3, tokens_vlm.sequence_length, tokens_vlm.hidden_size
    assert tokens.shape == (count, length, width) and tokens.dtype == torch.float32
    assert tokens_vlm.num_image_tokens == image_tokens and length > image_tokens
    assert tokens_vlm.image_size == {"idefics3": (64, 64), "qwen2_vl": (224, 168)}[family]

    expected = {
        "last": tokens[:, -1],
        "mean": tokens.mean(dim=1),
        "image_mean": tokens[:, tokens_vlm.image_mask].mean(dim=1),  # the image tokens only, not their markers
    }
    for pooling, want in expected.items():
        pooled = TruncatedVLM.from_pretrained(model_dir, layer=3, pooling=pooling).embed(frames)
        assert pooled.shape == (count, width) and pooled.dtype == torch.float32, pooling
        torch.testing.assert_close(pooled, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected["image_mean"][0], expected["image_mean"][1])


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_real_pong_frames_in_one_batch(references, pong_frames, family):
    vlm = TruncatedVLM.from_pretrained(references[family][0], layer=2)
    hidden = vlm.embed(pong_frames)
    assert hidden.shape == (64, vlm.hidden_size) and hidden.dtype == torch.float32
    assert torch.isfinite(hidden).all()
    assert len(torch.unique(hidden.round(decimals=5), dim=0)) > 1  # a random rollout: frames differ, states differ
    torch.testing.assert_close(vlm.embed(pong_frames[5:9]), hidden[5:9], atol=1e-5, rtol=1e-4)  # batch-independent


def test_other_frame_sizes_get_their_own_prompt(references):
    # The number of image tokens follows the frame size (Qwen2-VL's resize keeps the aspect): 97x301 -> 84x308
    # -> 6x22 patches -> 33 tokens, not the 48 of a 210x160 frame; the prompt is re-expanded for it.
    model_dir, model, processor = references["qwen2_vl"]
    vlm = TruncatedVLM.from_pretrained(model_dir, layer=-1, pooling="tokens")
    frames = np.random.default_rng(2).integers(0, 256, (2, 97, 301, 3), np.uint8)
    _, reference = _reference_hidden(model, processor, frames, vlm.family.prompt_text(processor, PROMPT), -1)
    ours = vlm.embed(frames)
    assert ours.shape == reference.shape and ours.shape[1] == vlm.sequence_length - 48 + 33
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(1), reference.flatten(1))
    assert cosine.min().item() > 0.999
    assert vlm.num_image_tokens == 48  # the properties still describe ALE frames


def test_qwen2_vl_rejects_pixels_off_its_patch_grid(references):
    vlm = TruncatedVLM.from_pretrained(references["qwen2_vl"][0], layer=1)
    pixels = torch.zeros(1, 3, 100, 100)
    with pytest.raises(InputError, match="28-pixel blocks"):
        vlm.preprocessor.to_patches(pixels)


@pytest.mark.parametrize("family, why", [("idefics3", "pixel-shuffles"), ("qwen2_vl", "part of the vision model")])
def test_families_without_a_separable_projector_refuse_the_split(references, family, why):
    """encoder.inputs vision/both and stage2.method joint need the projector as a module of its own: one line
    saying why this family has none and what to use, from the config alone and when loading."""
    from envenc_ray.errors import ModelError
    from envenc_ray.vlm.backbone import patch_shape_of

    model_dir = str(references[family][0])
    for attempt in (lambda: patch_shape_of(model_dir), lambda: TruncatedVLM.from_pretrained(model_dir, output="both")):
        with pytest.raises(ModelError, match=f"{family} model and .*{why}.*llava family") as error:
            attempt()
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("family, why", [("idefics3", "tiles of pixel-shuffled"), ("qwen2_vl", "smart resize")])
def test_families_without_a_patch_grid_refuse_spatial_pooling(references, family, why):
    """vlm.pooling 'spatial' needs the image tokens as one row-major patch grid: one line saying why this family
    has none and what to use, from the config before any weights load."""
    from envenc_ray.errors import ModelError

    with pytest.raises(ModelError, match=f"{family} model and .*{why}.*image_mean, or a model of the llava family"
                       ) as error:
        TruncatedVLM.from_pretrained(str(references[family][0]), pooling="spatial")
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ serving


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_replica_core_serves_each_family(references, pong_frames, family, tmp_path):
    """The Serve replica's logic (no Serve needed) loads the family and encodes frames like in-process.

    Idefics3 is preprocessed by its own HF processor, so the replica refuses client-resized frames and
    its `info` tells the client to send raw frames; Qwen2-VL takes client-resized frames."""
    from envenc_ray.config import EncoderConfig, VLMConfig
    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, load_encoder, save_encoder
    from envenc_ray.encoder.models import build_autoencoder
    from envenc_ray.errors import InputError
    from envenc_ray.encoder.served import ServedPair
    from envenc_ray.serve.replica import EncoderCore, ReplicaSpec

    model_dir = references[family][0]
    vlm = TruncatedVLM.from_pretrained(model_dir, layer=2)
    settings = EncoderConfig(kind="mlp", latent_dim=4, hidden_dims=[16])
    torch.manual_seed(0)
    encoder = build_autoencoder(settings, vlm.hidden_size).encoder_module()
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "mlp", "latent_dim": 4,
                   "hidden_size": vlm.hidden_size, "window": 1, "encoder": settings.model_dump(mode="json")}
    save_encoder(encoder, tmp_path / "encoder", description, metrics={})

    core = EncoderCore(ReplicaSpec(ServedPair(str(model_dir), str(tmp_path / "encoder"), VLMConfig(layer=2), "pong"), 1))
    frames = pong_frames[:3]
    expected, _ = EnvironmentEncoder(vlm, load_encoder(tmp_path / "encoder")).encode(frames)
    latents, _ = core.run_batch([core.check(frames, None, False, "latents")])[0]
    np.testing.assert_allclose(latents, expected, atol=1e-5)
    if family == "idefics3":
        assert core.info()["preprocessor"] is None
        with pytest.raises(InputError, match="raw frames"):
            core.check(np.zeros((1, *vlm.image_size, 3), np.uint8), None, True, "latents")
    else:
        assert core.info()["preprocessor"] is not None
