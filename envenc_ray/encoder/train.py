"""Stage `train-encoder`: an autoencoder over <run>/hidden/ trained by Ray Train, exported to <run>/encoder/.

Read top to bottom, `train_encoder` is:

  1. read     hidden/*.parquet through Ray Data; sort by (episode, step); build each frame's window;
              split train/validation BY EPISODE; normalisation statistics and raw-hidden-state baselines
  2. train    a `TorchTrainer` (num_workers x cpus_per_worker) running `train_loop_per_worker`:
              one checkpoint per epoch, early stopping, and resume from the latest checkpoint when the
              same training is started again (Ray Train restores it from <run>/encoder_train/<key>/)
  3. export   the best epoch's encoder (decoder dropped) + config.json + metrics.json into encoder/,
              written under a temporary name and renamed when complete
  4. atariari the AtariARI probes (per RAM byte, weighted F1 on the validation episodes) of the hidden
              states and of the exported encoder's latents, from the RAM frames/ recorded with each frame

Data path: the Train dataset holds row indices, not windows. Each worker gets the (N, D) hidden-state
matrix ((N, T, D) per-token states for the tokens encoder) once through the object store (zero-copy) and
gathers the (B, k, ...) windows of its batch itself; materialising every window in the dataset would
store each hidden state k times.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envenc_ray.config import EncoderConfig, EnvEncConfig, check_hidden_kind, content_hash
from envenc_ray.data.embed import META_FILE as EMBED_META
from envenc_ray.data.schema import (hidden_shape_of, hidden_to_array, list_shards, objects_to_table, read_table,
                                    wrong_column_types)
from envenc_ray.data.probes import probe_targets, ridge_probe_r2, split_by_episode
from envenc_ray.encoder.metrics import atariari_f1, consecutive_pairs, mean_cosine, probe_means, with_velocities
from envenc_ray.envs.annotate import ATARIARI_RAM
from envenc_ray.errors import ConfigError, DataError
from envenc_ray.files import json_safe, read_json, write_json_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.runtime import tell_user
from envenc_ray.storage import readable
from envenc_ray.train_jobs import (agreed_by_rank0, fit, fresh_state, note_epoch, report_epoch, resume_or_start,
                                   save_checkpoint)
from envenc_ray.vlm.backbone import resolve_dtype

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("episode_id", "step", "hidden")  # `objects` is optional: without it, no probes
PROBE_MAX_TRAIN_ROWS = 20_000  # linear probes fit on at most this many train frames (SVD cost ~ rows * D^2)
# Flattened per-token states are T*D ~ 10^4 wide, wider than the rows: the probe's cost is rows^2 * T*D
# (2048 rows of the tiny VLM's 75 x 128 tokens: a few seconds here, and ~0.4 GB).
PROBE_MAX_TRAIN_ROWS_TOKENS = 2_048
# Settings that change how long or where training runs, not what an epoch computes: a rerun that only
# changes these continues the same training (e.g. more epochs after an interruption or early stop).
RESUMABLE_SETTINGS = ("epochs", "patience", "num_workers", "cpus_per_worker", "report_poll_s")


@dataclass
class HiddenData:
    """The hidden-state artifact in memory, rows sorted by (episode_id, step)."""

    episode_ids: np.ndarray  # (N,) int64
    steps: np.ndarray  # (N,) int64
    hidden: np.ndarray  # (N, D) float32, or (N, T, D) per-token states
    objects: dict[str, np.ndarray]  # numeric annotation -> (N,) float64

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[-1]

    @property
    def hidden_shape(self) -> tuple[int, ...]:
        """One frame's hidden state: (D,) or (T, D)."""
        return tuple(self.hidden.shape[1:])


