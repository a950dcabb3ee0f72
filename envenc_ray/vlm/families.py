"""Model families: where each image-text-to-text model keeps its parts, and the static prompt around the image.

Model families differ only in where their parts live and how image features reach the decoder; each is a
small `Family` subclass in `FAMILIES`:
- Llava: fixed-size pixel_values, features from `get_image_features`;
- Idefics3 (SmolVLM v1 checkpoints): decoder at `model.text_model`, the HF image processor itself on the batch
  (Lanczos, optional tiles), one vision pass over every tile;
- Qwen2-VL: smart resize + flat patches with `image_grid_thw` (tensor code), 3-D rope position ids, and no
  full HF processor (its video processor needs torchvision): image processor + tokenizer + chat template.

The prompt is static, so it is tokenised once per frame size (`static_prompt`: the processor itself expands the
image placeholder into the right number of image tokens), and `PromptPlan` holds what of it the decoder runs per
frame. TruncatedVLM (backbone.py) loads and runs a model through its family; VLLMBackend reads the same prompt.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from envenc_ray.errors import ModelError
from envenc_ray.vlm.pooling import pool
from envenc_ray.vlm.preprocess import FramePreprocessor, ReferencePreprocessor

log = logging.getLogger(__name__)

ATARI_FRAME_SIZE = (210, 160)  # every ALE game renders 210x160 RGB: the frame size the load-time prompt is for


class Family:
    """Where one model family keeps its parts, and how its image features enter the decoder.

    Attribute paths are dotted, relative to the loaded *ForConditionalGeneration model (`backbone`,
    `lm_head`) or to the backbone (`decoder`); `layers` and `norm` are relative to the decoder.
    """

    name = "base"
    model_types: tuple[str, ...] = ()
    backbone = "model"  # the model without its LM head: what TruncatedVLM keeps
    lm_head = "lm_head"  # dropped
    decoder = "language_model"  # the text decoder inside the backbone: has embed_tokens, layers, norm
    layers = "layers"
    norm = "norm"
    # The multimodal projector, relative to the backbone, when it is a module of its own over the vision tower's
    # per-patch output: where encoder.inputs 'vision'/'both' and stage2.method 'joint' split the VLM. None: the
    # family has no such split point, and `no_projector_split` says why.
    projector: str | None = None
    no_projector_split = "it has no multimodal projector of its own over the vision tower's output"
    no_token_grid = "its image tokens are not one row-major grid of patches"

    def token_grid(self, config: Any) -> tuple[int, int] | None:
        """(rows, cols) of the image tokens of one frame, laid out row-major, from the config alone; None when the
        tokens form no such grid (`no_token_grid` says why): what vlm.pooling 'spatial' needs."""
        return None

    def load_processor(self, source: str, config: Any, trust_remote_code: bool) -> Any:
        """The model's processor: what gives the image processor, the tokenizer and the prompt's image tokens."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)

    def preprocessor(self, image_processor: Any) -> FramePreprocessor | ReferencePreprocessor:
        """The batched twin of the model's image processor (raises ModelError for settings it cannot match)."""
        return FramePreprocessor.from_image_processor(image_processor)

    def prune_vision(self, backbone: nn.Module) -> None:
        """Delete vision layers whose output nothing reads (default: keep all)."""

    def vision_inputs(self, preprocessor: FramePreprocessor, frames: torch.Tensor, device: torch.device) -> dict:
        """The keyword inputs of `image_features` for a batch of validated uint8 frames (all of one size)."""
        return {"pixel_values": preprocessor.pixel_values(frames, device=device)}

    def image_features(self, backbone: nn.Module, **vision_inputs: torch.Tensor) -> torch.Tensor:
        """(N, image tokens per frame, decoder hidden size): what replaces the image placeholder tokens."""
        raise NotImplementedError

    def vision_features(self, backbone: nn.Module, **vision_inputs: torch.Tensor) -> torch.Tensor:
        """(N, patches, Dv): the vision tower's output the projector reads (`projector` families only), so that
        projector(vision_features(...)) == image_features(...)."""
        raise NotImplementedError

    def patch_shape(self, config: Any) -> tuple[int, int]:
        """(patches, Dv) of `vision_features` per frame, from the model's config alone (no weights loaded)."""
        raise NotImplementedError

    def prompt_text(self, processor: Any, prompt: str) -> str:
        """The processor's text input: the model's chat template if it has one, else image token + prompt."""
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{processor.image_token}\n{prompt}"

    def prompt_ids(self, processor: Any, text: str, frame: np.ndarray) -> torch.Tensor:
        """(1, T) input ids of the prompt for one frame: the processor expands the image placeholder."""
        return processor(images=[frame], text=[text], return_tensors="pt")["input_ids"]

    def image_token_id(self, config: Any) -> int:
        return config.image_token_id

    def position_ids(self, backbone: nn.Module, input_ids: torch.Tensor, vision_inputs: dict) -> torch.Tensor | None:
        """Decoder position ids; None means 0..T-1 (Qwen2-VL returns its 3-D rope positions here)."""
        return None


