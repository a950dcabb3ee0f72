"""Stage `tune`: a Ray Tune sweep over config keys given as dotted paths -> <run>/tune/.

    read the sweep YAML -> check every key and value against EnvEncConfig, and that a trial fits the cluster
    -> deploy the encoder once (rl.encoder_source=serve; the trials connect by app name)
    -> Tuner.fit: each trial = the config + its overrides -> build_algorithm -> one metrics_row per iteration
    -> results table (printed, results.csv, results.json) and the best trial's full config (best.yaml).

A sweep file (see configs/sweeps/ppo-lr.yaml):

    metric: episode_return_mean     # a metrics_row key (rl/train.py); NaN until an episode has ended
    mode: max
    num_samples: 2                  # random samples; grid values are crossed with them (Tune's semantics)
    scheduler: {type: asha, max_t: 20, grace_period: 2, reduction_factor: 4}   # or {type: fifo} (default)
    max_concurrent_trials: null     # null: as many as fit the cluster next to the encoder deployment
    params:
      rl.lr: {grid: [1.0e-4, 3.0e-4]}
      rl.entropy_coeff: {uniform: [0.0, 0.02]}
      rl.num_epochs: {choice: [2, 4]}
      rl.minibatch_size: {randint: [64, 256]}      # integers, both ends included
      rl.gamma: {loguniform: [0.9, 0.999]}
      env.max_episode_steps: 2000                  # a plain value: the same override in every trial

Keys that change the latents the agent sees (encoder.*, vlm.*, env.game) are refused: each value would need
its own trained encoder (and the trials share one). Sweep them by training one encoder per value and running
one sweep per run directory. Only rl.* (not where the encoder comes from), env.* and experiment.seed vary.

<run>/tune/ holds results.csv + results.json (one row per trial), best.yaml (a complete config, loadable by
`envenc config show` / `envenc train`) and Tune's own trial folders under <sweep name>-<timestamp>/.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import tune as ray_tune

from envenc_ray.config import EnvEncConfig, read_yaml_mapping
from envenc_ray.errors import ConfigError
from envenc_ray.files import replaced_atomically, write_text_atomic
from envenc_ray.layout import RunLayout
from envenc_ray.pipeline.trials import (TrialLines, absolute_paths, bundles_total, check_resources,
                                        check_rllib_settings, first_line, fit_trials, raise_trial_error,
                                        trial_algorithm, trial_bundles, trial_config, trial_id)

logger = logging.getLogger(__name__)

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
MAX_CHECKED_COMBINATIONS = 256  # beyond this, each key's candidate values are checked one at a time


# ----------------------------------------------------------------------------- the sweep file


class SchedulerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["fifo", "asha"] = Field("fifo", description="fifo: every trial runs to the end; asha: "
                                          "asynchronous successive halving stops weak trials at rungs.")
    max_t: int | None = Field(None, ge=1, description="ASHA: most training iterations of a trial (None: rl.iterations).")
    grace_period: int = Field(1, ge=1, description="ASHA: iterations before a trial can be stopped.")
    reduction_factor: float = Field(4.0, gt=1, description="ASHA: 1/reduction_factor of the trials pass each rung.")


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str = Field("episode_return_mean", description="metrics_row key that ranks the trials.")
    mode: Literal["max", "min"] = Field("max", description="Whether a larger metric is better.")
    num_samples: int = Field(1, ge=1, description="Random samples of the space; each is crossed with the grid.")
    scheduler: SchedulerSpec = SchedulerSpec()
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; None: as many as fit the cluster (checked before launching).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop the whole sweep after this many seconds.")
    params: dict[str, Any] = Field(..., min_length=1, description="Dotted config key -> distribution or value.")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        from envenc_ray.rl.train import LEARNER_METRICS, metrics_row

        known = [*metrics_row({"training_iteration": 0}), *LEARNER_METRICS]
        if metric not in known:
            raise ValueError(f"metric {metric!r} is not a metrics_row key; use one of {', '.join(known)}")
        return metric


class Param(BaseModel):
    """One swept key: a distribution (`kind` in DISTRIBUTIONS) over `values`, or a fixed value (`kind` 'value')."""

    key: str
    kind: str
    values: list[Any]

    def search_space(self):
        if self.kind == "value":
            return self.values[0]
        if self.kind == "grid":
            return ray_tune.grid_search(self.values)
        if self.kind == "choice":
            return ray_tune.choice(self.values)
        if self.kind == "uniform":
            return ray_tune.uniform(*self.values)
        if self.kind == "loguniform":
            return ray_tune.loguniform(*self.values)
        return ray_tune.randint(self.values[0], self.values[1] + 1)  # ours includes the upper end, Tune's does not

    @property
    def candidates(self) -> list[Any]:
        """The values checked before launching: every listed value, or both ends of a range."""
        return self.values


def load_sweep(path: str | Path) -> tuple[SweepSpec, list[Param]]:
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file", "see configs/sweeps/ppo-lr.yaml for the format")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown key '{where}'; known: {', '.join(_known_sweep_keys(item['loc']))}")
            else:
                problems.append(f"bad value for '{where}': {item['msg']}")
        raise ConfigError(f"sweep file {path}: {'; '.join(problems)}") from None
    return spec, [_parse_param(key, value, path) for key, value in spec.params.items()]


def _known_sweep_keys(loc) -> list[str]:
    model = SchedulerSpec if loc and loc[0] == "scheduler" else SweepSpec
    return list(model.model_fields)


def _parse_param(key: str, value: Any, path: Path) -> Param:
    if not isinstance(value, dict):
        return Param(key=key, kind="value", values=[value])
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise ConfigError(f"sweep file {path}: params.{key} must be a plain value or one of "
                          f"{{{' | '.join(f'{kind}: [...]' for kind in DISTRIBUTIONS)}}} (got {value!r}); "
                          "nested keys are written dotted, e.g. rl.lr")
    kind, values = next(iter(value.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"sweep file {path}: params.{key}.{kind} must be a non-empty list (got {values!r})")
    if kind in ("uniform", "loguniform", "randint"):
        number = int if kind == "randint" else float
        try:
            low, high = (number(v) for v in values)
        except (TypeError, ValueError):
            raise ConfigError(f"sweep file {path}: params.{key}.{kind} must be [low, high] {number.__name__}s "
                              f"(got {values!r})") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"sweep file {path}: params.{key}.{kind} needs low < high"
                              f"{' and low > 0' if kind == 'loguniform' else ''} (got {values!r})")
        values = [low, high]
    return Param(key=key, kind=kind, values=values)


# ----------------------------------------------------------------------------- which keys may vary per trial

FIXED_PER_SWEEP = {
    "encoder": "changes the latents the agent sees, so every value needs its own trained encoder",
    "vlm": "changes the latents the agent sees, so every value needs its own trained encoder",
    "env.game": "the encoder was trained on one game's frames",
    "rl.encoder_source": "where latents come from is fixed for a sweep (the trials share one encoder)",
    "rl.serve_app": "where latents come from is fixed for a sweep (the trials share one encoder)",
    "rl.encoder_dir": "where latents come from is fixed for a sweep (the trials share one encoder)",
    "serve": "the trials share one encoder deployment, deployed once before the sweep",
    "experiment": "a sweep writes into one run directory (only experiment.seed may vary)",
    "collect": "does not affect the agent",
    "embed": "does not affect the agent",
}


def check_sweepable(key: str, path: Path) -> None:
    if key == "experiment.seed":
        return
    for prefix, why in FIXED_PER_SWEEP.items():
        if key == prefix or key.startswith(prefix + "."):
            raise ConfigError(
                f"sweep file {path}: '{key}' cannot vary per trial: {why}. Sweep rl.* (except rl.encoder_source, "
                "rl.serve_app, rl.encoder_dir), env.* (except env.game) and experiment.seed; for encoder or VLM "
                "settings train one encoder per value and run one sweep per run directory")


def candidate_configs(config: EnvEncConfig, params: list[Param], path: Path) -> list[EnvEncConfig]:
    """Every combination of candidate values (all of them when few, else one key at a time), validated."""
    origin = f"sweep file {path}"
    base = config.model_dump(mode="json")
    for param in params:  # first each key alone: an unknown key or bad value is named on its own
        for value in param.candidates:
            trial_config(base, {param.key: value}, origin)
        check_sweepable(param.key, path)
    combinations = math.prod(len(param.candidates) for param in params)
    if combinations <= MAX_CHECKED_COMBINATIONS:
        choices = itertools.product(*[param.candidates for param in params])
        overrides = [dict(zip([param.key for param in params], values)) for values in choices]
    else:
        logger.info("tune: %d combinations of candidate values; checking each key's values alone", combinations)
        overrides = [{param.key: value} for param in params for value in param.candidates]
    configs = [trial_config(base, override, origin) for override in overrides]
    for override, candidate in zip(overrides, configs):
        check_rllib_settings(candidate, override, origin)
    return configs


# ----------------------------------------------------------------------------- resources


def serve_reservation(config: EnvEncConfig, candidates: list[EnvEncConfig]) -> dict[str, float]:
    """CPUs/GPUs the shared encoder deployment may hold at its autoscaling maximum (none without Serve)."""
    uses_serve = config.rl.encoder_source == "serve" and any(c.rl.reads_latents for c in candidates)
    if not uses_serve:
        return {"CPU": 0.0, "GPU": 0.0}
    s = config.serve
    return {"CPU": s.max_replicas * s.num_cpus, "GPU": s.max_replicas * s.num_gpus}


# ----------------------------------------------------------------------------- the stage


def tune(config: EnvEncConfig, sweep_path: str) -> dict:
    """Run the sweep of `sweep_path` over `config`; returns the summary also written to <run>/tune/results.json."""
    import ray

    from envenc_ray.runtime import ensure_ray

    started = time.perf_counter()
    path = Path(sweep_path)
    spec, params = load_sweep(path)
    candidates = candidate_configs(config, params, path)
    if spec.scheduler.type == "asha":
        max_t = spec.scheduler.max_t or config.rl.iterations
        if spec.scheduler.grace_period > max_t:
            raise ConfigError(f"sweep file {path}: scheduler.grace_period ({spec.scheduler.grace_period}) > "
                              f"max_t ({max_t}, from rl.iterations when not given)")

    ensure_ray()
    reserved = serve_reservation(config, candidates)
    largest, fit = check_resources(candidates, reserved, ray.cluster_resources(), path)
    concurrent = spec.max_concurrent_trials or fit
    print(f"tune: {path}: a trial takes {bundles_total(largest, 'CPU'):g} CPUs ({len(largest)} bundles); "
          f"{concurrent} trial(s) at once" + (f", next to the encoder deployment ({reserved['CPU']:g} CPUs)"
                                              if reserved["CPU"] else ""))

    # Trials run in their own Ray actors, in Tune's trial folders: every path they read must be absolute.
    base = absolute_paths(config)
    out_dir = RunLayout.of(base).tune
    out_dir.mkdir(parents=True, exist_ok=True)
    needs_latents = any(c.rl.reads_latents for c in candidates)
    deployed_here = False
    if needs_latents:
        deployed_here = prepare_encoder(base)

    try:
        param_space: dict[str, Any] = {}
        for param in params:
            *parents, leaf = param.key.split(".")
            section = param_space
            for part in parents:
                section = section.setdefault(part, {})
            section[leaf] = param.search_space()
        scheduler = None
        if spec.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(
                time_attr="training_iteration", max_t=spec.scheduler.max_t or config.rl.iterations,
                grace_period=spec.scheduler.grace_period, reduction_factor=spec.scheduler.reduction_factor)
        experiment = f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        lines = TrialLines("tune", lambda trial: trial.trial_id, lambda trial, result: (
            f" iteration {result.get('training_iteration')}: {spec.metric}={_fmt(result.get(spec.metric))}, "
            f"{_fmt(result.get('env_steps_per_s'))} env steps/s"))
        grid = fit_trials(
            ray_tune.with_parameters(run_trial, base=base.model_dump(mode="json"), origin=f"sweep file {path}"),
            lambda trial_params: _placement_group(base, trial_params), param_space, name=experiment,
            storage_dir=out_dir, lines=lines, metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            scheduler=scheduler, max_concurrent_trials=concurrent, time_budget_s=spec.time_budget_s,
            trial_dirname_creator=_trial_dirname)
    finally:
        if deployed_here:
            from envenc_ray.serve.client import shutdown

            shutdown(base.rl.serve_app)

    rows = [trial_row(result, params, spec, config.rl.iterations) for result in grid]
    best = best_row(rows, spec.mode)
    summary = {
        "sweep": str(path),
        "metric": spec.metric,
        "mode": spec.mode,
        "scheduler": spec.scheduler.model_dump(),
        "num_samples": spec.num_samples,
        "params": {param.key: {param.kind: param.values} for param in params},
        "trial_resources": {"bundles": largest, "max_concurrent_trials": concurrent, "encoder_reserved": reserved},
        "tune_dir": str(out_dir / experiment),
        "trials": rows,
        "best": None,
        "seconds": time.perf_counter() - started,
    }
    if best is not None:
        # the user's config (relative paths kept) plus the winning values: `envenc train best.yaml` trains it
        overrides = {key: best["params"][key] for key in best["params"]}
        best_config = trial_config(config.model_dump(mode="json"), overrides, f"sweep file {path}")
        best_path = write_best_yaml(best_config, out_dir / "best.yaml", best, spec, path)
        summary["best"] = {"trial": best["trial"], "params": best["params"], spec.metric: best["metric"],
                           "config": str(best_path)}
    write_results(summary, out_dir)
    print_table(summary)
    if rows and all(row["status"] == "ERROR" for row in rows):
        raise_trial_error(grid)
    return summary


def prepare_encoder(config: EnvEncConfig) -> bool:
    """Check the encoder once and build what trials share: the built-in VLM (so trials never race to build it)
    and, with rl.encoder_source=serve, the deployment. Returns whether this call deployed it (then the sweep
    shuts it down at the end; an app that was already running stays)."""
    from envenc_ray.vlm.paths import resolve_model_path
    from envenc_ray.encoder.served import read_encoder_description

    resolve_model_path(config)
    encoder_dir = RunLayout.of(config).agent_encoder
    read_encoder_description(encoder_dir)  # a missing encoder fails here, in one line, before any trial
    if config.rl.encoder_source != "serve":
        return False
    from envenc_ray.serve.client import EncoderClient, EncoderServiceError, deploy_encoder

    app = config.rl.serve_app
    try:
        EncoderClient.connect(app_name=app)
        running = True
    except EncoderServiceError:
        running = False
    print(f"tune: {'updating the running' if running else 'deploying the'} encoder app {app!r}; the trials share it")
    deploy_encoder(config, app_name=app, encoder_dir=str(encoder_dir))
    return not running


def _placement_group(base: EnvEncConfig, trial_params: dict):
    from ray.tune import PlacementGroupFactory

    config = trial_config(base.model_dump(mode="json"), flatten(trial_params), "a Tune trial")
    return PlacementGroupFactory(trial_bundles(config), strategy="PACK")


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_trial(trial_params: dict, *, base: dict, origin: str) -> None:
    """One trial, inside its Tune actor: the config with this trial's values -> RLlib algorithm -> iterations.

    Reports our metrics_row each iteration (None -> NaN: Tune needs the metric in every report, and ASHA
    treats NaN as 'not known yet' instead of failing).
    """
    config = trial_config(base, flatten(trial_params), origin)
    with trial_algorithm(config) as trial:
        for _ in range(config.rl.iterations):
            _, row = trial.iterate()
            ray_tune.report({key: (math.nan if value is None else value) for key, value in row.items()})


def flatten(nested: dict, prefix: str = "") -> dict[str, Any]:
    """{'rl': {'lr': 1e-4}} -> {'rl.lr': 1e-4}."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------- results


