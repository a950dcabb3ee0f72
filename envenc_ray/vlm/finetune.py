"""The model side of advice finetuning: a trainable VLM, (prompt, answer) token tensors, greedy answers.

The stage that uses these (`envenc advise`, data/advise.py) owns the data, the Ray Train job and the
artifact. Here is only what needs to know the model:

    model, processor, family = load_trainable(base_dir, method="full" | "lora", ...)
    pairs = encode_pairs(processor, family, prompt, answers, frame_size, context)   # ids + answer-only labels
    loss = answer_loss(model, family, preprocessor, frames, pairs.input_ids[rows], pairs.labels[rows])
    texts = greedy_answers(model, family, preprocessor, processor, prompt_ids, frames, max_new_tokens)
    export_merged(model, processor, out_dir)                                       # HF format, LoRA merged

Every (frame, answer) pair shares one prompt (the image placeholder expanded by the model's own processor,
then the question), so a batch is one prompt repeated, answers right-padded. Under causal attention no
prompt or answer token ever sees a pad that follows it, so no attention mask is needed and the padded
positions are simply left out of the loss (label -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envenc_ray.errors import DataError, ModelError
from envenc_ray.vlm.backbone import _load_config, _one_line
from envenc_ray.vlm.families import FAMILIES
from envenc_ray.vlm.preprocess import as_frame_batch

IGNORE_INDEX = -100  # what HF's causal-LM loss skips


@dataclass
class EncodedPairs:
    """Token tensors of N (frame, answer) pairs sharing one prompt."""

    input_ids: torch.Tensor  # (N, L) int64: prompt, answer, EOS, then pads
    labels: torch.Tensor  # (N, L) int64: the answer tokens and EOS; IGNORE_INDEX elsewhere
    prompt_ids: torch.Tensor  # (1, P): what generation starts from

    @property
    def prompt_length(self) -> int:
        return int(self.prompt_ids.shape[1])


def load_processor(base: str, trust_remote_code: bool = False) -> tuple[Any, Any, int]:
    """The model's processor, its family and its text context length (tokens), without loading weights."""
    config = _load_config(base, trust_remote_code)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelError(f"{base} is a {config.model_type!r} model; advice finetuning supports the families "
                         f"TruncatedVLM reads: {', '.join(sorted(FAMILIES))}")
    try:
        processor = family.load_processor(base, config, trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        raise ModelError(f"could not load the processor from {base}: {_one_line(error)}") from None
    image_token = getattr(processor, "image_token", None)
    # The placeholder must be the one token id the model replaces with image features; a tokenizer that
    # lacks it (transformers then appends it as a new token) would put the frame nowhere.
    ids = processor.tokenizer(image_token, add_special_tokens=False)["input_ids"] if image_token else []
    expected = family.image_token_id(config)
    if ids != [expected]:
        raise ModelError(f"the tokenizer of {base} has no image token the model reads ({image_token!r} -> {ids}, the "
                         f"model expects id {expected}), so a frame cannot be placed in the prompt; use the model's "
                         "own tokenizer and processor files")
    return processor, family, int(config.get_text_config().max_position_embeddings)


def load_trainable(base: str, *, method: str, lora_rank: int = 8, lora_alpha: float = 16.0,
                   lora_dropout: float = 0.0, lora_targets: list[str] | None = None,
                   trust_remote_code: bool = False, device: str = "cpu", readout: tuple[int, bool] | None = None):
    """The full image-text-to-text model (LM head included) ready to train, its processor and family.

    'full': every weight trains. 'lora': peft LoRA adapters on `lora_targets` (in both towers where the
    names match); everything else stays frozen. `readout` (vlm.layer, vlm.final_norm): of those, only what the
    hidden states at that layer do not depend on trains (`freeze_below_readout`).
    """
    from transformers import AutoModelForImageTextToText

    processor, family, _ = load_processor(base, trust_remote_code)
    from envenc_ray.vlm.tiny import quiet_progress_bars

    try:
        with quiet_progress_bars():
            model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, use_safetensors=True,
                                                                trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as error:
        raise ModelError(f"could not load the model from {base}: {_one_line(error)}") from None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(lora_targets or [])
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if not targets or missing:
            raise ModelError(f"advise.lora_targets {targets} name no module of {base} ({missing} missing); "
                             "use names such as q_proj, k_proj, v_proj, o_proj")
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                 target_modules=targets))
    elif method != "full":
        raise ModelError(f"advise.method must be 'full' or 'lora', got {method!r}")
    if readout is not None:
        freeze_below_readout(model.get_base_model() if method == "lora" else model, family, *readout)
    return model.to(torch.device(device)), processor, family


