"""TruncatedVLM: a Hugging Face image-text-to-text model cut down to the hidden states of one decoder layer.

    vlm = TruncatedVLM.from_pretrained("runs/pong-tiny/vlm", layer=2, pooling="image_mean")
    hidden = vlm.embed(frames_uint8)            # (N, H, W, 3) uint8 -> (N, D) float32

What `layer` means: the index into HF's `output_hidden_states` tuple, which has num_layers + 1 entries:
0 is the decoder input (token embeddings with the projected image features scattered in), k (1..L) is the
output of decoder layer k, and the last entry (L, or -1) is the last layer's output AFTER the final norm
(HF applies the norm before returning it). So for k < L the kept layers are 1..k and the final norm is
skipped (unless `final_norm=True`: then it is applied to layer k's output too, as vLLM's pooler does); for
k == L all layers and the norm are kept. Layers above k and the LM head are deleted from the
module tree (no compute, and their memory is freed), and vision-tower layers above the one the projector
reads (Llava's `vision_feature_layer`) are deleted too.

The prompt is static, so it is tokenised once per frame size (the processor itself expands the image
placeholder into the right number of image tokens; ALE's 210x160 at load) and every batch reuses the ids.
Preprocessing is batched torch code (`preprocess.FramePreprocessor`) that matches the model's own processor,
except for families whose processor has no tensor twin (see each family).

Model families differ only in where their parts live and how image features reach the decoder; each is a
small `Family` subclass in `FAMILIES`:
- Llava: fixed-size pixel_values, features from `get_image_features`;
- Idefics3 (SmolVLM v1 checkpoints): decoder at `model.text_model`, the HF image processor itself on the batch
  (Lanczos, optional tiles), one vision pass over every tile;
- Qwen2-VL: smart resize + flat patches with `image_grid_thw` (tensor code), 3-D rope position ids, and no
  full HF processor (its video processor needs torchvision): image processor + tokenizer + chat template.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from envenc_ray.config import BUILTIN_TINY
from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.storage import pull
from envenc_ray.vlm.preprocess import CROPS, FramePreprocessor, ReferencePreprocessor, as_frame_batch, with_crop

log = logging.getLogger(__name__)

POOLINGS = ("last", "mean", "image_mean", "spatial", "tokens")
# the poolings that read the image tokens only: the prompt after the image never runs for them
IMAGE_POOLINGS = ("image_mean", "spatial")
# What `embed` returns: the LLM's hidden state (pooled as `pooling` says), or, split at the multimodal projector
# (see `ImageAdapter`), the vision tower's output averaged over patches ('vision'), both concatenated
# ([llm, vision]: 'both'), or the tower's per-patch output itself ('patches', (N, P, Dv): what the projector of
# stage2.method 'joint' reads in the RLModule). 'llm', 'vision' and 'both' are encoder.inputs.
OUTPUTS = ("llm", "vision", "both", "patches")
# 'spatial' pooling gives the expected x and y of each channel (`spatial_softmax`), no presence feature: on 2,400
# Pong frames (6 episodes, held-out ridge probe, tiny VLM, patch 16) adding each channel's log-sum-exp or max over
# the grid moved ball_x by -0.08..+0.05 and ball_y / ball_in_play by -0.08..0.00 at layers 0 and 2: no consistent
# gain for 1.5x the features every consumer reads. No sharpening either: each channel standardized over the grid
# before the softmax lowers Pong's ball_x 0.84 -> 0.81 (0.65 at temperature 0.5) and does not find Breakout's ball
# (patch 8, layer 0; benchmarks/spatial-variants/, README "Sharper maps, presence, more moments"): the raw maps are
# nearly flat, and a flat softmax's expectation is linear in the states, which a linear probe unmixes
SPATIAL_FEATURES = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = (*DTYPES, "auto")  # auto: bfloat16 where checked and native, else float32 (resolve_dtype)
DEFAULT_PROMPT = "a game of pong. describe the state."
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
        encoder = _find(backbone.vision_tower, ("vision_model.encoder", "encoder"))
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


class TruncatedVLM:
    """A VLM without its LM head and the decoder layers above `layer`; `embed` maps frames to hidden states."""

    def __init__(
        self,
        backbone: nn.Module,
        processor: Any,
        family: Family,
        *,
        layer: int,
        pooling: str,
        prompt: str,
        device: torch.device,
        total_layers: int,
        source: str,
        crop: str = "model",
        compiled: bool = False,
        output: str = "llm",
    ):
        self.backbone = backbone
        self.processor = processor
        self.family = family
        self.layer = layer
        self.pooling = pooling
        self.prompt = prompt
        self.device = device
        self.total_layers = total_layers
        self.source = source
        self.compiled = compiled  # its layers run through torch.compile (`_compile_layers`)
        self.preprocessor = with_crop(family.preprocessor(processor.image_processor), crop)
        self.decoder = _get(backbone, family.decoder)
        self.dtype = next(backbone.parameters()).dtype
        self.grid = spatial_grid(family, backbone.config, source) if pooling == "spatial" else None
        self._prompts: dict[tuple[int, int], PromptPlan] = {}
        # the prompt for ALE frames; other frame sizes get theirs on first use
        ale_prompt = self._prompt_for(ATARI_FRAME_SIZE)
        self.input_ids, self.image_mask = ale_prompt.input_ids, ale_prompt.image_mask
        if self.grid is not None and self.num_image_tokens != self.grid[0] * self.grid[1]:
            raise ModelError(f"vlm.pooling 'spatial' lays the image tokens of {source} on a {self.grid[0]}x"
                             f"{self.grid[1]} grid, but its prompt has {self.num_image_tokens} image tokens per frame; "
                             "use vlm.pooling image_mean")
        self.output = output
        # (P, Dv) of the tower's per-patch output, for the read-outs split at the projector
        self.patch_shape = family.patch_shape(backbone.config) if output != "llm" else None
        self.adapter = ImageAdapter.of(self, "both", trainable=False) if output == "both" else None

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path,
        *,
        layer: int = -1,
        pooling: str = "image_mean",
        prompt: str = DEFAULT_PROMPT,
        dtype: str = "float32",
        device: str = "cpu",
        num_threads: int | None = None,
        trust_remote_code: bool = False,
        crop: str = "model",
        final_norm: bool = False,
        compile: bool = False,
        output: str = "llm",
    ) -> TruncatedVLM:
        """Load an image-text-to-text model (local directory or hub name) and truncate it after `layer`.

        `layer` indexes HF's hidden_states tuple (see the module docstring); -1 keeps every layer and the
        final norm. `num_threads` sets torch's intra-op threads for the whole process (1 in Ray actors).
        `crop="none"` resizes the whole frame instead of the processor's center crop (`preprocess.with_crop`).
        `final_norm=True` applies the decoder's final norm below the top layer too (what vLLM's pooler reads).
        `compile=True` runs each kept decoder and vision layer through torch.compile (`_compile_layers`).
        `output` is what `embed` returns (see OUTPUTS); all but 'llm' need a family with a `projector`.
        """
        from transformers import AutoModelForImageTextToText

        if pooling not in POOLINGS:
            raise ConfigError(f"vlm.pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if dtype not in DTYPE_CHOICES:
            raise ConfigError(f"vlm.dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
        dtype = resolve_dtype(dtype, device)
        if crop not in CROPS:  # checked before the (possibly large) model loads
            raise ConfigError(f"vlm.crop must be one of {', '.join(CROPS)}; got {crop!r}")
        if output not in OUTPUTS:
            raise ConfigError(f"TruncatedVLM output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        if "{game}" in prompt:
            raise ConfigError(
                f"prompt {prompt!r} still holds '{{game}}': format it first or use TruncatedVLM.from_config"
            )
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        source = str(pull(path_or_name))  # a model folder of a URI run root: fresh from the URI on any node
        config = _load_config(source, trust_remote_code)
        family = _family_of(config, source)
        if output != "llm":
            check_projector_split(family, source)
        if pooling == "spatial":  # from the config, before the weights load
            spatial_grid(family, config, source)
        local = Path(source)
        if local.is_dir() and not any(local.glob("*.safetensors")) and any(local.glob("*.bin")):
            raise ModelError(f"{source} holds its weights only as .bin (a pickle, which can run code when loaded): "
                             "envenc loads safetensors only; convert it once where you trust it, e.g. "
                             "model.save_pretrained(dir, safe_serialization=True)")
        try:
            # safetensors only: a pytorch_model.bin is a pickle, and loading a pickle can run its code
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True
            )
            processor = family.load_processor(source, config, trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError, ImportError, SafetensorError) as error:
            raise ModelError(f"could not load the model or processor from {source}: {_one_line(error)}") from None
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ModelError(f"{source} has no image processor + tokenizer (got {type(processor).__name__})")

        backbone = _get(model, family.backbone)
        setattr(model, family.lm_head, None)  # the LM head goes with the wrapper; nothing here reads logits
        del model
        decoder = _get(backbone, family.decoder)
        total_layers = len(_get(decoder, family.layers))
        keep = resolve_layer(layer, total_layers)
        _truncate_decoder(decoder, family, keep, total_layers, final_norm)
        family.prune_vision(backbone)
        torch_device = torch.device(device)
        backbone.to(torch_device).eval().requires_grad_(False)
        if compile:
            _compile_layers(backbone, decoder, family)
        vlm = cls(
            backbone,
            processor,
            family,
            layer=keep,
            pooling=pooling,
            prompt=prompt,
            device=torch_device,
            total_layers=total_layers,
            source=source,
            crop=crop,
            compiled=compile,
            output=output,
        )
        log.info(
            "loaded %s (%s): kept %d of %d decoder layers, %s pooling, %d tokens per 210x160 frame (%d image, "
            "%dx%d pixels per image)",
            source, family.name, keep, total_layers, pooling, vlm.sequence_length, vlm.num_image_tokens,
            *vlm.image_size,
        )
        return vlm

    @classmethod
    def from_config(cls, vlm_config: Any, model_path: str | Path | None = None, game: str = "pong",
                    output: str = "llm") -> TruncatedVLM:
        """Build from a `VLMConfig`; `model_path` overrides `vlm_config.model` (the caller resolves builtin:tiny).
        `output`: what `embed` returns (OUTPUTS; encoder.inputs, or 'patches' for stage2.method 'joint')."""
        source = model_path if model_path is not None else vlm_config.model
        if str(source) == BUILTIN_TINY:
            raise ModelError(
                "vlm.model is 'builtin:tiny', which names no directory: build it with "
                "`envenc model init-tiny --out DIR` (the pipeline builds it into <run>/vlm) and pass model_path=DIR"
            )
        return cls.from_pretrained(
            source,
            layer=vlm_config.layer,
            pooling=vlm_config.pooling,
            prompt=vlm_config.prompt.format(game=game),
            dtype=vlm_config.dtype,
            device=vlm_config.device,
            num_threads=vlm_config.num_threads,
            trust_remote_code=vlm_config.trust_remote_code,
            crop=vlm_config.crop,
            final_norm=vlm_config.final_norm,
            compile=vlm_config.compile,
            output=output,
        )

    # ---------------------------------------------------------------- properties

    @property
    def hidden_size(self) -> int:
        """D of the returned hidden states: the decoder's width ('llm'; times SPATIAL_FEATURES with 'spatial'
        pooling), the vision tower's Dv ('vision', and per patch for 'patches'), or their sum ('both')."""
        llm = pooled_width(self.pooling, self.decoder.config.hidden_size)
        if self.output == "llm":
            return llm
        return llm + self.patch_shape[1] if self.output == "both" else self.patch_shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the pixel input the vision tower sees for a 210x160 ALE frame (of each tile, for
        Idefics3 image splitting); every frame of that size is resized to it."""
        return self.preprocessor.output_size_for(*ATARI_FRAME_SIZE)

    @property
    def num_layers(self) -> int:
        """Decoder layers kept (and run); 0 means the decoder input itself."""
        return len(_get(self.decoder, self.family.layers))

    @property
    def sequence_length(self) -> int:
        """Tokens per 210x160 frame: image tokens plus the prompt's tokens (T of the 'tokens' pooling)."""
        return int(self.input_ids.shape[1])

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_mask.sum())

    # ---------------------------------------------------------------- the hot path

    @torch.inference_mode()
    def embed(self, frames_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames (N, H, W, 3) -> float32 hidden states on `self.device`.

        Shape (N, D) for 'last', 'mean', 'image_mean' and 'spatial' pooling (D: `hidden_size`), (N, T, D) for
        'tokens'. Returned tensors are inference tensors: `.clone()` them before using them in autograd.
        """
        return self.embed_frames(as_frame_batch(frames_uint8))

    @torch.inference_mode()
    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """`embed` of a batch already validated by `as_frame_batch` (uint8 (N, H, W, 3) tensor): what the
        service and EnvironmentEncoder call after checking the frames once at their entry."""
        vision_inputs = self.family.vision_inputs(self.preprocessor, frames, self.device)
        return self.embed_vision_inputs(vision_inputs, frame_size=tuple(frames.shape[1:3]))

    @torch.inference_mode()
    def embed_vision_inputs(
        self, vision_inputs: dict[str, torch.Tensor], frame_size: tuple[int, int] = ATARI_FRAME_SIZE
    ) -> torch.Tensor:
        """`embed` after preprocessing, e.g. from the HF processor's own `pixel_values` (and Qwen2-VL's
        `image_grid_thw`). `frame_size` is the (height, width) of the frames they came from: the number of image
        tokens depends on it for Qwen2-VL and Idefics3 image splitting."""
        prompt = self._prompt_for(frame_size)
        vision_inputs = {
            key: value.to(self.device, self.dtype) if torch.is_floating_point(value) else value.to(self.device)
            for key, value in vision_inputs.items()
        }
        if self.output != "llm":  # encoder.inputs vision/both, stage2.method joint: split at the projector
            return self._embed_split(vision_inputs)
        image_features = self.family.image_features(self.backbone, **vision_inputs)
        batch, tokens = image_features.shape[:2]
        if tokens != int(prompt.image_mask.sum()):
            height, width = frame_size
            raise ModelError(
                f"the vision tower gave {tokens} features per frame but the prompt for {height}x{width} frames has "
                f"{int(prompt.image_mask.sum())} image tokens; the processor and the model disagree (or frame_size "
                "is wrong)"
            )
        position_ids = self.family.position_ids(self.backbone, prompt.input_ids.expand(batch, -1), vision_inputs)
        return prompt.decode(self.decoder, image_features, position_ids)

    def _embed_split(self, vision_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The read-outs of OUTPUTS other than 'llm', from one vision-tower pass; with 'vision' the decoder does not
        run, with 'both' the LLM half is `ImageAdapter` over the same features (equal to the 'llm' read-out)."""
        patches = self.family.vision_features(self.backbone, **vision_inputs)
        if self.output == "patches":
            return patches.float().contiguous()
        if self.output == "vision":
            return patch_mean(patches)
        return self.adapter(patches)

    def _prompt_for(self, frame_size: tuple[int, int]) -> PromptPlan:
        frame_size = (int(frame_size[0]), int(frame_size[1]))
        if frame_size not in self._prompts:
            input_ids, image_mask = static_prompt(self.family, self.processor, self.prompt, frame_size,
                                                  self.backbone.config, self.source)
            self._prompts[frame_size] = self._plan(input_ids.to(self.device), image_mask.to(self.device))
        return self._prompts[frame_size]

    @torch.no_grad()  # not inference_mode: the prefix's states enter the adapter's autograd graph (ImageAdapter)
    def _plan(self, input_ids: torch.Tensor, image_mask: torch.Tensor) -> PromptPlan:
        """What of the static prompt runs per frame: the tokens before the first image token are the same for every
        frame under causal attention, so their states (and each kept layer's keys and values) are computed here,
        once, as vLLM's prefix cache would; the tokens after the last image token are dropped when the pooling
        reads image tokens only (nothing before them can see them)."""
        from transformers import DynamicCache

        image_positions = image_mask.nonzero().flatten()
        end = int(image_positions[-1]) + 1 if self.pooling in IMAGE_POOLINGS else len(image_mask)
        # no kept layer: nothing to compute once; compiled layers: a KV cache argument would recompile them
        prefix = int(image_positions[0]) if self.num_layers and not self.compiled else 0
        embeddings = self.backbone.get_input_embeddings()(input_ids)
        plan = PromptPlan(input_ids, image_mask, embeddings, self.pooling, self.grid, self._cache_keyword, 0, end)
        if prefix == 0:
            return plan
        cache = DynamicCache()  # filled in place
        # no position ids: text before the image counts 0..prefix-1 in every family (on all three axes in Qwen2-VL)
        states = self.decoder(inputs_embeds=embeddings[:, :prefix], use_cache=True,
                              **{self._cache_keyword: cache}).last_hidden_state
        keys_values = tuple((layer.keys, layer.values) for layer in cache.layers)
        return dataclasses.replace(plan, prefix=prefix, prefix_states=states, prefix_keys_values=keys_values)

    @property
    def _cache_keyword(self) -> str:
        """The decoder's name for its KV cache argument: `cache` since transformers 5.2x, `past_key_values` before."""
        return "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"

    def __repr__(self) -> str:
        return (
            f"TruncatedVLM({self.source!r}, family={self.family.name}, layer={self.layer}/{self.total_layers}, "
            f"pooling={self.pooling}, hidden_size={self.hidden_size}, image_size={self.image_size}, "
            f"tokens={self.sequence_length}, dtype={self.dtype})"
        )


