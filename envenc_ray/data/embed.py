"""Stage `embed`: the frozen, truncated VLM over every recorded frame -> <run>/hidden/*.parquet.

Ray Data streams the frame shards through an actor pool (one TruncatedVLM per actor, loaded once), so
the same code runs one CPU actor on a laptop or one GPU actor per device on a cluster. The output is
written into a temporary folder that is renamed to hidden/ only when complete. With vlm.pooling 'tokens'
each row holds the frame's (T, D) per-token states, stored float16 (T times the pooled size). encoder.inputs
says which states: the LLM's ('llm'), the vision tower's before the projector, averaged over patches
('vision'), or both concatenated ([llm, vision], 'both'); `_embed.json` records it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads

from envenc_ray.config import EnvEncConfig, VLMConfig
from envenc_ray.data.collect import read_frame_shape
from envenc_ray.data.schema import frames_to_array, hidden_column, hidden_schema, hidden_shape_of, list_shards
from envenc_ray.files import read_json, replaced_atomically
from envenc_ray.layout import RunLayout, resolve_model_path
from envenc_ray.runtime import set_torch_threads
from envenc_ray.storage import readable, remote_staging

logger = logging.getLogger(__name__)

META_FILE = "_embed.json"


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

    from envenc_ray.encoder.models import check_pooling
    from envenc_ray.runtime import ensure_ray

    check_pooling(config.encoder.kind, config.vlm.pooling)  # first: per-token states no encoder reads are waste
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
    paths, filesystem = readable(shards)  # read tasks run on any node: on a URI run root they read it there
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, columns=["episode_id", "step", "frame", "objects"])
    hidden = dataset.map_batches(
        HiddenStates,
        fn_constructor_kwargs=dict(
            vlm_config=config.vlm,
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
                        "seconds": seconds}, indent=2)
        )
    summary = EmbedSummary(frames, hidden_size, seconds, skipped=False, hidden_shape=hidden_shape)
    print(
        f"embed: {frames} frames -> {hidden_dir} ({config.encoder.inputs} states, shape {hidden_shape}) in "
        f"{seconds:.1f} s, {summary.frames_per_second:.1f} frames/s"
    )
    return summary
