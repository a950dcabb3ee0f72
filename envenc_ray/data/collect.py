"""Stage `collect`: play the game with a random, heuristic or epsilon-mixed policy and record every frame.

Episodes are played by parallel Ray tasks, one Parquet shard per episode (`frames/episode-00003.parquet`),
each written under a temporary name and renamed when complete, so an interrupted collection resumes by
playing only the episodes whose shard is missing. Every episode has its own seed derived from
(experiment.seed, episode index): the same config records the same frames, whichever task plays them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from envenc_ray.config import CollectConfig, EnvConfig, EnvEncConfig, game_name
from envenc_ray.data.schema import FRAMES_SCHEMA, write_parquet_atomic
from envenc_ray.envs.annotate import get_annotator
from envenc_ray.envs.atari import make_env_from_config
from envenc_ray.errors import DataError, UnsupportedGameError
from envenc_ray.files import read_json, write_text_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.storage import pull

logger = logging.getLogger(__name__)

META_FILE = "_collect.json"  # config hash and frame shape of the shards in frames/


@dataclass(frozen=True)
class CollectSummary:
    episodes: int
    episodes_played: int  # this call; the rest were already on disk
    frames: int
    bytes_on_disk: int
    raw_bytes: int
    seconds: float

    @property
    def skipped(self) -> bool:
        return self.episodes_played == 0

    @property
    def compression(self) -> float:
        return self.raw_bytes / max(self.bytes_on_disk, 1)


def episode_seed(experiment_seed: int, episode: int) -> int:
    return int(np.random.SeedSequence([experiment_seed, episode]).generate_state(1)[0])


def play_episode(env_config: EnvConfig, collect_config: CollectConfig, seed: int, episode: int) -> pa.Table:
    """One recorded episode: row t holds frame t, the action taken on it and what that action earned."""
    env = make_env_from_config(env_config)
    rng = np.random.default_rng(seed)
    game = game_name(env_config.game)
    try:
        annotator = get_annotator(game, env.unwrapped.get_action_meanings())
    except UnsupportedGameError:
        if collect_config.policy != "random":
            raise
        annotator = None  # a random policy needs no annotations: record frames without objects/advice

    observation, _ = env.reset(seed=seed)
    if annotator is not None:
        annotator.reset()
    columns: dict[str, list] = {field.name: [] for field in FRAMES_SCHEMA}
    for step in range(collect_config.max_steps_per_episode):
        ram = env.unwrapped.ale.getRAM()
        annotation = annotator.annotate(ram) if annotator is not None else None
        explore = collect_config.policy == "random" or (
            collect_config.policy == "mixed" and rng.random() < collect_config.epsilon
        )
        action = int(rng.integers(env.action_space.n)) if explore else annotation.heuristic_action
        next_observation, reward, terminated, truncated, _ = env.step(action)
        truncated = truncated or step == collect_config.max_steps_per_episode - 1
        columns["episode_id"].append(episode)
        columns["step"].append(step)
        columns["frame"].append(observation.tobytes())
        columns["action"].append(action)
        columns["reward"].append(float(reward))
        columns["terminated"].append(bool(terminated))
        columns["truncated"].append(bool(truncated))
        columns["ram"].append(ram.tobytes())
        columns["objects"].append(json.dumps(annotation.objects) if annotation else "{}")
        columns["advice"].append(annotation.advice if annotation else "")
        columns["heuristic_action"].append(annotation.heuristic_action if annotation else -1)
        observation = next_observation
        if terminated or truncated:
            break
    env.close()
    return pa.Table.from_pydict(columns, schema=FRAMES_SCHEMA)


def collect(config: EnvEncConfig) -> CollectSummary:
    """Record `collect.episodes` episodes into <run>/frames/, playing only those not yet on disk."""
    import ray

    from envenc_ray.runtime import ensure_ray

    frames_dir = RunLayout.of(config).frames
    if config.collect.policy != "random":  # fail here, not inside a Ray task, if the game has no heuristic
        env = make_env_from_config(config.env)
        get_annotator(RunLayout.of(config).game, env.unwrapped.get_action_meanings())
        env.close()
    frame_shape = _check_or_write_meta(frames_dir, output_hash(config), config)
    todo = [e for e in range(config.collect.episodes) if not _shard_path(frames_dir, e).exists()]
    started = time.perf_counter()
    if not todo:
        print(f"collect: skipped, {collect_current(config)}")
    else:
        ensure_ray()
        # At most num_tasks episodes in flight: ALE is single-threaded, one CPU per task.
        remote_play = ray.remote(_play_and_write).options(num_cpus=1)
        pending = []
        with tqdm(total=len(todo), desc="collect episodes", unit="ep") as bar:
            for episode in todo:
                if len(pending) >= config.collect.num_tasks:
                    done, pending = ray.wait(pending, num_returns=1)
                    bar.update(len(ray.get(done)))
                seed = episode_seed(config.experiment.seed, episode)
                pending.append(remote_play.remote(config.env, config.collect, seed, episode, str(frames_dir)))
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(ray.get(done)))
        pull(frames_dir, prune=False)  # on a URI run root, tasks on other nodes wrote into their own copies
    summary = _summarise(frames_dir, config.collect.episodes, len(todo), frame_shape, time.perf_counter() - started)
    print(
        f"collect: {summary.episodes} episodes, {summary.frames} frames in {frames_dir} "
        f"({summary.bytes_on_disk / 1e6:.1f} MB on disk, {summary.compression:.0f}x smaller than raw), "
        f"{summary.episodes_played} episodes played in {summary.seconds:.1f} s"
    )
    return summary


def output_hash(config: EnvEncConfig) -> str:
    """What determines frames/: the game and its settings, the policy, the episode count, the seed."""
    return config.section_hash("experiment", "env", "collect")


def collect_current(config: EnvEncConfig) -> str | None:
    """Why frames/ already holds every episode of this config, or None."""
    frames_dir = RunLayout.of(config).frames
    meta = read_json(frames_dir / META_FILE)
    if meta is None or meta["config_hash"] != output_hash(config):
        return None
    if any(not _shard_path(frames_dir, e).exists() for e in range(config.collect.episodes)):
        return None
    return f"all {config.collect.episodes} episodes already in {frames_dir}"


def _play_and_write(env_config: EnvConfig, collect_config: CollectConfig, seed: int, episode: int, frames_dir: str) -> int:
    table = play_episode(env_config, collect_config, seed, episode)
    write_parquet_atomic(table, _shard_path(Path(frames_dir), episode))
    return table.num_rows


def _shard_path(frames_dir: Path, episode: int) -> Path:
    return frames_dir / f"episode-{episode:05d}.parquet"


def _check_or_write_meta(frames_dir: Path, config_hash: str, config: EnvEncConfig) -> tuple[int, int, int]:
    """Refuse to mix shards of different configs in one frames/ folder; return the frame shape."""
    meta_path = frames_dir / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["config_hash"] != config_hash:
            raise DataError(
                f"{frames_dir} was recorded with another env/collect config (hash {meta['config_hash']}, "
                f"now {config_hash}); use a new experiment.name or delete {frames_dir}"
            )
        return tuple(meta["frame_shape"])
    env = make_env_from_config(config.env)
    frame_shape = tuple(int(n) for n in env.observation_space.shape)
    env.close()
    frames_dir.mkdir(parents=True, exist_ok=True)
    meta = {"config_hash": config_hash, "game": RunLayout.of(config).game, "frame_shape": frame_shape,
            "env": config.env.model_dump(), "collect": config.collect.model_dump(), "seed": config.experiment.seed}
    write_text_atomic(meta_path, json.dumps(meta, indent=2))
    return frame_shape


def read_frame_shape(frames_dir: Path) -> tuple[int, int, int]:
    meta_path = Path(frames_dir) / META_FILE
    if not meta_path.exists():
        raise DataError(f"{frames_dir} has no {META_FILE}; run `envenc collect` first")
    return tuple(json.loads(meta_path.read_text())["frame_shape"])


def _summarise(
    frames_dir: Path, episodes: int, played: int, frame_shape: tuple[int, int, int], seconds: float
) -> CollectSummary:
    import pyarrow.parquet as pq

    shards = [_shard_path(frames_dir, e) for e in range(episodes)]
    frames = sum(pq.ParquetFile(shard).metadata.num_rows for shard in shards)
    on_disk = sum(shard.stat().st_size for shard in shards)
    return CollectSummary(
        episodes=episodes,
        episodes_played=played,
        frames=frames,
        bytes_on_disk=on_disk,
        raw_bytes=frames * int(np.prod(frame_shape)),
        seconds=seconds,
    )
