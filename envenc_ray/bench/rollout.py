"""`envenc bench rollout`: what the encoder costs PPO's sampling, side by side with the pixel baseline.

Four PPO algorithms with the same EnvRunners, sub-envs per runner and batch sizes (the config's `rl`):
  latent_serve          latents from ONE EnvironmentEncoder Serve deployment (rl.encoder_source=serve)
  latent_serve_overlap  the same, with double-buffered EnvRunners (rl.overlap: two groups of sub-envs, one
                        stepping while the other's frames are encoded)
  pixels                the 84x84 grayscale frame stack, no encoder (the baseline)
  latent_in_process     latents from an encoder loaded inside each EnvRunner (reference)
on the config's VLM (the built-in tiny one by default) and the run's encoder (an untrained one of
config.encoder's shape when <run>/encoder is absent: same shapes and cost, the JSON says so).

After a warm-up iteration each, every round runs, for each mode in turn (so a shared machine's load drifts
hit all alike):
  one PPO training iteration   -> env steps / iteration time (sampling + learner), and the connector's
                                  encoder counters (calls, frames per call, ms per call)
  one sampling-only pass       -> env steps / time of the same synchronous_parallel_sample PPO's
                                  training_step runs (RLlib's own sampling timer is an EMA over iterations,
                                  so it cannot time one pass)
The ratios latent_serve_overlap / pixels, sampling alone (goal >= 0.5x) and whole iterations (goal >= 1.0x),
are the headline; `latent_step_outside_forward_share` is the part of a latent env step's wall time that is not
the replica's forward pass (1 - env steps/s over the replica's frames/s while busy). All algorithms live at
once when their EnvRunners and the replica fit the cluster, else one after the other.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from envenc_ray.config import EnvEncConfig

BENCH_APP = "envenc-bench-rollout"
MODES = ("latent_serve", "latent_serve_overlap", "pixels", "latent_in_process")
SERVE_MODES = ("latent_serve", "latent_serve_overlap")
GOALS = {"latent_serve_over_pixels_sample": 0.5, "latent_serve_over_pixels_train": 1.0}


def bench_rollout(config: EnvEncConfig, json_out: str | None = None, iterations: int = 3, *, warmup: int = 1,
                  modes: tuple[str, ...] = MODES, command: str | None = None) -> dict[str, Any]:
    """Run the benchmark (`iterations` measured rounds after `warmup` iterations of each of `modes`), print a table,
    write JSON to `json_out` (if given) and return the results; the ratios need every mode."""
    import ray
    import torch

    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.train import metrics_row
    from envenc_ray.runtime import ensure_ray
    from envenc_ray.bench.common import machine_facts, model_and_encoder, phase, write_json
    from envenc_ray.serve.client import deploy_encoder, shutdown

    started = time.perf_counter()
    ensure_ray()
    rl = config.rl
    results: dict[str, Any] = {
        "command": command or " ".join(sys.argv),
        "machine": machine_facts() | {"ray_cluster": ray.cluster_resources()},
        "settings": {
            "algo": "ppo",
            "num_env_runners": rl.num_env_runners,
            "num_envs_per_env_runner": rl.num_envs_per_env_runner,
            "cpus_per_env_runner": rl.cpus_per_env_runner,
            "env_runner_torch_threads": rl.torch_threads,
            "driver_torch_threads": torch.get_num_threads(),  # the learner's (rl.num_learners=0: in the driver)
            "num_learners": rl.num_learners,
            "train_batch_size": rl.train_batch_size,
            "minibatch_size": rl.minibatch_size,
            "num_epochs": rl.num_epochs,
            "rollout_fragment_length": rl.rollout_fragment_length,
            "fcnet_hiddens": rl.fcnet_hiddens,
            "game": config.env.game,
            "warmup_iterations": warmup,
            "measured_rounds": iterations,
            "vlm": config.vlm.model_dump(mode="json"),
            "encoder": config.encoder.model_dump(mode="json"),
            "serve": config.serve.model_dump(mode="json"),
        },
    }
    if rl.algo != "ppo":
        print(f"bench: rl.algo={rl.algo!r} in the config; this benchmark measures PPO sampling")

    pair, untrained = model_and_encoder(config)
    model_path, encoder_dir = pair.model_path, Path(pair.encoder_dir)
    results["model"] = {"model_path": model_path, "encoder_dir": str(encoder_dir), "untrained_encoder": untrained}
    unknown = set(modes) - set(MODES)
    if unknown:
        from envenc_ray.errors import ConfigError

        raise ConfigError(f"unknown rollout modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    configs = mode_configs(config, model_path, encoder_dir, modes)
    client = None  # the Serve app, for the modes that read it
    if set(modes) & set(SERVE_MODES):
        phase(f"deploying the encoder app {BENCH_APP!r} (one replica set, shared by the latent_serve* EnvRunners)")
        t = time.perf_counter()
        client = deploy_encoder(config, app_name=BENCH_APP, model_path=model_path, encoder_dir=str(encoder_dir))
        results["serve_deploy_s"] = time.perf_counter() - t
        results["model"].update({"latent_dim": client.latent_dim, "window": client.window,
                                 "hidden_size": client.hidden_size, "image_size": list(client.image_size)})
    groups = schedule(configs, config, ray.cluster_resources().get("CPU", 0.0))
    results["settings"]["all_modes_at_once"] = len(groups) == 1

    measured: dict[str, dict[str, list]] = {mode: {"train": [], "sample": []} for mode in configs}
    build_s: dict[str, float] = {}
    replica: dict[str, dict] = {}  # per group with a Serve mode: the replica's counters over its rounds
    try:
        for group in groups:
            algos = {}
            try:
                for mode in group:
                    phase(f"building {mode} ({configs[mode].rl.num_env_runners} EnvRunner(s) x "
                          f"{configs[mode].rl.num_envs_per_env_runner} envs)")
                    t = time.perf_counter()
                    algos[mode] = build_algorithm(configs[mode])
                    build_s[mode] = time.perf_counter() - t
                phase(f"warm-up: {warmup} iteration(s) each of {', '.join(group)}")
                for mode, algo in algos.items():
                    for _ in range(warmup):
                        algo.train()
                serve_modes = [m for m in group if m in SERVE_MODES]
                replica_before = client.stats() if serve_modes else None
                for round_index in range(iterations):
                    phase(f"round {round_index + 1}/{iterations}: a training iteration + a sampling-only pass "
                          f"each of {', '.join(group)}")
                    for mode, algo in algos.items():
                        measured[mode]["train"].append(metrics_row(algo.train()))
                        measured[mode]["sample"].append(sample_only(algo))
                if serve_modes:
                    replica[" + ".join(serve_modes)] = replica_delta(replica_before, client.stats())
            finally:
                for algo in algos.values():
                    algo.stop()
    finally:
        if client is not None:
            shutdown(BENCH_APP)
        if untrained:
            shutil.rmtree(Path(encoder_dir).parent, ignore_errors=True)  # model_and_encoder's temporary folder

    results["modes"] = {mode: summarize(measured[mode]) | {"build_s": build_s.get(mode)} for mode in configs}
    results["replica"] = replica
    if set(configs) == set(MODES):
        results["ratios"] = ratios(results["modes"], replica)
    results["machine"]["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    if json_out:
        write_json(results, Path(json_out))
        print(f"bench: wrote {json_out}")
    return results


def mode_configs(config: EnvEncConfig, model_path: str, encoder_dir, modes: tuple[str, ...] = MODES
                 ) -> dict[str, EnvEncConfig]:
    """The config of each of `modes`: the same rl settings, PPO, only the observation, the encoder source and the
    sampler differ."""
    configs = {}
    for mode in modes:
        mode_config = config.model_copy(deep=True)
        mode_config.vlm.model = str(model_path)
        mode_config.rl.algo = "ppo"
        mode_config.rl.obs_mode = "pixels" if mode == "pixels" else "latent"
        mode_config.rl.encoder_source = "serve" if mode in SERVE_MODES else "in_process"
        mode_config.rl.overlap = mode == "latent_serve_overlap"
        mode_config.rl.serve_app = BENCH_APP
        mode_config.rl.encoder_dir = str(encoder_dir)
        configs[mode] = mode_config
    return configs


def schedule(configs: dict[str, EnvEncConfig], config: EnvEncConfig, cluster_cpus: float) -> list[tuple[str, ...]]:
    """All modes at once when every EnvRunner fits next to the replica (then rounds interleave), else one by one.

    The learners run in this driver process (rl.num_learners=0), which holds no Ray CPU of its own.
    """
    rl, serve = config.rl, config.serve
    runners = sum(c.rl.num_env_runners * c.rl.cpus_per_env_runner + c.rl.num_learners for c in configs.values())
    replica = serve.max_replicas * serve.num_cpus if set(configs) & set(SERVE_MODES) else 0.0
    if runners + replica <= cluster_cpus + 1e-9:
        return [tuple(configs)]
    one = rl.num_env_runners * rl.cpus_per_env_runner + rl.num_learners
    if one + replica > cluster_cpus + 1e-9:
        from envenc_ray.errors import ConfigError

        raise ConfigError(f"one mode needs {one:g} CPUs for its EnvRunners/Learners and the encoder replica "
                          f"{replica:g} (serve.max_replicas x serve.num_cpus), more than the cluster's "
                          f"{cluster_cpus:g}; lower rl.num_env_runners or rl.cpus_per_env_runner")
    print(f"bench: the modes' EnvRunners ({runners:g} CPUs) and the replica ({replica:g}) do not fit "
          f"{cluster_cpus:g} CPUs at once: measuring the modes one after the other")
    return [(mode,) for mode in configs]


def sample_only(algo) -> dict[str, float]:
    """One pass of PPO's sampling step alone (the same call training_step makes), timed from the driver."""
    from ray.rllib.execution.rollout_ops import synchronous_parallel_sample

    t = time.perf_counter()
    episodes, _ = synchronous_parallel_sample(
        worker_set=algo.env_runner_group,
        max_env_steps=algo.config.total_train_batch_size,
        sample_timeout_s=algo.config.sample_timeout_s,
        _uses_new_env_runners=True,
        _return_metrics=True,
    )
    seconds = time.perf_counter() - t
    return {"env_steps": float(sum(len(episode) for episode in episodes)), "seconds": seconds}


