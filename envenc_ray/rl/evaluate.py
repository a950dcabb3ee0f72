"""Stage `evaluate`: play N greedy episodes with a trained agent; mean/std return, optional GIF.

The policy is rebuilt from our config (the same RLModule spec training used) and the checkpoint's
policy.safetensors (weights only, nothing unpickled); observations come from `EnvEncVectorEnv`, i.e. the
same per-episode latents / frame stacks the RLlib connector produced in training, one encoder call per
step for all N episodes. No Ray cluster is needed (unless the encoder is the Serve deployment).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import DataError, InputError
from envenc_ray.files import read_json, replaced_atomically, write_json_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.rl.checkpoints import latest_checkpoint, load_policy

logger = logging.getLogger(__name__)

EVAL_FILE, REFERENCE_FILE = "eval.json", "reference.json"  # in <run>/agent/


def evaluate(config: EnvEncConfig, checkpoint: str | Path | None = None, episodes: int | None = None,
             gif: str | Path | None = None) -> dict:
    """Greedy returns of `episodes` episodes (default rl.eval_episodes).

    They are played rl.num_envs_per_env_runner at a time in one EnvEncVectorEnv (one encoder call per step
    for all of them); a sub-env whose episode ends starts the next one. `checkpoint` defaults to the newest
    in <run>/agent/; `gif` writes episode 0 as an animation. The result also goes to <run>/agent/eval.json.
    """
    import torch
    from ray.rllib.core.columns import Columns
    from tqdm import tqdm

    from envenc_ray.rl.gym_wrapper import EnvEncVectorEnv

    episodes = config.rl.eval_episodes if episodes is None else episodes
    if episodes < 1:
        raise InputError(f"episodes must be >= 1, got {episodes}")
    if gif and config.rl.obs_mode == "state":
        raise InputError("--gif records the frames the agent saw, but an agent on rl.obs_mode 'state' sees the RAM's "
                         "object vector; evaluate it without --gif")
    if checkpoint is None:
        latest = latest_checkpoint(RunLayout.of(config).agent)
        if latest is None:
            raise DataError(f"no checkpoint in {RunLayout.of(config).agent}; run `envenc train` first or pass one")
        checkpoint = latest[1]
    checkpoint = Path(checkpoint).absolute()  # recorded in eval.json: the same folder whatever the working directory
    slots = min(episodes, config.rl.num_envs_per_env_runner)
    env = EnvEncVectorEnv(config, num_envs=slots)
    module = load_policy(config, checkpoint, env.single_observation_space, env.single_action_space)

    started = time.perf_counter()
    observations, _ = env.reset(seed=config.experiment.seed)
    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=int)
    episode_of: list[int | None] = list(range(slots))  # which episode each sub-env is playing
    next_episode, finished = slots, 0
    resetting = np.zeros(slots, dtype=bool)  # this sub-env's next step is the reset that starts its next episode
    state = _initial_state(module, slots)
    is_first = np.ones(slots, dtype=bool)
    gif_frames = [env.last_frames[0]] if gif else []
    max_steps = config.rl.eval_max_steps
    with tqdm(total=episodes, desc="evaluate", unit="episode") as progress:
        while finished < episodes:
            actions, state = greedy_actions(module, observations, state, is_first, torch, Columns)
            observations, rewards, terminateds, truncateds, _ = env.step(actions)
            for i in range(slots):
                is_first[i], resetting[i], episode = resetting[i], False, episode_of[i]
                if is_first[i] or episode is None:  # a reset step (no reward, no length) or an idle sub-env
                    continue
                returns[episode] += rewards[i]
                lengths[episode] += 1
                if gif and episode == 0:
                    gif_frames.append(env.last_frames[i])
                ended = terminateds[i] or truncateds[i]
                if ended or (max_steps is not None and lengths[episode] >= max_steps):
                    finished += 1
                    progress.update(1)
                    episode_of[i] = next_episode if next_episode < episodes else None
                    next_episode += 1
                    resetting[i] = True
                    if not ended:
                        env.request_reset(i)  # cut at eval_max_steps: the env itself would play on
    env.close()
    seconds = time.perf_counter() - started
    result = {
        "checkpoint": str(checkpoint),
        "episodes": episodes,
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "env_steps_per_s": float(lengths.sum() / seconds) if seconds else None,
        "encoder_call_ms": (1000 * env.observer.encode_seconds / env.observer.encode_calls
                            if env.observer.encode_calls else None),
        "gif": str(gif) if gif else None,
    }
    if gif:
        write_gif(gif_frames, Path(gif))
    out = RunLayout.of(config).agent / EVAL_FILE
    if checkpoint.resolve().parent == out.parent.resolve():  # the run's own agent (not an experiment trial's)
        write_json_atomic(out, result)
    print(f"evaluate: {episodes} episodes, return {result['return_mean']:.2f} +- {result['return_std']:.2f}")
    return result


def greedy_actions(module, observations, state, is_first, torch, Columns):
    """Deterministic actions for a batch of observations (and the next recurrent state, for DreamerV3)."""
    with torch.no_grad():
        obs = ({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in observations.items()}
               if isinstance(observations, dict) else torch.from_numpy(np.ascontiguousarray(observations)))
        if module.is_stateful():  # DreamerV3: obs with a time rank of 1, its RSSM state, is_first per episode
            batch = {Columns.OBS: obs.unsqueeze(1), Columns.STATE_IN: state,
                     "is_first": torch.from_numpy(is_first.astype(np.float32))}
            out = module.forward_inference(batch)
            return out[Columns.ACTIONS].reshape(len(is_first)).numpy(), out[Columns.STATE_OUT]
        out = module.forward_inference({Columns.OBS: obs})
        if Columns.ACTIONS in out:
            return out[Columns.ACTIONS].numpy(), state
        dist = module.get_inference_action_dist_cls().from_logits(out[Columns.ACTION_DIST_INPUTS])
        return dist.to_deterministic().sample().numpy(), state


def write_gif(frames: list[np.ndarray], path: Path, fps: int = 15) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    with replaced_atomically(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def _initial_state(module, n: int):
    if not module.is_stateful():
        return None
    import torch

    return {k: torch.as_tensor(v).unsqueeze(0).repeat(n, *([1] * torch.as_tensor(v).dim()))
            for k, v in module.get_initial_state().items()}


def evaluation_current(config: EnvEncConfig) -> str | None:
    """Why agent/eval.json and reference.json already evaluate the newest checkpoint with these settings, or None."""
    agent_dir = RunLayout.of(config).agent
    checkpoint = latest_checkpoint(agent_dir)
    previous = read_json(agent_dir / EVAL_FILE)
    if (checkpoint is not None and previous is not None and (agent_dir / REFERENCE_FILE).is_file()
            and previous["checkpoint"] == str(checkpoint[1]) and previous["episodes"] == config.rl.eval_episodes):
        return f"{agent_dir / EVAL_FILE} already evaluates the newest checkpoint"
    return None


def reference_returns(config: EnvEncConfig, episodes: int | None = None) -> dict:
    """Returns of three reference policies on the agent's env settings: the random policy (a learning curve's
    floor), the best constant action (`constant`: every action of the env's set played alone, the best kept; a
    greedy agent that learned one action scores this much without reading the screen, e.g. LEFT alone serves
    Breakout's ball into the bricks often enough for 6.75 with env.fire_on_life_start) and the RAM heuristic (a
    simple bar, annotated games only). Same episode count, seeds and step cap as `evaluate` (the pipeline writes
    them to <run>/agent/reference.json; an experiment into its results.json)."""
    from envenc_ray.envs.annotate import get_annotator
    from envenc_ray.envs.atari import make_env_from_config
    from envenc_ray.errors import UnsupportedGameError

    episodes = episodes or config.rl.eval_episodes
    seed, max_steps = config.experiment.seed, config.rl.eval_max_steps
    result: dict = {"episodes": episodes, "max_steps": max_steps}
    env = make_env_from_config(config.env)
    meanings = env.unwrapped.get_action_meanings()
    try:
        rng = np.random.default_rng(seed)
        result["random"] = _returns(env, episodes, seed, max_steps, lambda: int(rng.integers(env.action_space.n)))
        per_action = {meaning: _returns(env, episodes, seed, max_steps, lambda action=action: action)
                      for action, meaning in enumerate(meanings)}
        best = max(per_action, key=lambda meaning: per_action[meaning]["return_mean"])
        result["constant"] = {"action": best, **per_action[best],
                              "per_action": {meaning: r["return_mean"] for meaning, r in per_action.items()}}
        try:
            annotator = get_annotator(RunLayout.of(config).game, meanings)
        except UnsupportedGameError:
            return result  # no heuristic for this game: the report shows the other lines
        result["heuristic"] = _returns(env, episodes, seed, max_steps,
                                       lambda: annotator.annotate(env.unwrapped.ale.getRAM()).heuristic_action,
                                       reset=annotator.reset)
    finally:
        env.close()
    return result


def reference_label(policy: str, reference: dict) -> str:
    """How plots and tables name a reference policy of `reference_returns`: 'random policy', 'constant LEFT'
    (its best constant action), 'RAM heuristic'."""
    if policy == "constant":
        return f"constant {reference['constant']['action']}"
    return {"random": "random policy", "heuristic": "RAM heuristic"}[policy]


def _returns(env, episodes: int, seed: int, max_steps: int | None, choose, reset=lambda: None) -> dict:
    """Mean, std and each return of `episodes` episodes (seeds seed, seed + 1, ...) of the policy `choose()`."""
    returns = []
    for episode in range(episodes):
        env.reset(seed=seed + episode)
        reset()
        total, steps, done = 0.0, 0, False
        while not done and (max_steps is None or steps < max_steps):
            _, reward, terminated, truncated, _ = env.step(choose())
            total, steps, done = total + float(reward), steps + 1, terminated or truncated
        returns.append(total)
    return {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)), "returns": returns}
