"""What `envenc tune` and `envenc experiment` share: one trial's RLlib algorithm inside its Tune actor
(`trial_algorithm`), the Tuner that runs the trials (`fit_trials`), one line per trial report instead of Tune's
status tables (`TrialLines`), the error of a sweep whose every trial failed (`raise_trial_error`); a trial's config
from the base and its overrides (`trial_config`, `absolute_paths`, RLlib's own check in `check_rllib_settings`) and
what it holds of the cluster (`trial_bundles`, `check_resources`)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import ValidationError
from ray import tune as ray_tune

from envenc_ray.config import EnvEncConfig, explain_validation_error
from envenc_ray.errors import ConfigError, EnvEncError
from envenc_ray.storage import train_storage


class TrialAlgorithm:
    """The algorithm of one trial and the key its EnvRunners relay their errors under."""

    def __init__(self, algo, error_key: str):
        self.algo, self.error_key = algo, error_key

    def iterate(self) -> tuple[dict, dict]:
        """One training iteration: RLlib's result and our metrics_row of it."""
        from envenc_ray.rl.algorithm import train_iteration
        from envenc_ray.rl.train import metrics_row

        result = train_iteration(self.algo, self.error_key)
        return result, metrics_row(result)


@contextmanager
def trial_algorithm(config: EnvEncConfig) -> Iterator[TrialAlgorithm]:
    """Inside a trial's Tune actor: torch threads for the learner this process holds (rl.num_learners=0), the
    algorithm built, and stopped whatever happens."""
    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.runner_errors import new_error_key
    from envenc_ray.runtime import set_torch_threads

    set_torch_threads(config.rl.torch_threads)
    error_key = new_error_key()
    algo = build_algorithm(config, error_key)
    try:
        yield TrialAlgorithm(algo, error_key)
    finally:
        algo.stop()


class TrialLines(ray_tune.Callback):
    """One line per trial report and per failed trial, instead of Tune's periodic status tables:
    '<face>: <trial><what describe says of the report>'."""

    def __init__(self, face: str, name: Callable[[Any], str], describe: Callable[[Any, dict], str]):
        self.face, self.name, self.describe = face, name, describe

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"{self.face}: {self.name(trial)}{self.describe(trial, result)}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{self.face}: {self.name(trial)} failed; see {trial.path}", flush=True)


def fit_trials(trainable, resources: Callable[[dict], Any], param_space: dict, *, name: str, storage_dir: Path,
               lines: TrialLines, **tune_config):
    """Tuner.fit of `trainable` in placement groups from `resources`, one failure ends a trial (rerunning the
    command retries it), Tune's own folders under `storage_dir`/`name`; returns the ResultGrid."""
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(trainable, resources=resources),
        param_space=param_space,
        tune_config=ray_tune.TuneConfig(**tune_config),
        run_config=ray_tune.RunConfig(name=name, **train_storage(storage_dir), verbose=0,
                                      failure_config=ray_tune.FailureConfig(max_failures=0), callbacks=[lines]),
    )
    return tuner.fit()


def raise_trial_error(grid) -> None:
    """Every trial failed: raise the first trial's own error (ours keep their class, so the CLI prints one line)."""
    result = next(result for result in grid if result.error is not None)
    for error in _error_chain(result.error):  # Tune and Ray wrap the exception raised in the trial
        if isinstance(error, EnvEncError) and type(error).__module__.startswith("envenc_ray"):
            raise type(error)(f"every trial failed; trial {trial_id(result)}: {error}") from None
    raise RuntimeError(f"every trial failed; trial {trial_id(result)}: {first_line(result.error)} "
                       f"(log: {result.path})")


def trial_id(result) -> str:
    return Path(result.path).name.removeprefix("trial_") if result.path else "?"


def first_line(error) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _error_chain(error):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "cause", None) or error.__cause__


# ----------------------------------------------------------------------------- trial configs and resources


def trial_config(base: dict, overrides: dict[str, Any], origin: str) -> EnvEncConfig:
    """`base` (a config as a dict) with dotted `overrides` merged in, validated like load_config does."""
    merged = json.loads(json.dumps(base))
    for key, value in overrides.items():
        section = merged
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(section.get(part), dict):
                section[part] = {}
            section = section[part]
        section[leaf] = value
    try:
        return EnvEncConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(explain_validation_error(error, {key: origin for key in overrides})) from None