def summarize(measured: dict[str, list]) -> dict[str, Any]:
    """Pooled throughputs (total steps / total time over the rounds), per-round values and encoder latency."""
    train, sample = measured["train"], measured["sample"]
    if not train:
        return {}
    steps = sum(row["env_steps"] for row in train)
    seconds = sum(row["seconds"] for row in train)
    sample_steps = sum(row["env_steps"] for row in sample)
    sample_seconds = sum(row["seconds"] for row in sample)
    calls = sum(row["encoder_calls"] or 0 for row in train)
    out = {
        "train_env_steps_per_s": steps / seconds,
        "train_rounds_env_steps_per_s": [row["env_steps"] / row["seconds"] for row in train],
        "sample_env_steps_per_s": sample_steps / sample_seconds,
        "sample_rounds_env_steps_per_s": [row["env_steps"] / row["seconds"] for row in sample],
        "env_steps_per_iteration": steps / len(train),
        "iteration_s": seconds / len(train),
        # what the iteration spends outside sampling: learner update, weight sync, metrics
        "learner_share_estimate": max(0.0, 1 - (steps / (sample_steps / sample_seconds)) / seconds),
        "encoder_calls_per_iteration": calls / len(train) if calls else None,
    }
    if calls:
        out["encoder_ms_per_call"] = sum(row["encoder_call_ms"] * row["encoder_calls"] for row in train) / calls
        out["encoder_frames_per_call"] = (
            sum(row["encoder_frames_per_call"] * row["encoder_calls"] for row in train) / calls)
        out["encoder_share_of_iteration"] = calls * out["encoder_ms_per_call"] / 1000 / seconds
    return out


