"""Stage `advise` (stage 2, method 'finetuned'): teach the VLM the game before its hidden states are read.

    (frame, text) pairs: the recorded frames of every game in advise.games, each with its RAM-grounded
      advice and/or description (envs/annotate.answer_text), or a user file of (image, text) rows
    -> held-out episodes: the same seeded split the encoder's probes use (encoder.val_fraction), so probe
       numbers are measured on episodes that no stage trained on
    -> Ray Train TorchTrainer: causal-LM loss on the answer tokens only, one checkpoint per epoch, early
       stopping on the held-out loss, resume after a crash (vlm/finetune.py holds the model side)
    -> the best epoch exported in Hugging Face format (LoRA merged), then the held-out accuracy of the move
       parsed from greedy generation, against the RAM heuristic's move and the majority-move rate
    -> <run_root>/_shared/advise-<hash>/{vlm/, metrics.json}; <run>/advise.json points at it.

The finetuned VLM is content-addressed: <hash> covers the settings it depends on and the bytes of its
training data, so runs and experiment arms with the same inputs share one and never retrain it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from envenc_ray.config import EnvEncConfig, advise_settings_hash, content_hash, game_name
from envenc_ray.data.collect import collect, read_frame_shape
from envenc_ray.data.probes import split_by_episode
from envenc_ray.data.schema import frames_to_array, list_shards, read_table
from envenc_ray.envs.annotate import ANNOTATED_GAMES, advised_phrase, answer_text
from envenc_ray.errors import ConfigError, DataError
from envenc_ray.files import json_safe, read_json, replaced_atomically, write_json_atomic
from envenc_ray.layout import RunLayout, shared_advise_dir, shared_frames_root
from envenc_ray.runtime import tell_user
from envenc_ray.train_jobs import (agreed_by_rank0, checkpoint_weights, fit, fresh_state, note_epoch, report_epoch,
                                   resume_or_start, save_checkpoint, train_epoch)
from envenc_ray.vlm.paths import base_model_path

# a checkpoint holds only what advise trains (LoRA adapters or the modules left unfrozen), not the whole VLM
WEIGHTS_FILE = "trainable.safetensors"
FRAME_SIZE = (210, 160)  # user images are resized to ALE's frame size: the size embed and serving see
USER_COLUMNS = ("image", "text")
FRAME_COLUMNS = ("episode_id", "step", "frame", "objects", "advice")
EVAL_BATCH = 32


@dataclass
class AdviceData:
    """(frame, answer) pairs in memory, with what splits and scores them."""

    frames: np.ndarray  # (N, H, W, 3) uint8
    answers: list[str]
    groups: np.ndarray  # (N,) int64: the unit held out whole (one episode of one game)
    games: list[str]  # (N,) game of each pair ('' for user data)
    phrases: list[str | None]  # (N,) the advised move phrase of the answer, None if it names none
    source: str  # where the pairs came from, for messages
    fingerprint: str  # sha256 of the input bytes


def advise(config: EnvEncConfig) -> dict:
    """Finetune the VLM on (frame, text) pairs, unless a finetuned VLM of these inputs exists; point the run at it."""
    reason = advise_current(config)
    if reason:
        pointer = read_json(RunLayout.of(config).advise_pointer)
        print(f"advise: skipped, {reason}")
        return {"skipped": True, "vlm": pointer["vlm"], **_summary(read_json(Path(pointer["metrics"])))}
    data = advice_data(config)
    key = hashlib.sha256(f"{advise_settings_hash(config)}-{data.fingerprint}".encode()).hexdigest()[:16]
    out_dir = shared_advise_dir(config, key)
    if (out_dir / "metrics.json").is_file():
        metrics = json.loads((out_dir / "metrics.json").read_text())
        _write_pointer(config, out_dir)
        print(f"advise: skipped, {out_dir / 'vlm'} is the finetuned VLM of these inputs "
              f"(best epoch {metrics['best_epoch']}, held-out loss {metrics['val_loss_best']:.3f})")
        return {"skipped": True, "vlm": str((out_dir / "vlm").resolve()), **_summary(metrics)}

    from envenc_ray.runtime import ensure_ray

    ensure_ray()
    _check_resources(config)
    base = base_model_path(config)
    timings: dict[str, float] = {}
    train_rows, val_rows = _split(data, config)
    print(f"advise: {len(train_rows)} training and {len(val_rows)} held-out pairs ({data.source}), "
          f"{config.advise.method} finetuning of {base}")

    started = time.perf_counter()
    state, best = _fit(config, data, base, train_rows, val_rows, out_dir)
    timings["train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    with replaced_atomically(out_dir) as staging:
        _export(config, base, best, staging / "vlm")
        timings["export_s"] = time.perf_counter() - started
        started = time.perf_counter()
        accuracy = advice_accuracy(staging / "vlm", config, data, val_rows)
        timings["accuracy_s"] = time.perf_counter() - started
        metrics = {
            "advise_hash": key,
            "base_model": base,
            "method": config.advise.method,
            "text": config.advise.text,
            "source": data.source,
            "pairs": {"train": int(len(train_rows)), "val": int(len(val_rows))},
            "epochs": state["history"],
            "best_epoch": state["best_epoch"],
            "stopped_early": state["epochs_since_best"] >= config.advise.patience,
            "resumed_from_epoch": state["resumed_from_epoch"],
            "val_loss_before": state["val_loss_before"],
            "val_loss_best": state["best_val_loss"],
            **accuracy,
            "timings": timings,
        }
        write_json_atomic(staging / "metrics.json", json_safe(metrics))
    shutil.rmtree(_train_dir(out_dir), ignore_errors=True)  # checkpoints were for resuming; the export is kept
    _write_pointer(config, out_dir)
    acc = metrics["action_accuracy_heldout"]
    print(f"advise: finetuned VLM -> {out_dir / 'vlm'}: best epoch {metrics['best_epoch']} of {len(state['history'])}, "
          f"held-out loss {metrics['val_loss_before']:.3f} -> {metrics['val_loss_best']:.3f}"
          + (f", advised move accuracy {acc:.3f} (chance {metrics['chance_accuracy']:.3f})" if acc is not None else "")
          + f"; train {timings['train_s']:.0f} s")
    return {"skipped": False, "vlm": str((out_dir / "vlm").resolve()), **_summary(json_safe(metrics))}


def advise_current(config: EnvEncConfig) -> str | None:
    """Why <run>/advise.json already points at the finetuned VLM of these settings and data, or None.

    Recorded frames are a function of the settings (which the hash covers); a user's advise.data file is
    compared by size and modification time, so an edited file is finetuned on again.
    """
    pointer = read_json(RunLayout.of(config).advise_pointer)
    if pointer is None or pointer.get("settings_hash") != advise_settings_hash(config):
        return None
    if not (Path(pointer["vlm"]) / "config.json").is_file() or not Path(pointer["metrics"]).is_file():
        return None
    if pointer.get("data_file") != _data_file_stamp(config):
        return None
    metrics = read_json(Path(pointer["metrics"])) or {}
    return (f"{pointer['vlm']} is the finetuned VLM of these inputs (best epoch {metrics.get('best_epoch')}, "
            f"held-out loss {metrics.get('val_loss_best', float('nan')):.3f})")


def _data_file_stamp(config: EnvEncConfig) -> dict | None:
    if not config.advise.data:
        return None
    path = Path(config.advise.data).resolve()
    stat = path.stat() if path.is_file() else None
    return {"path": str(path), "size": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}


def _write_pointer(config: EnvEncConfig, out_dir: Path) -> None:
    write_json_atomic(RunLayout.of(config).advise_pointer, {"vlm": str((out_dir / "vlm").resolve()),
                                                            "settings_hash": advise_settings_hash(config),
                                                            "metrics": str((out_dir / "metrics.json").resolve()),
                                                            "data_file": _data_file_stamp(config)})


def _summary(metrics: dict) -> dict:
    keys = ("best_epoch", "val_loss_before", "val_loss_best", "action_accuracy_heldout", "chance_accuracy")
    return {key: metrics[key] for key in keys}


# ------------------------------------------------------------------------------------------------ data


def advice_data(config: EnvEncConfig) -> AdviceData:
    """The (frame, answer) pairs of `config.advise`: a user file, or the recorded frames of each game."""
    if config.advise.data:
        return user_pairs(Path(config.advise.data))
    games = [game_name(g) for g in (config.advise.games or [config.env.game])]
    unknown = [g for g in games if g not in ANNOTATED_GAMES]
    if unknown:
        raise ConfigError(f"advise.games {unknown} have no RAM annotations to make text from; use games from "
                          f"{', '.join(ANNOTATED_GAMES)}, or give (image, text) pairs in advise.data")
    parts = [recorded_pairs(game_frames_dir(config, game), game, index, config) for index, game in enumerate(games)]
    digest = hashlib.sha256("".join(part.fingerprint for part in parts).encode()).hexdigest()
    return AdviceData(
        frames=np.concatenate([p.frames for p in parts]),
        answers=[a for p in parts for a in p.answers],
        groups=np.concatenate([p.groups for p in parts]),
        games=[g for p in parts for g in p.games],
        phrases=[ph for p in parts for ph in p.phrases],
        source=", ".join(p.source for p in parts),
        fingerprint=digest,
    )


def game_frames_dir(config: EnvEncConfig, game: str) -> Path:
    """env.game's frames are the run's own; another game's are recorded once with the same collect settings
    into a shared folder named by what determines them."""
    if game == RunLayout.of(config).game:
        return RunLayout.of(config).frames
    env = config.env.model_copy(update={"game": game})
    recipe = {"seed": config.experiment.seed, "env": env.model_dump(mode="json"),
              "collect": config.collect.model_dump(mode="json")}
    digest = content_hash(recipe)[:12]
    name = f"{game}-{digest}"
    experiment = config.experiment.model_copy(update={"name": name, "run_root": str(shared_frames_root(config))})
    recording = config.model_copy(update={"env": env, "experiment": experiment})
    frames_dir = RunLayout.of(recording).frames
    if not (frames_dir / "_collect.json").is_file() or len(list(frames_dir.glob("episode-*.parquet"))) < config.collect.episodes:
        collect(recording)
    return frames_dir


def recorded_pairs(frames_dir: Path, game: str, game_index: int, config: EnvEncConfig) -> AdviceData:
    """Pairs of one game's recorded frames: answer text from the frame's own RAM annotation."""
    table = read_table(frames_dir, "frames (envenc collect)", FRAME_COLUMNS)
    rows = np.arange(table.num_rows)
    limit = config.advise.max_pairs_per_game
    if limit is not None and limit < len(rows):
        rows = np.sort(np.random.default_rng(config.experiment.seed).choice(rows, size=limit, replace=False))
        table = table.take(rows)
    frames = frames_to_array(table["frame"], read_frame_shape(frames_dir))
    objects = [json.loads(text) for text in table["objects"].to_pylist()]
    advice = table["advice"].to_pylist()
    if not all(objects) or not all(advice):
        raise DataError(f"{frames_dir} holds frames without annotations (recorded with policy 'random' for a game "
                        "without annotations?); advise needs the objects and advice columns filled")
    answers = [answer_text(game, o, a, config.advise.text) for o, a in zip(objects, advice)]
    episodes = table["episode_id"].to_numpy().astype(np.int64)
    digest = hashlib.sha256()
    for shard in list_shards(frames_dir, "frames (envenc collect)"):
        digest.update(shard.read_bytes())
    return AdviceData(
        frames=frames,
        answers=answers,
        groups=game_index * 1_000_000 + episodes,
        games=[game] * len(answers),
        phrases=[advised_phrase(game, text) for text in answers],
        source=f"{len(answers)} {game} frames in {frames_dir}",
        fingerprint=digest.hexdigest(),
    )


def user_pairs(path: Path) -> AdviceData:
    """(image, text) rows of a Parquet or JSONL file; `image` is a path (relative to the file) or image bytes.

    An optional `episode` column groups rows that are held out together (else each row is its own group).
    Every image is resized to 210x160, the frame size embed and serving see. Errors name the file, the row
    and the fix."""
    from PIL import Image, UnidentifiedImageError

    rows = _read_user_rows(path)
    frames, digest = [], hashlib.sha256(path.read_bytes())
    for index, row in enumerate(rows):
        image, text = row.get("image"), row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {index}: 'text' must be a non-empty string (got {text!r})")
        try:
            if isinstance(image, (bytes, bytearray)):
                picture = Image.open(io.BytesIO(image))
            elif isinstance(image, str):
                image_path = Path(image) if Path(image).is_absolute() else path.parent / image
                picture = Image.open(image_path)
                digest.update(image_path.read_bytes())
            else:
                raise DataError(f"{path} row {index}: 'image' must be a file path or encoded image bytes "
                                f"(got {type(image).__name__})")
            frames.append(np.asarray(picture.convert("RGB").resize(FRAME_SIZE[::-1], Image.BICUBIC)))
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"{path} row {index}: image {str(image)[:80]!r} is not readable ({error}); fix the path "
                            "(relative to the file) or the bytes") from None
    texts = [str(row["text"]) for row in rows]
    episodes = [row.get("episode", index) for index, row in enumerate(rows)]
    _, groups = np.unique(np.asarray([str(e) for e in episodes]), return_inverse=True)
    return AdviceData(frames=np.stack(frames), answers=texts, groups=groups.astype(np.int64), games=[""] * len(texts),
                      phrases=[None] * len(texts), source=f"{len(texts)} pairs in {path}", fingerprint=digest.hexdigest())


def _read_user_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"advise.data {path} does not exist; give a Parquet or JSONL file of (image, text) rows")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"{path} is not a readable Parquet file ({error})") from None
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number + 1} is not JSON ({error.msg}); write one object per "
                                    'line, e.g. {"image": "frame.png", "text": "..."}') from None
    else:
        raise DataError(f"advise.data {path} must end in .parquet or .jsonl")
    if not rows:
        raise DataError(f"{path} holds no rows; give at least two (image, text) pairs")
    missing = [c for c in USER_COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (it has {', '.join(rows[0]) or 'none'}); "
                        "each row needs 'image' (a path or bytes) and 'text'")
    return rows


def _split(data: AdviceData, config: EnvEncConfig) -> tuple[np.ndarray, np.ndarray]:
    """Held-out groups per game, drawn as the encoder draws its validation episodes (same fraction and seed)."""
    train, val = [], []
    for game in dict.fromkeys(data.games):
        rows = np.flatnonzero(np.asarray(data.games) == game)
        episode_ids = data.groups[rows] % 1_000_000 if game else data.groups[rows]
        game_train, game_val = split_by_episode(episode_ids, config.encoder.val_fraction, config.experiment.seed)
        train.append(rows[game_train])
        val.append(rows[game_val])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ----------------------------------------------------------------------------------------------- train


def _train_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f"{out_dir.name}.train")


def _check_resources(config: EnvEncConfig) -> None:
    import ray

    advise = config.advise
    needed, available = advise.num_workers * advise.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if needed > available:  # Ray Train would wait for these CPUs forever, silently
        raise ConfigError(f"advice finetuning needs {advise.num_workers} x {advise.cpus_per_worker} = {needed:g} CPUs, "
                          f"the Ray cluster has {available:g}; lower advise.num_workers or advise.cpus_per_worker")


def _fit(config: EnvEncConfig, data: AdviceData, base: str, train_rows: np.ndarray, val_rows: np.ndarray,
         out_dir: Path):
    """Run (or continue) the Ray Train job; returns the final training state and the best checkpoint."""
    import ray

    from envenc_ray.vlm.finetune import check_readout_leaves_weights, encode_pairs, load_processor

    advise = config.advise
    if advise.train == "above_readout":
        check_readout_leaves_weights(base, config.vlm.layer, config.vlm.trust_remote_code)
    processor, family, context = load_processor(base, config.vlm.trust_remote_code)
    pairs = encode_pairs(processor, family, _question(config), data.answers, tuple(data.frames.shape[1:3]),
                         context=context, source=data.source)
    loop_config = {
        "base": base,
        "advise": advise.model_dump(mode="json"),
        "vlm": config.vlm.model_dump(mode="json"),
        "seed": config.experiment.seed,
        "session": uuid.uuid4().hex[:8],
        "frames": ray.put(data.frames),
        "input_ids": ray.put(pairs.input_ids.numpy()),
        "labels": ray.put(pairs.labels.numpy()),
        "train_rows": train_rows,
        "val_rows": val_rows,
    }
    return fit(train_loop_per_worker, loop_config, what="advice finetuning", storage=_train_dir(out_dir).resolve(),
               name="run", workers=advise.num_workers, cpus_per_worker=advise.cpus_per_worker,
               use_gpu=advise.use_gpu, score="val_loss", poll_s=advise.report_poll_s)


def _question(config: EnvEncConfig) -> str:
    """The prompt the pairs answer: embed reads the hidden state where the model is about to answer it."""
    return (config.advise.question or config.vlm.prompt).format(game=RunLayout.of(config).game)


def train_loop_per_worker(loop: dict) -> None:
    """One Train worker: the trainable VLM, restored from the latest checkpoint if any, one report per epoch."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from envenc_ray.config import AdviseConfig, VLMConfig
    from envenc_ray.vlm.finetune import (IGNORE_INDEX, answer_loss, load_trainable, load_trainable_state,
                                         trainable_state)

    advise, vlm = AdviseConfig.model_validate(loop["advise"]), VLMConfig.model_validate(loop["vlm"])
    torch.set_num_threads(max(1, int(advise.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(loop["seed"])  # identical LoRA initialisation on every worker
    model, processor, family = load_trainable(
        loop["base"], method=advise.method, lora_rank=advise.lora_rank, lora_alpha=advise.lora_alpha,
        lora_dropout=advise.lora_dropout, lora_targets=advise.lora_targets, trust_remote_code=vlm.trust_remote_code,
        device=str(device), readout=(vlm.layer, vlm.final_norm) if advise.train == "above_readout" else None)
    preprocessor = family.preprocessor(processor.image_processor)
    frames = ray.get(loop["frames"])  # read-only, shared: batches index copies out of it
    input_ids, labels = (torch.tensor(ray.get(loop[key])) for key in ("input_ids", "labels"))
    train_rows, val_rows = np.array(loop["train_rows"]), np.array(loop["val_rows"])  # writable: they index tensors
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=advise.lr, weight_decay=advise.weight_decay)

    def loss_of(module, rows: np.ndarray) -> torch.Tensor:
        return answer_loss(module, family, preprocessor, frames[rows], input_ids[rows], labels[rows], device)

    @torch.no_grad()
    def held_out_loss() -> float:
        """Mean cross-entropy per answer token over every held-out pair."""
        model.eval()
        total, count = 0.0, 0
        for start in range(0, len(val_rows), advise.batch_size):
            rows = val_rows[start:start + advise.batch_size]
            tokens = int((labels[rows] != IGNORE_INDEX).sum())
            total, count = total + loss_of(model, rows).item() * tokens, count + tokens
        return total / max(count, 1)

    state = resume_or_start("advise", rank, lambda weights: load_trainable_state(model, weights), optimizer,
                            fresh_state("best_val_loss", val_loss_before=None, resumed_from_epoch=0), "best_val_loss",
                            weights_file=WEIGHTS_FILE)
    if state["epoch"]:
        state["resumed_from_epoch"] = state["epoch"]
    elif rank == 0:
        state["val_loss_before"] = held_out_loss()
    # Some weights never get a gradient (e.g. CLIP's post-layernorm when Llava reads the last layer's raw
    # output), so DDP must look for unused parameters instead of waiting for their gradients forever.
    trained = ray.train.torch.prepare_model(model, move_to_device=False,
                                            parallel_strategy_kwargs={"find_unused_parameters": True})

    for epoch in range(state["epoch"] + 1, advise.epochs + 1):
        if state["epochs_since_best"] >= advise.patience:
            break  # a resumed run that had already stopped early
        started = time.perf_counter()
        model.train()
        train_loss = train_epoch(lambda rows: loss_of(trained, rows), optimizer, train_rows, advise.batch_size,
                                 loop["seed"], epoch, rank, world_size)
        val = agreed_by_rank0(held_out_loss() if rank == 0 else 0.0, world_size)
        note_epoch(state, epoch, val, "best_val_loss")
        entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val,
                 "seconds": time.perf_counter() - started, "session": loop["session"]}
        state["history"].append(entry)

        report_epoch({"val_loss": val, "epoch": epoch}, epoch, rank,
                     lambda directory: save_checkpoint(directory, trainable_state(model), optimizer, state,
                                                       weights_file=WEIGHTS_FILE))
        if rank == 0:
            tell_user(f"advise epoch {epoch}/{advise.epochs}: train loss {entry['train_loss']:.3f}, held-out loss "
                      f"{val:.3f}, {entry['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------- export


def _export(config: EnvEncConfig, base: str, checkpoint, out: Path) -> None:
    """The best epoch's weights on the base model, LoRA merged, in Hugging Face format."""

    from envenc_ray.vlm.finetune import export_merged, load_trainable, load_trainable_state

    advise = config.advise
    model, processor, _ = load_trainable(base, method=advise.method, lora_rank=advise.lora_rank,
                                         lora_alpha=advise.lora_alpha, lora_dropout=advise.lora_dropout,
                                         lora_targets=advise.lora_targets, trust_remote_code=config.vlm.trust_remote_code)
    load_trainable_state(model, checkpoint_weights(checkpoint, WEIGHTS_FILE))
    export_merged(model.eval(), processor, out)


def advice_accuracy(model_dir: Path, config: EnvEncConfig, data: AdviceData, val_rows: np.ndarray) -> dict:
    """Greedy generation on held-out pairs: the advised move parsed from it vs the RAM heuristic's move.

    Chance is the majority-move rate of the same pairs (always saying the most common move). Per game too.
    None where the answers name no move (advise.text 'describe', or user data)."""
    import torch

    from envenc_ray.vlm.finetune import encode_pairs, greedy_answers, load_trainable

    scored = np.asarray([r for r in val_rows if data.phrases[r] is not None], dtype=np.int64)
    if len(scored) == 0:
        return {"action_accuracy_heldout": None, "chance_accuracy": None, "per_game": {}, "examples": []}
    if len(scored) > config.advise.eval_pairs:
        scored = np.sort(np.random.default_rng(config.experiment.seed).choice(scored, config.advise.eval_pairs,
                                                                              replace=False))
    model, processor, family = load_trainable(str(model_dir), method="full")
    model.eval()
    preprocessor = family.preprocessor(processor.image_processor)
    prompt_ids = encode_pairs(processor, family, _question(config), ["x"], tuple(data.frames.shape[1:3]),
                              context=math.inf, source=data.source).prompt_ids
    longest = max(len(processor.tokenizer(" " + data.answers[r], add_special_tokens=False)["input_ids"]) for r in scored)
    generated = []
    for start in range(0, len(scored), EVAL_BATCH):
        rows = scored[start:start + EVAL_BATCH]
        generated += greedy_answers(model, family, preprocessor, processor, prompt_ids, data.frames[rows],
                                    max_new_tokens=longest + 4, device=torch.device("cpu"))
    per_game = {}
    for game in dict.fromkeys(data.games[r] for r in scored):
        mine = [i for i, r in enumerate(scored) if data.games[r] == game]
        truth = [data.phrases[scored[i]] for i in mine]
        said = [advised_phrase(game, generated[i]) for i in mine]
        majority = max(set(truth), key=truth.count)
        per_game[game] = {"pairs": len(mine), "accuracy": float(np.mean([s == t for s, t in zip(said, truth)])),
                          "chance": truth.count(majority) / len(truth), "majority_move": majority}
    correct = sum(g["accuracy"] * g["pairs"] for g in per_game.values())
    chance = sum(g["chance"] * g["pairs"] for g in per_game.values())
    return {
        "action_accuracy_heldout": correct / len(scored),
        "chance_accuracy": chance / len(scored),
        "eval_pairs": int(len(scored)),
        "per_game": per_game,
        "examples": [{"target": data.answers[r], "generated": generated[i].strip()} for i, r in enumerate(scored[:3])],
    }


__all__ = ["advise", "advice_data", "user_pairs", "advice_accuracy", "train_loop_per_worker"]