def train_encoder(config: EnvEncConfig) -> dict:
    """Train the encoder of `config.encoder` on <run>/hidden/ and export it to <run>/encoder/.

    Skips (and says so) when encoder/ already holds an export of this config and these hidden states.
    Returns a summary: skipped, epochs, best epoch, resumed_from_epoch, final metrics, phase timings.
    """

    layout = RunLayout.of(config)
    hidden_dir, encoder_dir = layout.hidden, layout.encoder
    shards, hidden_shape, fingerprint = check_shards(hidden_dir)
    check_hidden_kind(config.encoder.kind, len(hidden_shape) == 2, f"{hidden_dir} holds")
    embed_meta = read_json(hidden_dir / EMBED_META) or {}
    embedded = embed_meta.get("inputs", "llm")  # hidden/ from before encoder.inputs: llm
    if embedded != config.encoder.inputs:
        raise DataError(f"{hidden_dir} holds {embedded!r} states but encoder.inputs is {config.encoder.inputs!r}; "
                        "rerun `envenc embed` with this config")
    config_hash = output_hash(config)
    reason = encoder_current(config)
    if reason:
        print(f"train-encoder: skipped, {reason}")
        return {"skipped": True, "encoder_dir": str(encoder_dir), **_summary(read_json(encoder_dir / "metrics.json"))}

    import ray

    from envenc_ray.encoder.export import export_encoder
    from envenc_ray.encoder.models import build_windows, effective_window
    from envenc_ray.runtime import ensure_ray

    ensure_ray()
    _check_resources(config.encoder)
    timings: dict[str, float] = {}

    # 1. read
    started = time.perf_counter()
    data = read_hidden(shards, hidden_shape)
    window = effective_window(config.encoder)
    windows = build_windows(data.episode_ids, data.steps, window)
    train_rows, val_rows = split_by_episode(data.episode_ids, config.encoder.val_fraction, config.experiment.seed)
    mean, std = data.hidden[train_rows].mean(0), data.hidden[train_rows].std(0)
    val_pairs = consecutive_pairs(data.episode_ids, val_rows)
    targets = probe_targets(with_velocities(data.objects, data.episode_ids, data.steps), train_rows, val_rows)
    probe_rows = probe_subsample(train_rows, hidden_shape, config.experiment.seed)
    standardized = (data.hidden - mean) / np.where(std > 1e-6, std, 1.0)
    baseline = {
        "val_consecutive_cosine_hidden": mean_cosine(data.hidden, val_pairs),
        "val_consecutive_cosine_hidden_centred": mean_cosine(data.hidden, val_pairs, centred=True),
        "val_consecutive_cosine_hidden_standardized": mean_cosine(standardized, val_pairs),
        "probe_r2_hidden": ridge_probe_r2(data.hidden, targets, probe_rows, val_rows),
    }
    baseline["probe_r2_hidden_mean"], baseline["probe_r2_hidden_velocity_mean"] = probe_means(baseline["probe_r2_hidden"])
    timings["read_s"] = time.perf_counter() - started
    logger.info("read %d frames (%d episodes, hidden state shape %s) in %.1f s", len(data.hidden),
                len(np.unique(data.episode_ids)), data.hidden_shape, timings["read_s"])

    # 2. train
    started = time.perf_counter()
    loop_config = {
        "encoder": config.encoder.model_dump(mode="json"),
        "seed": config.experiment.seed,
        "session": uuid.uuid4().hex[:8],  # tells this call's epochs from those of an interrupted earlier one
        "hidden": ray.put(data.hidden),  # once into the object store; workers read it zero-copy
        "windows": ray.put(windows),
        "train_rows": train_rows,
        "val_rows": val_rows,
        "val_pairs": val_pairs,
        "probe_rows": probe_rows,
        "probe_targets": targets,
        "mean": mean,
        "std": std,
        "baseline": {k: v for k, v in baseline.items() if not isinstance(v, dict)},
    }
    state, best_checkpoint = _fit(config, loop_config, resume_key(config, fingerprint))
    timings["train_s"] = time.perf_counter() - started

    # 3. export
    started = time.perf_counter()
    metrics = {
        "config_hash": config_hash,
        "kind": config.encoder.kind,
        "hidden_size": data.hidden_size,
        "hidden_shape": list(data.hidden_shape),
        "latent_dim": config.encoder.latent_dim,
        "window": window,
        "frames": {"train": int(len(train_rows)), "val": int(len(val_rows))},
        "episodes": {"train": int(len(np.unique(data.episode_ids[train_rows]))),
                     "val": int(len(np.unique(data.episode_ids[val_rows])))},
        "probe_targets": sorted(targets),
        "baseline": baseline,
        "epochs": state["history"],
        "best_epoch": state["best_epoch"],
        "stopped_early": state["epochs_since_best"] >= config.encoder.patience,
        "resumed_from_epoch": _resumed_from(state["history"]),
        "timings": timings,
    }
    # the dtype embed computed the hidden states in (vlm.dtype 'auto' decided there): the VLM serving this encoder uses it
    vlm_dtype = embed_meta.get("vlm_dtype") or resolve_dtype(config.vlm.dtype, config.vlm.device)
    export_encoder(best_checkpoint, encoder_dir, config, data.hidden_shape, config_hash, fingerprint, metrics,
                   vlm_dtype)
    timings["export_s"] = time.perf_counter() - started

    # 4. atariari
    started = time.perf_counter()
    metrics["atariari_f1"] = atariari_probes(config, data, windows, probe_rows, val_rows)
    timings["atariari_s"] = time.perf_counter() - started
    write_json_atomic(encoder_dir / "metrics.json", json_safe(metrics))  # now with the AtariARI probes and times

    best = _best(metrics)
    # Wall time per epoch includes waiting for Ray Train to take the report: its controller takes one
    # per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), a floor that only tiny epochs notice.
    this_call = [e for e in state["history"] if e["session"] == state["history"][-1]["session"]]
    if len(this_call) > 1:
        print(f"train-encoder: epochs took {np.median(np.diff([e['started_at'] for e in this_call])):.2f} s wall, "
              f"{np.median([e['epoch_seconds'] for e in this_call]):.2f} s compute (medians)")
    resumed = f"(resumed after epoch {metrics['resumed_from_epoch']})" if metrics["resumed_from_epoch"] else "(fresh)"
    print(f"train-encoder: {config.encoder.kind} encoder -> {encoder_dir}: {len(state['history'])} epochs "
          f"{resumed}, best epoch {metrics['best_epoch']} "
          f"val mse {best['val_mse']:.4f}, explained variance {best['val_explained_variance']:.3f}; "
          f"read {timings['read_s']:.1f} s, train {timings['train_s']:.1f} s, export {timings['export_s']:.1f} s")
    return {"skipped": False, "encoder_dir": str(encoder_dir), **_summary(json_safe(metrics))}


