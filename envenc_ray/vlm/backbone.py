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

The prompt is static, so it is tokenised once per frame size (ALE's 210x160 at load) and every batch reuses the
ids (`families.PromptPlan`). Preprocessing is batched torch code (`preprocess.FramePreprocessor`) that matches the
model's own processor, except for families whose processor has no tensor twin. Where each model family keeps its
parts is `families.py`; the split at the projector (encoder.inputs 'vision'/'both') is `adapter.py`; pooling is
`pooling.py`. Here: loading, truncation, the dtype settings and the forward pass.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from envenc_ray.config import BUILTIN_TINY
from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.storage import pull
from envenc_ray.vlm.adapter import ImageAdapter, check_projector_split, patch_mean
from envenc_ray.vlm.families import (ATARI_FRAME_SIZE, Family, PromptPlan, family_of, find_part, get_part,
                                     spatial_grid, static_prompt)
from envenc_ray.vlm.pooling import IMAGE_POOLINGS, POOLINGS, pooled_width
from envenc_ray.vlm.preprocess import CROPS, as_frame_batch, with_crop

log = logging.getLogger(__name__)

# What `embed` returns: the LLM's hidden state (pooled as `pooling` says), or, split at the multimodal projector
# (see `ImageAdapter`), the vision tower's output averaged over patches ('vision'), both concatenated
# ([llm, vision]: 'both'), or the tower's per-patch output itself ('patches', (N, P, Dv): what the projector of
# stage2.method 'joint' reads in the RLModule). 'llm', 'vision' and 'both' are encoder.inputs.
OUTPUTS = ("llm", "vision", "both", "patches")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = (*DTYPES, "auto")  # auto: bfloat16 where checked and native, else float32 (resolve_dtype)
DEFAULT_PROMPT = "a game of pong. describe the state."


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
        self.decoder = get_part(backbone, family.decoder)
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
        family = family_of(config, source)
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

        backbone = get_part(model, family.backbone)
        setattr(model, family.lm_head, None)  # the LM head goes with the wrapper; nothing here reads logits
        del model
        decoder = get_part(backbone, family.decoder)
        total_layers = len(get_part(decoder, family.layers))
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
        return len(get_part(self.decoder, self.family.layers))

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


def patch_shape_of(source: str, trust_remote_code: bool = False) -> tuple[int, int]:
    """(P, Dv) of the 'patches' read-out of the model in `source`, from its config alone (checked on a driver
    before anything loads weights); a ModelError for a family that cannot be split at its projector."""
    config = _load_config(str(pull(source)), trust_remote_code)
    family = family_of(config, source)
    check_projector_split(family, source)
    return family.patch_shape(config)


def hidden_size_of(source: str, pooling: str, output: str = "llm", trust_remote_code: bool = False) -> int:
    """`TruncatedVLM.hidden_size` of the model in `source` read out as `pooling` and `output` say, from its config
    alone (the driver's check of an exported encoder's input width, before anything loads weights)."""
    config = _load_config(str(pull(source)), trust_remote_code)
    llm = pooled_width(pooling, int(config.get_text_config().hidden_size))
    if output == "llm":
        return llm
    family = family_of(config, source)
    check_projector_split(family, source)
    vision = family.patch_shape(config)[1]
    return llm + vision if output == "both" else vision


# -------------------------------------------------------------------- helpers


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
    setattr(decoder, family.layers, get_part(decoder, family.layers)[:keep])
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
    vision = find_part(backbone, ("vision_tower.vision_model.encoder", "vision_tower.encoder", "vision_model.encoder"))
    for layer in [*get_part(decoder, family.layers), *getattr(vision, "layers", [])]:
        layer.compile()


def _one_line(error: Exception) -> str:
    """A library's multi-line message folded into one line (the CLI prints errors on one line)."""
    return " ".join(str(error).split())
