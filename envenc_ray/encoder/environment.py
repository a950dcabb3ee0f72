"""EnvironmentEncoder: truncated VLM + trained encoder in one process, frames (uint8) -> latents (float32).

The service and the RLlib connector wrap this. It keeps no per-episode state itself: for the windowed
encoders (temporal, tokens) the caller passes each episode's window state (its previous k-1 hidden states)
and gets the updated state back, so replicas stay stateless and an episode's window lives with the episode.

`AdapterFeatures` is its stage2.method 'joint' twin: the encoder runs in the agent's RLModule instead, after the
trainable projector, so what frames become here is the window of the vision tower's per-patch output.
"""

from __future__ import annotations

import numpy as np
import torch

from envenc_ray.config import check_pooling
from envenc_ray.encoder.models import WINDOWED_KINDS, Encoder
from envenc_ray.errors import InputError, ModelError
from envenc_ray.vlm.interface import VLM
from envenc_ray.vlm.preprocess import as_frame_batch


def vlm_hidden_shape(vlm: VLM) -> tuple[int, ...]:
    """One frame's hidden state from `vlm`: (D,) pooled, (T, D) with 'tokens' pooling (T of a 210x160 frame)."""
    if vlm.pooling == "tokens":
        return (vlm.sequence_length, vlm.hidden_size)
    return (vlm.hidden_size,)


