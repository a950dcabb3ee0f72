"""The HTTP wire format of POST /encode and /hidden: .npy (or .npz with windows) in, .npy / .npz out; nothing
is ever unpickled."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from envenc_ray.errors import InputError


def read_http_batch(body: bytes) -> tuple[np.ndarray, list | None, bool]:
    """A .npy frame batch, or an .npz with frames (+ windows and fresh); never unpickles."""
    try:
        loaded = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"the body is not a .npy/.npz array ({error}); send np.save(buffer, frames_uint8)") from None
    if isinstance(loaded, np.ndarray):
        return loaded, None, False
    with loaded:
        if "frames" not in loaded:
            raise InputError(f"the .npz body has {sorted(loaded.files)} but no 'frames'")
        frames = loaded["frames"]
        windows = None
        if "windows" in loaded:
            stacked = loaded["windows"]
            fresh = loaded["fresh"] if "fresh" in loaded else np.zeros(len(stacked), dtype=bool)
            if len(fresh) != len(stacked):
                raise InputError(f"'fresh' has {len(fresh)} entries but 'windows' {len(stacked)}")
            windows = [None if is_fresh else window for window, is_fresh in zip(stacked, fresh)]
    return frames, windows, True


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value
