"""Parquet layouts of the run directory's data artifacts, and their safe reading and writing.

frames/*.parquet  one row per env step. `frame` holds the raw HxWx3 uint8 bytes and the shards are
                  written with zstd: consecutive Atari frames are mostly identical background, so zstd
                  shrinks them ~30-60x while decoding stays one `np.frombuffer` per batch (PNG per frame
                  compresses similarly but costs a codec call per frame on every read).
hidden/*.parquet  one row per frame: the pooled VLM hidden state as a fixed-size list of D floats, or
                  with vlm.pooling 'tokens' the per-token states as a fixed-size list of T fixed-size
                  lists of D (float16), so the column's type alone says the (T, D) shape; plus the
                  frame's annotations carried along so encoder metrics (linear probes) need no join.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from envenc_ray.errors import DataError, InputError
from envenc_ray.files import replaced_atomically

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


def hidden_schema(hidden_shape: int | tuple[int, ...], dtype: str = "float32") -> pa.Schema:
    """The hidden/ schema for one frame's hidden state of shape (D,) (or an int D) or (T, D)."""
    hidden_type = pa.float16() if dtype == "float16" else pa.float32()
    for size in reversed((hidden_shape,) if isinstance(hidden_shape, int) else tuple(hidden_shape)):
        hidden_type = pa.list_(hidden_type, size)
    return pa.schema(
        [
            ("episode_id", pa.int64()),
            ("step", pa.int32()),
            ("hidden", hidden_type),
            ("objects", pa.string()),
        ]
    )


# The type of every column envenc writes, by name; hidden/'s `hidden` is checked by its shape (hidden_shape_of).
_COLUMN_TYPES = {field.name: field.type for field in (*FRAMES_SCHEMA, *hidden_schema(1)) if field.name != "hidden"}


def wrong_column_types(schema: pa.Schema, names: tuple[str, ...]) -> str | None:
    """'episode_id is string, expected int64; ...' for those of `names` whose type is not what envenc writes."""
    wrong = [f"{name} is {schema.field(name).type}, expected {_COLUMN_TYPES[name]}" for name in names
             if name in _COLUMN_TYPES and schema.field(name).type != _COLUMN_TYPES[name]]
    return "; ".join(wrong) or None


def hidden_shape_of(hidden_type: pa.DataType) -> tuple[int, ...] | None:
    """(D,) or (T, D) of a hidden column's type; None unless it is (nested) fixed-size lists of floats."""
    shape = []
    while pa.types.is_fixed_size_list(hidden_type):
        shape.append(hidden_type.list_size)
        hidden_type = hidden_type.value_type
    return tuple(shape) if shape and pa.types.is_floating(hidden_type) else None


def hidden_column(hidden_states: np.ndarray, hidden_type: pa.DataType) -> pa.FixedSizeListArray:
    """Hidden states (N, D) or (N, T, D) -> a column of `hidden_type` (from `hidden_schema`)."""
    shape = hidden_shape_of(hidden_type)
    if shape is None or tuple(hidden_states.shape[1:]) != shape:
        raise InputError(f"hidden states of shape {hidden_states.shape} do not fit the column type {hidden_type}")
    values_type = hidden_type
    while pa.types.is_fixed_size_list(values_type):
        values_type = values_type.value_type
    column = pa.array(np.ascontiguousarray(hidden_states, dtype=np.float32).reshape(-1)).cast(values_type)
    for size in reversed(shape):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def frames_to_array(column: pa.ChunkedArray | pa.Array | list[bytes], frame_shape: tuple[int, int, int]) -> np.ndarray:
    """Binary frame column -> uint8 array (N, H, W, 3)."""
    values = column.to_pylist() if hasattr(column, "to_pylist") else column
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), *frame_shape)


def hidden_to_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Fixed-size-list hidden column -> float32 array (N, D), or (N, T, D) for per-token states."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    shape = hidden_shape_of(column.type)
    if shape is None:
        raise DataError(f"column 'hidden' is {column.type}, expected fixed-size lists of floats (envenc embed)")
    values = column
    for _ in shape:
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), *shape)


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
    with replaced_atomically(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def list_shards(directory: Path, what: str) -> list[Path]:
    """Sorted Parquet shards of an artifact folder; an error that says which stage makes them if none."""
    directory = Path(directory)
    shards = sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))
    if not shards:
        raise DataError(f"no Parquet shards in {directory}; run the stage that writes {what} first")
    return shards


def read_table(directory: Path, what: str, required: tuple[str, ...], only_required: bool = False) -> pa.Table:
    """Read every shard of an artifact folder, checking it parses and holds the required columns.

    only_required reads just those columns (frames/ without its frame bytes: a fraction of the decoding)."""
    tables = []
    for shard in list_shards(directory, what):
        try:
            names = pq.read_schema(shard).names
            table = pq.read_table(shard, columns=[name for name in required if name in names] if only_required else None)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{shard} is not a readable Parquet file ({error}); delete it and rerun the stage") from None
        missing = [name for name in required if name not in table.column_names]
        if missing:
            raise DataError(f"{shard} lacks column(s) {', '.join(missing)}; it was not written by envenc's {what} stage")
        wrong = wrong_column_types(table.schema, required)
        if wrong:
            raise DataError(f"{shard}: column {wrong}; it was not written by envenc's {what} stage")
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default")
    if table.num_rows == 0:
        raise DataError(f"{directory} holds no rows; rerun the stage that writes {what}")
    return table