def check_rllib_settings(config: EnvEncConfig, override: dict[str, Any], origin: str) -> None:
    """RLlib's own validation of the algorithm config (batch sizes vs runners x envs x fragment length, ...),
    which would otherwise fail inside every trial. No encoder is touched: the source is only a description."""
    from envenc_ray.rl.algorithm import offline_algorithm_config

    try:
        offline_algorithm_config(config).validate()
    except ValueError as error:
        values = ", ".join(f"{key}={value!r}" for key, value in override.items())
        raise ConfigError(f"{origin}: RLlib refuses the trial with {values}: "
                          f"{str(error).splitlines()[0]}") from None


def absolute_paths(config: EnvEncConfig) -> EnvEncConfig:
    """The config with run_root, rl.encoder_dir and a local vlm.model made absolute (trials run elsewhere)."""
    resolved = config.model_copy(deep=True)
    resolved.experiment.run_root = str(Path(config.experiment.run_root).resolve())
    if config.rl.encoder_dir:
        resolved.rl.encoder_dir = str(Path(config.rl.encoder_dir).resolve())
    if Path(config.vlm.model).exists():
        resolved.vlm.model = str(Path(config.vlm.model).resolve())
    return resolved


def trial_bundles(config: EnvEncConfig) -> list[dict[str, float]]:
    """The placement group of one trial: what RLlib's Algorithm.default_resource_request asks for under
    these settings. Bundle 0 is the trial's own process (RLlib's main process, which also holds the learner
    when rl.num_learners=0), then one bundle per EnvRunner and per remote Learner. The EnvRunners and
    Learners that build_algorithm starts inside the trial land in these bundles."""
    rl = config.rl
    learner_cpus = 1.0 if rl.num_gpus_per_learner == 0 else 0.0  # RLlib's num_cpus_per_learner="auto"
    if rl.num_learners == 0:
        main = {"CPU": max(learner_cpus, 1.0), "GPU": rl.num_gpus_per_learner}
    else:
        main = {"CPU": 1.0, "GPU": 0.0}
    runners = [{"CPU": rl.cpus_per_env_runner, "GPU": 0.0} for _ in range(rl.num_env_runners)]
    learners = [{"CPU": learner_cpus, "GPU": rl.num_gpus_per_learner} for _ in range(rl.num_learners)]
    return [main, *runners, *learners]


def check_resources(candidates: list[EnvEncConfig], reserved: dict[str, float], cluster: dict[str, float],
                    path: Path) -> tuple[list[dict[str, float]], int]:
    """(largest trial's bundles, how many trials fit at once). A trial that can never be placed would make Tune
    wait forever without a word, so it is an error here, naming the settings to change."""
    largest = max((trial_bundles(c) for c in candidates), key=lambda bundles: bundles_total(bundles, "CPU"))
    room = {kind: cluster.get(kind, 0.0) - reserved[kind] for kind in ("CPU", "GPU")}
    for candidate in candidates:
        bundles = trial_bundles(candidate)
        for kind in ("CPU", "GPU"):
            need = bundles_total(bundles, kind)
            if need > room[kind] + 1e-9:
                rl = candidate.rl
                held = (f", {reserved[kind]:g} of them held by the shared encoder deployment (serve.max_replicas x "
                        f"serve.num_{kind.lower()}s)" if reserved[kind] else "")
                raise ConfigError(
                    f"sweep file {path}: a trial needs {need:g} {kind}s -- 1 main process/learner + "
                    f"{rl.num_env_runners} EnvRunners x {rl.cpus_per_env_runner:g} (rl.num_env_runners x "
                    f"rl.cpus_per_env_runner) + {rl.num_learners} Learners -- but the Ray cluster has "
                    f"{cluster.get(kind, 0.0):g}{held}; Tune would wait forever. Lower rl.num_env_runners or "
                    f"rl.cpus_per_env_runner (fractions are fine), rl.num_learners/num_gpus_per_learner, or the "
                    f"encoder's serve.num_cpus/max_replicas, or add resources")
    cpus = bundles_total(largest, "CPU")
    fit = int((room["CPU"] + 1e-9) // cpus) if cpus > 0 else len(candidates)
    return largest, max(1, fit)


def bundles_total(bundles: list[dict[str, float]], kind: str) -> float:
    """CPUs or GPUs (`kind`) a placement group of `bundles` holds in all."""
    return sum(bundle.get(kind, 0.0) for bundle in bundles)
