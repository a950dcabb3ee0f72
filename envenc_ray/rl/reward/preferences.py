"""Preference triples {input frame, loser frame, winner frame} made from the emulator itself (stage `reward-model`).

The rule (settings in the `reward_model` section):

  1. Rollouts. `episodes` episodes, each with its own seed, played by the RAM heuristic with `epsilon`-random
     actions and sticky actions OFF (repeat_action_probability 0 whatever env.repeat_action_probability says):
     a branch must play the action it names, so that a cloned state replayed with the same action gives the
     same frames and two branches differ by their actions only.
  2. Branch points. Where the ball reaches the agent's paddle within `reach_steps` env steps at its current
     velocity (Pong, Breakout): there one move decides whether the ball is missed. Elsewhere the heuristic
     recovers from any single move and the branches tie (measured on Pong with k = 8: branching wherever the
     ball approaches, reach_steps=1000, 4% of the pairs differ; within 2 steps of the paddle, 33%). Games without
     a ball branch at every step.
  3. Branches. The ALE state is cloned (RNG included) and each of the heuristic's moves (Pong: stay, up, down)
     is played from it, then the heuristic for `horizon` - 1 more steps. A branch's return is the sum of the
     game's rewards over those k = `horizon` steps (Pong: the change of the RAM score difference).
  4. Triples. Every two branches with different returns: the input frame is the branch point's frame, the winner
     frame what the higher-return branch's first step showed, the loser frame the other's. Ties are dropped
     (and counted).

One Parquet shard per rollout (preferences/episode-00003.parquet), one row per branch point that made at least
one triple: the `context` frames (the branch point's frame and up to `context - 1` frames before it, what the
agent's windowed encoder reads), the frame after each move, the moves and their returns. The shard's metadata
counts the rollout's steps, branch points and pairs. An interrupted run plays only the missing rollouts;
a change of the settings the triples depend on remakes them all.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections import deque
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from envenc_ray.config import EnvConfig, EnvEncConfig, RewardModelConfig, content_hash, game_name
from envenc_ray.data.collect import episode_seed
from envenc_ray.data.schema import write_parquet_atomic
from envenc_ray.envs.annotate import BreakoutAnnotator, PongAnnotator, get_annotator
from envenc_ray.envs.atari import make_env
from envenc_ray.errors import DataError
from envenc_ray.files import read_json, write_json_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.storage import pull, remove

SCHEMA = pa.schema([
    ("episode_id", pa.int64()),
    ("step", pa.int32()),
    ("context", pa.list_(pa.binary())),  # frames up to and including the branch point's, oldest first
    ("branch_frames", pa.list_(pa.binary())),  # the frame each move's first step showed, in branch_actions order
    ("branch_actions", pa.list_(pa.int16())),
    ("branch_returns", pa.list_(pa.float32())),
])
META_FILE = "_preferences.json"  # hash of what the triples depend on, and the frame shape
COUNTS_KEY = b"envenc_counts"  # each shard's schema metadata: its rollout's steps, branch points and pairs

# Games with a ball: the coordinate in which it approaches the agent's paddle (growing toward it), and its
# value where it touches the paddle.
PADDLE_LINES = {
    "pong": ("ball_x", PongAnnotator.PADDLE_FACE_X),  # the agent is the right paddle
    "breakout": ("ball_y", BreakoutAnnotator.PADDLE_TOP_Y),  # the paddle is at the bottom
}


def steps_to_paddle(game: str, objects: dict, previous: dict | None) -> float | None:
    """Env steps until the ball reaches the agent's paddle at its current velocity; None when it is not on its
    way there (not in play, standing, moving away, or its velocity unknown)."""
    axis, line = PADDLE_LINES[game]
    if previous is None or not (objects["ball_in_play"] and previous["ball_in_play"]):
        return None
    velocity = objects[axis] - previous[axis]
    return (line - objects[axis]) / velocity if velocity > 0 else None


def is_branch_point(game: str, objects: dict, previous: dict | None, reach_steps: float) -> bool:
    if game not in PADDLE_LINES:
        return True
    steps = steps_to_paddle(game, objects, previous)
    return steps is not None and 0 < steps <= reach_steps


def branch(ale_env, annotator, moves: list[int], horizon: int) -> tuple[list[np.ndarray], list[float]]:
    """From the emulator's current state, each move then the heuristic for horizon - 1 steps: the frame each
    move's first step shows and each branch's return. The state is restored afterwards."""
    state = ale_env.clone_state(include_rng=True)
    frames, returns = [], []
    for move in moves:
        ale_env.restore_state(state)
        follower = copy.deepcopy(annotator)  # the heuristic remembers the last frame: each branch its own copy
        frame, total, terminal, truncated, _ = ale_env.step(move)
        for _ in range(horizon - 1):
            if terminal or truncated:
                break
            action = follower.annotate(ale_env.ale.getRAM()).heuristic_action
            _, reward, terminal, truncated, _ = ale_env.step(action)
            total += reward
        frames.append(frame)
        returns.append(float(total))
    ale_env.restore_state(state)
    return frames, returns


def preference_pairs(returns) -> list[tuple[int, int]]:
    """(winner, loser) indices of every two branches whose returns differ; ties are dropped."""
    return [(i, j) if returns[i] > returns[j] else (j, i)
            for i, j in combinations(range(len(returns)), 2) if returns[i] != returns[j]]


def play_and_branch(env_config: EnvConfig, settings: RewardModelConfig, seed: int, episode: int,
                    context: int) -> pa.Table:
    """One rollout's branch points that made at least one triple (the rows of its shard; counts in metadata)."""
    env = make_env(env_config.game, repeat_action_probability=0.0, frameskip=env_config.frameskip,
                   full_action_space=env_config.full_action_space)
    ale_env = env.unwrapped  # branches step the ALE env itself: no wrapper of the rollout sees their steps
    game = game_name(env_config.game)
    meanings = ale_env.get_action_meanings()
    annotator = get_annotator(game, meanings)
    moves = [meanings.index(meaning) for meaning in dict.fromkeys(annotator.moves.values())]
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    counts = {"steps": 0, "branch_points": 0, "pairs": 0, "tied_pairs": 0}
    recent: deque[np.ndarray] = deque(maxlen=context)
    frame, _ = env.reset(seed=seed)
    previous = None
    for step in range(settings.max_steps_per_episode):
        recent.append(frame)
        annotation = annotator.annotate(ale_env.ale.getRAM())
        if is_branch_point(game, annotation.objects, previous, settings.reach_steps):
            branch_frames, returns = branch(ale_env, annotator, moves, settings.horizon)
            pairs = preference_pairs(returns)
            counts["branch_points"] += 1
            counts["pairs"] += len(pairs)
            counts["tied_pairs"] += len(moves) * (len(moves) - 1) // 2 - len(pairs)
            if pairs:
                columns["episode_id"].append(episode)
                columns["step"].append(step)
                columns["context"].append([f.tobytes() for f in recent])
                columns["branch_frames"].append([f.tobytes() for f in branch_frames])
                columns["branch_actions"].append(moves)
                columns["branch_returns"].append(returns)
        previous = annotation.objects
        explore = rng.random() < settings.epsilon
        action = int(rng.integers(env.action_space.n)) if explore else annotation.heuristic_action
        frame, _, terminated, truncated, _ = env.step(action)
        counts["steps"] += 1
        if terminated or truncated:
            break
    env.close()
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    return table.replace_schema_metadata({COUNTS_KEY: json.dumps(counts)})


