"""Stage `reward-model`: preference triples from the emulator -> transformer reward model (Ray Train) -> reward_model/.

Read top to bottom, `train_reward_model` is:

  1. triples     rollouts branched at the states where one move decides the point (rl/reward/preferences.py: the rule,
                 k, ties, sticky actions) -> <run>/preferences/, one shard per rollout, resumable
  2. represent   every input, winner and loser frame -> the agent's latent (its truncated VLM + encoder, windows
                 as the latent connector keeps them per episode) or grayscale pixels; the last val_fraction of
                 the rollouts are held out whole
  3. train       a `TorchTrainer` (num_workers x cpus_per_worker) minimising the Bradley-Terry loss
                 -log sigmoid(r(input, winner) - r(input, loser)): a checkpoint per epoch, early stopping on the
                 held-out loss, resume from the latest checkpoint when the same training starts again
  4. export      the best epoch, its output centred on the training triples, as config.json +
                 model.safetensors + metrics.json (held-out preference accuracy, and the accuracy of guessing the
                 winner from the two moves alone, the bar a model that only sees "the paddle moved" would reach)
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from envenc_ray.config import EnvEncConfig, RewardModelConfig, content_hash
from envenc_ray.data.schema import frames_to_array
from envenc_ray.envs.atari import make_env
from envenc_ray.errors import ConfigError, DataError
from envenc_ray.files import json_safe, read_json, write_json_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.rl.reward.preferences import META_FILE, make_preferences, preference_pairs, shard_path
from envenc_ray.rl.reward.model import (build_reward_model, output_hash, pixel_representation,
                                        representation_identity, save_reward_model)
from envenc_ray.runtime import tell_user
from envenc_ray.train_jobs import (agreed_by_rank0, checkpoint_weights, fit, fresh_state, note_epoch, report_epoch,
                                   resume_or_start, save_checkpoint, train_epoch)

REPRESENT_BATCH = 32  # frames per VLM forward pass when representing the triples by latents
# Settings that change how long or where training runs, not what an epoch computes: a rerun that only changes
# these continues the same Ray Train run.
RESUMABLE_SETTINGS = ("epochs", "patience", "num_workers", "cpus_per_worker", "report_poll_s")


@dataclass
class Triples:
    """Every triple's three representations (N, R) and what the metrics need to know of it."""

    inputs: np.ndarray
    winners: np.ndarray
    losers: np.ndarray
    episode_ids: np.ndarray  # (N,) the rollout: the held-out split is by rollout
    moves: np.ndarray  # (N, 2) the winner's and the loser's action index


