"""The HTTP wire format of POST /encode and /hidden: .npy (or .npz with windows) in, .npy / .npz out.

A body is untrusted: it is size-checked before it is read (Content-Length, then a streaming cap), an .npz's
members are size-checked before anything is decompressed (a zip bomb never inflates), and arrays are parsed
from their .npy header with our own checks instead of `np.load` (which allocates whatever shape a header
claims before reading the data). Nothing is ever unpickled: object arrays are refused.
"""

from __future__ import annotations

import ast
import io
import zipfile
from typing import Any

import numpy as np

from envenc_ray.errors import InputError

NPZ_MEMBERS = ("frames", "windows", "fresh")
HOW_TO_SEND = "send np.save(buffer, frames_uint8) of (N, H, W, 3) frames, or np.savez with frames/windows/fresh"


class BodyTooLargeError(InputError):
    """The request body (or an .npz's decompressed content) is larger than serve.max_body_bytes: HTTP 413."""


async def read_body(request: Any, limit: int) -> bytes:
    """The body of a Starlette request, refused with BodyTooLargeError as soon as it exceeds `limit` bytes:
    a declared Content-Length is checked before reading, and the stream is cut off at the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InputError(f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise _too_large(f"Content-Length says {int(declared)} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"the body passed {limit} bytes while being read", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def read_http_batch(body: bytes, limit: int) -> tuple[np.ndarray, list | None, bool]:
    """A .npy frame batch, or an .npz with frames (+ windows and fresh). Returns (frames, windows, as_npz)."""
    if not body:
        raise InputError(f"the body is empty: {HOW_TO_SEND}")
    if not body.startswith(b"PK\x03\x04"):
        return parse_npy(body, "the body"), None, False
    arrays = _read_npz(body, limit)
    if "frames" not in arrays:
        raise InputError(f"the .npz body has {sorted(arrays)} but no 'frames': {HOW_TO_SEND}")
    frames = arrays["frames"]
    windows = None
    if "windows" in arrays:
        stacked = arrays["windows"]
        fresh = arrays.get("fresh", np.zeros(len(stacked), dtype=bool))
        if fresh.ndim != 1 or len(fresh) != len(stacked):
            raise InputError(f"'fresh' has shape {fresh.shape} but 'windows' has {len(stacked)} entries: one bool each")
        windows = [None if is_fresh else window for window, is_fresh in zip(stacked, fresh.astype(bool))]
    return frames, windows, True


def parse_npy(data: bytes, what: str) -> np.ndarray:
    """An array from .npy bytes: header parsed and checked (known dtype, no objects, the data exactly the size
    the shape says) before any memory is set aside for it."""
    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        raise InputError(f"{what} is not a .npy array (no .npy magic): {HOW_TO_SEND}")
    major = data[6]
    if major == 1:
        header_length, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        header_length, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise InputError(f"{what} is a .npy of unknown format version {major}: {HOW_TO_SEND}")
    try:
        header = ast.literal_eval(data[start:start + header_length].decode("latin1"))
        dtype = np.dtype(header["descr"])
        shape = tuple(int(n) for n in header["shape"])
        fortran = bool(header["fortran_order"])
    except (ValueError, SyntaxError, TypeError, KeyError, UnicodeDecodeError, MemoryError, RecursionError):
        raise InputError(f"{what} has an unreadable .npy header: {HOW_TO_SEND}") from None
    if dtype.hasobject:
        raise InputError(f"{what} holds Python objects ({dtype}); only numeric arrays are accepted: {HOW_TO_SEND}")
    if any(n < 0 for n in shape):
        raise InputError(f"{what} claims a negative shape {shape}")
    payload = memoryview(data)[start + header_length:]
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if len(payload) != expected:
        raise InputError(f"{what} says shape {shape} of {dtype} ({expected} bytes) but carries {len(payload)} bytes "
                         "(truncated or padded): send the whole np.save output")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.copy()  # writable, owns its memory (the body buffer is dropped)


def _read_npz(body: bytes, limit: int) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        raise InputError(f"the body starts like a zip but is not a readable .npz: {HOW_TO_SEND}") from None
    names = [info.filename.removesuffix(".npy") for info in infos]
    unknown = sorted(set(names) - set(NPZ_MEMBERS))
    if unknown:
        raise InputError(f"the .npz body has members {unknown}; only {', '.join(NPZ_MEMBERS)} are read")
    if len(set(names)) != len(names):
        raise InputError(f"the .npz body repeats a member: {names}")
    inflated = sum(info.file_size for info in infos)
    if inflated > limit:
        raise _too_large(f"the .npz members decompress to {inflated} bytes", limit)
    arrays = {}
    for name, info in zip(names, infos):
        try:
            # zipfile stops at the size the member declares, so a lying header cannot inflate past the check
            data = archive.read(info)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError):
            raise InputError(f"the .npz member {name!r} is corrupt (bad CRC or truncated): {HOW_TO_SEND}") from None
        arrays[name] = parse_npy(data, f"the .npz member {name!r}")
    return arrays


def _too_large(what: str, limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(f"{what}, more than serve.max_body_bytes={limit}: send fewer frames per request "
                             "(split the batch) or raise serve.max_body_bytes")


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
