"""Bad input fuzzing (issue #14): hypothesis feeds malformed frames, configs, Parquet shards and model, encoder
and agent folders to the real entry points. Every case must end in an EnvEncError subclass whose message names
what was wrong (or succeed when the input is in fact valid): never another exception type, a hang or a crash.

Each test counts the cases it ran and asserts the count, so the total is shown, not assumed. The runs are
derandomized (the same cases every run, no example database): a failure reproduces exactly. Huge shapes are
described with zero strides (np.broadcast_to, torch.expand), so no case allocates them. No test starts Ray.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envenc_ray.config import EncoderConfig, EnvEncConfig, VLMConfig, load_config
from envenc_ray.data.schema import (FRAMES_SCHEMA, frames_to_array, hidden_column, hidden_schema, hidden_to_array,
                                    list_shards, read_table, write_parquet_atomic)
from envenc_ray.encoder.environment import EnvironmentEncoder, load_environment_encoder
from envenc_ray.encoder.export import load_encoder
from envenc_ray.encoder.train import REQUIRED_COLUMNS, check_shards
from envenc_ray.errors import ConfigError, DataError, InputError, ModelError
from envenc_ray.vlm.preprocess import MAX_FRAME_PIXELS, as_frame_batch
from test_serve import save_untrained_encoder

HIDDEN_SIZE = 128  # the tiny VLM's decoder width
TEMPORAL = EncoderConfig(kind="temporal", latent_dim=8, hidden_dims=[16], window=3)


def fuzz_settings(max_examples: int, deadline_ms: int):
    """Bounded, reproducible runs; `deadline` turns a hang (or a pathological slowdown) into a failure."""
    return settings(max_examples=max_examples, deadline=deadline_ms, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return save_untrained_encoder(TEMPORAL, tmp_path_factory.mktemp("fuzz-encoder") / "encoder")


@pytest.fixture(scope="module")
def environment_encoder(tiny_vlm_dir, encoder_dir, one_torch_thread) -> EnvironmentEncoder:
    return load_environment_encoder(VLMConfig(model=str(tiny_vlm_dir)), str(tiny_vlm_dir), encoder_dir, "pong")


# ------------------------------------------------------------------------------------------------- 1. frames

NUMPY_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.int64, np.float16, np.float32,
                np.float64, np.complex64, object]
TORCH_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                torch.bfloat16, torch.float32, torch.float64, torch.complex64]
SIDES = st.sampled_from([0, 1, 2, 3, 4, 5, 7, 16, 33])
HUGE_SIDES = st.sampled_from([1001, 4096, 100_000, 2**31])


def described(shape: tuple[int, ...], dtype, use_torch: bool):
    """An array or tensor of `shape` whose memory stays small: zero strides where it would be large."""
    if use_torch:
        base = torch.zeros((1,) * len(shape), dtype=dtype)
        return base.expand(*shape) if shape else base.reshape(())
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype=dtype), shape)


@st.composite
def frame_inputs(draw):
    """(input, a description) of anything a caller might pass as frames: mostly near misses of (N, H, W, 3) uint8."""
    kind = draw(st.sampled_from(["array", "tensor", "valid", "view", "huge", "nonfinite", "other"]))
    if kind in ("array", "tensor"):
        rank = draw(st.integers(0, 5))
        shape = tuple(draw(SIDES) for _ in range(rank))
        if rank and draw(st.booleans()):
            shape = (*shape[:-1], draw(st.sampled_from([1, 2, 3, 4])))
        if kind == "tensor":
            dtype = draw(st.sampled_from(TORCH_DTYPES))
            return described(shape, dtype, use_torch=True).clone(), f"tensor {shape} {dtype}"
        dtype = draw(st.sampled_from(NUMPY_DTYPES))
        return np.zeros(shape, dtype=dtype), f"array {shape} {np.dtype(dtype)}"
    if kind in ("valid", "view"):
        n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
        seed = draw(st.integers(0, 2**16))
        frames = np.random.default_rng(seed).integers(0, 256, (n, h, w + 3, 4), dtype=np.uint8)
        if kind == "valid":
            return np.ascontiguousarray(frames[:, :, :w, :3]), f"valid {(n, h, w, 3)}"
        view = draw(st.sampled_from(["rgba-slice", "step", "reversed", "transposed", "read-only", "fortran",
                                     "torch-permuted", "broadcast"]))
        if view == "rgba-slice":
            return frames[:, :, :w, :3], view  # non-contiguous channel axis
        if view == "step":
            return frames[:, :, ::2, :3], view
        if view == "reversed":
            return frames[::-1, ::-1, :w, :3], view
        if view == "transposed":
            return frames[:, :, :w, :3].transpose(0, 2, 1, 3), view
        if view == "read-only":
            frozen = np.array(frames[:, :, :w, :3])
            frozen.setflags(write=False)
            return frozen, view
        if view == "fortran":
            return np.asfortranarray(frames[:, :, :w, :3]), view
        if view == "torch-permuted":
            return torch.from_numpy(np.ascontiguousarray(frames[:, :, :w, :3].transpose(0, 3, 1, 2))).permute(
                0, 2, 3, 1), view
        return np.broadcast_to(frames[:1, :, :w, :3], (n, h, w, 3)), view
    if kind == "huge":
        n = draw(st.sampled_from([1, 2]))
        h, w = draw(HUGE_SIDES), draw(st.sampled_from([1, 160, 2**20]))
        if draw(st.booleans()):
            h, w = w, h
        use_torch = draw(st.booleans())
        return described((n, h, w, 3), torch.uint8 if use_torch else np.uint8, use_torch), f"huge {(n, h, w, 3)}"
    if kind == "nonfinite":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return np.full((1, 4, 4, 3), value, dtype=draw(st.sampled_from([np.float16, np.float32, np.float64]))), \
            f"non-finite {value}"
    other = draw(st.sampled_from(["none", "list", "nested-list", "int", "str", "bytes", "dict", "memoryview"]))
    values = {"none": None, "list": [np.zeros((4, 4, 3), np.uint8)] * 2, "nested-list": [[[[0, 0, 0]]]],
              "int": 7, "str": "frames", "bytes": b"\x00" * 12, "dict": {"frames": np.zeros((1, 2, 2, 3), np.uint8)},
              "memoryview": memoryview(b"\x00" * 12)}
    return values[other], other


def is_valid_frames(frames) -> bool:
    """What `as_frame_batch` must accept: a uint8 (N>0, H>0, W>0, 3) array or tensor within the pixel limit."""
    if isinstance(frames, np.ndarray):
        uint8 = frames.dtype == np.uint8
    elif isinstance(frames, torch.Tensor):
        uint8 = frames.dtype == torch.uint8
    else:
        return False
    shape = tuple(frames.shape)
    return (uint8 and len(shape) == 4 and shape[-1] == 3 and min(shape) > 0
            and shape[1] * shape[2] <= MAX_FRAME_PIXELS)


def test_fuzz_frames_reach_the_encoder_or_fail_with_input_error(environment_encoder):
    """as_frame_batch, EnvironmentEncoder.hidden/encode (with fuzzed window states) and TruncatedVLM.embed."""
    tried = {"valid": 0, "refused": 0}
    vlm = environment_encoder.vlm
    k = environment_encoder.window
    state_shape = (k - 1, HIDDEN_SIZE)

    @fuzz_settings(max_examples=220, deadline_ms=20_000)
    @given(case=frame_inputs(), window_kind=st.sampled_from(["none", "fresh", "good", "short", "nan", "int", "str",
                                                             "wrong-count", "array"]))
    def check(case, window_kind):
        frames, what = case
        if not is_valid_frames(frames):
            with pytest.raises(InputError, match="frames"):
                as_frame_batch(frames)
            for entry in (environment_encoder.hidden, vlm.embed, lambda f: environment_encoder.encode(f)):
                with pytest.raises(InputError, match="frames"):
                    entry(frames)
            tried["refused"] += 1
            return
        batch = as_frame_batch(frames)
        expected = torch.from_numpy(np.array(np.asarray(frames), order="C"))  # a fresh row-major copy
        assert batch.dtype == torch.uint8 and torch.equal(batch, expected), what
        hidden = environment_encoder.hidden(frames)
        assert hidden.shape == (len(batch), HIDDEN_SIZE) and np.isfinite(hidden).all(), what
        # the validated batch as it is (views, strides) gives what a contiguous copy gives
        np.testing.assert_allclose(vlm.embed_frames(batch).numpy(), vlm.embed_frames(expected).numpy(),
                                   rtol=1e-5, atol=1e-5)
        n = len(batch)
        windows = {"none": None, "fresh": [None] * n, "good": [np.zeros(state_shape, np.float32)] * n,
                   "short": [np.zeros((k - 2, HIDDEN_SIZE), np.float32)] * n,
                   "nan": [np.full(state_shape, np.nan, np.float32)] * n, "int": 5, "str": ["x"] * n,
                   "wrong-count": [None] * (n + 1), "array": np.zeros((n, *state_shape), np.float32)}[window_kind]
        if window_kind in ("none", "fresh", "good", "array"):
            latents, states = environment_encoder.encode(frames, windows)
            assert latents.shape == (n, TEMPORAL.latent_dim) and np.isfinite(latents).all()
            assert len(states) == n and all(s.shape == state_shape for s in states)
        else:
            with pytest.raises(InputError, match="window"):
                environment_encoder.encode(frames, windows)
        tried["valid"] += 1

    check()
    assert tried["valid"] >= 40 and tried["refused"] >= 60, tried
    assert sum(tried.values()) == 220, tried


# ------------------------------------------------------------------------------------------------- 2. configs

SECTIONS = sorted(EnvEncConfig.model_fields)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VALUES = st.one_of(
    st.integers(-3, 3).map(str), st.sampled_from(["1e9", "-1", "0", "0.0", "-0.5", "2**31", "9" * 30, "nan", "inf"]),
    st.sampled_from(["true", "no", "null", "~", "", "[]", "[1, -2]", "{}", "{a: 1}", "[", "]", "{", ": :", "'",
                     "ppo", "dreamerv3", "pixels", "latent", "latent+pixels", "tokens", "mlp", "cuda:7", "\x00"]),
    st.text(max_size=12),
)


GOOD_OVERRIDES = ["encoder.latent_dim=16", "rl.lr=0.001", "serve.max_replicas=2", "vlm.layer=1", "collect.episodes=2",
                  "experiment.seed=3", "encoder.epochs=2", "rl.train_batch_size=256", "env.game=breakout"]


@st.composite
def override_strings(draw) -> tuple[str, str | None]:
    """(override, the unknown key it names or None): known and unknown sections and keys, any value; a third
    of them valid overrides, so that lists of them also load."""
    if draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(GOOD_OVERRIDES)), None
    section = draw(st.sampled_from([*SECTIONS, "nosuch", "", "rl.extra"]))
    fields = sorted(EnvEncConfig.model_fields[section].annotation.model_fields) if section in SECTIONS else []
    key = draw(st.sampled_from([*fields, "bogus_key", "Latent_Dim"])) if fields else draw(
        st.sampled_from(["x", "latent_dim"]))
    dotted = f"{section}.{key}" if section else key
    if draw(st.integers(0, 9)) == 0:
        dotted += ".deeper"
    unknown = None
    if section not in SECTIONS:
        unknown = (section or key).split(".")[0] if section != "rl.extra" else "rl.extra"
    elif key not in fields:
        unknown = dotted if not dotted.endswith(".deeper") else dotted[: -len(".deeper")]
    separator = draw(st.sampled_from(["=", "=", "=", " = ", "", "=="]))
    return f"{dotted}{separator}{draw(VALUES)}", unknown


CONTRADICTIONS = [
    ["serve.min_replicas=3", "serve.max_replicas=2"],
    ["serve.max_batch_calls=32", "serve.max_ongoing_requests=8"],
    ["rl.algo=dreamerv3", "rl.obs_mode=pixels"],
    ["rl.algo=dreamerv3", "rl.obs_mode=latent+pixels"],
    ["rl.minibatch_size=1024", "rl.train_batch_size=64"],
    ["encoder.val_fraction=1"],
    ["rl.pixel_size=8"],
]


def test_fuzz_config_overrides_give_a_config_or_a_config_error_naming_the_key(tmp_path):
    tried = {"valid": 0, "refused": 0}
    presets = [CONFIGS / "pong-tiny.yaml", CONFIGS / "debug.yaml"]

    @fuzz_settings(max_examples=150, deadline_ms=5_000)
    @given(overrides=st.lists(override_strings(), min_size=1, max_size=3),
           contradiction=st.one_of(st.none(), st.sampled_from(CONTRADICTIONS)))
    def check(overrides, contradiction):
        texts = [text for text, _ in overrides] + (contradiction or [])
        try:
            config = load_config(presets, texts)
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message
            # it names what to fix: one of the overrides (the whole text when malformed) or the key it set
            keys = [text.split("=")[0].strip() for text in texts] + [unknown for _, unknown in overrides if unknown]
            assert any(key and repr(key)[1:-1] in message for key in keys), (texts, message)  # as {!r} shows it
            tried["refused"] += 1
            return
        assert isinstance(config, EnvEncConfig)
        assert contradiction is None, f"{contradiction} was accepted"
        assert all(unknown is None for _, unknown in overrides), overrides
        tried["valid"] += 1

    check()
    assert tried["valid"] >= 10 and tried["refused"] >= 60, tried
    assert sum(tried.values()) == 150, tried


YAML_TEXTS = st.one_of(
    st.sampled_from(["", "~", "[]", "- a\n- b", "42", "'text'", "serve: 3", "serve: [1, 2]", "rl: {algo: sac}",
                     "encoder:\n  latent_dim: -4", "encoder:\n  latent_dim: zero", "vlm: {layer: [1]}",
                     "experiment:\n  name: x\n  nosuch: 1", "nosuch: {a: 1}", "serve:\n  min_replicas: 5",
                     "rl:\n  algo: dreamerv3\n  obs_mode: pixels", "key: [unclosed", "a: b: c", "\t- tab",
                     "{{}}", "!!python/object:os.system ls", "&a [*a]", "encoder: &x {kind: mlp}\nrl: *x",
                     "---\nencoder: {}\n---\nrl: {}", "\xff\xfe", "collect:\n  episodes: 1.5",
                     "env: {max_episode_steps: 0}", "vlm: {pooling: sum}", "experiment: null"]),
    st.text(max_size=40),
    st.binary(max_size=40).map(lambda raw: raw.decode("latin-1")),
)


def test_fuzz_config_files_give_a_config_or_a_config_error_naming_the_file(tmp_path):
    tried = {"valid": 0, "refused": 0}

    @fuzz_settings(max_examples=100, deadline_ms=5_000)
    @given(text=YAML_TEXTS)
    def check(text):
        path = tmp_path / "fuzzed.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            config = load_config([CONFIGS / "pong-tiny.yaml", path])
        except ConfigError as error:
            message = str(error)
            assert "\n" not in message
            assert str(path) in message or "'" in message, message  # the file, or the dotted key it set
            tried["refused"] += 1
            return
        assert isinstance(config, EnvEncConfig)
        tried["valid"] += 1

    check()
    assert tried["valid"] >= 3 and tried["refused"] >= 30, tried
    assert sum(tried.values()) == 100, tried


# ------------------------------------------------------------------------------------------------- 3. Parquet shards

def hidden_shard(rows: int, hidden_size: int = 8) -> pa.Table:
    rng = np.random.default_rng(0)
    schema = hidden_schema(hidden_size)
    return pa.table({"episode_id": pa.array(np.zeros(rows, np.int64)), "step": pa.array(np.arange(rows, dtype=np.int32)),
                     "hidden": hidden_column(rng.normal(size=(rows, hidden_size)), schema.field("hidden").type),
                     "objects": pa.array(['{"ball_x": 1}'] * rows)}, schema=schema)


def frames_shard(rows: int) -> pa.Table:
    frame = np.zeros((4, 4, 3), np.uint8).tobytes()
    columns = {field.name: [None] * rows for field in FRAMES_SCHEMA}
    columns.update(episode_id=[0] * rows, step=list(range(rows)), frame=[frame] * rows, ram=[b"\x00" * 128] * rows,
                   objects=["{}"] * rows)
    return pa.table(columns, schema=FRAMES_SCHEMA)


TABLE_DAMAGE = ["none", "zero-rows", "drop-column", "column-as-string", "column-as-int", "hidden-as-variable-list"]
BYTE_DAMAGE = ["none", "truncate", "random-bytes", "flip-bytes", "empty", "not-parquet"]
FRAME_COLUMNS = ("episode_id", "step", "frame", "objects")


def damaged_table(table: pa.Table, damage: str, column: str) -> pa.Table:
    if damage == "zero-rows":
        return table.slice(0, 0)
    if damage == "drop-column":
        return table.drop_columns([column])
    if damage in ("column-as-string", "column-as-int"):
        kind = pa.string() if damage == "column-as-string" else pa.int64()
        values = [str(i) for i in range(table.num_rows)] if kind == pa.string() else list(range(table.num_rows))
        return table.set_column(table.column_names.index(column), column, pa.array(values, kind))
    if damage == "hidden-as-variable-list" and "hidden" in table.column_names:
        index = table.column_names.index("hidden")
        return table.set_column(index, "hidden", table["hidden"].cast(pa.list_(pa.float32())))
    return table


def damaged_bytes(raw: bytes, damage: str, offset_fraction: float, seed: int) -> bytes:
    offset = int(len(raw) * offset_fraction)
    rng = np.random.default_rng(seed)
    if damage == "truncate":
        return raw[:offset]
    if damage == "random-bytes":
        return raw[:offset] + rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + raw[offset + 64:]
    if damage == "flip-bytes":
        return raw[:offset] + bytes(b ^ 0xFF for b in raw[offset:offset + 16]) + raw[offset + 16:]
    if damage == "empty":
        return b""
    if damage == "not-parquet":
        return rng.integers(0, 256, max(1, offset), dtype=np.uint8).tobytes()
    return raw


def test_fuzz_parquet_shards_read_or_fail_with_data_error_naming_the_file(tmp_path):
    """read_table (frames/, as advise and diagnostics read them), list_shards, and train-encoder's check_shards
    plus hidden_to_array (what read_hidden decodes after Ray Data read the same files)."""
    tried = {"valid": 0, "refused": 0}
    counter = iter(range(10**6))

    @fuzz_settings(max_examples=160, deadline_ms=10_000)
    @given(artifact=st.sampled_from(["frames", "hidden"]), rows=st.integers(1, 6),
           table_damage=st.sampled_from(TABLE_DAMAGE), byte_damage=st.sampled_from(BYTE_DAMAGE),
           column_index=st.integers(0, 3), offset=st.floats(0, 1), seed=st.integers(0, 2**16),
           good_shards=st.integers(0, 2))
    def check(artifact, rows, table_damage, byte_damage, column_index, offset, seed, good_shards):
        folder = tmp_path / f"case-{next(counter)}"
        make = frames_shard if artifact == "frames" else hidden_shard
        required = FRAME_COLUMNS if artifact == "frames" else REQUIRED_COLUMNS
        for i in range(good_shards):
            write_parquet_atomic(make(rows), folder / f"good-{i}.parquet")
        column = required[column_index % len(required)]
        bad = folder / "shard-bad.parquet"
        write_parquet_atomic(damaged_table(make(rows), table_damage, column), bad)
        bad.write_bytes(damaged_bytes(bad.read_bytes(), byte_damage, offset, seed))
        assert len(list_shards(folder, artifact)) == good_shards + 1
        try:
            if artifact == "frames":
                table = read_table(folder, "frames (envenc collect)", FRAME_COLUMNS)
                frames = frames_to_array(table["frame"], (4, 4, 3))
                assert frames.shape == (table.num_rows, 4, 4, 3)
            else:
                shards, hidden_shape, _ = check_shards(folder)
                table = read_table(folder, "hidden states (envenc embed)", REQUIRED_COLUMNS)
                hidden = hidden_to_array(table["hidden"])
                assert hidden.shape == (table.num_rows, *hidden_shape)
        except DataError as error:
            message = str(error)
            assert str(bad) in message or (table_damage == "zero-rows" and str(folder) in message), message
            tried["refused"] += 1
            return
        # read without an error: the damage must have left a valid shard (or a value the schema allows)
        same_type = {"column-as-string": pa.string(), "column-as-int": pa.int64()}.get(table_damage)
        harmless = {"none", "zero-rows", "hidden-as-variable-list" if artifact == "frames" else "none",
                    # a column rewritten with its own type ("0" as objects JSON, 0 as episode_id) is still valid
                    table_damage if same_type == make(rows).schema.field(column).type else "none"}
        assert table_damage in harmless, (table_damage, byte_damage, column)
        tried["valid"] += 1

    check()
    assert tried["valid"] >= 5 and tried["refused"] >= 80, tried
    assert sum(tried.values()) == 160, tried
    with pytest.raises(DataError, match="no Parquet shards"):
        list_shards(tmp_path / "empty-folder", "frames")


# ------------------------------------------------------------------------------------------------- 4. model folders

FILE_DAMAGE = ["delete", "empty", "truncate", "random-bytes", "json-field"]
JSON_EDITS = [("hidden_size", 64), ("hidden_size", -1), ("hidden_shape", [64]), ("hidden_shape", "wide"),
              ("latent_dim", 3), ("kind", "mlp"), ("kind", "transformer"), ("window", 9), ("format", "other"),
              ("format_version", 99), ("encoder", None), ("encoder", {"kind": "mlp", "nosuch": 1}),
              ("encoder.hidden_dims", [7]), ("encoder.latent_dim", 0), ("encoder.window", 5), ("-encoder", None),
              ("-hidden_size", None), ("-hidden_shape", None), ("<top>", []), ("<top>", "text"), ("<top>", 3)]


def damage_file(path: Path, damage: str, offset_fraction: float, seed: int, edit: tuple) -> None:
    """Break one file of a model folder the way a crash, a bad copy or a hand edit would."""
    if damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * offset_fraction)])
    elif damage == "random-bytes":
        raw = bytearray(path.read_bytes())
        start = int(len(raw) * offset_fraction)
        noise = np.random.default_rng(seed).integers(0, 256, 32, dtype=np.uint8).tobytes()
        raw[start:start + 32] = noise[: len(raw[start:start + 32])]
        path.write_bytes(bytes(raw))
    elif path.suffix == ".json":
        edit_json(path, *edit)
    else:
        path.write_bytes(path.read_bytes()[:8] + b"{not json" + path.read_bytes()[17:])


def edit_json(path: Path, key: str, value) -> None:
    data = json.loads(path.read_text())
    if key == "<top>" or not isinstance(data, dict):
        data = value
    elif key.startswith("-"):
        data.pop(key[1:], None)
    elif "." in key:
        outer, inner = key.split(".")
        if isinstance(data.get(outer), dict):
            data[outer][inner] = value
        else:  # an edit that does not fit this file: set the field wholesale
            data[outer] = {inner: value}
    else:
        data[key] = value
    path.write_text(json.dumps(data))


def check_names_folder_or_file(message: str, folder: Path, file: Path) -> None:
    assert "\n" not in message
    assert str(folder) in message or str(file) in message, message


def test_fuzz_encoder_folders_load_or_fail_with_model_error_naming_the_file(tmp_path, encoder_dir):
    tried = {"valid": 0, "refused": 0}
    counter = iter(range(10**6))
    names = sorted(p.name for p in encoder_dir.iterdir())

    @fuzz_settings(max_examples=120, deadline_ms=10_000)
    @given(name=st.sampled_from(names), damage=st.sampled_from(FILE_DAMAGE), offset=st.floats(0, 1),
           seed=st.integers(0, 2**16), edit=st.sampled_from(JSON_EDITS),
           other_model=st.booleans())
    def check(name, damage, offset, seed, edit, other_model):
        folder = tmp_path / f"encoder-{next(counter)}"
        if other_model and name == "model.safetensors":  # the weights of another encoder, a valid file
            save_untrained_encoder(EncoderConfig(kind="mlp", latent_dim=5, hidden_dims=[9]), folder, hidden_size=64)
            weights = (folder / "model.safetensors").read_bytes()
            shutil.rmtree(folder)
            shutil.copytree(encoder_dir, folder)
            (folder / "model.safetensors").write_bytes(weights)
        else:
            shutil.copytree(encoder_dir, folder)
            damage_file(folder / name, damage, offset, seed, edit)
        try:
            encoder = load_encoder(folder)
        except ModelError as error:
            check_names_folder_or_file(str(error), folder, folder / name)
            tried["refused"] += 1
            return
        # loaded: then it must be usable as what its config.json says
        description = json.loads((folder / "config.json").read_text())
        latents = encoder(torch.zeros(2, encoder.window, *encoder.hidden_shape)) if encoder.window > 1 else encoder(
            torch.zeros(2, *encoder.hidden_shape))
        assert latents.shape == (2, description["encoder"]["latent_dim"])
        tried["valid"] += 1

    check()
    assert tried["valid"] >= 5 and tried["refused"] >= 60, tried
    assert sum(tried.values()) == 120, tried


def test_fuzz_vlm_folders_load_or_fail_with_model_error_naming_the_folder(tmp_path, tiny_vlm_dir, encoder_dir,
                                                                          one_torch_thread):
    """TruncatedVLM.from_config through load_environment_encoder, the factory Serve and EnvRunners use."""
    tried = {"valid": 0, "refused": 0}
    counter = iter(range(10**6))
    names = sorted(p.name for p in Path(tiny_vlm_dir).iterdir() if p.is_file())
    vlm_edits = [("hidden_size", 64), ("text_config", {"hidden_size": 64}), ("model_type", "bert"),
                 ("model_type", "nosuch"), ("-model_type", None), ("<top>", []), ("vision_config", None),
                 ("image_token_index", 10**9)]

    @fuzz_settings(max_examples=40, deadline_ms=30_000)
    @given(name=st.sampled_from(names), damage=st.sampled_from(FILE_DAMAGE), offset=st.floats(0, 1),
           seed=st.integers(0, 2**16), edit=st.sampled_from(vlm_edits))
    def check(name, damage, offset, seed, edit):
        folder = tmp_path / f"vlm-{next(counter)}"
        shutil.copytree(tiny_vlm_dir, folder)
        target = folder / name
        damage_file(target, damage, offset, seed, edit)
        try:
            encoder = load_environment_encoder(VLMConfig(model=str(folder)), str(folder), encoder_dir, "pong")
        except (ModelError, ConfigError) as error:
            check_names_folder_or_file(str(error), folder, target)
            tried["refused"] += 1
            return
        hidden = encoder.hidden(np.zeros((1, 210, 160, 3), np.uint8))
        assert hidden.shape == (1, HIDDEN_SIZE)
        tried["valid"] += 1

    check()
    assert tried["refused"] >= 15, tried
    assert sum(tried.values()) == 40, tried


@pytest.fixture(scope="module")
def agent(tmp_path_factory, tiny_vlm_dir, encoder_dir):
    """A real (untrained) PPO policy checkpoint on latents, saved as `save_policy` does, and its config."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors.torch import save_file

    from envenc_ray.rl.algorithm import offline_algorithm_config
    from envenc_ray.rl.checkpoints import POLICY_CONFIG, POLICY_WEIGHTS, latents_identity, space_shapes
    from envenc_ray.rl.observations import observation_space

    import gymnasium as gym

    root = tmp_path_factory.mktemp("fuzz-agent")
    config = load_config([CONFIGS / "pong-tiny.yaml", CONFIGS / "debug.yaml"],
                         [f"experiment.run_root={root}", f"vlm.model={tiny_vlm_dir}", f"rl.encoder_dir={encoder_dir}",
                          f"encoder.latent_dim={TEMPORAL.latent_dim}", "rl.fcnet_hiddens=[8]",
                          "rl.encoder_source=in_process"])
    obs_space, action_space = observation_space("latent", TEMPORAL.latent_dim), gym.spaces.Discrete(6)
    spec = offline_algorithm_config(config).get_rl_module_spec(
        spaces={DEFAULT_MODULE_ID: (obs_space, action_space)}, inference_only=False)
    checkpoint = root / "checkpoint_000001"
    checkpoint.mkdir()
    save_file({k: v.contiguous() for k, v in spec.build().state_dict().items()}, str(checkpoint / POLICY_WEIGHTS))
    description = {"algo": "ppo", "obs_mode": "latent", "observation_shapes": space_shapes(obs_space),
                   "game": "pong", "frame_stack": 4, "pixel_size": 84, "latents": latents_identity(config)}
    (checkpoint / POLICY_CONFIG).write_text(json.dumps(description))
    return config, checkpoint, obs_space, action_space


