"""The VLM split at its multimodal projector: encoder.inputs 'vision'/'both' and stage2.method 'joint'.

`ImageAdapter` is the VLM from its projector on (the tower's per-patch output -> the pooled hidden state), with
the truncated decoder and prompt held outside the module tree by `FrozenDecoder`; `patch_mean` is the 'vision'
read-out; `check_projector_split` says which families can be split here. TruncatedVLM (backbone.py) builds its
'both' read-out from these, and rl/joint.py trains the projector through them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.vlm.families import ATARI_FRAME_SIZE, FAMILIES, Family, get_part


class FrozenDecoder:
    """The truncated decoder with the prompt around the image, as plain tensors and a module kept out of any
    module tree: projected image features (N, image tokens, D) -> pooled hidden states (N, D) float32.

    Llava's prompt is the same for every frame (one image token per patch, positions 0..T-1): it runs as the VLM's
    own PromptPlan for ALE frames does. Nothing here has requires_grad; gradients only pass through it.
    `vlm` is a TruncatedVLM (not named as a type here: backbone.py imports this module).
    """

    def __init__(self, vlm):
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
    def of(cls, vlm, inputs: str, trainable: bool) -> ImageAdapter:
        """The adapter of a TruncatedVLM `vlm` (a family with a `projector`)."""
        projector = get_part(vlm.backbone, vlm.family.projector)
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