def trial_row(result, params: list[Param], spec: SweepSpec, base_iterations: int) -> dict:
    """One trial: its values, status, last finite metric (and the best over its iterations), iterations."""
    flat = flatten(result.config or {})
    row: dict[str, Any] = {"trial": trial_id(result), "params": {p.key: flat.get(p.key) for p in params}}
    history = []
    frame = result.metrics_dataframe
    if frame is not None and spec.metric in frame:
        history = [float(v) for v in frame[spec.metric] if v is not None and not math.isnan(float(v))]
    metrics = result.metrics or {}
    iterations = int(metrics.get("training_iteration", 0) or 0)
    speed, call_ms = _column_mean(frame, "env_steps_per_s"), _column_mean(frame, "encoder_call_ms")
    planned = int(flat.get("rl.iterations", base_iterations))
    if spec.scheduler.type == "asha":
        planned = min(planned, spec.scheduler.max_t or base_iterations)
    if result.error is not None:
        status = "ERROR"
    elif iterations < planned:
        status = "STOPPED"  # by the scheduler (ASHA) or the time budget
    else:
        status = "DONE"
    pick = max if spec.mode == "max" else min
    row.update({
        "status": status,
        "metric": history[-1] if history else None,
        "metric_best": pick(history) if history else None,
        "iterations": iterations,
        "env_steps_per_s": speed,
        "encoder_call_ms": call_ms,
        "seconds": metrics.get("time_total_s"),
        "error": first_line(result.error) if result.error is not None else None,
        "path": result.path,
    })
    return row