def train_reward_model(config: EnvEncConfig) -> dict:
    """Make the preference triples, train the reward model on them and export it to <run>/reward_model/.

    Skips (and says so) when reward_model/ already holds the model of this config and representation."""
    from envenc_ray.runtime import ensure_ray

    layout = RunLayout.of(config)
    settings = config.reward_model
    reason = reward_model_current(config)
    if reason:
        print(f"reward-model: skipped, {reason}")
        return {"skipped": True, "reward_model_dir": str(layout.reward_model),
                **_summary(read_json(layout.reward_model / "metrics.json"))}
    encoder = _agent_encoder(config) if settings.representation == "latent" else None
    ensure_ray()
    _check_resources(settings)
    timings: dict[str, float] = {}

    # 1. triples
    started = time.perf_counter()
    counts = make_preferences(config, context=encoder.window if encoder is not None else 1)
    timings["triples_s"] = time.perf_counter() - started

    # 2. represent
    started = time.perf_counter()
    triples = represent_triples(layout.preferences, settings, encoder)
    check_triples(triples, layout.preferences)
    train_rows, val_rows = split_by_rollout(triples.episode_ids, settings.val_fraction)
    timings["represent_s"] = time.perf_counter() - started

    # 3. train
    started = time.perf_counter()
    state, best_checkpoint = _fit(config, triples, train_rows, val_rows)
    timings["train_s"] = time.perf_counter() - started

    # 4. export
    started = time.perf_counter()
    model = _centred_model(best_checkpoint, settings, triples, train_rows)
    best = next(e for e in state["history"] if e["epoch"] == state["best_epoch"])
    winner_moves = Counter(int(move) for move in triples.moves[:, 0])
    meanings = _action_meanings(config)
    metrics = {
        "heldout_accuracy": best["val_accuracy"],
        "heldout_loss": best["val_loss"],
        "train_accuracy": best["train_accuracy"],
        "move_baseline_accuracy": move_baseline_accuracy(triples.moves, train_rows, val_rows),
        "triples": {"train": int(len(train_rows)), "heldout": int(len(val_rows))},
        "rollouts": {"train": int(len(np.unique(triples.episode_ids[train_rows]))),
                     "heldout": int(len(np.unique(triples.episode_ids[val_rows])))},
        "preferences": counts,
        "winner_moves": {meanings[move]: count for move, count in sorted(winner_moves.items())},
        "representation": settings.representation,
        "representation_dim": int(triples.inputs.shape[1]),
        "rule": {"horizon": settings.horizon, "reach_steps": settings.reach_steps, "repeat_action_probability": 0.0,
                 "epsilon": settings.epsilon},
        "epochs": state["history"],
        "best_epoch": state["best_epoch"],
        "stopped_early": state["epochs_since_best"] >= settings.patience,
        "timings": timings,
    }
    description = {
        "representation": settings.representation,
        "representation_dim": int(triples.inputs.shape[1]),
        "settings": settings.model_dump(mode="json"),
        "game": layout.game,
        "config_hash": output_hash(config),
        "identity": representation_identity(config),
        "best_epoch": state["best_epoch"],
    }
    save_reward_model(model, layout.reward_model, description, json_safe(metrics))
    timings["export_s"] = time.perf_counter() - started
    write_json_atomic(layout.reward_model / "metrics.json", json_safe(metrics))  # now with the export time
    print(f"reward-model: {settings.representation} reward model -> {layout.reward_model}: held-out preference "
          f"accuracy {metrics['heldout_accuracy']:.3f} on {len(val_rows)} triples (moves alone: "
          f"{metrics['move_baseline_accuracy']:.3f}), best epoch {state['best_epoch']} of {len(state['history'])}; "
          f"triples {timings['triples_s']:.1f} s, represent {timings['represent_s']:.1f} s, "
          f"train {timings['train_s']:.1f} s")
    return {"skipped": False, "reward_model_dir": str(layout.reward_model), **_summary(json_safe(metrics))}


def reward_model_current(config: EnvEncConfig) -> str | None:
    """Why reward_model/ already holds the model of this config, trained on these representations, or None."""
    folder = RunLayout.of(config).reward_model
    description, metrics = read_json(folder / "config.json"), read_json(folder / "metrics.json")
    if not description or not metrics or not (folder / "model.safetensors").is_file() \
            or description.get("config_hash") != output_hash(config) \
            or description.get("identity") != representation_identity(config):
        return None
    return (f"{folder} already holds the {description['representation']} reward model of this config (held-out "
            f"preference accuracy {metrics['heldout_accuracy']:.3f})")


def _summary(metrics: dict) -> dict:
    return {key: metrics[key] for key in ("heldout_accuracy", "move_baseline_accuracy", "triples", "best_epoch",
                                          "timings")}


def _action_meanings(config: EnvEncConfig) -> list[str]:
    env = make_env(config.env.game, full_action_space=config.env.full_action_space)
    meanings = env.unwrapped.get_action_meanings()
    env.close()
    return meanings


# ------------------------------------------------------------------------------------------- represent


def _agent_encoder(config: EnvEncConfig):
    """The agent's truncated VLM + encoder, in this process: what the latent connector runs in the EnvRunners."""
    from envenc_ray.encoder.served import ServedPair
    from envenc_ray.runtime import set_torch_threads

    set_torch_threads(config.vlm.num_threads)
    return ServedPair.of(config).load()


