"""Parquet layouts of the run directory's data artifacts, and their safe reading and writing.

frames/*.parquet  one row per env step. `frame` holds the raw HxWx3 uint8 bytes and the shards are
                  written with zstd: consecutive Atari frames are mostly identical background, so zstd
                  shrinks them ~30-60x while decoding stays one `np.frombuffer` per batch (PNG per frame
                  compresses similarly but costs a codec call per frame on every read).
hidden/*.parquet  one row per frame: the pooled VLM hidden state as a fixed-size list, plus the frame's
                  annotations carried along so encoder metrics (linear probes) need no join.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from envenc_ray.errors import DataError

FRAMES_SCHEMA = pa.schema(
    [
        ("episode_id", pa.int64()),
        ("step", pa.int32()),
        ("frame", pa.binary()),
        ("action", pa.int16()),
        ("reward", pa.float32()),
        ("terminated", pa.bool_()),
        ("truncated", pa.bool_()),
        ("ram", pa.binary(128)),
        ("objects", pa.string()),  # JSON: {"player_y": 120, "ball_x": 64, ...}
        ("advice", pa.string()),
        ("heuristic_action", pa.int16()),
    ]
)


def hidden_schema(hidden_size: int, dtype: str = "float32") -> pa.Schema:
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema(
        [
            ("episode_id", pa.int64()),
            ("step", pa.int32()),
            ("hidden", pa.list_(value_type, hidden_size)),
            ("objects", pa.string()),
        ]
    )


def frames_to_array(column: pa.ChunkedArray | pa.Array | list[bytes], frame_shape: tuple[int, int, int]) -> np.ndarray:
    """Binary frame column -> uint8 array (N, H, W, 3)."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else column
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), *frame_shape)


def hidden_to_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Fixed-size-list hidden column -> float32 array (N, D)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)


def objects_to_table(objects_json: list[str]) -> dict[str, np.ndarray]:
    """JSON annotation strings -> one float array per numeric key present in every row."""
    rows = [json.loads(text) for text in objects_json]
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)] if rows else []
    return {key: np.array([row[key] for row in rows], dtype=np.float64) for key in keys}


def write_parquet_atomic(table: pa.Table, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary name, then rename: a reader never sees half a shard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def list_shards(directory: Path, what: str) -> list[Path]:
    """Sorted Parquet shards of an artifact folder; an error that says which stage makes them if none."""
    directory = Path(directory)
    shards = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))
    if not shards:
        raise DataError(f"no Parquet shards in {directory}; run the stage that writes {what} first")
    return shards


def read_table(directory: Path, what: str, required: tuple[str, ...]) -> pa.Table:
    """Read every shard of an artifact folder, checking it parses and holds the required columns."""
    tables = []
    for shard in list_shards(directory, what):
        try:
            table = pq.read_table(shard)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{shard} is not a readable Parquet file ({error}); delete it and rerun the stage") from None
        missing = [name for name in required if name not in table.column_names]
        if missing:
            raise DataError(f"{shard} lacks column(s) {', '.join(missing)}; it was not written by envenc's {what} stage")
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default")
    if table.num_rows == 0:
        raise DataError(f"{directory} holds no rows; rerun the stage that writes {what}")
    return table
