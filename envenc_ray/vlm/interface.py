"""VLM: what callers read of a VLM backend, declared once for both backends.

TruncatedVLM (backbone.py: transformers in this process) and VLLMBackend (vllm_backend.py: `serve.backend: vllm`)
give the same states for the same settings, and EnvironmentEncoder, the Serve replica, embed and the benchmarks
take either. Neither inherits from `VLM`: a Protocol only names what both have, so a test stand-in with these
members serves too (tests/test_vlm.py checks that both backends satisfy it).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from envenc_ray.vlm.preprocess import FramePreprocessor, ReferencePreprocessor


@runtime_checkable
class VLM(Protocol):
    """A truncated VLM read out as `pooling` says: uint8 RGB frames in, float32 hidden states out.

    Read-only properties, so that a plain attribute (TruncatedVLM.pooling) and a computed one
    (VLLMBackend.hidden_size) both satisfy them.
    """

    @property
    def pooling(self) -> str:
        """vlm.pooling (`pooling.POOLINGS`): 'tokens' gives (N, T, D) states, every other pooling (N, D)."""

    @property
    def output(self) -> str:
        """What `embed` returns (backbone.OUTPUTS): 'llm' the decoder's read-out; with TruncatedVLM also 'vision',
        'both' (encoder.inputs) or 'patches' (stage2.method 'joint': the vision tower's per-patch output)."""

    @property
    def hidden_size(self) -> int:
        """D: the width of one frame's state (of each token's, with 'tokens' pooling)."""

    @property
    def sequence_length(self) -> int:
        """T: tokens per 210x160 frame (what 'tokens' pooling returns per frame)."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the vision tower sees of a 210x160 frame (what clients may resize to)."""

    @property
    def dtype(self) -> torch.dtype | str:
        """What the VLM computes in: a torch dtype (TruncatedVLM) or its name (VLLMBackend)."""

    @property
    def device(self) -> torch.device:
        """Where the returned states are."""

    @property
    def preprocessor(self) -> FramePreprocessor | ReferencePreprocessor | None:
        """The batched twin of the model's image processor; None when the backend preprocesses raw frames itself
        (vLLM), so clients must not resize."""

    def embed(self, frames_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames (N, H, W, 3) -> float32 states (N, D), or (N, T, D) with 'tokens' pooling."""

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """`embed` of a batch already validated by `preprocess.as_frame_batch`."""