def represent_triples(folder: Path, settings: RewardModelConfig, encoder=None) -> Triples:
    """Every triple of the shards in `folder`, its frames turned into representations: latents of `encoder`
    (an EnvironmentEncoder) or, without one, grayscale pixels. One shard (rollout) at a time, so the frames of
    one rollout only are in memory."""
    meta = read_json(folder / META_FILE)
    if meta is None or "frame_shape" not in meta:
        raise DataError(f"{folder} holds no {META_FILE}; rerun `envenc reward-model` to make the triples")
    shards = [shard_path(folder, episode) for episode in range(settings.episodes)]  # this config's rollouts only
    parts = []
    for path in tqdm(shards, desc="reward-model representations", unit="rollout"):
        table = pq.read_table(path)
        if table.num_rows == 0:
            continue
        inputs, branches = _represent_rows(table, settings, encoder, tuple(meta["frame_shape"]))
        for row, returns in enumerate(table["branch_returns"].to_pylist()):
            actions = table["branch_actions"][row].as_py()
            for winner, loser in preference_pairs(returns):
                parts.append((inputs[row], branches[row, winner], branches[row, loser],
                              table["episode_id"][row].as_py(), (actions[winner], actions[loser])))
    if not parts:
        raise DataError(f"the preference set in {folder} is empty: every branch tied; raise reward_model.episodes or "
                        "reward_model.max_steps_per_episode (more branch points), reward_model.horizon (more time to "
                        "score) or reward_model.reach_steps")
    inputs, winners, losers, episode_ids, moves = zip(*parts)
    return Triples(np.stack(inputs), np.stack(winners), np.stack(losers), np.array(episode_ids), np.array(moves))


def _represent_rows(table, settings: RewardModelConfig, encoder, frame_shape) -> tuple[np.ndarray, np.ndarray]:
    """(inputs (n, R), branches (n, M, R)): the branch point's frame and each move's frame of every row."""
    contexts = [frames_to_array(frames, frame_shape) for frames in table["context"].to_pylist()]
    branch_frames = np.stack([frames_to_array(frames, frame_shape) for frames in table["branch_frames"].to_pylist()])
    n, moves = branch_frames.shape[:2]
    if encoder is None:
        inputs = pixel_representation(np.stack([context[-1] for context in contexts]), settings.pixel_size)
        branches = pixel_representation(branch_frames.reshape(n * moves, *frame_shape), settings.pixel_size)
        return inputs, branches.reshape(n, moves, -1)
    # The window an episode's latent connector would hold: the last k frames up to the branch point, an
    # episode's first frame repeated before it (EnvironmentEncoder's fresh-episode padding).
    k = encoder.window
    windows = np.stack([np.concatenate([np.repeat(c[:1], k - len(c), axis=0), c]) for c in contexts])  # (n, k, ...)
    hidden_windows = _hidden(encoder, windows.reshape(n * k, *frame_shape)).reshape(n, k, *encoder.hidden_shape)
    hidden_branches = _hidden(encoder, branch_frames.reshape(n * moves, *frame_shape))
    hidden_branches = hidden_branches.reshape(n, moves, *encoder.hidden_shape)
    before_input = list(hidden_windows[:, :-1]) if k > 1 else None
    before_branch = list(hidden_windows[:, 1:]) if k > 1 else None
    inputs, _ = encoder.encode_hidden(hidden_windows[:, -1], before_input)
    branches = np.stack([encoder.encode_hidden(hidden_branches[:, m], before_branch)[0] for m in range(moves)], axis=1)
    return inputs, branches


def _hidden(encoder, frames: np.ndarray) -> np.ndarray:
    return np.concatenate([encoder.hidden(frames[start:start + REPRESENT_BATCH])
                           for start in range(0, len(frames), REPRESENT_BATCH)])


