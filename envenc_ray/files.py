"""Small file helpers every stage shares: artifacts are replaced whole, never seen half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a hidden temporary name beside `path`, then rename over it (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