def replica_delta(before: list[dict], after: list[dict]) -> dict[str, Any]:
    """The replica counters over the measured rounds (both training and sampling-only passes)."""
    def total(stats, key):
        return sum(replica.get(key, 0) or 0 for replica in stats)

    delta = {key: total(after, key) - total(before, key)
             for key in ("calls", "frames", "batches", "cache_hits", "frames_computed", "busy_s")}
    delta["replicas"] = len(after)
    if delta["batches"]:
        delta["mean_calls_per_batch"] = delta["calls"] / delta["batches"]
    if delta["frames"]:
        delta["cache_hit_rate"] = delta["cache_hits"] / delta["frames"]
    if delta["busy_s"]:
        delta["busy_frames_per_s"] = delta["frames"] / delta["busy_s"]
    return delta


def ratios(modes: dict[str, dict], replica: dict[str, dict]) -> dict[str, Any]:
    """The headline ratios (with the overlapped sampler, the fast path), the plain sampler's, the overlap's gain,
    and the share of a latent env step outside the replica's forward pass (where each serve mode ran alone)."""
    plain, overlap = modes["latent_serve"], modes["latent_serve_overlap"]
    pixels, local = modes["pixels"], modes["latent_in_process"]
    out: dict[str, Any] = {}
    for kind in ("train", "sample"):
        key = f"{kind}_env_steps_per_s"
        out[f"latent_serve_over_pixels_{kind}"] = overlap[key] / pixels[key]
        out[f"plain_latent_serve_over_pixels_{kind}"] = plain[key] / pixels[key]
        out[f"overlap_over_plain_{kind}"] = overlap[key] / plain[key]
        out[f"latent_serve_over_in_process_{kind}"] = overlap[key] / local[key]
    for mode in SERVE_MODES:
        busy = replica.get(mode, {}).get("busy_frames_per_s")
        if busy:  # one frame per env step: the step's forward share is (steps/s) / (forward frames/s)
            out[f"{mode}_step_outside_forward_share"] = 1 - modes[mode]["sample_env_steps_per_s"] / busy
    out["latent_step_outside_forward_share"] = out.get("latent_serve_overlap_step_outside_forward_share")
    out["goals"] = GOALS
    out["goals_met"] = {name: out[name] >= goal for name, goal in GOALS.items()}
    return out