def check_triples(triples: Triples, folder: Path) -> None:
    """One-line errors for a (non-empty) preference set the model cannot learn from or be measured on."""
    winners = np.unique(triples.moves[:, 0])
    if len(winners) < 2:
        raise DataError(f"the preference set in {folder} is one-class: every one of its {len(triples.inputs)} "
                        f"triples is won by action {winners[0]}, so a model would learn the move, not the game; "
                        "raise reward_model.episodes or reward_model.max_steps_per_episode")
    episodes = np.unique(triples.episode_ids)
    if len(episodes) < 2:
        raise DataError(f"the triples in {folder} all come from rollout {episodes[0]}; the held-out accuracy needs "
                        "whole held-out rollouts: raise reward_model.episodes or reward_model.max_steps_per_episode")


def split_by_rollout(episode_ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and held-out triples: the last val_fraction of the rollouts (at least one
    each way) are held out whole. Every rollout has its own seed, so the last ones are as random as any."""
    episodes = np.unique(episode_ids)
    n_val = min(max(1, round(val_fraction * len(episodes))), len(episodes) - 1)
    held_out = np.isin(episode_ids, episodes[-n_val:])
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def move_baseline_accuracy(moves: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray) -> float:
    """Held-out accuracy of guessing each triple's winner from its two moves alone (the training triples'
    majority winner for that pair of moves): the bar above which a model sees more than which way the paddle moved."""
    wins = Counter((frozenset(moves[row]), int(moves[row, 0])) for row in train_rows)
    right = [wins[(frozenset(moves[row]), int(moves[row, 0]))] > wins[(frozenset(moves[row]), int(moves[row, 1]))]
             for row in val_rows]
    return float(np.mean(right))


# ----------------------------------------------------------------------------------------------- train


def _check_resources(settings: RewardModelConfig) -> None:
    import ray

    needed, available = settings.num_workers * settings.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if needed > available:  # Ray Train would wait for these CPUs forever, silently
        raise ConfigError(f"reward model training needs {settings.num_workers} x {settings.cpus_per_worker} = "
                          f"{needed:g} CPUs, the Ray cluster has {available:g}; lower reward_model.num_workers or "
                          "reward_model.cpus_per_worker (fractions such as 0.5 are fine)")


def resume_key(config: EnvEncConfig) -> str:
    """Names the Ray Train run folder: the same training (the config minus RESUMABLE_SETTINGS, the same
    representations)."""
    neutral = {name: getattr(RewardModelConfig(), name) for name in RESUMABLE_SETTINGS}
    training = config.model_copy(update={"reward_model": config.reward_model.model_copy(update=neutral)})
    return f"reward-{content_hash([output_hash(training), representation_identity(config)])}"


def _fit(config: EnvEncConfig, triples: Triples, train_rows: np.ndarray, val_rows: np.ndarray):
    """Run (or continue) the Ray Train job; returns the final training state and the best epoch's checkpoint."""
    import ray

    settings = config.reward_model
    if len(train_rows) < settings.num_workers:
        raise DataError(f"{len(train_rows)} training triples cannot feed {settings.num_workers} Train workers; raise "
                        "reward_model.episodes or lower reward_model.num_workers")
    representations = np.concatenate([triples.inputs[train_rows], triples.winners[train_rows],
                                       triples.losers[train_rows]])
    loop_config = {
        "settings": settings.model_dump(mode="json"),
        "seed": config.experiment.seed,
        "session": uuid.uuid4().hex[:8],
        "triples": ray.put(np.stack([triples.inputs, triples.winners, triples.losers])),  # (3, N, R), read zero-copy
        "train_rows": train_rows,
        "val_rows": val_rows,
        "mean": representations.mean(0),
        "std": representations.std(0),
    }
    return fit(train_loop_per_worker, loop_config, what="reward model training",
               storage=RunLayout.of(config).reward_model_train.resolve(), name=resume_key(config),
               workers=settings.num_workers, cpus_per_worker=settings.cpus_per_worker, use_gpu=False,
               score="val_loss", poll_s=settings.report_poll_s)


