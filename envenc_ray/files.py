"""Small file helpers every stage shares: artifacts are replaced whole, never seen half-written."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from envenc_ray.errors import ModelError
from envenc_ray.storage import TEMPORARY, publish


def read_export_config(folder: Path, format_name: str, format_version: int, missing: str, rerun: str) -> dict:
    """config.json of an exported model folder (config.json + model.safetensors), checked to be a dict of
    `format_name` v`format_version`; a one-line ModelError otherwise: `missing` when a file is absent, else what is
    wrong with the config and `rerun`."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file() or not (Path(folder) / "model.safetensors").is_file():
        raise ModelError(missing)
    try:
        description = json.loads(config_path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8 text
        raise ModelError(f"{config_path} is not valid JSON ({error}); {rerun}") from None
    if (not isinstance(description, dict) or description.get("format") != format_name
            or description.get("format_version") != format_version):
        raise ModelError(f"{config_path} is not a {format_name} v{format_version} config; {rerun}")
    return description


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` to write a file or a folder into; when the block ends it is
    renamed over `path` (atomic on one filesystem), when it raises (an error, Ctrl-C, SIGTERM) it is removed.

    Every artifact is written this way: a reader sees the old one or the new one, never half of one, and an
    interrupted stage leaves nothing half-written behind (a killed process, such as a Ray worker when Ray stops,
    leaves a dot-file, which no reader lists and the CLI removes after an interrupt: remove_orphaned_temporaries).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
        publish(path)  # under a URI run root: up to the URI, from whichever node wrote it (see storage.py)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_orphaned_temporaries(root: Path, wait_s: float = 10.0) -> list[Path]:
    """Remove what `replaced_atomically` was writing under `root` in processes that have ended, and return it.

    After an interrupt the driver stops Ray, and Ray's workers (collect's tasks, Ray Data's, Train's) die a moment
    later without running their `finally`s: their temporaries stay. Each name carries its writer's pid, so this
    waits up to `wait_s` for those writers to end, then removes their files; a writer still running (another
    command on the same run) keeps its own.
    """
    deadline = time.monotonic() + wait_s
    removed = []
    for path in sorted(Path(root).rglob(".*.tmp-*")) if Path(root).is_dir() else []:
        match = TEMPORARY.match(path.name)
        if match is None or not path.exists():  # inside a temporary folder removed just before
            continue
        writer = int(match.group(1))
        while _running(writer) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _running(writer):
            _remove(path)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=float))


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file is missing or unreadable (treated as not done)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def weights_sha256(folder: Path) -> str | None:
    """sha256 over a model folder's weight files (*.safetensors, else *.bin), in name order; None when the
    folder holds none (a hub name, or nothing there yet). Reads every byte: seconds per GB."""
    import hashlib

    folder = Path(folder)
    files = (sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def json_safe(value):
    """NaN/inf -> None recursively: metrics.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