def print_table(results: dict[str, Any]) -> None:
    s = results["settings"]
    print(f"\nPPO rollout on {s['game']}: {s['num_env_runners']} EnvRunner(s) x {s['num_envs_per_env_runner']} envs, "
          f"batch {s['train_batch_size']}, {s['measured_rounds']} rounds"
          + (" (untrained encoder)" if results["model"]["untrained_encoder"] else ""))
    header = ("mode", "train steps/s", "sample steps/s", "encoder ms/call", "frames/call", "encoder share")
    rows = []
    for mode, numbers in results["modes"].items():
        rows.append((mode, _fmt(numbers.get("train_env_steps_per_s")), _fmt(numbers.get("sample_env_steps_per_s")),
                     _fmt(numbers.get("encoder_ms_per_call")), _fmt(numbers.get("encoder_frames_per_call")),
                     _fmt(numbers.get("encoder_share_of_iteration"))))
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
    r = results.get("ratios")
    if r is None:
        return
    print(f"latent_serve_overlap / pixels: {r['latent_serve_over_pixels_train']:.2f}x with the learner (goal >= "
          f"{GOALS['latent_serve_over_pixels_train']}x), {r['latent_serve_over_pixels_sample']:.2f}x sampling only "
          f"(goal >= {GOALS['latent_serve_over_pixels_sample']}x); overlap / plain: "
          f"{r['overlap_over_plain_sample']:.2f}x sampling only; outside the forward pass: "
          f"{_fmt(r['latent_step_outside_forward_share'])} of a latent env step")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"
