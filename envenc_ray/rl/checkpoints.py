"""Agent checkpoints in <run>/agent/: RLlib's own (for resuming) plus a weights-only policy (for evaluation).

    checkpoint_<iteration>/   algo.save_to_path (pickles: optimizer and connector state) + policy.safetensors
                              + policy.json (what the policy is), written under a temporary name, then renamed
    train.json                what the checkpoints were trained with (agent hash, algo, obs mode, summary)

RLlib's files are pickles: restore (resume) only checkpoints you made yourself. `evaluate` loads
policy.safetensors only, which unpickles nothing. Both record the sha256 of the encoder and VLM weights the
agent was trained on; resuming or evaluating it against other weights is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import DataError, InputError
from envenc_ray.encoder.served import ServedPair
from envenc_ray.files import replaced_atomically
from envenc_ray.rl.algorithm import offline_algorithm_config
from envenc_ray.storage import remove

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{6})$")
META_FILE = "train.json"
POLICY_WEIGHTS, POLICY_CONFIG = "policy.safetensors", "policy.json"


def latest_checkpoint(agent_dir: Path) -> tuple[int, Path] | None:
    """(iteration, path) of the newest complete checkpoint in `agent_dir`, or None."""
    found = []
    if Path(agent_dir).is_dir():
        for path in Path(agent_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and path.is_dir():
                found.append((int(match.group(1)), path))
    return max(found) if found else None


def save_checkpoint(algo, config: EnvEncConfig, agent_dir: Path, iteration: int, latents: dict | None) -> Path:
    """algo.save_to_path into a temporary folder, rename it to checkpoint_<iteration>, prune old ones.

    RLlib's own files (pickles: optimizer and connector state, for resuming) sit next to policy.safetensors
    + policy.json, the weights-only copy that `evaluate` loads.
    """
    keep = config.rl.keep_checkpoints
    final = agent_dir / f"checkpoint_{iteration:06d}"
    with replaced_atomically(final) as tmp:
        algo.save_to_path(str(tmp.resolve()))
        save_policy(algo, tmp, config, latents)
    checkpoints = sorted(p for p in agent_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        remove(old)  # on a URI run root, there too
    return final


def read_meta(agent_dir: Path) -> dict | None:
    path = agent_dir / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON; delete {agent_dir} to train from scratch") from None


def save_policy(algo, checkpoint: Path, config: EnvEncConfig, latents: dict | None) -> None:
    """Weights-only copy of the trained module (safetensors) + what it is (including `latents_identity`, the
    encoder and VLM it was trained on), next to RLlib's own files."""
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors.torch import save_file

    weights = algo.learner_group.get_weights(module_ids=[DEFAULT_MODULE_ID])[DEFAULT_MODULE_ID]
    tensors = {k: torch.as_tensor(np.asarray(v)).contiguous() for k, v in weights.items()}
    save_file(tensors, str(checkpoint / POLICY_WEIGHTS))
    description = {"algo": config.rl.algo, "obs_mode": config.rl.obs_mode,
                   "observation_shapes": space_shapes(algo.get_module().observation_space), "game": config.env.game,
                   "frame_stack": config.rl.frame_stack, "pixel_size": config.rl.pixel_size, "latents": latents}
    (checkpoint / POLICY_CONFIG).write_text(json.dumps(description, indent=2))


def load_policy(config: EnvEncConfig, checkpoint: Path, obs_space, action_space):
    """The trained RLModule from checkpoint/policy.safetensors, built from the spec training used."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, description_path = checkpoint / POLICY_WEIGHTS, checkpoint / POLICY_CONFIG
    if not weights_path.is_file() or not description_path.is_file():
        raise DataError(f"{checkpoint} is not an agent checkpoint (needs {POLICY_WEIGHTS} and {POLICY_CONFIG}); "
                        "pass a checkpoint_<iteration> folder from <run>/agent/")
    try:
        description = json.loads(description_path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8 text
        raise DataError(f"{description_path} is not valid JSON ({error}); it is not a checkpoint envenc wrote") from None
    if not isinstance(description, dict) or not {"algo", "obs_mode", "observation_shapes"} <= description.keys():
        raise DataError(f"{description_path} lacks algo, obs_mode or observation_shapes; it is not a checkpoint "
                        "envenc wrote")
    rl = config.rl
    if (description["algo"], description["obs_mode"]) != (rl.algo, rl.obs_mode):
        raise InputError(f"{checkpoint} holds a {description['algo']} agent on {description['obs_mode']} "
                         f"observations, but the config says rl.algo={rl.algo}, rl.obs_mode={rl.obs_mode}; "
                         "evaluate it with the config it was trained with")
    if description["observation_shapes"] != space_shapes(obs_space):
        raise InputError(f"{checkpoint} was trained on observations of shape {description['observation_shapes']} "
                         f"but the encoder/config gives {space_shapes(obs_space)}; use the encoder and "
                         "frame settings it was trained with")
    recorded = description.get("latents")
    if recorded is not None and not isinstance(recorded, dict):
        raise DataError(f"{description_path}: 'latents' is {type(recorded).__name__}, expected the encoder and VLM "
                        "identity envenc records; it is not a checkpoint envenc wrote")
    check_latents(recorded, latents_identity(config), str(checkpoint))
    algo_config = offline_algorithm_config(config)
    spec = algo_config.get_rl_module_spec(spaces={DEFAULT_MODULE_ID: (obs_space, action_space)}, inference_only=False)
    module = spec.build()
    try:
        module.load_state_dict(load_file(str(weights_path)))
    except (SafetensorError, RuntimeError, OSError) as error:
        raise DataError(f"{weights_path} does not hold this agent's weights ({str(error).splitlines()[0]}); "
                        "it is damaged or from another agent") from None
    module.eval()
    return module


def space_shapes(space):
    """[shape] of a Box, {key: [shape]} of a Dict: what a checkpoint records of its observation space."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Dict):
        return {key: list(sub.shape) for key, sub in space.spaces.items()}
    return list(space.shape)


def latents_identity(config: EnvEncConfig) -> dict | None:
    """The encoder and VLM an agent on latents reads, by the sha256 of their weights (None for pixels and state): what
    train.json and policy.json record, and what resuming and evaluating check. With rl.encoder_source 'serve'
    it is what the running app loaded."""
    if not config.rl.reads_latents:
        return None
    if config.rl.encoder_source == "serve":
        from envenc_ray.serve.client import EncoderClient

        info = EncoderClient.connect(app_name=config.rl.serve_app).info
        return {key: info.get(key) for key in ("encoder_dir", "encoder_sha256", "model_path", "vlm_sha256")}
    return ServedPair.resolve(config).identity()  # checked where the pair is loaded (encoder_source)


def check_latents(recorded: dict | None, current: dict | None, agent: str) -> None:
    """Refuse an agent whose encoder or VLM weights differ from the ones it was trained on (a checkpoint made
    before identities were recorded, or a hub-name VLM without local weights, is not checked)."""
    if not recorded or not current:
        return
    for name, folder, digest in (("encoder", "encoder_dir", "encoder_sha256"), ("VLM", "model_path", "vlm_sha256")):
        if recorded.get(digest) and current.get(digest) and recorded[digest] != current[digest]:
            raise DataError(f"{agent} was trained on the {name} in {recorded[folder]} (sha256 {recorded[digest][:12]}), "
                            f"but this config reads {current[folder]} (sha256 {current[digest][:12]}); use the {name} "
                            "it was trained with, or train a new agent (another experiment.name)")