def preferences_hash(config: EnvEncConfig, context: int) -> str:
    """What the triples depend on: the game and its emulation, the rollout and branching settings, the seed and
    how many frames before each branch point are kept."""
    settings = config.reward_model
    payload = {
        "seed": config.experiment.seed,
        "env": config.env.model_dump(mode="json", include={"game", "frameskip", "full_action_space"}),
        "rule": settings.model_dump(mode="json", include={"episodes", "max_steps_per_episode", "epsilon", "horizon",
                                                          "reach_steps"}),
        "context": context,
    }
    return content_hash(payload)


def make_preferences(config: EnvEncConfig, context: int) -> dict:
    """Play (as parallel Ray tasks) the rollouts whose shard is missing from <run>/preferences/; returns the
    counts over all rollouts."""
    import ray

    folder = RunLayout.of(config).preferences
    expected = preferences_hash(config, context)
    meta = read_json(folder / META_FILE)
    if meta is not None and meta.get("hash") != expected:
        print(f"reward-model: the triples in {folder} were made with other settings; making them again")
        shutil.rmtree(folder)
        remove(folder)  # on a URI run root, there too: the next sync would bring the old shards back
    if not (folder / META_FILE).is_file():
        env = make_env(config.env.game)
        frame_shape = list(env.observation_space.shape)
        env.close()
        write_json_atomic(folder / META_FILE, {"hash": expected, "context": context, "frame_shape": frame_shape})
    todo = [e for e in range(config.reward_model.episodes) if not shard_path(folder, e).is_file()]
    started = time.perf_counter()
    if todo:
        # One CPU per task (ALE is single-threaded): Ray runs as many at once as the cluster has CPUs.
        play = ray.remote(_play_and_write).options(num_cpus=1)
        pending = [play.remote(config.env, config.reward_model, episode_seed(config.experiment.seed, e), e,
                               context, str(folder)) for e in todo]
        with tqdm(total=len(todo), desc="reward-model rollouts", unit="ep") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
                bar.update(len(done))
        pull(folder, prune=False)  # on a URI run root, tasks on other nodes wrote into their own copies
    counts = preference_counts(folder, config.reward_model.episodes)
    print(f"reward-model: {counts['pairs']} triples from {counts['branch_points']} branch points of "
          f"{counts['steps']} rollout steps (tie rate {counts['tie_rate']:.2f}), {len(todo)} rollouts played in "
          f"{time.perf_counter() - started:.1f} s")
    return counts


def _play_and_write(env_config: EnvConfig, settings: RewardModelConfig, seed: int, episode: int, context: int,
                    folder: str) -> None:
    table = play_and_branch(env_config, settings, seed, episode, context)
    write_parquet_atomic(table, shard_path(Path(folder), episode))


def shard_path(folder: Path, episode: int) -> Path:
    return folder / f"episode-{episode:05d}.parquet"


def preference_counts(folder: Path, episodes: int) -> dict:
    """Steps, branch points, triples (pairs that differ) and tied pairs summed over the rollouts' shards."""
    totals = {"steps": 0, "branch_points": 0, "pairs": 0, "tied_pairs": 0}
    for episode in range(episodes):
        path = shard_path(folder, episode)
        try:
            counts = json.loads(pq.read_schema(path).metadata[COUNTS_KEY])
        except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
            raise DataError(f"{path} is not a preference shard envenc wrote; delete {folder} and rerun "
                            "`envenc reward-model`") from None
        for key in totals:
            totals[key] += counts[key]
    compared = totals["pairs"] + totals["tied_pairs"]
    return totals | {"tie_rate": totals["tied_pairs"] / compared if compared else 0.0}
