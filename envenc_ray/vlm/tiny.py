"""The built-in tiny VLM: a Llava-architecture model with random weights and a locally trained tokenizer.

It is what the embedded default and the tests use until the advice stage trains it, so it must be small
(about 2M parameters, a few ms per frame on a 2-core CPU), deterministic per seed (same seed, byte-identical
`model.safetensors` and `tokenizer.json`) and loadable offline by `AutoModelForImageTextToText`,
`AutoProcessor` and `TruncatedVLM`.

Two facts of Atari frames shape its processor:
- a CLIP-style "resize the shortest edge, then center-crop" of a 210x160 frame cuts off the top and bottom,
  where Pong keeps its score, so the whole frame is resized (squashed) to the square input, no crop;
- Pong's ball is 2x4 pixels at 210x160. At 128x128 (bicubic, antialiased) the ball still raises its
  brightest pixel by at least 191 of the 219 grey levels it differs from the background, on every real frame
  we checked (48 frames; 96x96 keeps only 131), so 128 is the smallest round size that keeps it clearly
  visible; with 16x16 patches that is 64 image tokens per frame.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from envenc_ray.errors import ModelError
from envenc_ray.files import replaced_atomically

log = logging.getLogger(__name__)

MARKER_FILE = "envenc_tiny.json"  # written last: a directory holding it is a complete built-in tiny VLM

IMAGE_TOKEN = "<image>"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]  # ids 0..3, in this order


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the built-in tiny VLM. Head size is 32 in both towers (the smallest we allow)."""

    image_size: int = 128  # square input; see the module docstring for why 128
    patch_size: int = 16  # (128/16)^2 = 64 image tokens per frame
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4  # head size 128/4 = 32
    text_hidden: int = 128
    text_layers: int = 4  # four, so a "middle layer" (2) is a real truncation
    text_heads: int = 4  # head size 32
    intermediate: int = 512  # MLP width of both towers (4x hidden)
    max_vocab: int = 1024  # BPE vocabulary incl. the 256 bytes and special tokens (scores up to 999 fill it)
    max_positions: int = 512  # image tokens + prompt tokens stay far below this

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tiny_vlm(out_dir: str | Path, seed: int = 0, *, patch_size: int = TinySpec.patch_size, measure: bool = True,
                   report: bool = True) -> Path:
    """Build the tiny VLM into `out_dir` (written to a temporary sibling, then renamed) and return its path.

    `patch_size` (a divisor of 128) sets the image-token grid; `envenc bench encoder --readouts` compares sizes.

    `measure` times TruncatedVLM.embed on synthetic 210x160 frames (batch 1 and 32) and records it in
    `envenc_tiny.json` next to the parameter count; `report` prints a one-line summary.
    An existing `out_dir` is replaced only if it is empty or a previous tiny build.
    """
    out = Path(out_dir)
    _check_replaceable(out)
    if TinySpec.image_size % patch_size:
        raise ModelError(f"the tiny VLM's patch size must divide its {TinySpec.image_size}-pixel input; got {patch_size}")
    spec = TinySpec(patch_size=patch_size)
    with quiet_progress_bars(), replaced_atomically(out) as staging:
        info = _build_into(staging, spec, seed, measure)
    summary = (
        f"built tiny VLM (seed {seed}) at {out}: {info['parameters'] / 1e6:.2f}M parameters, "
        f"{spec.image_size}x{spec.image_size} input -> {spec.image_tokens} image tokens, vocab {info['vocab_size']}"
    )
    if measure:
        timing = info["forward_ms_per_frame"]
        summary += f", embed {timing['batch_1']:.1f} ms/frame (batch 1), {timing['batch_32']:.1f} ms/frame (batch 32)"
    log.info(summary)
    if report:
        print(summary)
    return out


def _build_into(staging: Path, spec: TinySpec, seed: int, measure: bool) -> dict:
    """Write the model into `staging`; returns what envenc_tiny.json records."""
    tokenizer = _train_tokenizer(seed)
    model = _build_model(spec, tokenizer, seed)
    processor = _build_processor(spec, tokenizer)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    info = {
        "seed": seed,
        "spec": asdict(spec),
        "image_tokens": spec.image_tokens,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if measure:
        info["forward_ms_per_frame"] = _measure_forward(staging)
    (staging / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


@contextmanager
def quiet_progress_bars():
    """transformers' shard-writing and weight-loading bars are noise for small models loaded many times."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out} is a file; pass a directory path to build the tiny VLM in")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise ModelError(
            f"{out} exists, is not empty and is not a built-in tiny VLM; refusing to overwrite it. "
            "Choose another --out or delete the directory."
        )


def _train_tokenizer(seed: int):
    """Byte-level BPE trained on the advice and description corpora plus the default prompt of every annotated game.

    Byte-level, so any later advice text still encodes (no unknown token); the corpus is small, so the
    vocabulary saturates (whole words become single tokens) well below `max_vocab`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from envenc_ray.config import VLMConfig
    from envenc_ray.envs.annotate import ANNOTATED_GAMES, advice_corpus, describe_corpus

    prompt = VLMConfig.model_fields["prompt"].default
    corpus = (advice_corpus(seed=seed) + describe_corpus(seed=seed)
              + [prompt.format(game=game) for game in ANNOTATED_GAMES])

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TinySpec.max_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=TinySpec.max_positions,
    )
    return tokenizer


def _build_model(spec: TinySpec, tokenizer, seed: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=spec.image_tokens,
        # The last vision layer feeds the projector: with two layers, -2 (Llava's default) would waste one.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop CLIP's class token: one token per patch
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private RNG stream: the same seed gives byte-identical weights whatever the caller's torch state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.eval()


def _build_processor(spec: TinySpec, tokenizer):
    from transformers import LlavaProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    square = {"height": spec.image_size, "width": spec.image_size}
    image_processor = LlavaImageProcessorPil(
        do_resize=True,
        size=square,  # height and width: squash the whole frame, keep the score rows
        resample=PILImageResampling.BICUBIC,
        do_center_crop=False,
        crop_size=square,  # unused for cropping; the processor reads it to count image tokens
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        do_pad=False,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token, removed again by the "default" strategy
    )


def _measure_forward(model_dir: Path) -> dict[str, float]:
    """Median ms per frame of TruncatedVLM.embed (preprocessing included) on synthetic 210x160 frames."""
    from envenc_ray.vlm.backbone import TruncatedVLM

    vlm = TruncatedVLM.from_pretrained(model_dir)
    rng = np.random.default_rng(0)
    timings = {}
    for batch, repeats in ((1, 10), (32, 3)):
        frames = rng.integers(0, 256, size=(batch, 210, 160, 3), dtype=np.uint8)
        vlm.embed(frames)  # warm-up
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            vlm.embed(frames)
            samples.append((time.perf_counter() - start) * 1000 / batch)
        timings[f"batch_{batch}"] = round(float(np.median(samples)), 3)
    return timings