# -------------------------------------------------------------------- the VLM from its projector on


class FrozenDecoder:
    """The truncated decoder with the prompt around the image, as plain tensors and a module kept out of any
    module tree: projected image features (N, image tokens, D) -> pooled hidden states (N, D) float32.

    Llava's prompt is the same for every frame (one image token per patch, positions 0..T-1): it runs as the VLM's
    own PromptPlan for ALE frames does. Nothing here has requires_grad; gradients only pass through it.
    """

    def __init__(self, vlm: TruncatedVLM):
        self.decoder, self.plan = vlm.decoder, vlm._prompt_for(ATARI_FRAME_SIZE)

    @property
    def prompt_embeddings(self) -> torch.Tensor:
        return self.plan.embeddings

    @property
    def device(self) -> torch.device:
        return self.plan.embeddings.device

    def to(self, device: torch.device) -> FrozenDecoder:
        self.decoder.to(device)
        self.plan = self.plan.to(device)
        return self

    def __call__(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.plan.decode(self.decoder, image_features)


class ImageAdapter(nn.Module):
    """The VLM from its multimodal projector on: the tower's per-patch output (N, P, Dv) -> the pooled hidden state
    at vlm.layer (N, D), or [that, the patch mean of the same features] (N, D + Dv) for encoder.inputs 'both'.

    `projector` is its only registered submodule: the VLM's own (frozen: TruncatedVLM's 'both' read-out), or a
    float32 copy that the RL loss trains (stage2.method 'joint', `trainable=True`). The truncated decoder and the
    prompt live in `frozen` (`FrozenDecoder`), outside the module tree, so they never reach an optimizer, a
    state_dict, a checkpoint or RLlib's weight sync: a decoder slice of a real VLM is gigabytes.
    """

    def __init__(self, projector: nn.Module, frozen: FrozenDecoder, inputs: str):
        super().__init__()
        if inputs not in ("llm", "both"):
            raise ConfigError(f"the adapter reads the projector for encoder.inputs llm or both; got {inputs!r}")
        self.projector, self.frozen, self.inputs = projector, frozen, inputs

    @classmethod
    def of(cls, vlm: TruncatedVLM, inputs: str, trainable: bool) -> ImageAdapter:
        projector = _get(vlm.backbone, vlm.family.projector)
        if trainable:  # float32 weights for the optimizer whatever vlm.dtype computes in
            projector = copy.deepcopy(projector).float().requires_grad_(True).train()
        return cls(projector, FrozenDecoder(vlm), inputs)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.frozen.device != patches.device:  # a Learner moved the module to its GPU: the decoder follows
            self.frozen.to(patches.device)
        projector_dtype = next(self.projector.parameters()).dtype
        hidden = self.frozen(self.projector(patches.to(projector_dtype)))
        return hidden if self.inputs == "llm" else torch.cat([hidden, patch_mean(patches)], dim=1)


def patch_mean(patches: torch.Tensor) -> torch.Tensor:
    """(N, P, Dv) per-patch vision features -> (N, Dv) float32: encoder.inputs 'vision', the 'both' half."""
    return patches.float().mean(dim=1)


def check_projector_split(family: Family, source: str) -> None:
    """A one-line ModelError unless `family` has a separable multimodal projector (`Family.projector`)."""
    if family.projector is None:
        supported = sorted({f.name for f in FAMILIES.values() if f.projector is not None})
        raise ModelError(f"encoder.inputs vision/both and stage2.method joint split the VLM at its multimodal "
                         f"projector, but {source} is a {family.name} model and {family.no_projector_split}; use a "
                         f"model of the {', '.join(supported)} family (vlm.model), or encoder.inputs=llm with "
                         "stage2.method pretrained or finetuned")


def patch_shape_of(source: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(P, Dv) of the 'patches' read-out of the model in `source`, from its config alone (checked on a driver
    before anything loads weights); a ModelError for a family that cannot be split at its projector."""
    config = _load_config(str(pull(source)), trust_remote_code)
    family = _family_of(config, source)
    check_projector_split(family, source)
    return family.patch_shape(config)


def hidden_size_of(source: str, pooling: str, output: str = "llm", trust_remote_code: bool = False) -> int:
    """`TruncatedVLM.hidden_size` of the model in `source` read out as `pooling` and `output` say, from its config
    alone (the driver's check of an exported encoder's input width, before anything loads weights)."""
    config = _load_config(str(pull(source)), trust_remote_code)
    llm = pooled_width(pooling, int(config.get_text_config().hidden_size))
    if output == "llm":
        return llm
    family = _family_of(config, source)
    check_projector_split(family, source)
    vision = family.patch_shape(config)[1]
    return llm + vision if output == "both" else vision


# -------------------------------------------------------------------- helpers


def pool(hidden: torch.Tensor, image_mask: torch.Tensor, pooling: str,
         grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, T, D) token states -> float32 (N, D) ('last', 'mean', 'image_mean'), (N, SPATIAL_FEATURES * D)
    ('spatial', over the image tokens laid out on `grid`) or (N, T, D) ('tokens')."""
    if pooling == "last":
        pooled = hidden[:, -1]
    elif pooling == "mean":
        pooled = hidden.float().mean(dim=1)
    elif pooling == "image_mean":
        pooled = hidden[:, image_mask].float().mean(dim=1)
    elif pooling == "spatial":
        pooled = spatial_softmax(hidden[:, image_mask], grid)
    else:  # tokens
        pooled = hidden
    return pooled.float().contiguous()


def spatial_softmax(image_states: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, rows * cols, D) image-token states in row-major order -> float32 (N, SPATIAL_FEATURES * D): per channel,
    a softmax over the grid's positions and the expected column and row under it, each in [-1, 1] (left/top -1),
    as [x (D), y (D)].

    Why: a mean over the tokens washes out an object that fills one patch (Pong's ball), while the softmax of a
    channel that responds to it peaks at its patch, so the expected position follows the object (Levine et al.
    2016's spatial soft-argmax, here without learned parameters).
    """
    rows, cols = grid
    states = image_states.float()
    weights = torch.softmax(states, dim=1)  # over positions, per channel
    xs = torch.linspace(-1.0, 1.0, cols, device=states.device).repeat(rows)  # column of each row-major position
    ys = torch.linspace(-1.0, 1.0, rows, device=states.device).repeat_interleave(cols)
    expected_x = torch.einsum("npd,p->nd", weights, xs)
    expected_y = torch.einsum("npd,p->nd", weights, ys)
    return torch.cat([expected_x, expected_y], dim=1)


def pooled_width(pooling: str, hidden_size: int) -> int:
    """Features per frame of a pooled read-out of `hidden_size`-wide token states (per token for 'tokens')."""
    return SPATIAL_FEATURES * hidden_size if pooling == "spatial" else hidden_size


def spatial_grid(family: Family, config: Any, source: str) -> tuple[int, int]:
    """(rows, cols) of the model's image tokens, or a one-line ModelError for a family without one."""
    grid = family.token_grid(config)
    if grid is None:
        raise ModelError(f"vlm.pooling 'spatial' lays the image tokens on the model's patch grid, but {source} is a "
                         f"{family.name} model and {family.no_token_grid}; use vlm.pooling image_mean, or a model of "
                         "the llava family (vlm.model)")
    return grid


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


def resolve_dtype(dtype: str, device: str, checked_bfloat16: bool = False) -> str:
    """The dtype a VLM computes in for a vlm.dtype setting: 'float32' and 'bfloat16' as given; 'auto' is bfloat16
    only where `device` computes it natively and the embed stage checked, on the run's own frames, that bfloat16
    reads the game state as well as float32 (`checked_bfloat16`, from data/embed.py's check), else float32.

    Why the check: on the tiny VLM bfloat16 moves hidden states by ~0.5% of their size but ~8% of their spread
    over frames, enough to move the probe R^2 of the game state by more than 0.01 (tests/test_vlm.py).
    """
    if dtype != "auto":
        return dtype
    return "bfloat16" if checked_bfloat16 and native_bfloat16(device) else "float32"


def native_bfloat16(device: str) -> bool:
    """The CUDA device named (Ampere or later), or a CPU with AVX512-BF16 or AMX (oneDNN's bf16 matmul kernels);
    elsewhere bfloat16 is emulated and slower than float32."""
    if torch.device(device).type == "cuda":  # Ampere (compute capability 8.0) and later; V100/T4 only emulate it
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    if torch.device(device).type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:  # not Linux: no cheap way to ask, and float32 is never wrong
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _family_of(config: Any, source: str) -> Family:
    """The `Family` of a loaded model config, or a ModelError naming the supported model types."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelError(
            f"{source} is a {config.model_type!r} image-text-to-text model, which TruncatedVLM has no adapter "
            f"for yet; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return family


def _load_config(source: str, trust_remote_code: bool):
    """The model's config, or a ModelError saying why `source` is not an image-text-to-text model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    path = Path(source).expanduser()
    local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if local and not path.is_dir():
        raise ModelError(
            f"model directory {source} does not exist; build the tiny VLM with `envenc model init-tiny --out DIR` "
            "or pass an existing Hugging Face model directory"
        )
    if local and not (path / "config.json").is_file():
        raise ModelError(
            f"{source} has no config.json, so it is not a Hugging Face model directory "
            f"(it holds: {', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})"
        )
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        if local:
            raise ModelError(f"could not read the model config in {source}: {_one_line(error)}") from None
        raise ModelError(
            f"{source} is neither an existing directory nor a hub model in the local Hugging Face cache "
            f"(downloads are off when HF_HUB_OFFLINE=1): {_one_line(error)}"
        ) from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not trust_remote_code:
        raise ModelError(
            f"{source} is a {config.model_type!r} model, not an image-text-to-text model (a VLM such as llava); "
            "TruncatedVLM needs a model that reads images"
        )
    return config


def resolve_layer(layer: int, total_layers: int) -> int:
    """HF hidden_states index (0..L, negatives from the end) -> number of decoder layers to keep."""
    if not -(total_layers + 1) <= layer <= total_layers:
        raise ConfigError(
            f"vlm.layer={layer} is out of range for a decoder with {total_layers} layers: "
            f"use 0..{total_layers} or -{total_layers + 1}..-1 (-1: the last layer)"
        )
    return layer % (total_layers + 1)


def _truncate_decoder(decoder: nn.Module, family: Family, keep: int, total_layers: int, final_norm: bool) -> None:
    """Delete decoder layers above `keep`; below the top layer, also the final norm (HF applies it only there)
    unless `final_norm` keeps it."""
    if keep == total_layers:
        return
    setattr(decoder, family.layers, _get(decoder, family.layers)[:keep])
    if not final_norm:
        setattr(decoder, family.norm, nn.Identity())
    decoder.config.num_hidden_layers = keep
    layer_types = getattr(decoder.config, "layer_types", None)
    if isinstance(layer_types, list):
        decoder.config.layer_types = layer_types[:keep]


def _compile_layers(backbone: nn.Module, decoder: nn.Module, family: Family) -> None:
    """torch.compile each kept decoder and vision-tower layer: inductor fuses the memory-bound work between the
    matmuls (norms, rotary embeddings, activations), a third of a small model's time on a CPU (`envenc bench
    encoder`). Layer by layer, so that the Python between them stays eager; each compiles on its first call and
    once more, shape-generic, on the first other batch size."""
    vision = _find(backbone, ("vision_tower.vision_model.encoder", "vision_tower.encoder", "vision_model.encoder"))
    for layer in [*_get(decoder, family.layers), *getattr(vision, "layers", [])]:
        layer.compile()


def _one_line(error: Exception) -> str:
    """A library's multi-line message folded into one line (the CLI prints errors on one line)."""
    return " ".join(str(error).split())


def _get(module: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _find(module: nn.Module, candidates: tuple[str, ...]) -> nn.Module | None:
    for dotted in candidates:
        try:
            return _get(module, dotted)
        except AttributeError:
            continue
    return None
