"""Stage `evaluate`: play N greedy episodes with a trained agent; mean/std return, optional GIF.

The policy is rebuilt from our config (the same RLModule spec training used) and the checkpoint's
policy.safetensors (weights only, nothing unpickled); observations come from `EnvEncVectorEnv`, i.e. the
same per-episode latents / frame stacks the RLlib connector produced in training, one encoder call per
step for all N episodes. No Ray cluster is needed (unless the encoder is the Serve deployment).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from envenc_ray.config import EnvEncConfig
from envenc_ray.files import write_json_atomic
from envenc_ray.errors import DataError, InputError

logger = logging.getLogger(__name__)

POLICY_WEIGHTS, POLICY_CONFIG = "policy.safetensors", "policy.json"


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
    from envenc_ray.rl.train import latest_checkpoint

    episodes = config.rl.eval_episodes if episodes is None else episodes
    if episodes < 1:
        raise InputError(f"episodes must be >= 1, got {episodes}")
    if checkpoint is None:
        latest = latest_checkpoint(config.run_dir / "agent")
        if latest is None:
            raise DataError(f"no checkpoint in {config.run_dir / 'agent'}; run `envenc train` first or pass one")
        checkpoint = latest[1]
    checkpoint = Path(checkpoint)
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
    out = config.run_dir / "agent" / "eval.json"
    if out.parent.is_dir():
        write_json_atomic(out, result)
    print(f"evaluate: {episodes} episodes, return {result['return_mean']:.2f} +- {result['return_std']:.2f}")
    return result


def load_policy(config: EnvEncConfig, checkpoint: Path, obs_space, action_space):
    """The trained RLModule from checkpoint/policy.safetensors, built from the spec training used."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors.torch import load_file

    weights_path, description_path = checkpoint / POLICY_WEIGHTS, checkpoint / POLICY_CONFIG
    if not weights_path.is_file() or not description_path.is_file():
        raise DataError(f"{checkpoint} is not an agent checkpoint (needs {POLICY_WEIGHTS} and {POLICY_CONFIG}); "
                        "pass a checkpoint_<iteration> folder from <run>/agent/")
    description = json.loads(description_path.read_text())
    rl = config.rl
    if (description["algo"], description["obs_mode"]) != (rl.algo, rl.obs_mode):
        raise InputError(f"{checkpoint} holds a {description['algo']} agent on {description['obs_mode']} "
                         f"observations, but the config says rl.algo={rl.algo}, rl.obs_mode={rl.obs_mode}; "
                         "evaluate it with the config it was trained with")
    if description["observation_shapes"] != space_shapes(obs_space):
        raise InputError(f"{checkpoint} was trained on observations of shape {description['observation_shapes']} "
                         f"but the encoder/config gives {space_shapes(obs_space)}; use the encoder and "
                         "frame settings it was trained with")
    algo_config = _algorithm_config(config)
    spec = algo_config.get_rl_module_spec(spaces={DEFAULT_MODULE_ID: (obs_space, action_space)}, inference_only=False)
    module = spec.build()
    module.load_state_dict(load_file(str(weights_path)))
    module.eval()
    return module


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


def save_policy(algo, checkpoint: Path, config: EnvEncConfig) -> None:
    """Weights-only copy of the trained module (safetensors) + what it is, next to RLlib's own files."""
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors.torch import save_file

    weights = algo.learner_group.get_weights(module_ids=[DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID]
    tensors = {k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in weights.items()}
    save_file(tensors, str(checkpoint / POLICY_WEIGHTS))
    description = {"algo": config.rl.algo, "obs_mode": config.rl.obs_mode,
                   "observation_shapes": space_shapes(algo.get_module().observation_space), "game": config.env.game,
                   "frame_stack": config.rl.frame_stack, "pixel_size": config.rl.pixel_size}
    (checkpoint / POLICY_CONFIG).write_text(json.dumps(description, indent=2))


def write_gif(frames: list[np.ndarray], path: Path, fps: int = 15) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    os.replace(tmp, path)


def _initial_state(module, n: int):
    if not module.is_stateful():
        return None
    import torch

    return {k: torch.as_tensor(v).unsqueeze(0).repeat(n, *([1] * torch.as_tensor(v).dim()))
            for k, v in module.get_initial_state().items()}


def _algorithm_config(config: EnvEncConfig):
    """The algorithm config without an encoder source: only its RLModule spec is used here."""
    from envenc_ray.rl.connector import EncoderSource

    placeholder = EncoderSource(kind="in_process", latent_dim=1)  # never built: spaces come from the env
    if config.rl.algo == "dreamerv3":
        from envenc_ray.rl.dreamer import build_dreamer_config

        return build_dreamer_config(config, placeholder)
    from envenc_ray.rl.ppo import build_ppo_config

    return build_ppo_config(config, placeholder)


def space_shapes(space):
    """[shape] of a Box, {key: [shape]} of a Dict: what a checkpoint records of its observation space."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Dict):
        return {key: list(sub.shape) for key, sub in space.spaces.items()}
    return list(space.shape)




def reference_returns(config: EnvEncConfig, episodes: int | None = None) -> dict:
    """Returns of the random and the RAM-heuristic policy on the agent's env settings: a learning curve's
    floor and a simple bar. Same episode count, seed and step cap as `evaluate`; written to reference.json."""
    from envenc_ray.envs.annotate import get_annotator
    from envenc_ray.envs.atari import game_name, make_env_from_config
    from envenc_ray.errors import UnsupportedGameError

    episodes = episodes or config.rl.eval_episodes
    max_steps = config.rl.eval_max_steps
    result = {"episodes": episodes, "max_steps": max_steps}
    for policy in ("random", "heuristic"):
        env = make_env_from_config(config.env)
        try:
            annotator = get_annotator(game_name(config.env.game), env.unwrapped.get_action_meanings())
        except UnsupportedGameError:
            if policy == "heuristic":
                env.close()
                continue  # no heuristic for this game: the report shows the random line only
        rng = np.random.default_rng(config.experiment.seed)
        returns = []
        for episode in range(episodes):
            env.reset(seed=config.experiment.seed + episode)
            annotator.reset()
            total, steps, done = 0.0, 0, False
            while not done and (max_steps is None or steps < max_steps):
                if policy == "random":
                    action = int(rng.integers(env.action_space.n))
                else:
                    action = annotator.annotate(env.unwrapped.ale.getRAM()).heuristic_action
                _, reward, terminated, truncated, _ = env.step(action)
                total, steps, done = total + float(reward), steps + 1, terminated or truncated
            returns.append(total)
        env.close()
        result[policy] = {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
                          "returns": returns}
    out = config.run_dir / "agent" / "reference.json"
    if out.parent.is_dir():
        write_json_atomic(out, result)
    return result
