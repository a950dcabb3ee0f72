"""A random-weight Llava-architecture VLM of a few hundred million parameters, for GPU benchmarks offline.

    python benchmarks/build_random_llava.py --tokenizer-from TINY_VLM_DIR --out DIR [--hidden 64 --layers 2 ...]

Shaped like LLaVA-1.5, narrower: a CLIP ViT-B-sized vision tower on 336x336 images in 14-pixel patches (576
image tokens; the projector reads its second-to-last layer, as LLaVA-1.5's does), a two-layer MLP projector
and a Llama decoder, 291M parameters at the defaults; LLaVA-1.5's image processor (shortest edge 336, center
crop 336, CLIP normalization), so `vlm.crop` matters for it. The tokenizer is the built-in tiny VLM's
(`envenc model init-tiny`), so nothing is downloaded. The weights are random: it times compute, not quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from envenc_ray.errors import EnvEncError, ModelError

HEAD_SIZE = 64  # of both towers, as in CLIP ViT-B and Llama
PROMPT_ROOM = 256  # decoder positions beyond the image tokens, for the prompt


@dataclass(frozen=True)
class RandomLlavaSpec:
    """Sizes; the defaults give 291M parameters (86M vision tower, 202M decoder, 2M projector, 1M LM head)."""

    hidden: int = 1024  # decoder width
    layers: int = 12  # decoder layers
    vision_hidden: int = 768
    vision_layers: int = 12
    image_size: int = 336
    patch_size: int = 14
    seed: int = 0

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_random_llava(out_dir: str | Path, tokenizer_from: str | Path, spec: RandomLlavaSpec) -> dict:
    """Write the model, processor and `envenc_random_llava.json` (spec, parameters, seconds) into `out_dir`."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; pass a new --out directory")
    if spec.hidden % HEAD_SIZE or spec.vision_hidden % HEAD_SIZE:
        raise ModelError(f"--hidden and --vision-hidden must be multiples of the head size {HEAD_SIZE}; got "
                         f"{spec.hidden} and {spec.vision_hidden}")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokenizer.model_max_length = spec.image_tokens + PROMPT_ROOM  # the tiny VLM's 512 is too short for 576 tokens
    with torch.random.fork_rng(devices=[]):  # the same seed gives the same weights whatever the caller's RNG
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(llava_config(spec, tokenizer)).eval()
    hf_logging.disable_progress_bar()  # a shard-writing bar is noise in the GPU check's log
    model.save_pretrained(out)
    llava_processor(spec, tokenizer).save_pretrained(out)
    info = {"spec": asdict(spec), "parameters": sum(p.numel() for p in model.parameters()),
            "image_tokens": spec.image_tokens, "build_s": round(time.perf_counter() - started, 2)}
    (out / "envenc_random_llava.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def llava_config(spec: RandomLlavaSpec, tokenizer):
    """CLIP vision tower + Llama decoder at `spec`'s sizes, with LLaVA-1.5's feature layer and token strategy."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=spec.vision_hidden,
            intermediate_size=4 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_hidden // HEAD_SIZE,
            image_size=spec.image_size,
            patch_size=spec.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden,
            intermediate_size=4 * spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.hidden // HEAD_SIZE,
            num_key_value_heads=spec.hidden // HEAD_SIZE,
            max_position_embeddings=tokenizer.model_max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        image_seq_length=spec.image_tokens,
        vision_feature_layer=-2,  # LLaVA-1.5's: TruncatedVLM drops the tower's last layer, which nothing reads
        vision_feature_select_strategy="default",  # drop CLIP's class token: one token per patch
        pad_token_id=tokenizer.pad_token_id,
    )


def llava_processor(spec: RandomLlavaSpec, tokenizer):
    """LLaVA-1.5's processor at `spec`'s image size: shortest edge, center crop, CLIP normalization."""
    from transformers import LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token=tokenizer.image_token,
        num_additional_image_tokens=1,  # CLIP's class token, removed again by the "default" strategy
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-from", required=True, help="a tiny VLM directory (envenc model init-tiny)")
    parser.add_argument("--out", required=True, help="new directory to write the model to")
    for field in fields(RandomLlavaSpec):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=field.default,
                            help=f"default {field.default}")
    args = parser.parse_args(argv)
    spec = RandomLlavaSpec(**{field.name: getattr(args, field.name) for field in fields(RandomLlavaSpec)})
    try:
        info = build_random_llava(args.out, args.tokenizer_from, spec)
    except EnvEncError as error:
        print(f"build_random_llava: error: {error}", file=sys.stderr)
        return 2
    print(f"built random Llava at {args.out}: {info['parameters'] / 1e6:.1f}M parameters, {spec.image_size}x"
          f"{spec.image_size} input -> {info['image_tokens']} image tokens, in {info['build_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