class LlavaFamily(Family):
    """Llava: CLIP-style vision tower -> MLP projector -> Llama-style decoder (model.language_model)."""

    name = "llava"
    model_types = ("llava",)
    projector = "multi_modal_projector"
    no_token_grid = "its vision_feature_select_strategy 'full' puts CLIP's class token among the image tokens"

    def token_grid(self, config: Any) -> tuple[int, int] | None:
        if config.vision_feature_select_strategy != "default":
            return None
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side, side

    def prune_vision(self, backbone: nn.Module) -> None:
        config = backbone.config
        encoder = find_part(backbone.vision_tower, ("vision_model.encoder", "encoder"))
        if encoder is None or not hasattr(encoder, "layers"):
            log.info("vision tower %s: no encoder.layers found, not pruned", type(backbone.vision_tower).__name__)
            return
        total = len(encoder.layers)
        requested = config.vision_feature_layer
        indices = [requested] if isinstance(requested, int) else list(requested)
        # hidden_states of the tower: 0 = embeddings, i = output of layer i; negative indices count from the end
        indices = [i % (total + 1) for i in indices]
        keep = max(indices)
        if keep < total:
            encoder.layers = encoder.layers[:keep]
            backbone.vision_tower.config.num_hidden_layers = keep
            config.vision_config.num_hidden_layers = keep
        config.vision_feature_layer = indices[0] if isinstance(requested, int) else indices

    def image_features(self, backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        output = backbone.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.stack(list(output.pooler_output))  # one (tokens, D) tensor per frame

    def vision_features(self, backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """What `get_image_features` hands `multi_modal_projector`: the `vision_feature_layer` output(s) of the
        tower, without CLIP's class token under the 'default' strategy, concatenated along features."""
        config = backbone.config
        layers = config.vision_feature_layer
        hidden_states = backbone.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        selected = [hidden_states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if config.vision_feature_select_strategy == "default":
            selected = [states[:, 1:] for states in selected]
        return torch.cat(selected, dim=-1)

    def patch_shape(self, config: Any) -> tuple[int, int]:
        vision = config.vision_config
        layers = config.vision_feature_layer
        patches = (vision.image_size // vision.patch_size) ** 2
        class_token = 0 if config.vision_feature_select_strategy == "default" else 1
        return patches + class_token, vision.hidden_size * (1 if isinstance(layers, int) else len(layers))


class Idefics3Family(Family):
    """Idefics3 (SmolVLM v1 checkpoints): SigLIP-style tower -> pixel-shuffle connector -> Llama-style decoder.

    Preprocessing runs the model's own HF image processor on the batch (`ReferencePreprocessor`): correctness
    first. It has no tensor twin within a tight tolerance: it resamples with Lanczos (torch has no Lanczos),
    first to an intermediate whose longest edge is `size` (2048 for SmolVLM-256M/500M: a ~10x upscale of a
    210x160 frame), then to `max_image_size` images, and with `do_image_splitting` (SmolVLM's default) a frame
    becomes rows x cols tiles plus a global image of `image_seq_len` tokens each: 4 x 4 + 1 = 17 x 64 = 1088
    image tokens per 210x160 frame for SmolVLM-256M. "do_image_splitting": false in preprocessor_config.json
    gives one image (64 tokens) per frame; TruncatedVLM follows whatever the processor config says.
    """

    name = "idefics3"
    model_types = ("idefics3",)
    decoder = "text_model"
    no_projector_split = "its connector pixel-shuffles the tower's patches into fewer tokens before projecting them"
    no_token_grid = "its image tokens are tiles of pixel-shuffled patches, not one grid of the frame"

    def preprocessor(self, image_processor: Any) -> ReferencePreprocessor:
        return ReferencePreprocessor(image_processor)

    def vision_inputs(self, preprocessor: ReferencePreprocessor, frames: torch.Tensor, device: torch.device) -> dict:
        # frames of one size give tiles of one size: no padding, so the pixel attention mask is all ones
        return {"pixel_values": preprocessor(frames, device=device)["pixel_values"]}

    def image_features(
        self, backbone: nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, tiles, 3, h, w) -> (N, tiles * image_seq_len, D), tile-major as the processor lays out the tokens."""
        # Not backbone.get_image_features: it drops every all-zero tile as batch padding, and an all-black tile
        # of a processor that does not normalize is all zeros; our tiles are never padding.
        frames, tiles = pixel_values.shape[:2]
        images = pixel_values.flatten(0, 1)
        patch_mask = None
        if pixel_attention_mask is not None:  # HF's own reduction of a pixel mask to a patch mask
            patch = backbone.config.vision_config.patch_size
            mask = pixel_attention_mask.flatten(0, 1).unfold(1, patch, patch).unfold(2, patch, patch)
            patch_mask = mask.sum(dim=(-1, -2)) > 0
        hidden = backbone.vision_model(pixel_values=images, patch_attention_mask=patch_mask).last_hidden_state
        features = backbone.connector(hidden)  # (N * tiles, image_seq_len, D)
        return features.reshape(frames, tiles * features.shape[1], features.shape[2])


class ProcessorParts:
    """What TruncatedVLM needs of a HF processor: image processor, tokenizer, chat template, image token.

    For models whose full processor does not load without torchvision: Qwen2-VL's also builds a video
    processor, which TruncatedVLM never uses.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None, image_token: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token

    def apply_chat_template(self, messages: list[dict], **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


class Qwen2VLFamily(Family):
    """Qwen2-VL: ViT over flat 14x14 patches (2x2 merged into one token) -> Qwen2 decoder with 3-D (M-)RoPE.

    Preprocessing is tensor code: the processor's smart resize (sides multiples of 28, area within its pixel
    budget; 210x160 -> 224x168 -> 16x12 patches -> 48 tokens by default), bicubic like its PIL path, then its
    patch flattening. Image tokens get (temporal, row, column) rope positions from the model's `get_rope_index`.
    The processor is assembled from its parts (`ProcessorParts`), so the prompt's image placeholder is expanded
    here as Qwen2VLProcessor does: one <|image_pad|> per merged patch.
    """

    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    no_projector_split = "its patch merger, the projector, is part of the vision model"
    no_token_grid = "its merged-patch grid follows each frame's size (smart resize), which TruncatedVLM does not map"

    def load_processor(self, source: str, config: Any, trust_remote_code: bool) -> ProcessorParts:
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.processing_utils import ProcessorMixin

        image_processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        # chat_template.jinja, legacy chat_template.json, or the tokenizer's own
        chat_template = ProcessorMixin.get_processor_dict(source)[0].get("chat_template") or tokenizer.chat_template
        if isinstance(chat_template, dict):
            chat_template = chat_template.get("default")
        image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
        return ProcessorParts(image_processor, tokenizer, chat_template, image_token)

    def preprocessor(self, image_processor: Any) -> FramePreprocessor:
        return FramePreprocessor.from_qwen2_vl_image_processor(image_processor)

    def vision_inputs(self, preprocessor: FramePreprocessor, frames: torch.Tensor, device: torch.device) -> dict:
        pixel_values, image_grid_thw = preprocessor.to_patches(preprocessor.pixel_values(frames, device=device))
        return {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}

    def image_features(
        self, backbone: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        output = backbone.get_image_features(pixel_values=pixel_values, image_grid_thw=image_grid_thw, return_dict=True)
        return torch.stack(list(output.pooler_output))  # one (tokens, D) tensor per frame

    def prompt_text(self, processor: Any, prompt: str) -> str:
        if getattr(processor, "chat_template", None):
            return super().prompt_text(processor, prompt)
        return f"<|vision_start|>{processor.image_token}<|vision_end|>{prompt}"  # what its chat template writes

    def prompt_ids(self, processor: Any, text: str, frame: np.ndarray) -> torch.Tensor:
        grid_thw = processor.image_processor(images=[frame], return_tensors="pt")["image_grid_thw"][0]
        image_tokens = int(grid_thw.prod()) // processor.image_processor.merge_size**2
        expanded = text.replace(processor.image_token, processor.image_token * image_tokens)
        return processor.tokenizer([expanded], return_tensors="pt")["input_ids"]

    def position_ids(self, backbone: nn.Module, input_ids: torch.Tensor, vision_inputs: dict) -> torch.Tensor:
        """(3, N, T) rope positions: text tokens count up on all three axes, image tokens get (t, row, col)."""
        grid_thw = vision_inputs["image_grid_thw"]
        if not (grid_thw == grid_thw[:1]).all():
            grids = grid_thw.unique(dim=0).tolist()
            raise ModelError(f"frames of one batch must share one patch grid (one frame size); got grids {grids}")
        token_types = (input_ids[:1] == backbone.config.image_token_id).int()  # the processor's mm_token_type_ids
        positions, _ = backbone.get_rope_index(
            input_ids[:1], mm_token_type_ids=token_types, image_grid_thw=grid_thw[:1]
        )
        return positions.expand(-1, input_ids.shape[0], -1)  # one prompt and one grid: the same for every frame


FAMILIES: dict[str, Family] = {
    model_type: family
    for family in (LlavaFamily(), Idefics3Family(), Qwen2VLFamily())
    for model_type in family.model_types
}


def family_of(config: Any, source: str) -> Family:
    """The `Family` of a loaded model config, or a ModelError naming the supported model types."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelError(
            f"{source} is a {config.model_type!r} image-text-to-text model, which TruncatedVLM has no adapter "
            f"for yet; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return family


def spatial_grid(family: Family, config: Any, source: str) -> tuple[int, int]:
    """(rows, cols) of the model's image tokens, or a one-line ModelError for a family without one."""
    grid = family.token_grid(config)
    if grid is None:
        raise ModelError(f"vlm.pooling 'spatial' lays the image tokens on the model's patch grid, but {source} is a "
                         f"{family.name} model and {family.no_token_grid}; use vlm.pooling image_mean, or a model of "
                         "the llava family (vlm.model)")
    return grid


# -------------------------------------------------------------------- the static prompt


@dataclass(frozen=True)
class PromptPlan:
    """The static prompt for frames of one size, and what of it the decoder runs per frame (`TruncatedVLM._plan`).

    Per frame, tokens `prefix` .. `end` - 1 run, on top of the prefix's keys and values computed once; `decode`
    is that run, for TruncatedVLM's read-out and for the adapter that stage2.method 'joint' trains through.
    """

    input_ids: torch.Tensor  # (1, T)
    image_mask: torch.Tensor  # (T,) bool: the image placeholder tokens
    embeddings: torch.Tensor  # (1, T, D): the prompt's token embeddings (the image tokens' are replaced)
    pooling: str
    grid: tuple[int, int] | None  # (rows, cols) of the image tokens: what 'spatial' pooling lays them out on
    cache_keyword: str  # the decoder's name for its KV cache argument (it changed in transformers 5)
    prefix: int  # tokens before the first image token: computed once
    end: int  # T, or the last image token + 1 when the pooling reads image tokens only
    prefix_states: torch.Tensor | None = None  # (1, prefix, D): the prefix's output states
    prefix_keys_values: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # per kept layer, batch 1

    def decode(self, decoder: nn.Module, image_features: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, image tokens, D) projected image features -> the pooled states of the prompt around them (float32).

        `position_ids` are the whole prompt's (None: 0..T-1); autograd follows the image features through it."""
        start, end, batch = self.prefix, self.end, len(image_features)
        inputs_embeds = self.embeddings[:, start:end].expand(batch, -1, -1).clone()
        inputs_embeds[:, self.image_mask[start:end]] = image_features.to(inputs_embeds.dtype)
        if position_ids is not None:
            position_ids = position_ids[..., start:end]
        past = {self.cache_keyword: self.prefix_cache(batch)} if start else {}
        hidden = decoder(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=bool(start),
                         **past).last_hidden_state
        if start:
            hidden = torch.cat([self.prefix_states.expand(batch, -1, -1), hidden], dim=1)
        return pool(hidden, self.image_mask[:end], self.pooling, self.grid)

    def prefix_cache(self, batch: int):
        """A fresh cache holding the prefix's keys and values for `batch` frames."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=[(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
                                            for keys, values in self.prefix_keys_values])

    def to(self, device: torch.device) -> PromptPlan:
        move = {name: getattr(self, name).to(device) for name in ("input_ids", "image_mask", "embeddings")}
        if self.prefix:
            move["prefix_states"] = self.prefix_states.to(device)
            move["prefix_keys_values"] = tuple((k.to(device), v.to(device)) for k, v in self.prefix_keys_values)
        return dataclasses.replace(self, **move)


def static_prompt(family: Family, processor: Any, prompt: str, frame_size: tuple[int, int], model_config: Any,
                  source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T) ids and (T,) image-token mask of the prompt for frames of this size: the model's own processor,
    run on a blank frame, expands the image placeholder (the prompt is the same for every frame)."""
    blank = np.zeros((*frame_size, 3), dtype=np.uint8)
    text = family.prompt_text(processor, prompt)
    input_ids = family.prompt_ids(processor, text, blank)
    image_mask = input_ids[0] == family.image_token_id(model_config)
    if not image_mask.any():
        raise ModelError(f"the processor of {source} put no image tokens into the prompt {text!r}")
    return input_ids, image_mask


# -------------------------------------------------------------------- helpers


def get_part(module: Any, dotted: str) -> Any:
    """The attribute at a dotted path below `module` (a `Family`'s paths, e.g. 'model.language_model')."""
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def find_part(module: nn.Module, candidates: tuple[str, ...]) -> nn.Module | None:
    """The first of the dotted paths `candidates` that exists below `module`, or None."""
    for dotted in candidates:
        try:
            return get_part(module, dotted)
        except AttributeError:
            continue
    return None