def train_loop_per_worker(loop: dict) -> None:
    """One Train worker: the reward model (restored from the latest checkpoint if any), Bradley-Terry epochs,
    one report per epoch with rank 0's held-out loss and accuracy."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    settings = RewardModelConfig.model_validate(loop["settings"])
    torch.set_num_threads(1)  # N workers on N cores: one thread each, or they fight over the cores
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    inputs, winners, losers = (torch.from_numpy(array) for array in ray.get(loop["triples"]))
    train_rows, val_rows = np.array(loop["train_rows"]), np.array(loop["val_rows"])
    torch.manual_seed(loop["seed"])  # identical initial weights on every worker
    model = build_reward_model(settings, inputs.shape[1])
    model.set_input_statistics(loop["mean"], loop["std"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)

    @torch.no_grad()
    def scored(rows: np.ndarray) -> tuple[float, float]:
        """Mean Bradley-Terry loss and preference accuracy over `rows` (eval mode)."""
        model.eval()
        margin = model(inputs[rows], winners[rows]) - model(inputs[rows], losers[rows])
        model.train()
        return float(F.softplus(-margin).mean()), float((margin > 0).float().mean())

    state = resume_or_start("reward-model", rank, model.load_state_dict, optimizer, fresh_state("best_val_loss"),
                            "best_val_loss")
    trained = ray.train.torch.prepare_model(model)  # DDP when world_size > 1

    def bradley_terry_loss(rows: np.ndarray) -> torch.Tensor:
        """-log P(winner preferred), P = sigmoid(r(input, winner) - r(input, loser))."""
        return F.softplus(trained(inputs[rows], losers[rows]) - trained(inputs[rows], winners[rows])).mean()

    for epoch in range(state["epoch"] + 1, settings.epochs + 1):
        if state["epochs_since_best"] >= settings.patience:
            break  # a resumed run that had already stopped early
        started = time.perf_counter()
        train_loss = train_epoch(bradley_terry_loss, optimizer, train_rows, settings.batch_size, loop["seed"], epoch,
                                 rank, world_size)
        entry = {}
        if rank == 0:  # rank 0 scores every triple; the others wait for its verdict on the held-out loss
            (val_loss, val_accuracy), (_, train_accuracy) = scored(val_rows), scored(train_rows)
            entry = {"val_loss": val_loss, "val_accuracy": val_accuracy, "train_accuracy": train_accuracy}
        val_loss = agreed_by_rank0(entry.get("val_loss", 0.0), world_size)
        note_epoch(state, epoch, val_loss, "best_val_loss")
        entry.update(epoch=epoch, val_loss=val_loss, train_loss=train_loss,
                     seconds=time.perf_counter() - started, session=loop["session"])
        state["history"].append(entry)

        report_epoch({"val_loss": val_loss, "epoch": epoch}, epoch, rank,
                     lambda directory: save_checkpoint(directory, model.state_dict(), optimizer, state))
        if rank == 0:
            tell_user(f"reward-model epoch {epoch}/{settings.epochs}: train loss {entry['train_loss']:.3f}, held-out "
                      f"loss {val_loss:.3f}, held-out accuracy {entry['val_accuracy']:.3f}, {entry['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------- export


def _centred_model(checkpoint, settings: RewardModelConfig, triples: Triples, train_rows: np.ndarray):
    """The checkpoint's model with its output centred on the training triples' (input, winner) and (input, loser)
    rewards: Bradley-Terry leaves the offset free."""
    import torch

    model = build_reward_model(settings, triples.inputs.shape[1])
    model.load_state_dict(checkpoint_weights(checkpoint))
    model.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(triples.inputs[train_rows])
        rewards = torch.cat([model(inputs, torch.from_numpy(triples.winners[train_rows])),
                             model(inputs, torch.from_numpy(triples.losers[train_rows]))])
    model.reward_offset.copy_(rewards.mean())
    return model
