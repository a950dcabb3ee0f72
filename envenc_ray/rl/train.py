"""Stage `train`: an RLlib agent (PPO or DreamerV3) on latents, pixels or both -> <run>/agent/.

    build the algorithm from the config -> resume from the newest checkpoint in <run>/agent/ (if any)
    -> train `rl.iterations` iterations, logging one metrics row per iteration
    -> checkpoint every `rl.checkpoint_every` iterations and at the end.

<run>/agent/ holds checkpoint_<iteration>/ folders (each written to a temporary name, then renamed, so a
killed run never leaves half a checkpoint), progress.jsonl + progress.csv (one row per iteration),
TensorBoard event files under tb/, and train.json (what the checkpoints were trained with). A rerun with
the same agent settings and no more iterations is skipped; with more iterations it resumes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from envenc_ray.config import EnvEncConfig, content_hash
from envenc_ray.errors import DataError
from envenc_ray.files import write_json_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.rl.algorithm import build_algorithm, train_iteration
from envenc_ray.rl.checkpoints import (META_FILE, check_latents, latents_identity, latest_checkpoint, read_meta,
                                       save_checkpoint)
from envenc_ray.rl.runner_errors import new_error_key

logger = logging.getLogger(__name__)

# Learner losses copied into each metrics row when the algorithm reports them (PPO's, then DreamerV3's).
LEARNER_METRICS = ("total_loss", "policy_loss", "vf_loss", "entropy",
                   "WORLD_MODEL_L_total", "ACTOR_L_total", "CRITIC_L_total")


def train(config: EnvEncConfig) -> dict:
    """Train (or resume) the agent of `config.rl`; returns a summary of the run (also in train.json)."""
    from tqdm import tqdm

    from envenc_ray.runtime import ensure_ray

    rl = config.rl
    agent_dir = RunLayout.of(config).agent
    agent_hash = agent_config_hash(config)
    meta = read_meta(agent_dir)
    if meta is not None and meta["agent_hash"] != agent_hash:
        raise DataError(f"{agent_dir} holds checkpoints of a different agent ({meta['algo']}, obs_mode "
                        f"{meta['obs_mode']}, other model/encoder settings); delete {agent_dir} or set another "
                        "experiment.name to train this one")
    latest = latest_checkpoint(agent_dir)
    reason = training_current(config)
    if reason:
        print(f"train: skipped, {reason}")
        return (meta.get("summary") or {}) | {"iterations": latest[0], "checkpoint": str(latest[1]), "skipped": True}

    ensure_ray()
    latents = latents_identity(config)
    if latest is not None and meta is not None:  # resuming: the same encoder and VLM weights, or refuse
        check_latents(meta.get("latents"), latents, str(agent_dir))
    error_key = new_error_key()
    algo = build_algorithm(config, error_key)
    try:
        agent_dir.mkdir(parents=True, exist_ok=True)
        for stale in agent_dir.glob(".checkpoint_*.tmp-*"):  # left by a process killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        meta = {"agent_hash": agent_hash, "algo": rl.algo, "obs_mode": rl.obs_mode, "latents": latents,
                "summary": None}
        write_json_atomic(agent_dir / META_FILE, meta)  # before the first checkpoint, so a resume can check it
        if latest is not None:
            algo.restore_from_path(str(latest[1].resolve()))
            print(f"train: resumed from {latest[1]} (iteration {algo.iteration})")
        writer = ProgressWriter(agent_dir)
        rows = []
        started = time.perf_counter()
        for iteration in tqdm(range(algo.iteration, rl.iterations), desc=f"train {rl.algo}/{rl.obs_mode}",
                              initial=algo.iteration, total=rl.iterations, unit="iter"):
            result = train_iteration(algo, error_key)
            row = metrics_row(result)
            rows.append(row)
            writer.write(row)
            logger.info("iteration %d: %s", row["iteration"], row)
            done = iteration + 1
            if done % rl.checkpoint_every == 0 or done == rl.iterations:
                save_checkpoint(algo, config, agent_dir, done, latents)
        writer.close()
        checkpoint = latest_checkpoint(agent_dir)
        summary = {
            "algo": rl.algo,
            "obs_mode": rl.obs_mode,
            "iterations": algo.iteration,
            "checkpoint": str(checkpoint[1]) if checkpoint else None,
            "seconds": time.perf_counter() - started,
            "env_steps_lifetime": rows[-1]["env_steps_lifetime"] if rows else None,
            "env_steps_per_s": _mean([r["env_steps_per_s"] for r in rows]),
            "encoder_call_ms": _mean([r["encoder_call_ms"] for r in rows]),
            "episode_return_mean": next((r["episode_return_mean"] for r in reversed(rows)
                                         if r["episode_return_mean"] is not None), None),
            "skipped": False,
        }
        write_json_atomic(agent_dir / META_FILE, meta | {"summary": summary})
        return summary
    finally:
        algo.stop()


def training_current(config: EnvEncConfig) -> str | None:
    """Why <run>/agent/ already holds rl.iterations iterations of this very agent, or None."""
    agent_dir = RunLayout.of(config).agent
    latest, meta = latest_checkpoint(agent_dir), read_meta(agent_dir)
    if latest is None or meta is None or meta["agent_hash"] != agent_config_hash(config) \
            or latest[0] < config.rl.iterations:
        return None
    return (f"{latest[1]} already holds {latest[0]} iterations of this agent (rl.iterations="
            f"{config.rl.iterations}); raise rl.iterations to train on")


def agent_config_hash(config: EnvEncConfig) -> str:
    """What a checkpoint's weights depend on: the game, the model, (for latents) the VLM and encoder and (for
    rl.reward other than 'env') the reward model.

    Resources, batch sizes, learning rates and the iteration budget are left out: changing them continues
    training the same agent.
    """
    rl = config.rl
    payload: dict[str, Any] = {
        "game": config.env.game,
        "full_action_space": config.env.full_action_space,
        "rl": rl.model_dump(mode="json", include={"algo", "obs_mode", "fcnet_hiddens", "frame_stack",
                                                  "pixel_size", "dreamer_model_size"}),
    }
    if rl.reads_latents:
        payload["latents"] = config.section_hash("vlm", "encoder")
    if config.stage2.joint:  # the module holds the projector (and maybe trains the encoder)
        payload["joint"] = config.stage2.model_dump(mode="json")
    if rl.reward != "env":  # what it learned to maximise (absent for the game's reward: older agents keep their hash)
        payload["reward"] = {"mode": rl.reward, "scale": rl.reward_model_scale,
                             "reward_model": config.section_hash("reward_model")}
    return content_hash(payload)


# ----------------------------------------------------------------------------- metrics


def metrics_row(result: dict) -> dict:
    """One iteration's numbers from an RLlib result: returns, throughput (learner included), encoder calls."""
    runners = result.get("env_runners", {})
    learner = result.get("learners", {}).get("default_policy", {})
    seconds = float(result.get("time_this_iter_s", float("nan")))
    env_steps = _number(runners.get("num_env_steps_sampled"))
    calls = _number(runners.get("envenc_encode_calls"))
    frames = _number(runners.get("envenc_frames_encoded"))
    encode_ms = _number(runners.get("envenc_encode_ms"))
    row = {
        "iteration": int(result["training_iteration"]),
        "seconds": seconds,
        "env_steps": env_steps,
        "env_steps_lifetime": _number(result.get("num_env_steps_sampled_lifetime",
                                                 runners.get("num_env_steps_sampled_lifetime"))),
        "env_steps_per_s": env_steps / seconds if env_steps and seconds > 0 else None,
        "episodes": _number(runners.get("num_episodes")),
        "episode_return_mean": _number(runners.get("episode_return_mean")),
        "episode_len_mean": _number(runners.get("episode_len_mean")),
        "encoder_calls": calls,
        "encoder_frames_per_call": frames / calls if calls else None,
        "encoder_call_ms": encode_ms / calls if calls else None,
        # rl.reward model | env+model: the game's reward and the reward model's (scaled) summed over the
        # iteration's steps; episode_return_mean above is the return of the reward the agent trains on
        "env_reward": _number(runners.get("envenc_env_reward")),
        "model_reward": _number(runners.get("envenc_model_reward")),
    }
    for key in LEARNER_METRICS:
        if key in learner:
            row[key] = _number(learner[key])
    return row


class ProgressWriter:
    """progress.jsonl + progress.csv (columns of the first row) + TensorBoard scalars when tensorboardX is there."""

    def __init__(self, agent_dir: Path):
        self.jsonl_path, self.csv_path = agent_dir / "progress.jsonl", agent_dir / "progress.csv"
        self.columns: list[str] | None = None
        if self.csv_path.is_file():  # a resumed run appends under the header it started with
            with self.csv_path.open(newline="") as f:
                self.columns = next(csv.reader(f), None)
        self.tensorboard = None
        try:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(str(agent_dir / "tb"))
        except ImportError:
            logger.info("tensorboardX is not installed: no TensorBoard event files")

    def write(self, row: dict) -> None:
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        new_file = self.columns is None
        if new_file:
            self.columns = list(row)
        with self.csv_path.open("a" if not new_file else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["iteration"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None




