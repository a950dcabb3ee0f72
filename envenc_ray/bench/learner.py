"""`envenc bench learner`: what stage2.method 'joint' costs PPO's learner, next to precomputed latents.

Two PPO algorithms with the config's VLM, encoder and batch sizes (rl.train_batch_size, minibatch_size,
num_epochs):
  latents  the learner sees precomputed latents: what stage2.method pretrained and finetuned give it (the VLM and
           the encoder ran in the EnvRunner); it trains RLlib's MLP and heads
  joint    the learner sees the window of per-patch vision features and runs projector -> frozen truncated
           decoder -> pooling -> encoder on every frame of every sample (stage2.train_encoder as the config says)
Each samples ONE train batch, then times `learner_group.update` on that batch: one warm-up, then `iterations`
measured updates. One update is what a PPO iteration's learner does: the value pass over the whole batch (GAE),
then num_epochs passes of SGD steps over minibatches. Sampling is not timed (`envenc bench rollout` times it);
everything runs in this process (rl.num_env_runners=0, the encoder in-process, rl.num_learners as set).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from envenc_ray.config import EnvEncConfig

MODES = ("latents", "joint")


def bench_learner(config: EnvEncConfig, json_out: str | None = None, iterations: int = 3, *,
                  command: str | None = None) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON to `json_out` (if given) and return the results."""
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
    from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

    from envenc_ray.bench.common import machine_facts, model_and_encoder, phase, write_json
    from envenc_ray.layout import RunLayout
    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.runtime import ensure_ray

    ensure_ray()
    rl = config.rl
    pair, untrained = model_and_encoder(config)
    model_path, encoder_dir = pair.model_path, Path(pair.encoder_dir)
    results: dict[str, Any] = {
        "command": command or " ".join(sys.argv),
        "machine": machine_facts() | {"learner_torch_threads": torch.get_num_threads()},
        "settings": {
            "train_batch_size": rl.train_batch_size, "minibatch_size": rl.minibatch_size, "num_epochs": rl.num_epochs,
            "num_envs_per_env_runner": rl.num_envs_per_env_runner, "fcnet_hiddens": rl.fcnet_hiddens,
            "num_learners": rl.num_learners, "train_encoder": config.stage2.train_encoder,
            "measured_updates": iterations, "vlm": config.vlm.model_dump(mode="json"),
            "encoder": config.encoder.model_dump(mode="json"), "untrained_encoder": untrained,
        },
    }
    for mode in MODES:
        variant = config.model_copy(deep=True)
        variant.vlm.model = model_path
        variant.stage2.method = "joint" if mode == "joint" else "pretrained"  # the VLM is given by path either way
        variant.stage2.joint_from = "pretrained"
        variant.rl.encoder_dir, variant.rl.encoder_source, variant.rl.num_env_runners = str(encoder_dir), "in_process", 0
        variant.experiment.name = f"{config.experiment.name}-bench-learner-{mode}"
        variant.experiment.run_root = str(RunLayout.of(config).bench)
        phase(f"{mode}: sampling one train batch of {rl.train_batch_size} env steps")
        algo = build_algorithm(variant)
        try:
            episodes = synchronous_parallel_sample(worker_set=algo.env_runner_group, max_env_steps=rl.train_batch_size,
                                                   _uses_new_env_runners=True)
            samples = sum(len(episode) for episode in episodes)
            seconds = []
            for update in range(iterations + 1):  # the first one warms up (allocations, lazy init)
                started = time.perf_counter()
                algo.learner_group.update(episodes=episodes, timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: samples},
                                          num_epochs=rl.num_epochs, minibatch_size=rl.minibatch_size,
                                          shuffle_batch_per_epoch=True)
                seconds.append(time.perf_counter() - started)
                phase(f"{mode}: update {update} {'(warm-up) ' if not update else ''}took {seconds[-1]:.3f} s")
            learner = algo.learner_group._learner  # rl.num_learners=0: the learner is in this process
            module = learner.module[DEFAULT_MODULE_ID] if learner is not None else None
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad) if module else None
            observation = list(algo.get_module().observation_space.shape)
        finally:
            algo.stop()
        update_s = statistics.median(seconds[1:])
        results[mode] = {"samples": samples, "observation_shape": observation, "trainable_parameters": trainable,
                         "update_s": seconds[1:], "update_s_median": update_s,
                         # per sample and epoch: comparable whatever the minibatch count
                         "ms_per_sample_epoch": 1000 * update_s / (samples * rl.num_epochs)}
    results["joint_over_latents"] = results["joint"]["update_s_median"] / results["latents"]["update_s_median"]
    for mode in MODES:
        row = results[mode]
        print(f"bench: {mode:8s} update {row['update_s_median']:.3f} s (median of {iterations}) for {row['samples']} "
              f"samples x {rl.num_epochs} epochs = {row['ms_per_sample_epoch']:.2f} ms per sample-epoch; "
              f"{row['trainable_parameters']} trainable parameters, observation {row['observation_shape']}")
    print(f"bench: joint / latents = {results['joint_over_latents']:.1f}x per learner update")
    out = json_out or str(RunLayout.of(config).bench / "learner.json")
    write_json(results, Path(out))
    print(f"bench: wrote {out}")
    return results