def test_fuzz_agent_checkpoints_load_or_fail_with_a_clear_error(tmp_path, agent):
    """rl/checkpoints.load_policy, the weights-only load `envenc evaluate` does."""
    from envenc_ray.rl.checkpoints import load_policy

    config, checkpoint, obs_space, action_space = agent
    tried = {"valid": 0, "refused": 0}
    counter = iter(range(10**6))
    policy_edits = [("algo", "dreamerv3"), ("algo", 3), ("obs_mode", "pixels"), ("observation_shapes", [5]),
                    ("observation_shapes", "x"), ("-algo", None), ("-observation_shapes", None), ("<top>", []),
                    ("<top>", 7), ("latents", {"encoder_sha256": "0" * 64, "encoder_dir": "elsewhere"}),
                    ("latents", "x")]

    @fuzz_settings(max_examples=60, deadline_ms=10_000)
    @given(name=st.sampled_from(["policy.json", "policy.safetensors"]), damage=st.sampled_from(FILE_DAMAGE),
           offset=st.floats(0, 1), seed=st.integers(0, 2**16), edit=st.sampled_from(policy_edits))
    def check(name, damage, offset, seed, edit):
        folder = tmp_path / f"checkpoint-{next(counter)}"
        shutil.copytree(checkpoint, folder)
        damage_file(folder / name, damage, offset, seed, edit)
        try:
            module = load_policy(config, folder, obs_space, action_space)
        except (DataError, InputError, ModelError) as error:
            check_names_folder_or_file(str(error), folder, folder / name)
            tried["refused"] += 1
            return
        assert module is not None
        tried["valid"] += 1

    check()
    assert tried["refused"] >= 30, tried
    assert sum(tried.values()) == 60, tried