# ------------------------------------------------------------------------------------------------ read


def encoder_current(config: EnvEncConfig) -> str | None:
    """Why encoder/ already holds the export of this config trained on these very hidden states, or None."""
    layout = RunLayout.of(config)
    existing, metrics = read_json(layout.encoder / "config.json"), read_json(layout.encoder / "metrics.json")
    if not existing or not metrics or existing.get("config_hash") != output_hash(config) \
            or not (layout.encoder / "model.safetensors").exists():
        return None
    try:
        fingerprint = check_shards(layout.hidden)[2]
    except DataError:
        return None  # the stage itself says what is wrong with hidden/
    if existing.get("input_fingerprint") != fingerprint:
        return None
    return (f"{layout.encoder} already holds the {existing['kind']} encoder of this config (best epoch "
            f"{metrics['best_epoch']}, val mse {_best(metrics)['val_mse']:.4f})")


def check_shards(hidden_dir: Path) -> tuple[list[Path], tuple[int, ...], str]:
    """Footers of every shard: readable, required columns, one fixed hidden state shape, rows > 0.

    Cheap (no data pages are read), so a bad artifact fails before Ray starts. Returns the shards, one
    frame's hidden state shape ((D,), or (T, D) per token) and a fingerprint of the input (names, sizes,
    row counts) that identifies these shards.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = list_shards(hidden_dir, "hidden states (envenc embed)")
    hidden_shapes, rows, identity = set(), 0, []
    for shard in shards:
        try:
            metadata = pq.read_metadata(shard)
            schema = metadata.schema.to_arrow_schema()
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{shard} is not a readable Parquet file ({error}); delete hidden/ and rerun `envenc embed`") from None
        missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
        if missing:
            raise DataError(f"{shard} lacks column(s) {', '.join(missing)}; it was not written by `envenc embed`")
        wrong = wrong_column_types(schema, REQUIRED_COLUMNS)
        if wrong:
            raise DataError(f"{shard}: column {wrong}; it was not written by `envenc embed`")
        hidden_type = schema.field("hidden").type
        hidden_shape = hidden_shape_of(hidden_type)
        if hidden_shape is None or len(hidden_shape) > 2:
            raise DataError(f"{shard}: column 'hidden' is {hidden_type}, expected a fixed-size list of floats (D) "
                            "or of T fixed-size lists of floats (per-token states)")
        hidden_shapes.add(hidden_shape)
        rows += metadata.num_rows
        identity.append((shard.name, shard.stat().st_size, metadata.num_rows))
    if len(hidden_shapes) > 1:
        raise DataError(f"the shards in {hidden_dir} mix hidden sizes {sorted(hidden_shapes)} (different VLMs or "
                        "poolings?); delete hidden/ and rerun `envenc embed`")
    if rows == 0:
        raise DataError(f"{hidden_dir} holds no rows; rerun `envenc embed` on recorded frames")
    hidden_shape = hidden_shapes.pop()
    fingerprint = content_hash([list(hidden_shape), identity])  # no mappings inside: the same as without sorted keys
    return shards, hidden_shape, fingerprint


def read_hidden(shards: list[Path], hidden_shape: tuple[int, ...]) -> HiddenData:
    """All rows of the shards through Ray Data, sorted by (episode_id, step)."""
    import pyarrow as pa
    import ray

    try:
        names = set(pa.unify_schemas([_schema(s) for s in shards]).names)
        columns = [c for c in (*REQUIRED_COLUMNS, "objects") if c in names]
        paths, filesystem = readable(shards)  # read tasks run on any node: on a URI run root they read it there
        dataset = ray.data.read_parquet(paths, filesystem=filesystem, columns=columns)
        tables = ray.get(dataset.to_arrow_refs())
    except (ray.exceptions.RayError, pa.ArrowException, OSError) as error:
        raise DataError(f"reading {shards[0].parent} failed ({_root_cause(error)}); "
                        "delete hidden/ and rerun `envenc embed`") from None
    tables = [t for t in tables if t.num_rows]
    episode_ids = np.concatenate([t["episode_id"].to_numpy().astype(np.int64) for t in tables])
    steps = np.concatenate([t["step"].to_numpy().astype(np.int64) for t in tables])
    hidden = np.concatenate([hidden_to_array(t["hidden"]) for t in tables])
    if hidden.shape[1:] != tuple(hidden_shape):
        raise DataError(f"hidden states are of shape {hidden.shape[1:]}, the shard schemas say {tuple(hidden_shape)}")
    if not np.isfinite(hidden).all():
        raise DataError(f"{shards[0].parent} holds NaN or infinite hidden states; check the VLM and rerun `envenc embed`")
    objects_json = [text or "{}" for t in tables for text in t["objects"].to_pylist()] if "objects" in columns else []
    order = np.lexsort((steps, episode_ids))
    try:
        objects = objects_to_table([objects_json[i] for i in order]) if objects_json else {}
    except json.JSONDecodeError as error:
        raise DataError(f"column 'objects' in {shards[0].parent} holds invalid JSON ({error})") from None
    return HiddenData(episode_ids[order], steps[order], hidden[order], objects)


def _root_cause(error: BaseException) -> str:
    """The underlying 'SomeError: message' line: Ray Data wraps it in task tracebacks and retry advice."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__
    for link in chain:
        for line in reversed(str(link).splitlines()):
            if re.match(r"^[\w.]+(Error|Invalid|Exception): ", line.strip()):
                return line.strip()
    lines = [line.strip() for line in str(chain[0]).splitlines() if line.strip()]
    return lines[-1] if lines else type(chain[0]).__name__


