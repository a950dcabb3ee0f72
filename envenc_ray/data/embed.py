"""Stage `embed`: the frozen, truncated VLM over every recorded frame -> <run>/hidden/*.parquet.

Ray Data streams the frame shards through an actor pool (one TruncatedVLM per actor, loaded once), so
the same code runs one CPU actor on a laptop or one GPU actor per device on a cluster. The output is
written into a temporary folder that is renamed to hidden/ only when complete. With vlm.pooling 'tokens'
each row holds the frame's (T, D) per-token states, stored float16 (T times the pooled size). encoder.inputs
says which states: the LLM's ('llm'), the vision tower's before the projector, averaged over patches
('vision'), or both concatenated ([llm, vision], 'both'); `_embed.json` records it.

vlm.dtype 'auto' is decided here, once per run (`choose_dtype`): bfloat16 only where the embed actors' device
computes it natively and, on a sample of the recorded frames, it reads the game state as well as float32 does
(probe R^2 within DTYPE_R2_TOLERANCE); _embed.json records the choice and its numbers, the exported encoder
carries it on, and Serve replicas and EnvRunners load the VLM in the dtype their encoder was trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from envenc_ray.config import EnvEncConfig, VLMConfig
from envenc_ray.data.collect import read_frame_shape
from envenc_ray.data.schema import (frames_to_array, hidden_column, hidden_schema, hidden_shape_of, list_shards,
                                    objects_to_table)
from envenc_ray.files import read_json, replaced_atomically
from envenc_ray.layout import RunLayout
from envenc_ray.runtime import set_torch_threads
from envenc_ray.storage import readable, remote_staging
from envenc_ray.vlm.paths import resolve_model_path

logger = logging.getLogger(__name__)

META_FILE = "_embed.json"
DTYPE_R2_TOLERANCE = 0.01  # vlm.dtype 'auto': the most bfloat16 may move the mean probe R^2 of the game state
CALIBRATION_FRAMES = 512  # recorded frames the dtype check embeds twice, spread over every episode


@dataclass(frozen=True)
class EmbedSummary:
    frames: int
    hidden_size: int  # D
    seconds: float
    skipped: bool
    hidden_shape: tuple[int, ...]  # one frame's: (D,) pooled, (T, D) with vlm.pooling 'tokens'

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds else float("nan")


class HiddenStates:
    """Ray Data actor: frame rows -> hidden-state rows with one TruncatedVLM loaded per actor."""

    def __init__(self, vlm_config: VLMConfig, model_path: str, game: str, frame_shape: tuple, hidden_dtype: str,
                 inputs: str = "llm"):
        from envenc_ray.vlm.backbone import TruncatedVLM

        set_torch_threads(vlm_config.num_threads or 1)
        self.vlm = TruncatedVLM.from_config(vlm_config, model_path=model_path, game=game, output=inputs)
        self.frame_shape = tuple(frame_shape)
        per_token = vlm_config.pooling == "tokens"
        hidden_shape = (self.vlm.sequence_length, self.vlm.hidden_size) if per_token else (self.vlm.hidden_size,)
        self.schema = hidden_schema(hidden_shape, hidden_dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        frames_uint8 = frames_to_array(batch["frame"], self.frame_shape)
        hidden_states = self.vlm.embed(frames_uint8).numpy()
        column = hidden_column(hidden_states, self.schema.field("hidden").type)
        return pa.Table.from_arrays([batch["episode_id"], batch["step"], column, batch["objects"]], schema=self.schema)


def output_hash(config: EnvEncConfig) -> str:
    """What determines hidden/: the frames, the VLM (as given, or finetuned by `advise`) and the read-out
    (vlm.layer and pooling, and which states: encoder.inputs)."""
    sections = config.section_hash("experiment", "env", "collect", "vlm", "stage2", "advise", "embed")
    return hashlib.sha256(f"{sections}/{config.encoder.inputs}".encode()).hexdigest()[:16]


def embed_current(config: EnvEncConfig) -> str | None:
    """Why hidden/ already holds the hidden states of this config, or None."""
    hidden_dir = RunLayout.of(config).hidden
    meta = read_json(hidden_dir / META_FILE)
    if meta is None or meta["config_hash"] != output_hash(config):
        return None
    return f"{hidden_dir} already holds {meta['frames']} hidden states for this config"


def embed(config: EnvEncConfig) -> EmbedSummary:
    """Hidden states of every frame in <run>/frames/ -> <run>/hidden/, unless already there for this config."""
    import ray

    from envenc_ray.runtime import ensure_ray

    layout = RunLayout.of(config)
    frames_dir, hidden_dir = layout.frames, layout.hidden
    shards = list_shards(frames_dir, "frames (envenc collect)")
    config_hash = output_hash(config)
    reason = embed_current(config)
    if reason:
        meta = read_json(hidden_dir / META_FILE)
        print(f"embed: skipped, {reason}")
        # hidden/ written before per-token states existed names only hidden_size: (D,)
        hidden_shape = tuple(meta.get("hidden_shape", [meta["hidden_size"]]))
        return EmbedSummary(meta["frames"], meta["hidden_size"], 0.0, skipped=True, hidden_shape=hidden_shape)

    model_path = resolve_model_path(config)
    if config.encoder.inputs != "llm":  # here, in one line, not in a Ray Data actor's traceback
        from envenc_ray.vlm.backbone import patch_shape_of

        patch_shape_of(model_path, config.vlm.trust_remote_code)
    frame_shape = read_frame_shape(frames_dir)
    ensure_ray()
    started = time.perf_counter()
    dtype, dtype_check = choose_dtype(config, model_path, layout.game, shards, frame_shape)
    vlm_config = config.vlm.model_copy(update={"dtype": dtype})
    paths, filesystem = readable(shards)  # read tasks run on any node: on a URI run root they read it there
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, columns=["episode_id", "step", "frame", "objects"])
    hidden = dataset.map_batches(
        HiddenStates,
        fn_constructor_kwargs=dict(
            vlm_config=vlm_config,
            model_path=model_path,
            game=layout.game,
            frame_shape=frame_shape,
            hidden_dtype="float16" if config.vlm.pooling == "tokens" else config.embed.hidden_dtype,
            inputs=config.encoder.inputs,
        ),
        batch_size=config.embed.batch_size,
        batch_format="pyarrow",
        concurrency=config.embed.concurrency,
        num_cpus=config.embed.num_cpus,
        num_gpus=config.embed.num_gpus,
    )
    with replaced_atomically(hidden_dir) as tmp_dir:
        with remote_staging(tmp_dir) as (path, filesystem):  # Ray Data's write tasks run on any node
            hidden.write_parquet(path, filesystem=filesystem, compression="zstd")
        seconds = time.perf_counter() - started
        written = pads.dataset(str(tmp_dir), format="parquet")
        frames = written.count_rows()
        hidden_shape = hidden_shape_of(written.schema.field("hidden").type)
        hidden_size = hidden_shape[-1]
        (tmp_dir / META_FILE).write_text(
            json.dumps({"config_hash": config_hash, "frames": frames, "hidden_size": hidden_size,
                        "hidden_shape": list(hidden_shape), "inputs": config.encoder.inputs, "model": model_path,
                        "vlm_dtype": dtype, "dtype_check": dtype_check, "seconds": seconds}, indent=2)
        )
    summary = EmbedSummary(frames, hidden_size, seconds, skipped=False, hidden_shape=hidden_shape)
    print(
        f"embed: {frames} frames -> {hidden_dir} ({config.encoder.inputs} states, shape {hidden_shape}, {dtype}) in "
        f"{seconds:.1f} s, {summary.frames_per_second:.1f} frames/s"
    )
    return summary


def choose_dtype(config: EnvEncConfig, model_path: str, game: str, shards: list[Path],
                 frame_shape: tuple[int, int, int]) -> tuple[str, dict]:
    """The dtype embed computes in, and why: vlm.dtype as set, or for 'auto' the outcome of `bfloat16_check` on
    up to CALIBRATION_FRAMES recorded frames, run as a Ray task on a device like the embed actors'."""
    import ray

    if config.vlm.dtype != "auto":
        return config.vlm.dtype, {}
    per_shard = max(1, CALIBRATION_FRAMES // len(shards))
    frames, objects, episodes = [], [], []
    for shard in shards:  # every episode contributes, so the probe can hold out whole episodes
        table = pq.read_table(shard, columns=["episode_id", "frame", "objects"])
        rows = np.linspace(0, table.num_rows - 1, min(per_shard, table.num_rows)).astype(int)
        table = table.take(rows)
        frames.append(frames_to_array(table["frame"], frame_shape))
        objects += table["objects"].to_pylist()
        episodes.append(table["episode_id"].to_numpy())
    check = ray.remote(bfloat16_check).options(num_cpus=config.embed.num_cpus, num_gpus=config.embed.num_gpus)
    dtype, numbers = ray.get(check.remote(config.vlm, model_path, game, np.concatenate(frames), objects,
                                          np.concatenate(episodes), config.encoder.inputs))
    print(f"embed: vlm.dtype auto -> {dtype} ({numbers['reason']})")
    return dtype, numbers


def bfloat16_check(vlm_config: VLMConfig, model_path: str, game: str, frames: np.ndarray, objects_json: list[str],
                   episodes: np.ndarray, inputs: str = "llm") -> tuple[str, dict]:
    """('bfloat16' or 'float32', the numbers): bfloat16 iff this device computes it natively and the mean ridge
    probe R^2 of the annotated game state (held-out episodes), in the states of `inputs` (encoder.inputs), moves by
    at most DTYPE_R2_TOLERANCE from float32's."""
    import torch

    from envenc_ray.data.probes import probe_targets, ridge_probe_r2
    from envenc_ray.vlm.backbone import TruncatedVLM, native_bfloat16

    if not native_bfloat16(vlm_config.device):
        return "float32", {"reason": f"{vlm_config.device} does not compute bfloat16 natively"}
    names = np.unique(episodes)
    held_out = np.isin(episodes, names[-max(1, len(names) // 4):]) if len(names) > 1 else (
        np.arange(len(episodes)) >= len(episodes) * 3 // 4)  # one episode: its last quarter
    train, val = np.flatnonzero(~held_out), np.flatnonzero(held_out)
    targets = probe_targets(objects_to_table(objects_json), train, val)
    if not targets:
        return "float32", {"reason": "no annotated game state varies in the recorded frames to test bfloat16 against"}
    set_torch_threads(vlm_config.num_threads or 1)
    hidden, r2 = {}, {}
    for dtype in ("float32", "bfloat16"):
        vlm = TruncatedVLM.from_config(vlm_config.model_copy(update={"dtype": dtype}), model_path=model_path, game=game,
                                       output=inputs)
        with torch.inference_mode():
            hidden[dtype] = np.concatenate([vlm.embed(frames[i: i + 64]).cpu().numpy() for i in range(0, len(frames), 64)])
        r2[dtype] = float(np.mean(list(ridge_probe_r2(hidden[dtype], targets, train, val).values())))
        del vlm
    reference = hidden["float32"].reshape(len(frames), -1)
    spread = np.linalg.norm(reference - reference.mean(0))
    numbers = {"frames": len(frames), "probe_r2_float32": r2["float32"], "probe_r2_bfloat16": r2["bfloat16"],
               "centred_relative_error": float(np.linalg.norm(hidden["bfloat16"].reshape(len(frames), -1) - reference)
                                               / spread) if spread else None,
               "tolerance": DTYPE_R2_TOLERANCE}
    moved = abs(r2["bfloat16"] - r2["float32"])
    within = moved <= DTYPE_R2_TOLERANCE
    numbers["reason"] = (f"bfloat16 moves the probe R^2 of the game state by {moved:.3f} "
                         f"({'within' if within else 'over'} the {DTYPE_R2_TOLERANCE} tolerance)")
    return ("bfloat16" if within else "float32"), numbers