def freeze_below_readout(model, family: Any, layer: int, final_norm: bool) -> None:
    """Freeze every weight the hidden states at `layer` are computed from: the vision tower, the projector, the
    token embeddings, the decoder layers below `layer`, and the final norm where the read-out applies it. What
    still trains (decoder layers above, the LM head, their LoRA adapters) cannot change what embed reads, so
    advice finetuning cannot lower the latent. A weight shared with a frozen module (tied embeddings) is frozen."""
    from operator import attrgetter

    from envenc_ray.vlm.backbone import resolve_layer

    decoder = attrgetter(f"{family.backbone}.{family.decoder}")(model)
    layers = attrgetter(family.layers)(decoder)
    keep = resolve_layer(layer, len(layers))
    unseen = [*layers[keep:], attrgetter(family.lm_head)(model)]
    if keep < len(layers) and not final_norm:  # HF applies the final norm only after the top layer
        unseen.append(attrgetter(family.norm)(decoder))
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if any(module is m for m in unseen))
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if not name.startswith(prefixes):
            parameter.requires_grad_(False)


def check_readout_leaves_weights(base: str, layer: int, trust_remote_code: bool = False) -> None:
    """On the driver, before a Train job starts: advise.train 'above_readout' must leave a weight to train. Reading
    the top layer leaves only the LM head, nothing when it is tied to the token embeddings."""
    from envenc_ray.vlm.backbone import resolve_layer

    text = _load_config(base, trust_remote_code).get_text_config()
    total = int(text.num_hidden_layers)
    if resolve_layer(layer, total) == total and getattr(text, "tie_word_embeddings", False):
        raise ModelError(f"advise.train 'above_readout' leaves no weight of {base} to train: vlm.layer {layer} reads "
                         f"the top of its {total}-layer decoder and its LM head is tied to the token embeddings; read "
                         "a lower vlm.layer, or set advise.train all")


def encode_pairs(processor: Any, family: Any, prompt: str, answers: list[str], frame_size: tuple[int, int],
                 context: float, source: str) -> EncodedPairs:
    """Prompt (image tokens + question) + ' answer' + EOS per pair, right-padded; labels on the answer only.

    A pair longer than the model's `context` is a DataError naming its row in `source`."""
    tokenizer = processor.tokenizer
    blank = np.zeros((*frame_size, 3), dtype=np.uint8)
    prompt_ids = family.prompt_ids(processor, family.prompt_text(processor, prompt), blank)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token: the finetuned model could not learn where an answer ends")
    pad = eos if pad is None else pad
    answer_ids = tokenizer([" " + text.strip() for text in answers], add_special_tokens=False)["input_ids"]
    length = prompt_ids.shape[1] + max(len(ids) for ids in answer_ids) + 1
    if length > context:
        row = int(np.argmax([len(ids) for ids in answer_ids]))
        raise DataError(f"{source} row {row}: prompt + answer are {prompt_ids.shape[1] + len(answer_ids[row]) + 1} "
                        f"tokens, more than the model's context of {context}; shorten the text")
    input_ids = torch.full((len(answers), length), pad, dtype=torch.long)
    labels = torch.full((len(answers), length), IGNORE_INDEX, dtype=torch.long)
    input_ids[:, : prompt_ids.shape[1]] = prompt_ids[0]
    for i, ids in enumerate(answer_ids):
        answer = torch.tensor([*ids, eos], dtype=torch.long)
        span = slice(prompt_ids.shape[1], prompt_ids.shape[1] + len(answer))
        input_ids[i, span] = answer
        labels[i, span] = answer
    return EncodedPairs(input_ids, labels, prompt_ids)


def answer_loss(model, family, preprocessor, frames_uint8: np.ndarray, input_ids: torch.Tensor,
                labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given frame + prompt (HF shifts labels by one)."""
    vision_inputs = family.vision_inputs(preprocessor, as_frame_batch(frames_uint8), device)
    output = model(input_ids=input_ids.to(device), labels=labels.to(device), use_cache=False, **vision_inputs)
    return output.loss


@torch.no_grad()
def greedy_answers(model, family, preprocessor, processor, prompt_ids: torch.Tensor, frames_uint8: np.ndarray,
                   max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy (argmax) answers of the model to the shared prompt, one per frame, decoded to text."""
    vision_inputs = family.vision_inputs(preprocessor, as_frame_batch(frames_uint8), device)
    batch = len(frames_uint8)
    input_ids = prompt_ids.to(device).expand(batch, -1)
    generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=processor.tokenizer.pad_token_id, **vision_inputs)
    return processor.tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them for 'full', adapters for 'lora'): what a checkpoint holds."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's trainable parameters back; every one must exist in the model."""
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    if unknown:
        raise DataError(f"the advise checkpoint holds parameters this model lacks ({unknown[:3]}...); it was made "
                        "for another model or advise.method: delete the advise folder and rerun")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def export_merged(model, processor, out_dir: Path) -> Path:
    """Save in Hugging Face format (LoRA adapters merged into the weights), loadable by the Auto classes."""
    if hasattr(model, "merge_and_unload"):  # a peft model
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    if hasattr(processor, "save_pretrained"):
        processor.save_pretrained(out_dir)
    else:  # Qwen2-VL's processor assembled from its parts (families.ProcessorParts)
        processor.image_processor.save_pretrained(out_dir)
        processor.tokenizer.save_pretrained(out_dir)
    return out_dir