def _schema(shard: Path):
    import pyarrow.parquet as pq

    return pq.read_schema(shard)


def probe_subsample(train_rows: np.ndarray, hidden_shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The train rows the linear probes fit on (the hidden-state and the latent probes alike): a seeded
    subsample of at most PROBE_MAX_TRAIN_ROWS, or PROBE_MAX_TRAIN_ROWS_TOKENS for per-token states (T, D)."""
    limit = PROBE_MAX_TRAIN_ROWS_TOKENS if len(hidden_shape) == 2 else PROBE_MAX_TRAIN_ROWS
    return _subsample(train_rows, limit, seed)


def _subsample(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))


# ----------------------------------------------------------------------------------------------- hashes


def output_hash(config: EnvEncConfig) -> str:
    """What determines encoder/: its own settings and every stage upstream of hidden/ (as `embed` hashes)."""
    return config.section_hash("experiment", "env", "collect", "vlm", "stage2", "advise", "embed", "encoder")


def resume_key(config: EnvEncConfig, input_fingerprint: str) -> str:
    """Names the Ray Train run folder: the same training (config minus RESUMABLE_SETTINGS, same input)."""
    neutral = {name: getattr(EncoderConfig(), name) for name in RESUMABLE_SETTINGS}
    training = config.model_copy(update={"encoder": config.encoder.model_copy(update=neutral)})
    return f"{config.encoder.kind}-{training.section_hash('experiment', 'encoder')}-{input_fingerprint[:8]}"


# ----------------------------------------------------------------------------------------------- train


def _check_resources(encoder: EncoderConfig) -> None:
    import ray

    needed, available = encoder.num_workers * encoder.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if needed > available:
        # Ray Train would wait for these CPUs forever, silently.
        raise ConfigError(f"encoder training needs {encoder.num_workers} x {encoder.cpus_per_worker} = {needed:g} "
                          f"CPUs, the Ray cluster has {available:g}; lower encoder.num_workers or "
                          "encoder.cpus_per_worker (fractions such as 0.5 are fine)")


def _fit(config: EnvEncConfig, loop_config: dict, key: str) -> tuple[dict, object]:
    """Run (or continue) the Ray Train run named `key` under <run>/encoder_train/: (the final training state, the
    checkpoint of the lowest held-out MSE)."""
    import pyarrow as pa
    import ray

    enc = config.encoder
    return fit(train_loop_per_worker, loop_config, what="encoder training",
               storage=RunLayout.of(config).encoder_train.resolve(), name=key, workers=enc.num_workers,
               cpus_per_worker=enc.cpus_per_worker, use_gpu=False, score="val_mse", poll_s=enc.report_poll_s,
               datasets={"train": ray.data.from_arrow(pa.table({"row": loop_config["train_rows"]}))})


def train_loop_per_worker(loop: dict) -> None:
    """One Train worker: build the model, restore the latest checkpoint if any, train epochs, report each."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from envenc_ray.encoder.models import WINDOWED_KINDS, build_autoencoder

    torch.set_num_threads(1)  # N workers on N cores: one thread each, or they fight over the cores
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    enc = EncoderConfig.model_validate(loop["encoder"])
    hidden, windows = ray.get(loop["hidden"]), ray.get(loop["windows"])
    windowed = enc.kind in WINDOWED_KINDS

    def batch(rows: np.ndarray) -> torch.Tensor:
        return encoder_inputs(hidden, windows, rows, windowed)

    torch.manual_seed(loop["seed"])  # identical initial weights on every worker
    model = build_autoencoder(enc, hidden.shape[1:])
    model.encoder_module().set_normalization(loop["mean"], loop["std"])
    init_rows = _subsample(loop["train_rows"], 1024, loop["seed"])
    model.init_codebook(batch(init_rows), generator=torch.Generator().manual_seed(loop["seed"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=enc.lr)
    state = resume_or_start("encoder", rank, model.load_state_dict, optimizer, fresh_state("best_val_mse"),
                            "best_val_mse")
    trained = ray.train.torch.prepare_model(model)  # DDP when world_size > 1
    shard = ray.train.get_dataset_shard("train")

    for epoch in range(state["epoch"] + 1, enc.epochs + 1):
        if state["epochs_since_best"] >= enc.patience:
            break  # a resumed run that had already stopped early
        started, started_at = time.perf_counter(), time.time()
        trained.train()
        loss_sum, seen = 0.0, 0
        for rows in shard.iter_batches(batch_size=enc.batch_size, batch_format="numpy",
                                       local_shuffle_buffer_size=max(4 * enc.batch_size, 1024),
                                       local_shuffle_seed=loop["seed"] * 1_000_003 + epoch * 101 + rank):
            x = batch(rows["row"])
            reconstruction, _, aux_loss = trained(x)
            loss = F.mse_loss(reconstruction, model.normalize(x)) + aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(x), seen + len(x)
        totals = torch.tensor([loss_sum, seen], dtype=torch.float64)
        if world_size > 1:
            dist.all_reduce(totals)
        train_seconds = time.perf_counter() - started

        # Rank 0 evaluates on the full train and validation sets; the others wait for its verdict so
        # that every worker takes the same early-stopping decision.
        entry = _evaluate(model, batch, loop, enc) if rank == 0 else {}
        val_mse = agreed_by_rank0(entry.get("val_mse", 0.0), world_size)
        note_epoch(state, epoch, val_mse, "best_val_mse")
        entry.update(
            epoch=epoch,
            train_loss=float(totals[0] / max(totals[1], 1)),
            train_seconds=train_seconds,
            epoch_seconds=time.perf_counter() - started,  # compute only; see started_at for wall time
            started_at=started_at,  # differences include the report/checkpoint wait of Ray Train
            session=loop["session"],
        )
        state["history"].append(entry)
        reported = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and v is not None}
        reported["val_mse"] = val_mse
        report_epoch(reported, epoch, rank,
                     lambda directory: save_checkpoint(directory, model.state_dict(), optimizer, state))
        if rank == 0:
            tell_user(f"encoder epoch {epoch}/{enc.epochs}: train loss {entry['train_loss']:.4f}, val mse "
                      f"{val_mse:.4f}, explained variance {entry['val_explained_variance']:.3f}, probe R2 latent "
                      f"{_fmt(entry['probe_r2_latent_mean'])} (hidden {_fmt(entry['probe_r2_hidden_mean'])}), "
                      f"{entry['epoch_seconds']:.2f} s")


def _evaluate(model, batch, loop: dict, enc: EncoderConfig) -> dict:
    """Rank 0's per-epoch metrics over the full train and validation sets (eval mode, no gradients)."""
    import torch

    started = time.perf_counter()
    model.eval()
    train_rows, val_rows = loop["train_rows"], loop["val_rows"]
    all_rows = np.concatenate([train_rows, val_rows])
    n = int(all_rows.max()) + 1
    latents = np.zeros((n, enc.latent_dim), dtype=np.float32)
    codes = np.zeros(n, dtype=np.int64)
    sse = np.zeros(n)  # per-row squared reconstruction error, summed over the reconstructed dims
    val_sum, val_sum_sq, dims = 0.0, 0.0, 0
    is_val = np.zeros(n, dtype=bool)
    is_val[val_rows] = True
    with torch.no_grad():
        for start in range(0, len(all_rows), 1024):
            rows = all_rows[start:start + 1024]
            x = batch(rows)
            reconstruction, latent, _ = model(x)
            target = model.normalize(x)
            latents[rows] = latent.numpy()
            sse[rows] = ((reconstruction - target) ** 2).flatten(1).sum(1).double().numpy()
            dims = target[0].numel()
            if model.encoder_module().quantizer is not None:
                codes[rows] = model.encoder_module().codes(x).numpy()
            val_target = target[torch.from_numpy(is_val[rows])].flatten(1).double()
            val_sum = val_sum + val_target.sum(0)
            val_sum_sq = val_sum_sq + (val_target**2).sum(0)
    model.train()
    n_val = len(val_rows)
    val_total = float((val_sum_sq - val_sum**2 / n_val).sum())  # SST around the validation mean
    probe = ridge_probe_r2(latents, loop["probe_targets"], loop["probe_rows"], val_rows)
    entry = {
        "train_mse": float(sse[train_rows].sum() / (len(train_rows) * dims)),
        "val_mse": float(sse[val_rows].sum() / (n_val * dims)),
        "val_explained_variance": float(1 - sse[val_rows].sum() / val_total) if val_total > 0 else float("nan"),
        "val_consecutive_cosine_latent": mean_cosine(latents, loop["val_pairs"]),
        "val_consecutive_cosine_latent_centred": mean_cosine(latents, loop["val_pairs"], centred=True),
        **loop["baseline"],
        "probe_r2_latent": probe,
        "probe_r2_latent_mean": probe_means(probe)[0],
        "probe_r2_latent_velocity_mean": probe_means(probe)[1],
        "codebook_usage": None,
        "codebook_perplexity": None,
    }
    if model.encoder_module().quantizer is not None:
        counts = np.bincount(codes[val_rows], minlength=enc.codebook_size)
        p = counts[counts > 0] / n_val
        entry["codebook_usage"] = float((counts > 0).mean())  # fraction of codes the validation frames use
        entry["codebook_perplexity"] = float(np.exp(-(p * np.log(p)).sum()))  # effective number of codes
    entry["eval_seconds"] = time.perf_counter() - started
    return entry


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def encoder_inputs(hidden: np.ndarray, windows: np.ndarray, rows: np.ndarray, windowed: bool):
    """The encoder's input for `rows`: their (B, k, D) or (B, k, T, D) windows, or the frames' own states."""
    import torch

    x = hidden[windows[rows]]  # a copy
    return torch.from_numpy(x if windowed else x[:, -1])


# ---------------------------------------------------------------------------------------------- atariari


def atariari_probes(config: EnvEncConfig, data: HiddenData, windows: np.ndarray, train_rows: np.ndarray,
                    val_rows: np.ndarray) -> dict[str, dict[str, float]]:
    """AtariARI F1 per RAM variable of the (pooled) hidden states and of the exported encoder's latents, on the
    ridge probes' rows; {} for a game without AtariARI variables, or without frames/ to give the RAM (hidden
    states made elsewhere)."""
    import torch

    from envenc_ray.encoder.export import load_encoder
    from envenc_ray.encoder.models import WINDOWED_KINDS

    layout = RunLayout.of(config)
    addresses = ATARIARI_RAM.get(layout.game)
    if addresses is None or not any(layout.frames.glob("*.parquet")):
        logger.info("AtariARI probes skipped: no AtariARI variables for %s, or no RAM in %s", layout.game, layout.frames)
        return {}
    ram = read_ram(layout.frames, data.episode_ids, data.steps)
    encoder, windowed = load_encoder(layout.encoder), config.encoder.kind in WINDOWED_KINDS
    rows = np.arange(len(data.hidden))
    with torch.no_grad():
        latents = np.concatenate([encoder(encoder_inputs(data.hidden, windows, rows[start:start + 1024], windowed)).numpy()
                                  for start in range(0, len(rows), 1024)])
    # Per-token states are T*D wide (10^6 for a real VLM): a classifier per byte over them would hold T*D x
    # values weights; their probe is the ridge one, and AtariARI's is the latent's only.
    pooled = data.hidden.ndim == 2
    return {"hidden": atariari_f1(data.hidden, ram, addresses, train_rows, val_rows) if pooled else {},
            "latent": atariari_f1(latents, ram, addresses, train_rows, val_rows)}


def read_ram(frames_dir: Path, episode_ids: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(N, 128) uint8: the RAM frames/ recorded with each of the rows (sorted by episode and step) of hidden/."""
    table = read_table(frames_dir, "frames (envenc collect)", ("episode_id", "step", "ram"), only_required=True)
    frame_episodes, frame_steps = table["episode_id"].to_numpy(), table["step"].to_numpy()
    order = np.lexsort((frame_steps, frame_episodes))
    if not (np.array_equal(frame_episodes[order], episode_ids) and np.array_equal(frame_steps[order], steps)):
        raise DataError(f"{frames_dir} and the hidden states hold different frames; rerun `envenc embed`")
    ram = np.frombuffer(b"".join(table["ram"].to_pylist()), dtype=np.uint8).reshape(-1, 128)
    return ram[order]


# ------------------------------------------------------------------------------------------ checkpoints


def _resumed_from(history: list[dict]) -> int:
    """Last epoch finished by an earlier call (0: this call trained from scratch)."""
    if not history:
        return 0
    latest_session = history[-1]["session"]
    earlier = [e["epoch"] for e in history if e["session"] != latest_session]
    return max(earlier, default=0)


# ---------------------------------------------------------------------------------------------- helpers


def _best(metrics: dict) -> dict:
    return next(e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"])


def _summary(metrics: dict) -> dict:
    return {
        "kind": metrics["kind"],
        "epochs": len(metrics["epochs"]),
        "best_epoch": metrics["best_epoch"],
        "stopped_early": metrics["stopped_early"],
        "resumed_from_epoch": metrics["resumed_from_epoch"],
        "best": _best(metrics),
        "timings": metrics["timings"],
    }


__all__ = ["train_encoder", "encoder_current", "check_shards", "read_hidden", "probe_subsample",
           "output_hash", "resume_key", "train_loop_per_worker", "HiddenData"]
