"""What `envenc tune` and `envenc experiment` share: one trial's RLlib algorithm inside its Tune actor
(`trial_algorithm`), the Tuner that runs the trials (`fit_trials`), one line per trial report instead of Tune's
status tables (`TrialLines`), and the error of a sweep whose every trial failed (`raise_trial_error`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ray import tune as ray_tune

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import EnvEncError
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
