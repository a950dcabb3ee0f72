"""`envenc bench autoscale`: Serve's autoscaling of the encoder under load from RLlib EnvRunners, measured.

One PPO algorithm with the config's EnvRunners samples latents from one EnvironmentEncoder app (the config's
serve section: min_replicas, max_replicas, target_ongoing_requests, upscale/downscale delays). Phases:

  load    sampling passes (PPO's own synchronous_parallel_sample) back to back until Serve runs max_replicas
          replicas and a few more passes ran at that count, or `load_timeout_s`: env steps/s of every pass,
          with the replica count it ran at
  idle    no calls; the replica count is polled until it is back at min_replicas, or `idle_timeout_s`

The JSON holds the timeline (seconds at the start of each pass, replicas then, env steps/s), the throughput at each
replica count, and how long the scale-up and the scale-down took (to the first pass that found the new count). tests/test_autoscale.py runs the same function at a tiny size.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from envenc_ray.config import EnvEncConfig

BENCH_APP = "envenc-bench-autoscale"
PASSES_AT_MAX = 3  # sampling passes measured after the last replica is up


def bench_autoscale(config: EnvEncConfig, json_out: str | None = None, *, load_timeout_s: float = 180.0,
                    idle_timeout_s: float = 180.0, command: str | None = None) -> dict[str, Any]:
    """Run both phases, print a summary, write JSON to `json_out` (if given) and return the results."""
    import numpy as np

    from envenc_ray.bench.common import machine_facts, model_and_encoder, phase, write_json
    from envenc_ray.bench.rollout import sample_only
    from envenc_ray.errors import ConfigError
    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.runtime import ensure_ray
    from envenc_ray.serve.client import deploy_encoder, shutdown

    serve = config.serve
    if serve.max_replicas <= serve.min_replicas:
        raise ConfigError(f"bench autoscale needs room to scale: serve.max_replicas ({serve.max_replicas}) must be "
                          f"above serve.min_replicas ({serve.min_replicas}), e.g. --set serve.max_replicas=2")
    started = time.perf_counter()
    ensure_ray()
    pair, untrained = model_and_encoder(config)
    model_path, encoder_dir = pair.model_path, Path(pair.encoder_dir)
    load_config = config.model_copy(deep=True)
    load_config.vlm.model = str(model_path)
    load_config.rl.algo, load_config.rl.obs_mode, load_config.rl.encoder_source = "ppo", "latent", "serve"
    load_config.rl.serve_app, load_config.rl.encoder_dir = BENCH_APP, str(encoder_dir)
    results: dict[str, Any] = {
        "command": command or " ".join(sys.argv),
        "machine": machine_facts(),
        "settings": {"serve": serve.model_dump(mode="json"), "num_env_runners": config.rl.num_env_runners,
                     "num_envs_per_env_runner": config.rl.num_envs_per_env_runner, "overlap": config.rl.overlap,
                     "train_batch_size": config.rl.train_batch_size, "vlm": config.vlm.model_dump(mode="json"),
                     "untrained_encoder": untrained},
    }
    phase(f"deploying {BENCH_APP!r}: {serve.min_replicas}..{serve.max_replicas} replicas of {serve.num_cpus:g} CPU, "
          f"target {serve.target_ongoing_requests:g} calls in flight per replica")
    deploy_encoder(load_config, app_name=BENCH_APP, model_path=model_path, encoder_dir=str(encoder_dir))
    timeline: list[dict[str, float]] = []
    clock = time.perf_counter()
    try:
        algo = build_algorithm(load_config)
        try:
            phase(f"load: {config.rl.num_env_runners} EnvRunner(s) sampling until {serve.max_replicas} replicas run")
            at_max = 0
            while at_max < PASSES_AT_MAX and time.perf_counter() - clock < load_timeout_s:
                started_at, replicas = time.perf_counter() - clock, running_replicas(BENCH_APP)
                sampled = sample_only(algo)
                # a pass is credited to the replicas that ran at its start (one that came up during it: the next)
                timeline.append({"t": started_at, "replicas": replicas, "phase": "load",
                                 "env_steps_per_s": sampled["env_steps"] / sampled["seconds"]})
                at_max += replicas >= serve.max_replicas
        finally:
            algo.stop()
        load_ended = time.perf_counter() - clock
        phase(f"idle: no calls until {serve.min_replicas} replica(s) again")
        while time.perf_counter() - clock - load_ended < idle_timeout_s:
            replicas = running_replicas(BENCH_APP)
            timeline.append({"t": time.perf_counter() - clock, "replicas": replicas, "phase": "idle"})
            if replicas <= max(serve.min_replicas, 1):
                break
            time.sleep(1.0)
    finally:
        shutdown(BENCH_APP)

    load = [row for row in timeline if row["phase"] == "load"]
    by_count = {}
    for count in sorted({row["replicas"] for row in load}):
        rates = [row["env_steps_per_s"] for row in load if row["replicas"] == count]
        by_count[str(count)] = {"passes": len(rates), "env_steps_per_s_mean": float(np.mean(rates)),
                                "env_steps_per_s_last": rates[-1]}
    up = next((row["t"] for row in load if row["replicas"] >= serve.max_replicas), None)
    down = next((row["t"] - load_ended for row in timeline
                 if row["phase"] == "idle" and row["replicas"] <= max(serve.min_replicas, 1)), None)
    results.update({
        "timeline": timeline,
        "throughput_by_replicas": by_count,
        "max_replicas_seen": max(row["replicas"] for row in timeline),
        "final_replicas": timeline[-1]["replicas"],
        "scale_up_s": up,
        "scale_down_s_after_load": down,
        "wall_s": time.perf_counter() - started,
    })
    results["machine"]["load_average_end"] = os.getloadavg()
    print_summary(results)
    if json_out:
        write_json(results, Path(json_out))
        print(f"bench: wrote {json_out}")
    return results


def running_replicas(app_name: str) -> int:
    """Replicas of the app's encoder deployment that Serve reports RUNNING."""
    from ray import serve

    from envenc_ray.serve.deployment import DEPLOYMENT_NAME

    application = serve.status().applications.get(app_name)
    if application is None or DEPLOYMENT_NAME not in application.deployments:
        return 0
    return int(application.deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0))


def print_summary(results: dict[str, Any]) -> None:
    rows = ", ".join(f"{count} replica(s): {row['env_steps_per_s_mean']:.0f} env steps/s ({row['passes']} passes)"
                     for count, row in results["throughput_by_replicas"].items())
    up, down = results["scale_up_s"], results["scale_down_s_after_load"]
    print(f"autoscale: {rows}; scaled up after {'-' if up is None else f'{up:.0f} s'} of load, back down "
          f"{'-' if down is None else f'{down:.0f} s'} after it stopped (max {results['max_replicas_seen']}, "
          f"final {results['final_replicas']})")
