"""Batched frame preprocessing in torch: uint8 frames (N, H, W, 3) -> pixel_values (N, 3, H', W').

It reproduces a Hugging Face image processor (resize, optional center crop, rescale, normalize) for a whole
batch at once; the processor itself is the reference (tests compare both), not the hot path. Qwen2-VL's
processor fits too: its "smart resize" picks the output size from the frame size, and `to_patches` flattens
the pixels the way its processor does. Processors with no tensor twin (Idefics3/SmolVLM: Lanczos resampling
through an up to 2048-pixel intermediate, then tiling) run as themselves through `ReferencePreprocessor`.

Why it matches PIL so closely: HF's PIL backend resizes the uint8 image with PIL, which resamples in two
separable passes (one axis, then the other) with a uint8 intermediate image, antialiased (the kernel
widens by the downscale factor). torch's `interpolate(..., antialias=True)` uses the same kernels (PIL's
bicubic a=-0.5), and calling it one axis at a time on uint8 tensors reproduces PIL's intermediate rounding
and clipping; doing both axes in one float pass instead differs by up to ~12 grey levels on noisy images
(bicubic overshoot that PIL clips between the passes). The order of the passes matters for the same
reason, see `_vertical_first`.

`with_crop(preprocessor, "none")` (config `vlm.crop`) replaces a processor's center crop with a resize of the
whole frame to the crop size, so that nothing of an ALE frame is cut off (CLIP-style processors such as
LLaVA-1.5's crop away the top and bottom of 210x160, where Pong keeps its score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from envenc_ray.config import ServeConfig
from envenc_ray.errors import ConfigError, InputError, ModelError

# PIL resample codes (transformers.image_utils.PILImageResampling) -> torch interpolate modes.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
CROPS = ("model", "none")  # vlm.crop: the processor's own center crop, or the whole frame (see `with_crop`)
# Largest frame (height x width) accepted in process; one home for the number: serve.max_frame_pixels's default.
MAX_FRAME_PIXELS = ServeConfig.model_fields["max_frame_pixels"].default


def as_frame_batch(frames_uint8: Any, max_frame_pixels: int = MAX_FRAME_PIXELS) -> torch.Tensor:
    """Validate a batch of RGB frames and return it as a uint8 torch tensor (N, H, W, 3), row-major: the
    input's own memory when it already is (frames from ALE, Parquet and HTTP are), else one copy.

    Raises InputError saying what is wrong and how to fix it: not an array, wrong rank, not 3 channels,
    not uint8, no frames, or frames of more than `max_frame_pixels` (height x width) pixels.
    """
    if isinstance(frames_uint8, np.ndarray):
        kind = "array"
    elif isinstance(frames_uint8, torch.Tensor):
        kind = "tensor"
    else:
        raise InputError(
            f"frames must be a numpy array or torch tensor of uint8 RGB frames (N, H, W, 3); "
            f"got {type(frames_uint8).__name__} (stack a list of frames with np.stack)"
        )
    shape = tuple(frames_uint8.shape)
    if len(shape) == 3 and shape[-1] == 3:
        raise InputError(
            f"frames must be a batch (N, H, W, 3); got a single frame of shape {shape}: add a batch axis, frames[None]"
        )
    if len(shape) != 4:
        raise InputError(f"frames must have 4 axes (N, H, W, 3); got shape {shape}")
    if shape[-1] != 3:
        hint = " (channels-first? use frames.transpose(0, 2, 3, 1))" if shape[1] == 3 else ""
        hint = hint or (" (RGBA? drop alpha: frames[..., :3])" if shape[-1] == 4 else "")
        raise InputError(f"frames must have 3 RGB channels in the last axis; got shape {shape}{hint}")
    dtype = frames_uint8.dtype
    if dtype != (np.uint8 if kind == "array" else torch.uint8):
        raise InputError(
            f"frames must be uint8 (0..255); got a {kind} of {dtype}. Floats in [0, 1] convert with "
            "(frames * 255).round() cast to uint8"
        )
    if shape[0] == 0:
        raise InputError("frames is an empty batch (0 frames); pass at least one frame")
    if shape[1] == 0 or shape[2] == 0:
        raise InputError(f"frames have no pixels: shape {shape}")
    if shape[1] * shape[2] > max_frame_pixels:
        # refused before anything is copied or resized: a zero-strided view can describe terabytes
        raise InputError(f"frames of {shape[1]}x{shape[2]} pixels, more than serve.max_frame_pixels="
                         f"{max_frame_pixels}: send frames at their native size (ALE: 210x160) or raise the limit")
    if kind == "array":
        if not frames_uint8.flags.writeable or any(stride < 0 for stride in frames_uint8.strides):
            frames_uint8 = np.array(frames_uint8, order="C")  # torch cannot wrap read-only or reversed arrays
        frames_uint8 = torch.from_numpy(frames_uint8)
    # Copy any other layout once, to NHWC row-major (what frames from ALE, Parquet and HTTP already are): torch
    # 2.13's uint8 antialiased CPU resize returns wrong pixels for some strided inputs (found by tests/test_fuzz.py).
    return frames_uint8 if frames_uint8.is_contiguous() else frames_uint8.contiguous()


@dataclass(frozen=True)
class FramePreprocessor:
    """The tensor twin of a HF image processor. Build it with `from_image_processor`.

    resize_to:       (height, width) of a fixed-size resize, or None
    shortest_edge:   resize so the shorter side has this length (aspect kept), or None
    resample:        PIL resample code (3 bicubic, 2 bilinear, 0 nearest)
    crop_to:         (height, width) of a center crop after the resize, or None
    rescale_factor:  multiplies the 0..255 values (1/255), or None
    mean, std:       per-channel normalization after rescaling, or None
    smart_resize:    (factor, min_pixels, max_pixels) of Qwen2-VL's resize: aspect kept, both sides a multiple
                     of factor, area within [min_pixels, max_pixels]; or None
    patch_layout:    (patch_size, merge_size, temporal_patch_size) of Qwen2-VL's flat patches (`to_patches`), or None
    """

    resize_to: tuple[int, int] | None
    shortest_edge: int | None
    resample: int
    crop_to: tuple[int, int] | None
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    smart_resize: tuple[int, int, int] | None = None
    patch_layout: tuple[int, int, int] | None = None

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> FramePreprocessor:
        """Read size, resample, crop, rescale and normalization settings from a loaded HF image processor."""
        name = type(image_processor).__name__

        def setting(key: str, default: Any = None) -> Any:
            return getattr(image_processor, key, default)

        if setting("do_pad"):
            raise ModelError(f"{name} pads images to a square (do_pad=True); the tensor preprocessing does not yet")
        resize_to = shortest_edge = None
        if setting("do_resize", False):
            size = _as_dict(setting("size"))
            if size.get("height") and size.get("width"):
                resize_to = (int(size["height"]), int(size["width"]))
            elif size.get("shortest_edge") and not size.get("longest_edge"):
                shortest_edge = int(size["shortest_edge"])
            else:
                raise ModelError(f"{name} has an image size the tensor preprocessing does not support: {size}")
        resample = int(setting("resample") if setting("resample") is not None else 2)  # PIL backend default
        if resample not in _RESAMPLE_MODES:
            raise ModelError(
                f"{name} resamples with {_RESAMPLE_NAMES.get(resample, resample)}; "
                "supported: bicubic, bilinear, nearest"
            )
        crop_to = None
        if setting("do_center_crop", False):
            crop = _as_dict(setting("crop_size"))
            crop_to = (int(crop["height"]), int(crop["width"]))
        rescale_factor, mean, std = _rescale_and_normalize(image_processor)
        if resize_to is None and crop_to is None:
            raise ModelError(
                f"{name} keeps each image's own size (no fixed resize or crop); TruncatedVLM needs a fixed input size"
            )
        return cls(resize_to, shortest_edge, resample, crop_to, rescale_factor, mean, std)

    @classmethod
    def from_qwen2_vl_image_processor(cls, image_processor: Any) -> FramePreprocessor:
        """Read a Qwen2-VL image processor: smart resize (its `size` holds pixel counts, not edges) + patch layout."""
        name = type(image_processor).__name__
        if not getattr(image_processor, "do_resize", False):
            raise ModelError(
                f"{name} has do_resize=False, so frames would need sides that are multiples of the patch grid; "
                "set do_resize=true in preprocessor_config.json"
            )
        size = _as_dict(getattr(image_processor, "size", None))
        min_pixels, max_pixels = size.get("shortest_edge"), size.get("longest_edge")  # Qwen2-VL's names for them
        if not min_pixels or not max_pixels:
            raise ModelError(f"{name} has no pixel budget (size shortest_edge/longest_edge): {size}")
        patch_size, merge_size = int(image_processor.patch_size), int(image_processor.merge_size)
        resample = int(image_processor.resample if image_processor.resample is not None else 3)
        if resample not in _RESAMPLE_MODES:
            raise ModelError(
                f"{name} resamples with {_RESAMPLE_NAMES.get(resample, resample)}; "
                "supported: bicubic, bilinear, nearest"
            )
        rescale_factor, mean, std = _rescale_and_normalize(image_processor)
        return cls(
            resize_to=None,
            shortest_edge=None,
            resample=resample,
            crop_to=None,
            rescale_factor=rescale_factor,
            mean=mean,
            std=std,
            smart_resize=(patch_size * merge_size, int(min_pixels), int(max_pixels)),
            patch_layout=(patch_size, merge_size, int(image_processor.temporal_patch_size)),
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of the pixel_values for any frame size; None when it depends on it (`smart_resize`)."""
        if self.smart_resize is not None:
            return None
        return self.crop_to or self.resize_to

    def output_size_for(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixel_values of frames of this size."""
        if self.crop_to is not None:
            return self.crop_to
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is not None:
            return _shortest_edge_size(height, width, self.shortest_edge)
        if self.smart_resize is not None:
            return _smart_resize_size(height, width, *self.smart_resize)
        return (height, width)

    def to_patches(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) pixel_values -> Qwen2-VL's (N * grid_h * grid_w, 3 * T * P * P) patches and (N, 3) grid_thw.

        The layout of its processor: patches ordered by merge_size x merge_size blocks (the vision tower merges
        each block into one token), each patch repeated temporal_patch_size times (a still image is a 1-frame video).
        """
        if self.patch_layout is None:
            raise ModelError("this preprocessor has no patch layout; only Qwen2-VL's flattens patches")
        patch, merge, temporal = self.patch_layout
        count, channels, height, width = pixel_values.shape
        if height % (patch * merge) or width % (patch * merge):
            raise InputError(
                f"pixel_values of {height}x{width} do not split into {patch * merge}-pixel blocks "
                f"({merge}x{merge} patches of {patch}); send frames of their original size"
            )
        grid_h, grid_w = height // patch, width // patch
        blocks = pixel_values.reshape(count, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        blocks = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, block rows, block cols, merge, merge, C, P, P)
        blocks = blocks.unsqueeze(6).expand(*blocks.shape[:6], temporal, patch, patch)
        patches = blocks.reshape(count * grid_h * grid_w, channels * temporal * patch * patch)
        grid_thw = torch.tensor([[1, grid_h, grid_w]], device=pixel_values.device).expand(count, 3)
        return patches, grid_thw.contiguous()

    def __call__(self, frames_uint8: Any, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 frames (N, H, W, 3), numpy or torch -> float32 pixel_values (N, 3, H', W') on `device`."""
        return self.pixel_values(as_frame_batch(frames_uint8), device)

    def pixel_values(self, frames: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """`__call__` of a batch already validated by `as_frame_batch` (the model's hot path)."""
        # NHWC -> NCHW view (channels-last memory): no copy; move the 1-byte pixels, not 4-byte floats.
        images = frames.permute(0, 3, 1, 2).to(device, non_blocking=True)
        images = self._resize(images)
        if self.crop_to is not None:
            images = _center_crop(images, self.crop_to)
        # rescale and normalize as one multiply-add per pixel, x * (r / std) - mean / std, on contiguous NCHW (the
        # uint8 copy is 4x smaller than a float one; broadcasting over channels-last floats is slow on the CPU)
        scale, shift = self._affine(images.device)
        return torch.addcmul(shift, images.contiguous().float(), scale)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of shape (1, 3, 1, 1): rescaling then normalization as one multiply-add."""
        rescale = self.rescale_factor if self.rescale_factor is not None else 1.0
        mean = self.mean if self.mean is not None else (0.0, 0.0, 0.0)
        std = self.std if self.std is not None else (1.0, 1.0, 1.0)
        scale = torch.tensor([rescale / s for s in std], device=device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, 3, 1, 1)
        return scale, shift

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        in_h, in_w = images.shape[-2:]
        if self.resize_to is not None:
            out_h, out_w = self.resize_to
        elif self.shortest_edge is not None:
            out_h, out_w = _shortest_edge_size(in_h, in_w, self.shortest_edge)
        elif self.smart_resize is not None:
            out_h, out_w = _smart_resize_size(in_h, in_w, *self.smart_resize)
        else:
            return images
        mode = _RESAMPLE_MODES[self.resample]
        if _vertical_first(in_h, in_w, out_h, out_w):
            images = _resize_axis(images, (out_h, in_w), mode)
            return _resize_axis(images, (out_h, out_w), mode)
        images = _resize_axis(images, (in_h, out_w), mode)
        return _resize_axis(images, (out_h, out_w), mode)


@dataclass(frozen=True)
class ReferencePreprocessor:
    """The model's own HF image processor, run on a batch frame by frame: for processors with no tensor twin.

    Correctness first: its pixels are the reference itself (zero difference), at the cost of per-frame PIL
    work on the CPU. Idefics3/SmolVLM need it: Lanczos resampling (torch has none), through an intermediate
    image of up to 2048 pixels, then optional tiling ("image splitting").
    """

    image_processor: Any

    def __call__(self, frames_uint8: Any, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """uint8 frames (N, H, W, 3) -> the processor's tensors (pixel_values first) on `device`."""
        frames = as_frame_batch(frames_uint8).cpu().numpy()
        # one image per sample: nested-list processors (Idefics3) would read a flat list as one sample
        encoded = self.image_processor(
            images=[[frame] for frame in frames], return_tensors="pt", input_data_format="channels_last"
        )
        return {key: value.to(device) for key, value in encoded.items() if isinstance(value, torch.Tensor)}

    @property
    def output_size(self) -> None:
        """Unknown without running the processor: see `output_size_for`."""
        return None

    def output_size_for(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of each image (tile) the processor makes of a frame of this size."""
        pixel_values = self(np.zeros((1, height, width, 3), dtype=np.uint8))["pixel_values"]
        return tuple(pixel_values.shape[-2:])


def with_crop(
    preprocessor: FramePreprocessor | ReferencePreprocessor, crop: str
) -> FramePreprocessor | ReferencePreprocessor:
    """The preprocessor for `vlm.crop`: "model" keeps it as it is; "none" shows the model the whole frame.

    With "none", a center-cropping processor becomes a fixed-size resize of the whole frame to its crop size:
    the same pixels as its HF processor with do_center_crop=False and size={height, width} = crop_size. A
    processor that does not crop (Qwen2-VL's smart resize, Idefics3's resize and tiles, the built-in tiny VLM's
    squash) already shows the whole frame, so "none" leaves it unchanged rather than failing a config that
    means exactly that.
    """
    if crop not in CROPS:
        raise ConfigError(f"vlm.crop must be one of {', '.join(CROPS)}; got {crop!r}")
    if crop == "model" or not isinstance(preprocessor, FramePreprocessor) or preprocessor.crop_to is None:
        return preprocessor
    # Squash, not pad. The vision tower needs its fixed input size either way (Llava: crop size = image size).
    # Squashing spends every image token on the frame, where padding 210x160 to a square spends a quarter of
    # them on a constant border and gives every object's width 24% fewer pixels; its pixels are a stock HF setting
    # (do_center_crop=False, size={height, width}), so they are tested against the processor itself. The cost:
    # a 1.3x horizontal stretch that a pretrained tower never saw (LLaVA-1.5 trained on padded squares); it
    # is the same for every frame, and the encoder learns on the hidden states as they come.
    return replace(preprocessor, resize_to=preprocessor.crop_to, shortest_edge=None, crop_to=None)


def _resize_axis(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One PIL pass: resize to `size` (only one axis differs) and round to uint8, as PIL's intermediate is."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images  # PIL skips a pass whose axis keeps its length
    antialias = mode in ("bilinear", "bicubic")
    if images.device.type == "cpu":
        # torch's uint8 CPU kernels resample with fixed-point weights and round like PIL (and are ~20x faster)
        return F.interpolate(images, size=size, mode=mode, antialias=antialias)
    resized = F.interpolate(images.float(), size=size, mode=mode, antialias=antialias)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _vertical_first(in_h: int, in_w: int, out_h: int, out_w: int) -> bool:
    """Whether PIL resamples the vertical axis first (it matters: the intermediate is rounded and clipped).

    PIL up to 12 always runs the horizontal pass first. Pillow 13 (python-pillow/Pillow#9549) runs the
    vertical pass first when the height shrinks much more than the width; the condition below reproduces
    its choice on every one of ~300 random (input, output) size pairs we checked against Pillow 13.0.
    """
    if in_h == out_h or in_w == out_w:
        return False  # a single pass: order is moot
    if _pillow_major() < 13:
        return False
    return out_h < in_h and (in_h - out_h) > 2 * (in_w - out_w)


def _pillow_major() -> int:
    try:
        import PIL

        return int(PIL.__version__.split(".")[0])
    except (ImportError, ValueError):
        return 13


def _shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """HF's get_resize_output_image_size(default_to_square=False) for an int size."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _smart_resize_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """HF's qwen2_vl smart_resize: sides rounded to multiples of `factor`, area scaled into [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"frames of {height}x{width} are too elongated for Qwen2-VL (aspect ratio above 200)")
    out_h, out_w = round(height / factor) * factor, round(width / factor) * factor
    if out_h * out_w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        out_h = max(factor, math.floor(height / beta / factor) * factor)
        out_w = max(factor, math.floor(width / beta / factor) * factor)
    elif out_h * out_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        out_h = math.ceil(height * beta / factor) * factor
        out_w = math.ceil(width * beta / factor) * factor
    return out_h, out_w


def _center_crop(images: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    height, width = images.shape[-2:]
    crop_h, crop_w = crop_hw
    if crop_h > height or crop_w > width:
        raise InputError(f"frames resized to {height}x{width} are smaller than the center crop {crop_h}x{crop_w}")
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def _as_dict(size: Any) -> dict[str, Any]:
    if size is None:
        return {}
    if isinstance(size, dict):
        return size
    if isinstance(size, int):
        return {"height": size, "width": size}
    # transformers' SizeDict: a dataclass with height/width/shortest_edge/longest_edge/... attributes
    return {k: v for k, v in vars(size).items() if v is not None}


def _rescale_and_normalize(image_processor: Any) -> tuple[float | None, tuple | None, tuple | None]:
    """(rescale_factor, mean, std) of a HF image processor; None for a step it skips."""
    rescale_factor = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", False) else None
    mean = std = None
    if getattr(image_processor, "do_normalize", False):
        mean = _three(image_processor.image_mean)
        std = _three(image_processor.image_std)
    return rescale_factor, mean, std


def _three(values: Any) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ModelError(f"expected 3 per-channel normalization values, got {values}")
    return tuple(values)