def _column_mean(frame, column: str) -> float | None:
    if frame is None or column not in frame:
        return None
    values = [float(v) for v in frame[column] if v is not None and not math.isnan(float(v))]
    return sum(values) / len(values) if values else None


def best_row(rows: list[dict], mode: str) -> dict | None:
    """The trial with the best last finite metric; None when no trial reported one (no episode ended)."""
    scored = [row for row in rows if row["metric"] is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda row: row["metric"])


def write_best_yaml(config: EnvEncConfig, path: Path, best: dict, spec: SweepSpec, sweep_path: Path) -> Path:
    header = (f"# Best trial {best['trial']} of the sweep {sweep_path}: {spec.metric} = {best['metric']:.6g} "
              f"({spec.mode}), after {best['iterations']} iterations.\n"
              f"# Swept values: {json.dumps(best['params'])}\n"
              f"# A complete config: `envenc config show {path}`, `envenc train {path}`.\n")
    write_text_atomic(path, header + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def write_results(summary: dict, out_dir: Path) -> None:
    keys = list(summary["params"])
    columns = ["trial", "status", *keys, "metric", "metric_best", "iterations", "env_steps_per_s",
               "encoder_call_ms", "seconds", "error", "path"]
    with replaced_atomically(out_dir / "results.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in summary["trials"]:
            writer.writerow({**{k: v for k, v in row.items() if k != "params"}, **row["params"]})
    write_text_atomic(out_dir / "results.json", json.dumps(summary, indent=2, default=str))


def print_table(summary: dict) -> None:
    keys = list(summary["params"])
    header = ["trial", "status", *keys, summary["metric"], "iters", "env steps/s"]
    lines = [[row["trial"], row["status"], *[_fmt(row["params"].get(k)) for k in keys], _fmt(row["metric"]),
              str(row["iterations"]), _fmt(row["env_steps_per_s"])] for row in summary["trials"]]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    for line in [header, *lines]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
    best = summary["best"]
    if best is None:
        print(f"tune: no trial reported a finite {summary['metric']} (no episode ended within the budget?): "
              "no best.yaml; raise rl.iterations or rl.train_batch_size, or set env.max_episode_steps")
    else:
        print(f"tune: best trial {best['trial']} ({summary['mode']} {summary['metric']} = "
              f"{_fmt(best[summary['metric']])}): {best['config']}")
    failed = [row for row in summary["trials"] if row["status"] == "ERROR"]
    for row in failed:
        print(f"tune: trial {row['trial']} failed: {row['error']}")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