class EnvironmentEncoder:
    """`vlm` is a TruncatedVLM or a VLLMBackend (what this reads of it: `.pooling`, `.hidden_size` and
    `.embed_frames(frames) -> (N, D) tensor` of a validated uint8 (N, H, W, 3) tensor; with `.pooling` 'tokens'
    also `.sequence_length` T and (N, T, D) states)."""

    def __init__(self, vlm: VLM, encoder: Encoder):
        check_pooling(encoder.kind, vlm.pooling)
        if vlm.hidden_size != encoder.hidden_size:
            raise ModelError(f"the VLM's hidden size is {vlm.hidden_size} but the encoder was trained on "
                             f"{encoder.hidden_size}-wide hidden states; use the VLM (model, layer, pooling) "
                             "that embedded its training data, or retrain the encoder")
        if vlm_hidden_shape(vlm) != encoder.hidden_shape:
            raise ModelError(f"the VLM gives {vlm_hidden_shape(vlm)} token states per frame but the encoder was "
                             f"trained on {encoder.hidden_shape}; use the vlm.model and vlm.prompt that embedded "
                             "its training data, or retrain the encoder")
        self.vlm = vlm
        self.encoder = encoder.eval()

    @property
    def window(self) -> int:
        """Frames per latent: k for the windowed encoders, 1 otherwise (then no state is kept)."""
        return self.encoder.window

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """One frame's hidden state: (D,), or (T, D) for the tokens encoder."""
        return self.encoder.hidden_shape

    @property
    def windowed(self) -> bool:
        """Whether a latent reads a window of frames (then per-episode window states travel with the calls)."""
        return self.encoder.kind in WINDOWED_KINDS

    def hidden(self, frames_uint8: np.ndarray) -> np.ndarray:
        """Raw hidden states (N, *hidden_shape) float32 of a batch of frames (N, H, W, 3) uint8, checked here,
        once: the in-process entry (the VLM's `embed_frames` takes the validated batch as it is)."""
        frames = as_frame_batch(frames_uint8)
        with torch.no_grad():
            return self.vlm.embed_frames(frames).float().cpu().numpy()

    def encode(self, frames_uint8: np.ndarray, windows: list[np.ndarray | None] | None = None
               ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Latents (N, latent_dim) float32 of N frames, each from its own episode, and the new window states.

        Windowed encoders: `windows[i]` is frame i's episode state, its previous k-1 hidden states (oldest
        first, (k-1, *hidden_shape)), or None at a fresh episode start, meaning "pad with this frame" exactly
        as training padded an episode's first frames. `windows=None` means every episode is fresh. Returns
        the updated states. Per-frame encoders are stateless: `windows` is ignored and None is returned.
        """
        return self.encode_hidden(self.hidden(frames_uint8), windows)

    def encode_hidden(self, hidden_states: np.ndarray, windows: list[np.ndarray | None] | None = None
                      ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """`encode` from hidden states (N, *hidden_shape) instead of frames (the VLM already ran)."""
        hidden_states = np.asarray(hidden_states, dtype=np.float32)
        shape = self.hidden_shape
        if hidden_states.shape[1:] != shape:
            raise InputError(f"hidden states must be (N, {', '.join(map(str, shape))}), got {hidden_states.shape}")
        if not self.windowed:
            return self._latents(hidden_states), None
        stacked = stack_windows(hidden_states, windows, self.window)
        return self._latents(stacked), [stacked[i, 1:].copy() for i in range(len(stacked))]

    def _latents(self, inputs: np.ndarray) -> np.ndarray:
        """(N, *encoder.input_shape) -> latents (N, latent_dim)."""
        with torch.no_grad():
            return self.encoder(torch.from_numpy(inputs)).numpy()


class AdapterFeatures(EnvironmentEncoder):
    """stage2.method 'joint': frames -> the window of the vision tower's per-patch output before the projector,
    flattened: (N, k * P * Dv) float32, the observation of `rl/joint.py`'s RLModule.

    That module runs projector -> frozen truncated decoder -> pooling -> encoder on every frame of the window, in
    the Learner too: the projector changes as PPO trains it, so no hidden state can be computed once here.
    `vlm` is a TruncatedVLM with output 'patches'; `encoder` is the one the RLModule starts from (its kind and
    window say how many frames a sample holds). Windows travel with the calls as for EnvironmentEncoder, as
    (k-1, P, Dv) arrays.
    """

    def __init__(self, vlm: VLM, encoder: Encoder):
        if vlm.output != "patches":
            raise ModelError("AdapterFeatures reads the vision tower's per-patch output: build the VLM with "
                             "output='patches'")
        self.vlm = vlm
        self.encoder = encoder.eval()

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """One frame's per-patch features: (P, Dv)."""
        return tuple(self.vlm.patch_shape)

    @property
    def latent_dim(self) -> int:
        """Width of the flattened observation: k frames of (P, Dv) features."""
        return self.window * int(np.prod(self.hidden_shape))

    def _latents(self, inputs: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(inputs.reshape(len(inputs), -1))


def check_windows(windows, n: int, k: int, shape: tuple[int, ...]) -> list[np.ndarray | None] | None:
    """The window states of a call of `n` frames, checked once for every entry (a Serve replica's, the in-process
    encoder's), each error saying what to pass: one per frame, None at a fresh episode start, else the episode's
    previous k-1 hidden states (k-1, *shape), float32. None when there are none or the encoder keeps none (k 1)."""
    if windows is None or k == 1:
        return None  # per-frame encoders keep no state: windows are ignored
    if isinstance(windows, (str, bytes, dict)) or not hasattr(windows, "__len__"):
        raise InputError(f"window states must be a list of one state (or None) per frame, got "
                         f"{type(windows).__name__}")
    windows = list(windows)  # an (N, k-1, *shape) array: every episode continues
    if len(windows) != n:
        raise InputError(f"got {n} frames but {len(windows)} window states; pass one per frame (None for a "
                         "fresh episode)")
    checked: list[np.ndarray | None] = []
    for i, previous in enumerate(windows):
        if previous is None:
            checked.append(None)
            continue
        try:
            previous = np.asarray(previous, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise InputError(f"window state {i} is not an array of numbers ({error}); pass the state "
                             "that encode returned, or None for a fresh episode") from None
        if previous.shape != (k - 1, *shape):
            raise InputError(f"window state {i} has shape {previous.shape}, expected {(k - 1, *shape)}: the "
                             "episode's previous k-1 hidden states, as the last call returned them (None starts fresh)")
        if not np.isfinite(previous).all():
            raise InputError(f"window state {i} holds non-finite values (NaN or infinite); pass the state that "
                             "encode returned, or None for a fresh episode")
        checked.append(previous)
    return checked


def stack_windows(hidden_states: np.ndarray, windows: list[np.ndarray | None] | None, k: int) -> np.ndarray:
    """(N, k, *shape): each frame after its episode's previous k-1 hidden states (`windows[i]`, oldest first; None
    at a fresh episode start, meaning "pad with this frame" exactly as training padded an episode's first frames;
    `windows=None`: every episode is fresh), checked by `check_windows`."""
    n, shape = len(hidden_states), hidden_states.shape[1:]
    windows = check_windows(windows, n, k, shape) or [None] * n
    stacked = np.empty((n, k, *shape), dtype=np.float32)
    for i, previous in enumerate(windows):
        stacked[i, :-1] = hidden_states[i] if previous is None else previous  # fresh: the first frame fills it
        stacked[i, -1] = hidden_states[i]
    return stacked


def load_environment_encoder(vlm_config, model_path: str, encoder_dir, game: str,
                             vllm_checkpoint: str | None = None, joint: bool = False) -> EnvironmentEncoder:
    """The truncated VLM of `model_path` (read out as `vlm_config` says, of the states the encoder was trained on:
    its encoder.inputs) + the exported encoder of `encoder_dir`: the one pair that Serve replicas, in-process
    EnvRunners and the encoder benchmark all run. With `vllm_checkpoint` (serve.backend 'vllm') vLLM computes
    the VLM's states from that checkpoint. `joint` (stage2.method 'joint'): `AdapterFeatures` instead."""
    from envenc_ray.encoder.export import load_encoder
    from envenc_ray.vlm.backbone import resolve_dtype

    encoder = load_encoder(encoder_dir)
    if vlm_config.dtype == "auto":
        # bfloat16 if the encoder was trained on bfloat16 states (embed checked that they read the game as float32
        # ones do; encoders from before that check have none) and this device computes it natively
        dtype = resolve_dtype("auto", vlm_config.device, checked_bfloat16=encoder.vlm_dtype == "bfloat16")
        vlm_config = vlm_config.model_copy(update={"dtype": dtype})
    output = "patches" if joint else encoder.inputs
    if vllm_checkpoint is not None:
        from envenc_ray.vlm.vllm_backend import VLLMBackend

        if output != "llm":
            raise ModelError(f"serve.backend 'vllm' returns the LLM's hidden state only, and the encoder in "
                             f"{encoder_dir} reads {output!r} states; set serve.backend=transformers")
        vlm = VLLMBackend.from_config(vlm_config, model_path, vllm_checkpoint, game=game)
    else:
        from envenc_ray.vlm.backbone import TruncatedVLM

        vlm = TruncatedVLM.from_config(vlm_config, model_path=model_path, game=game, output=output)
    return AdapterFeatures(vlm, encoder) if joint else EnvironmentEncoder(vlm, encoder)
