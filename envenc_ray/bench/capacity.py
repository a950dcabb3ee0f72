"""The cluster model of docs/performance.md: how fast E EnvRunners x k sub-envs sample latents from R encoder
replicas, from terms that `envenc bench encoder` and `envenc bench rollout` measure, and how many replicas (and
which autoscaling target) a given number of EnvRunners needs.

Terms, all measured (`measure_terms`):
  t_env    EnvRunner seconds per vector step outside its encoder call: k env steps, the policy forward, the
           connector's bookkeeping (plain latent_serve: 1 / vector steps per s - encoder seconds per call)
  o        Serve's seconds per call beyond the forward pass: routing, serialization, the batch wait (encoder
           seconds per call - k * c(k))
  c(b)     a replica's forward seconds per frame at batch b (the in-process batch sweep, one thread)
  b_sat    the smallest batch whose frames/s is within 10% of the sweep's best: what a replica should be given

Predicted sampling env steps/s of E EnvRunners (plain sampler: each steps, then waits for its one call):
  per_runner = k / (t_env + o + k c(k))
  X = min(E per_runner,                   every EnvRunner at its own pace
          R / c(b),                       R replicas; a busy replica's next forward takes the calls that queued
                                          while it ran: b = k max(1, E/R - 1), at most b_sat (closed loop: a
                                          caller sends its next call only after the last came back)
          cores / (t_env / k + c(k)))     the cores the processes share (on a laptop or this 2-core CI box)
Replicas needed, target_ongoing_requests: `replicas_needed`, `autoscaling_target`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def measure_terms(encoder_json: dict[str, Any], rollout_json: dict[str, Any]) -> dict[str, Any]:
    """The model's terms from one `bench encoder` run (the sweep) and one `bench rollout` run (latent_serve)."""
    sweep = encoder_json["sweep"]
    batches, rates = sweep["batch_sizes"], sweep["float32"]
    k = rollout_json["settings"]["num_envs_per_env_runner"]
    serve = rollout_json["modes"]["latent_serve"]
    per_frame = {int(b): 1.0 / rate for b, rate in zip(batches, rates)}
    step_s = k / serve["sample_env_steps_per_s"]  # one vector step of one EnvRunner (1 EnvRunner in that run)
    call_s = serve["encoder_ms_per_call"] / 1000
    forward_s = k * cost_per_frame(per_frame, k)
    best = max(rates)
    return {
        "k": k,
        "t_env_s": step_s - call_s,
        "serve_overhead_s": call_s - forward_s,
        "per_frame_s": per_frame,
        "saturation_batch": int(min(b for b, rate in zip(batches, rates) if rate >= 0.9 * best)),
        "replica_frames_per_s_best": best,
        "sources": {"encoder": encoder_json.get("command"), "rollout": rollout_json.get("command")},
    }


def cost_per_frame(per_frame: dict[int, float], batch: float) -> float:
    """c(b): the sweep's seconds per frame, interpolated in log2(batch) between measured batch sizes."""
    sizes = sorted(per_frame)
    if batch <= sizes[0]:
        return per_frame[sizes[0]]
    if batch >= sizes[-1]:
        return per_frame[sizes[-1]]
    upper = next(size for size in sizes if size >= batch)
    lower = max(size for size in sizes if size <= batch)
    if upper == lower:
        return per_frame[lower]
    share = (math.log2(batch) - math.log2(lower)) / (math.log2(upper) - math.log2(lower))
    return per_frame[lower] + share * (per_frame[upper] - per_frame[lower])


def predict(terms: dict[str, Any], runners: int, replicas: int, cores: float | None = None) -> dict[str, float]:
    """Predicted sampling env steps/s of `runners` EnvRunners x k sub-envs on `replicas` replicas, and each bound."""
    k, per_frame = terms["k"], terms["per_frame_s"]
    per_runner = k / (terms["t_env_s"] + terms["serve_overhead_s"] + k * cost_per_frame(per_frame, k))
    batch = min(terms["saturation_batch"], k * max(1.0, runners / replicas - 1))  # calls queued during a forward
    bounds = {"runners": runners * per_runner, "replicas": replicas / cost_per_frame(per_frame, batch)}
    if cores is not None:
        bounds["cores"] = cores / (terms["t_env_s"] / k + cost_per_frame(per_frame, k))
    return {"env_steps_per_s": min(bounds.values()), **{f"bound_{name}": value for name, value in bounds.items()}}


def replicas_needed(terms: dict[str, Any], runners: int) -> int:
    """The fewest replicas that keep `runners` EnvRunners from waiting on a full replica (cores unbounded)."""
    replicas = 1
    while predict(terms, runners, replicas)["bound_replicas"] < predict(terms, runners, 1)["bound_runners"]:
        replicas += 1
    return replicas


def autoscaling_target(terms: dict[str, Any], calls_per_runner: int = 1) -> float:
    """serve.target_ongoing_requests: the calls in flight per replica at which it never idles. A caller spends
    t_env + o between its calls and k c(k) in the forward, so a replica stays busy from 1 + (t_env + o) / (k c(k))
    callers on (twice that with rl.overlap, whose EnvRunners keep two calls in flight); above it calls queue,
    below it the replica waits, so that is where Serve should add or remove one."""
    k = terms["k"]
    forward = k * cost_per_frame(terms["per_frame_s"], k)
    return calls_per_runner * (1 + (terms["t_env_s"] + terms["serve_overhead_s"]) / forward)


def check(terms: dict[str, Any], runs: list[dict[str, Any]], cores: float) -> list[dict[str, Any]]:
    """The model against `bench rollout` runs of latent_serve with other EnvRunner and replica counts."""
    rows = []
    for run in runs:
        runners, replicas = run["settings"]["num_env_runners"], run["settings"]["serve"]["max_replicas"]
        measured = run["modes"]["latent_serve"]["sample_env_steps_per_s"]
        predicted = predict(terms, runners, replicas, cores)
        rows.append({"runners": runners, "replicas": replicas, "measured_env_steps_per_s": measured,
                     **predicted, "predicted_over_measured": predicted["env_steps_per_s"] / measured})
    return rows


def main(argv: list[str]) -> None:
    """python -m envenc_ray.bench.capacity ENCODER.json ROLLOUT.json [CHECK.json ...] --out OUT.json"""
    if "--out" not in argv or len(argv) < 4:
        raise SystemExit(main.__doc__)
    out = Path(argv[argv.index("--out") + 1])
    inputs = [Path(a) for a in argv[: argv.index("--out")]]
    encoder_json, rollout_json, *checks = [json.loads(path.read_text()) for path in inputs]
    terms = measure_terms(encoder_json, rollout_json)
    cores = float(rollout_json["machine"]["cores"])
    results = {
        "inputs": [str(path) for path in inputs],
        "terms": terms,
        "check": check(terms, checks, cores),
        "replicas_needed": {runners: replicas_needed(terms, runners) for runners in (1, 2, 4, 8, 16, 32)},
        "autoscaling_target": {"plain": autoscaling_target(terms, 1), "overlap": autoscaling_target(terms, 2)},
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: results[key] for key in ("check", "replicas_needed", "autoscaling_target")}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
