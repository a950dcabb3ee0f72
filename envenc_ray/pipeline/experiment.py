"""Stage `experiment`: seeded, equal-budget comparisons of arms as Ray Tune trials -> <run>/experiments/<arms>/.

    read the arms file (configs/experiments/*.yaml): a question, and per arm a name + dotted config overrides
    -> one config per arm, checked before anything runs: keys and values, RLlib's batch rules, the step budget,
       and that a trial fits the cluster
    -> build the shared artifacts once, before the trials: frames, [the finetuned VLM], hidden states, encoders,
       each in a folder keyed by a hash of the settings that determine it, so arms, seeds and other arms files
       of the same config reuse them
    -> Tuner.fit over the (arm, seed) pairs without a current result: each trial trains the same whole number
       of iterations, --steps env steps (RLlib can add < num_envs steps per iteration where episodes end; the
       count is recorded); at every evaluation point (each `eval_every` env steps, and the budget) it saves a
       checkpoint, plays greedy full-length episodes and writes progress.json; at the end its policy and
       result.json, atomically
    -> the random and RAM-heuristic policies' returns on each game (the reference lines)
    -> results.json (per arm and seed: learning curve, evaluation returns at the points, wall time; per arm: final
       evaluation return with a 95% bootstrap CI over seeds, area under the evaluation curve, env steps to reach
       `threshold`, diagnostics), curves.png (mean training return vs env steps, 95% bootstrap band over seeds),
       eval_curves.png (greedy evaluation return vs env steps, with the reference lines) and eval_returns.png.

Layout under the config's run directory:

    artifacts/<data key>/                       frames/, vlm/, hidden/ of one data config (collect, advise, embed)
    artifacts/<data key>/encoders/<encoder key>/  one exported encoder per encoder section
    experiments/<arms file stem>/               results.json, *.png, trials/<arm>/seed-<s>/, tune/ (Tune's own)
    trials/<arm>/seed-<s>/                      progress.json, checkpoint_<iteration>/ (the newest two), policy/,
                                                result.json (when done)

Seeds: trial seed s becomes experiment.seed of the agent only (RLlib's seed, env resets, evaluation). The
artifacts are built with the config's experiment.seed, and a trial reads its arm's VLM and encoder by path
(vlm.model, rl.encoder_dir), so all seeds of an arm see the same latents and the spread over seeds is the
agent's.

Resuming: rerunning the same command skips every trial whose result.json matches its config and budget and
every current artifact, and continues every unfinished trial from its last evaluation point. progress.json
names the checkpoint of that point and holds the curve and the evaluations up to it; it is rewritten (whole,
atomically) only after the checkpoint is complete and the evaluation played, so a kill at any moment leaves
the trial at its previous point: the rerun restores that checkpoint (RLlib's state: weights, optimizer,
iteration and env-step counters, the learning-rate schedule) and trains on, appending to the rows kept.
`--status` reads these files and prints each trial's progress without starting Ray.
"""

from __future__ import annotations

import textwrap
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402
from ray import tune as ray_tune  # noqa: E402

from envenc_ray.config import EnvEncConfig, content_hash, read_yaml_mapping  # noqa: E402
from envenc_ray.errors import ConfigError, DataError, EnvEncError  # noqa: E402
from envenc_ray.files import read_json, write_json_atomic  # noqa: E402
from envenc_ray.layout import RunLayout  # noqa: E402
from envenc_ray.pipeline import STAGES  # noqa: E402
from envenc_ray.pipeline.trials import (  # noqa: E402
    TrialLines,
    absolute_paths,
    check_resources,
    check_rllib_settings,
    fit_trials,
    raise_trial_error,
    trial_algorithm,
    trial_bundles,
    trial_config,
)
from envenc_ray.rl.evaluate import reference_label  # noqa: E402

RESULT_FILE, PROGRESS_FILE = "result.json", "progress.json"
BOOTSTRAP_RESAMPLES = 2000
CURVE_POINTS = 100  # learning-curve points per trial, at most
EVAL_KEYS = ("episodes", "return_mean", "return_std", "returns", "lengths")  # what a trial keeps of an evaluation
SAMPLING_TIMERS = ("env_runner_sampling_timer", "sample")  # RLlib's names in PPO's and DreamerV3's results
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # becomes a folder name
# Keys an arm may not set, because the experiment sets them for every trial.
SET_BY_EXPERIMENT = {
    "experiment": "the experiment owns the run directory, and a trial's experiment.seed is its seed (--seeds)",
    "rl.encoder_source": "trials load their arm's encoder inside each EnvRunner (in_process)",
    "rl.encoder_dir": "each arm trains (or reuses) its own encoder",
    "rl.iterations": "the budget is --steps env steps",
    "rl.eval_max_steps": "evaluation plays full-length episodes",
    "rl.keep_checkpoints": "a trial keeps the checkpoint its progress.json names until the next one is complete",
}


# Keys of an arm that are not config overrides (config keys always hold a dot): for transfer between games.
ARM_KEYS = {
    "steps": "the arm's own env-step budget instead of --steps (0: evaluate the init_from policy only)",
    "init_from": "an arm whose final policy of the same seed the trial starts from (that arm runs first)",
    "encoder_from": "an arm whose VLM and encoder the trial reads, so that both games share one latent space",
}


# ----------------------------------------------------------------------------- the arms file


class ArmsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., description="What the arms compare; the plot's title.")
    steps: int | None = Field(None, ge=1, description="Env steps per trial when --steps is not given.")
    seeds: int | None = Field(None, ge=1, description="Seeds per arm (0 .. seeds-1) when --seeds is not given.")
    eval_every: int | None = Field(None, ge=1, description="Env steps between a trial's greedy evaluations (each "
                                   "also a checkpoint to resume from), a whole number of iterations; None: only "
                                   "at the end of its budget.")
    threshold: float | None = Field(None, description="Evaluation return whose first crossing (env steps) results.json "
                                    "reports per arm; None: not reported.")
    common: dict[str, Any] = Field({}, description="Dotted overrides of every arm, applied before the arm's own.")
    arms: dict[str, dict[str, Any]] = Field(..., min_length=1, description="Arm name -> dotted config overrides "
                                            "(and optionally the ARM_KEYS steps, init_from, encoder_from).")

    def overrides(self, arm: str) -> dict[str, Any]:
        """The arm's config overrides on top of `common`."""
        return {**self.common, **{k: v for k, v in self.arms[arm].items() if k not in ARM_KEYS}}

    def source(self, arm: str, key: str) -> str:
        """The arm named by `key` (init_from / encoder_from), or the arm itself."""
        return self.arms[arm].get(key) or arm


def load_arms(path: Path) -> ArmsSpec:
    data = read_yaml_mapping(path, "arms file", "see configs/experiments/obs-mode.yaml for the format")
    try:
        spec = ArmsSpec.model_validate(data)
    except ValidationError as error:
        problems = [f"'{'.'.join(str(p) for p in item['loc']) or '(top level)'}': {item['msg']}"
                    for item in error.errors()]
        raise ConfigError(f"arms file {path}: {'; '.join(problems)} (known keys: "
                          f"{', '.join(ArmsSpec.model_fields)})") from None
    for name, overrides in spec.arms.items():
        if not ARM_NAME.match(name):
            raise ConfigError(f"arms file {path}: arm name {name!r} must be letters, digits and _ . + - "
                              "(it names a folder)")
        for key in ("init_from", "encoder_from"):
            source = overrides.get(key)
            if source is not None and (source not in spec.arms or source == name
                                       or {"init_from", "encoder_from"} & set(spec.arms[source])):
                raise ConfigError(f"arms file {path}: arm {name!r} has {key}: {source!r}, which must name another "
                                  f"arm that itself has neither init_from nor encoder_from (arms: {', '.join(spec.arms)})")
        budget = overrides.get("steps")
        if budget is not None and (not isinstance(budget, int) or budget < 0 or (budget == 0 and "init_from" not in overrides)):
            raise ConfigError(f"arms file {path}: arm {name!r} has steps: {budget!r}; give a whole number of env steps "
                              "(0 only with init_from: evaluate that policy as it is)")
        for key in [*spec.common, *spec.overrides(name)]:
            for prefix, why in SET_BY_EXPERIMENT.items():
                if key == prefix or key.startswith(prefix + "."):
                    raise ConfigError(f"arms file {path}: arm {name!r} sets '{key}', which the experiment sets "
                                      f"itself: {why}")
    return spec


def check_budget(config: EnvEncConfig, steps: int, origin: str, what: str = "--steps") -> None:
    """Every trial stops at the iteration that reaches `steps` env steps, so `steps` must be a whole number of
    iterations (then all trials train the same number of iterations); so must `eval_every` (`what`), so that
    every evaluation point falls on one iteration's end.

    RLlib samples in rounds of (EnvRunners x sub-envs x rollout fragment) env steps. PPO takes exactly
    train_batch_size steps per iteration when that is a whole number of rounds; DreamerV3 first fills its
    replay buffer with batch_size_B x batch_length_T steps, then samples one round per iteration."""
    rl = config.rl
    round_steps = max(1, rl.num_env_runners) * rl.num_envs_per_env_runner * (rl.rollout_fragment_length or 1)
    if rl.algo == "ppo":
        if rl.train_batch_size % round_steps:
            raise ConfigError(f"{origin}: rl.train_batch_size ({rl.train_batch_size}) must be a multiple of EnvRunners "
                              f"x sub-envs x rollout fragment ({round_steps}) so that every iteration samples exactly "
                              "that many env steps")
        per_iteration = first = rl.train_batch_size
    else:
        per_iteration = round_steps
        first = math.ceil(rl.dreamer_batch_size_B * rl.dreamer_batch_length_T / round_steps) * round_steps
    if steps < first or steps % per_iteration:
        lower = max(first, steps - steps % per_iteration)
        raise ConfigError(f"{origin}: {what} {steps} is not a whole number of iterations of {per_iteration} env "
                          f"steps ({rl.algo}, at least {first}); use {what} {lower} or {lower + per_iteration}, "
                          "or change rl.train_batch_size / rl.num_envs_per_env_runner")


# ----------------------------------------------------------------------------- shared artifacts


def data_key(config: EnvEncConfig) -> str:
    """Hash of what frames, the (finetuned) VLM and hidden states depend on; the trial seed is not part of it."""
    payload = {"experiment.seed": config.experiment.seed,
               **{name: getattr(config, name).model_dump(mode="json")
                  for name in ("env", "collect", "vlm", "stage2", "embed")}}
    if config.stage2.reads_finetuned_vlm:  # the advise settings matter only when a finetuned VLM is made
        payload["advise"] = config.advise.model_dump(mode="json")
        payload["encoder.val_fraction"] = config.encoder.val_fraction  # advise holds out the probes' episodes
    return content_hash(payload)


def encoder_key(config: EnvEncConfig) -> str:
    return content_hash({"data": data_key(config), "encoder": config.encoder.model_dump(mode="json")})


def artifact_config(config: EnvEncConfig, artifacts_root: Path) -> EnvEncConfig:
    """The arm's config with its run directory moved to the artifact folder of its data key: the stages then
    read and write there (and skip what is current), whichever arm or arms file asks."""
    located = config.model_copy(deep=True)
    located.experiment.run_root = str(artifacts_root)
    located.experiment.name = data_key(config)
    return located


def build_artifacts(arm_configs: dict[str, EnvEncConfig], artifacts_root: Path,
                    latents_of: dict[str, str] | None = None) -> dict[str, Path | None]:
    """collect -> [advise] -> embed -> train-encoder for every arm that sees latents; arm -> its encoder folder
    (None for pixels and state). The stages skip themselves when their output is current, so arms that share a data key
    share frames, VLM and hidden states; each distinct encoder section is trained once and kept under its key.
    An arm whose `latents_of` is another arm (encoder_from) builds nothing and reads that arm's encoder."""
    latents_of = latents_of or {}
    encoders: dict[str, Path | None] = {}
    for arm, config in arm_configs.items():
        if not config.rl.reads_latents or latents_of.get(arm, arm) != arm:
            encoders[arm] = None
            continue
        located = artifact_config(config, artifacts_root)
        layout = RunLayout.of(located)
        target = layout.encoders / encoder_key(config)
        if (target / "model.safetensors").is_file():  # only ever created whole, by the rename below
            print(f"experiment: arm {arm} reuses the encoder {target}")
        else:
            print(f"experiment: arm {arm}: building artifacts in {layout.run_dir}")
            for stage in encoder_stages(located):
                stage.run(located)
            # train_encoder always exports to <run>/encoder; keeping each export under its own key lets the
            # next encoder section train beside it on the same hidden states.
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(layout.encoder, target)
        encoders[arm] = target
    for arm, source in latents_of.items():
        if source != arm and arm_configs[arm].rl.reads_latents:
            encoders[arm] = encoders[source]
    return encoders


def encoder_stages(config: EnvEncConfig) -> list:
    """The stages of `pipeline.STAGES` that make the agent's encoder, as `envenc run` includes them for `config`:
    collect -> [advise] -> embed -> train-encoder."""
    names = [stage.name for stage in STAGES]
    return [stage for stage in STAGES[: names.index("train-encoder") + 1] if stage.in_run(config)]


def encoder_diagnostics(encoder_dir: Path | None) -> dict | None:
    """What the encoder's metrics.json says of its latent at the best epoch (None for pixels and state arms)."""
    if encoder_dir is None:
        return None
    metrics = read_json(encoder_dir / "metrics.json") or {}
    best = next((e for e in metrics.get("epochs", []) if e["epoch"] == metrics.get("best_epoch")), {})
    return {
        "encoder_dir": str(encoder_dir),
        "probe_r2_latent_mean": best.get("probe_r2_latent_mean"),
        "probe_r2_latent": best.get("probe_r2_latent"),
        # centred (vectors minus their mean): written by encoders trained after issue 9; None before that
        "consecutive_cosine_latent_centred": best.get("val_consecutive_cosine_latent_centred"),
        "consecutive_cosine_latent": best.get("val_consecutive_cosine_latent"),
    }


# ----------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Trial:
    arm: str
    seed: int
    config: EnvEncConfig  # what this trial trains and evaluates (its VLM and encoder by path once they are built)
    directory: Path  # its progress.json, checkpoints, policy/ and result.json
    fingerprint: str  # config + budget + evaluation points (+ the init_from trial's): files with another are stale
    steps: int  # its env-step budget
    eval_points: tuple[int, ...]  # env steps at which it evaluates; the last is the budget
    init_from: Trial | None = None  # the trial whose final policy it starts from

    @property
    def key(self) -> str:
        return f"{self.arm}/{self.seed}"

    def result(self) -> dict | None:
        """result.json when it is this trial's (then the trial is done), else None."""
        return _own(read_json(self.directory / RESULT_FILE), self.fingerprint)

    def progress(self) -> dict | None:
        """progress.json when it is this trial's (an unfinished trial resumes from it), else None."""
        return _own(read_json(self.directory / PROGRESS_FILE), self.fingerprint)

    def is_done(self) -> bool:
        return self.result() is not None


def _own(record: dict | None, fingerprint: str) -> dict | None:
    return record if record is not None and record.get("fingerprint") == fingerprint else None


def evaluation_points(steps: int, eval_every: int | None) -> tuple[int, ...]:
    """Every eval_every env steps below the budget, then the budget (0: the zero-shot evaluation only)."""
    every = eval_every or max(steps, 1)
    return (*range(every, steps, every), steps)


def plan_trials(spec: ArmsSpec, arm_configs: dict[str, EnvEncConfig], seeds: int, steps: int, out_dir: Path,
                encoders: dict[str, Path | None] | None = None, artifacts_root: Path | None = None) -> list[Trial]:
    """Every (arm, seed) with its config, folder and fingerprint. With `encoders` (built) each latent arm's config
    reads its VLM and encoder by path; without (`--status`), nothing is resolved and nothing built: the
    fingerprint depends only on the settings, which determine those paths."""
    from envenc_ray.vlm.paths import resolve_model_path

    trials = []
    # Seed-major: every arm's seed 0 runs before any arm's seed 1, so an experiment stopped early still
    # compares all arms. Within a seed, arms that start from another arm's policy come after the plain ones.
    for seed in range(seeds):
        planned: dict[str, Trial] = {}
        for arm in sorted(arm_configs, key=lambda name: "init_from" in spec.arms[name]):
            config = arm_configs[arm].model_copy(deep=True)
            config.experiment.seed = seed
            config.rl.encoder_source = "in_process"
            config.rl.eval_max_steps = None
            config.rl.keep_checkpoints = 2  # the one progress.json names survives until the next is named
            budget = spec.arms[arm].get("steps", steps)
            points = evaluation_points(budget, spec.eval_every)
            source = planned[spec.arms[arm]["init_from"]] if "init_from" in spec.arms[arm] else None
            # The settings a trial computes from: those that differ from their defaults, so that a setting added
            # later, whose default keeps the old behaviour, leaves a half-done trial resumable by the new code
            # (these experiments span sessions), and without rl.iterations, which the budget replaces.
            settings = config.model_dump(mode="json", exclude_defaults=True)
            settings.get("rl", {}).pop("iterations", None)
            identity = {"config": settings, "steps": budget, "eval_points": points}
            if source is not None:
                identity["init_from"] = source.fingerprint
            if encoders is not None and encoders[arm] is not None:
                # The VLM that embed read (the built-in tiny one, or the finetuned one its advise.json names),
                # given by path: the trial loads it as is, so nothing about it depends on the trial seed.
                latents = arm_configs[spec.source(arm, "encoder_from")]
                config.vlm.model = resolve_model_path(artifact_config(latents, artifacts_root))
                if config.stage2.method == "finetuned":  # that path is the finetuned VLM: no trial runs advise
                    config.stage2.method = "pretrained"
                config.stage2.joint_from = "pretrained"  # a joint arm's adapter starts from that VLM too
                config.rl.encoder_dir = str(encoders[arm])
            planned[arm] = Trial(arm, seed, config, out_dir / "trials" / arm / f"seed-{seed}", content_hash(identity),
                                 budget, points, source)
        trials += [planned[arm] for arm in arm_configs]
    return trials


def run_trial(params: dict, *, plans: dict[str, dict]) -> None:
    """One (arm, seed), inside its Tune actor: whole iterations up to `steps` env steps, with a checkpoint and
    greedy evaluation at every evaluation point; resumed from progress.json when a run before stopped."""
    from envenc_ray.files import remove_orphaned_temporaries
    from envenc_ray.rl.checkpoints import latents_identity, save_checkpoint, save_policy
    from envenc_ray.rl.evaluate import evaluate
    from envenc_ray.runtime import tell_user

    plan = plans[params["trial"]]
    config = EnvEncConfig.model_validate(plan["config"])
    directory, budget = Path(plan["directory"]), plan["steps"]
    remove_orphaned_temporaries(directory)  # a checkpoint or file a killed run was writing
    progress = _own(read_json(directory / PROGRESS_FILE), plan["fingerprint"])
    if progress is None:  # a fresh start: what runs with other settings left here is stale
        shutil.rmtree(directory, ignore_errors=True)
        progress = {"fingerprint": plan["fingerprint"], "arm": plan["arm"], "seed": config.experiment.seed,
                    "steps": budget, "env_steps": 0, "iterations": 0, "checkpoint": None, "curve": [], "evals": [],
                    "seconds": {"wall": 0.0, "eval": 0.0, "loop": 0.0, "encode": 0.0, "sampling": 0.0}}
    seconds = progress["seconds"]
    started = time.perf_counter()
    wall_before = seconds["wall"]
    latents = latents_identity(config)
    with trial_algorithm(config) as trial:
        algo = trial.algo
        if progress["checkpoint"]:
            algo.restore_from_path(str(directory / progress["checkpoint"]))
            tell_user(f"experiment: {params['trial']} resumes at {progress['env_steps']} env steps "
                      f"({progress['checkpoint']})")
        elif plan["init_policy"]:
            start_from_policy(algo, Path(plan["init_policy"]))
        # At most CURVE_POINTS points (and Tune reports): DreamerV3 samples one round of a few env steps per iteration.
        report_every = max(1, budget // CURVE_POINTS)
        steps, curve = progress["env_steps"], list(progress["curve"])
        points = [point for point in plan["eval_points"] if point > (progress["evals"][-1]["point"]
                                                                      if progress["evals"] else -1)]
        while points:
            if steps < points[0]:
                result, row = trial.iterate()
                steps = int(row["env_steps_lifetime"])
                seconds["loop"] += row["seconds"]
                if row["encoder_calls"]:
                    seconds["encode"] += row["encoder_calls"] * row["encoder_call_ms"] / 1000
                timers = result.get("timers", {})
                seconds["sampling"] += next((timers[key] for key in SAMPLING_TIMERS if key in timers), 0.0)
                reported = curve[-1][0] if curve else 0
                if steps // report_every > reported // report_every or steps >= budget:
                    curve.append([steps, row["episode_return_mean"]])
                    ray_tune.report({"env_steps": steps, "env_steps_per_s": row["env_steps_per_s"] or math.nan,
                                     "episode_return_mean": _nan_if_none(row["episode_return_mean"])})
                continue
            evaluation_started = time.perf_counter()
            checkpoint = save_checkpoint(algo, config, directory, algo.iteration, latents)
            evaluation = evaluate(config, checkpoint=checkpoint)
            seconds["eval"] += time.perf_counter() - evaluation_started
            seconds["wall"] = wall_before + time.perf_counter() - started
            progress.update(env_steps=steps, iterations=algo.iteration, checkpoint=checkpoint.name, curve=curve,
                            evals=[*progress["evals"], {"point": points.pop(0), "env_steps": steps,
                                                        **{key: evaluation[key] for key in EVAL_KEYS}}])
            write_json_atomic(directory / PROGRESS_FILE, progress)
            tell_user(f"experiment: {params['trial']} evaluated at {steps} env steps: greedy return "
                      f"{evaluation['return_mean']:.2f} over {evaluation['episodes']} episodes")
            if budget == 0:  # evaluation only (zero-shot): one report, so Tune records the trial
                ray_tune.report({"env_steps": 0, "env_steps_per_s": math.nan, "episode_return_mean": math.nan})
        policy_dir = directory / "policy"
        policy_dir.mkdir(parents=True, exist_ok=True)
        save_policy(algo, policy_dir, config, latents)
    # RLlib samples whole vector steps, and a sub-env whose episode ended resets on the next one without counting
    # it, so an iteration can end a few steps (< num_envs) past its share: the trial stops at the first
    # iteration that reaches the budget and records the env steps it took (Atari-100k Pong: 100,409 of 100,000).
    if steps < budget:
        raise DataError(f"trial {params['trial']} stopped at {steps} env steps, short of its budget {budget}")
    # Encoder calls happen in the EnvRunners, in parallel: their summed time over the EnvRunners' sampling time.
    # RLlib's sampling timer is a moving average of the iterations', so the share is approximate.
    runners = max(1, config.rl.num_env_runners)
    wall_s = wall_before + time.perf_counter() - started
    write_json_atomic(directory / RESULT_FILE, {
        "arm": plan["arm"],
        "seed": config.experiment.seed,
        "fingerprint": plan["fingerprint"],
        "env_steps": steps,
        "iterations": progress["iterations"],
        "curve": curve,
        "evals": progress["evals"],
        "eval": progress["evals"][-1],  # the final evaluation: the one at the budget
        "wall_s": wall_s,
        "train_s": wall_s - seconds["eval"],
        # sampling and learning, without building the algorithm
        "env_steps_per_s": steps / seconds["loop"] if seconds["loop"] else None,
        "encoder_share_of_sampling": (seconds["encode"] / (runners * seconds["sampling"])
                                      if seconds["encode"] and seconds["sampling"] else None),
    })


def start_from_policy(algo, policy_dir: Path) -> None:
    """Load another trial's final policy (policy.safetensors) into the learner and every EnvRunner, so that
    training (or the zero-shot evaluation) starts from it; the optimizer starts fresh."""
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors.numpy import load_file

    from envenc_ray.rl.checkpoints import POLICY_WEIGHTS

    weights = load_file(str(policy_dir / POLICY_WEIGHTS))
    algo.learner_group.set_weights({DEFAULT_MODULE_ID: weights})
    # EnvRunners hold inference-only modules: give them the learner's own inference-only view of the weights.
    algo.env_runner_group.sync_weights(from_worker_or_learner_group=algo.learner_group, inference_only=True)


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value  # Tune wants the same keys in every report


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _trial_dirname(trial) -> str:
    return "trial_" + trial.config["trial"].replace("/", "_seed")


def run_trials(trials: list[Trial], concurrent: int, out_dir: Path) -> None:
    from ray.tune import PlacementGroupFactory

    plans = {t.key: {"arm": t.arm, "config": t.config.model_dump(mode="json"), "steps": t.steps,
                     "directory": str(t.directory), "fingerprint": t.fingerprint, "eval_points": list(t.eval_points),
                     "init_policy": str(t.init_from.directory / "policy") if t.init_from else None} for t in trials}
    bundles = {t.key: trial_bundles(t.config) for t in trials}
    budgets = {t.key: t.steps for t in trials}
    # Env steps, not Tune's report count, say how far a trial is: a resumed trial's count starts over, its env
    # steps do not.
    lines = TrialLines("experiment", lambda trial: trial.config["trial"], lambda trial, result: (
        f": {int(result.get('env_steps', 0))}/{budgets[trial.config['trial']]} env steps, return "
        f"{_number(result.get('episode_return_mean'), '.2f')}, {_number(result.get('env_steps_per_s'), '.0f')} "
        "env steps/s"))
    grid = fit_trials(ray_tune.with_parameters(run_trial, plans=plans),
                      lambda params: PlacementGroupFactory(bundles[params["trial"]], strategy="PACK"),
                      {"trial": ray_tune.grid_search(list(plans))}, name=f"run-{time.strftime('%Y%m%d-%H%M%S')}",
                      storage_dir=out_dir / "tune", lines=lines, max_concurrent_trials=concurrent,
                      trial_dirname_creator=_trial_dirname)
    failed = [result for result in grid if result.error is not None]
    if failed and len(failed) == len(trials):
        raise_trial_error(grid)
    if failed:
        raise EnvEncError(f"{len(failed)} of {len(trials)} trials failed (logs: {', '.join(r.path for r in failed)}); "
                          "the others' results are kept: rerun the same command to retry only the failed ones")


# ----------------------------------------------------------------------------- the stage


def load_experiment(config: EnvEncConfig, path: Path, seeds: int | None,
                    steps: int | None) -> tuple[ArmsSpec, dict[str, EnvEncConfig], int, int, Path]:
    """(arms file, one config per arm, seeds, steps, the experiment's folder), checked: keys and values, the budget
    and the evaluation interval in whole iterations, state arms on annotated games. Starts nothing."""
    from envenc_ray.rl.state import check_state_game

    spec = load_arms(path)
    steps = spec.steps if steps is None else steps
    seeds = spec.seeds if seeds is None else seeds
    if steps is None or seeds is None or steps < 1 or seeds < 1:
        raise ConfigError(f"--steps and --seeds must be positive numbers (got {steps}, {seeds}); give them, or set "
                          f"steps and seeds in the arms file {path}")
    base = absolute_paths(config)  # trials run in Tune's folders: every path they read must be absolute
    base_dump = base.model_dump(mode="json")
    arm_configs = {}
    for arm in spec.arms:
        origin = f"arms file {path}, arm {arm!r}"
        arm_config = trial_config(base_dump, spec.overrides(arm), origin)
        if spec.arms[arm].get("steps", steps):  # 0: a zero-shot evaluation, no training
            check_budget(arm_config, spec.arms[arm].get("steps", steps), origin)
            if spec.eval_every:
                check_budget(arm_config, spec.eval_every, origin, "eval_every")
        if arm_config.rl.obs_mode == "state":
            check_state_game(arm_config.env.game, origin)
        arm_configs[arm] = arm_config
    return spec, arm_configs, seeds, steps, RunLayout.of(base).experiments / path.stem


def experiment(config: EnvEncConfig, arms_path: str, seeds: int | None = None, steps: int | None = None,
               concurrent: int | None = None, command: str | None = None) -> dict:
    """Run (or resume) the experiment of `arms_path` on `config`; returns the summary also in results.json."""
    import ray

    from envenc_ray.runtime import ensure_ray

    started = time.perf_counter()
    path = Path(arms_path)
    spec, arm_configs, seeds, steps, out_dir = load_experiment(config, path, seeds, steps)
    for arm, arm_config in arm_configs.items():
        check_rllib_settings(arm_config, spec.overrides(arm), f"arms file {path}, arm {arm!r}")

    ensure_ray()
    # A trial that can never be placed would make Tune wait forever: fail now, before building anything.
    largest, fit = check_resources(list(arm_configs.values()), {"CPU": 0.0, "GPU": 0.0}, ray.cluster_resources(),
                                   path)
    artifacts_root = RunLayout.of(absolute_paths(config)).artifacts
    encoders = build_artifacts(arm_configs, artifacts_root, {arm: spec.source(arm, "encoder_from") for arm in spec.arms})
    trials = plan_trials(spec, arm_configs, seeds, steps, out_dir, encoders, artifacts_root)
    pending = [t for t in trials if not t.is_done()]
    resumed = [t for t in pending if t.progress() is not None]
    concurrent = concurrent or fit
    print(f"experiment: {path}: {len(spec.arms)} arms x {seeds} seeds x {steps} env steps; "
          f"{len(trials) - len(pending)} trials already done, {len(pending)} to run ({len(resumed)} resumed from "
          f"their last evaluation point), {concurrent} at once ({sum(b['CPU'] for b in largest):g} CPUs each)",
          flush=True)
    # Trials that start from another trial's policy run after every other trial has saved its own.
    for phase in ([t for t in pending if t.init_from is None], [t for t in pending if t.init_from is not None]):
        if phase:
            run_trials(phase, concurrent, out_dir)

    summary = {
        "arms_file": str(path),
        "question": spec.question,
        "command": command,
        "steps": steps,
        "seeds": list(range(seeds)),
        "evaluation": {"episodes": eval_episodes(arm_configs), "max_steps": None, "policy": "greedy",
                       "every": spec.eval_every},
        "threshold": spec.threshold,
        "curve": "(env steps, RLlib's mean return of the recent training episodes) after each iteration",
        "references": reference_lines(trials),
        "trials_run": [t.key for t in pending],
        "arms": summarize_arms(spec, arm_configs, encoders, trials),
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(out_dir / "results.json", summary)
    plot_curves(summary, out_dir / "curves.png")
    plot_eval_curves(summary, out_dir / "eval_curves.png")
    plot_eval_returns(summary, out_dir / "eval_returns.png")
    print_table(summary, out_dir)
    return summary


def experiment_status(config: EnvEncConfig, arms_path: str, seeds: int | None = None,
                      steps: int | None = None) -> list[dict]:
    """Each trial's progress, read from its files (no Ray, nothing built): arm, seed, env steps done of its budget,
    the last evaluation return, and whether it is done, partial (resumes from its last evaluation point) or not
    started. Printed as a table and returned."""
    path = Path(arms_path)
    spec, arm_configs, seeds, steps, out_dir = load_experiment(config, path, seeds, steps)
    rows = []
    for trial in plan_trials(spec, arm_configs, seeds, steps, out_dir):
        result = trial.result()
        record = result or trial.progress()
        rows.append({"arm": trial.arm, "seed": trial.seed, "env_steps": record["env_steps"] if record else 0,
                     "steps": trial.steps,
                     "last_eval_return": record["evals"][-1]["return_mean"] if record and record["evals"] else None,
                     "evaluations": f"{len(record['evals']) if record else 0}/{len(trial.eval_points)}",
                     "state": "done" if result else "partial" if record else "not started"})
    _print_rows(["arm", "seed", "env steps", "evaluations", "last eval return", "state"],
                [[row["arm"], str(row["seed"]), f"{row['env_steps']}/{row['steps']}", row["evaluations"],
                  _fmt(row["last_eval_return"]), row["state"]] for row in rows])
    done = sum(row["state"] == "done" for row in rows)
    print(f"experiment: {path}: {done} of {len(rows)} trials done; trial folders under {out_dir / 'trials'}")
    return rows


# ----------------------------------------------------------------------------- results


def eval_episodes(arm_configs: dict[str, EnvEncConfig]) -> int | list[int]:
    """Greedy episodes per trial: the arms' rl.eval_episodes (one number when they agree)."""
    counts = sorted({config.rl.eval_episodes for config in arm_configs.values()})
    return counts[0] if len(counts) == 1 else counts


def summarize_arms(spec: ArmsSpec, arm_configs: dict[str, EnvEncConfig], encoders: dict[str, Path | None],
                   trials: list[Trial]) -> dict:
    rng = np.random.default_rng(0)
    arms = {}
    for arm, arm_config in arm_configs.items():
        results = {t.seed: t.result() for t in trials if t.arm == arm}
        seeds = {str(seed): result for seed, result in results.items() if result is not None}
        returns = np.array([[result["eval"]["return_mean"] for result in seeds.values()]])
        areas = np.array([[curve_area(result["evals"]) for result in seeds.values()]])
        shares = [r["encoder_share_of_sampling"] for r in seeds.values() if r["encoder_share_of_sampling"]]
        low, high = bootstrap_ci(returns, rng) if seeds else (None, None)
        area_low, area_high = bootstrap_ci(areas, rng) if seeds else (None, None)
        curve = eval_curve(list(seeds.values()), rng)
        arms[arm] = {
            "overrides": spec.overrides(arm),
            "steps": next(t.steps for t in trials if t.arm == arm),
            **{key: spec.arms[arm][key] for key in ("init_from", "encoder_from") if key in spec.arms[arm]},
            "algo": arm_config.rl.algo,
            "obs_mode": arm_config.rl.obs_mode,
            "seeds": seeds,
            "eval_return_mean": float(returns.mean()) if seeds else None,
            "eval_return_ci95": [float(low[0]), float(high[0])] if seeds else None,
            "eval_curve": curve,
            # the mean evaluation return over the run: the area under the evaluation curve over its env-step span
            "eval_return_auc_mean": float(areas.mean()) if seeds else None,
            "eval_return_auc_ci95": [float(area_low[0]), float(area_high[0])] if seeds else None,
            "steps_to_threshold": steps_to_threshold(curve, list(seeds.values()), spec.threshold),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in seeds.values()])) if seeds else None,
            "diagnostics": {"encoder": encoder_diagnostics(encoders[arm]),
                            "encoder_share_of_sampling": float(np.mean(shares)) if shares else None},
        }
    return arms


def curve_area(evals: list[dict]) -> float:
    """A trial's mean evaluation return over its run: the trapezoid area under (env steps, return) divided by the
    env steps it spans (the one return when it evaluated once)."""
    steps = np.array([row["env_steps"] for row in evals], dtype=float)
    returns = np.array([row["return_mean"] for row in evals], dtype=float)
    if len(evals) == 1 or steps[-1] == steps[0]:
        return float(returns.mean())
    return float(np.sum((returns[1:] + returns[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def eval_curve(results: list[dict], rng: np.random.Generator) -> dict | None:
    """The arm's evaluation curve: at each evaluation point, the mean greedy return over seeds and its 95%
    bootstrap CI (every seed of an arm evaluates at the same points)."""
    if not results:
        return None
    values = np.array([[row["return_mean"] for row in result["evals"]] for result in results]).T  # (points, seeds)
    low, high = bootstrap_ci(values, rng)
    return {"points": [row["point"] for row in results[0]["evals"]], "mean": values.mean(axis=1).tolist(),
            "ci95": [[float(a), float(b)] for a, b in zip(low, high)]}


def steps_to_threshold(curve: dict | None, results: list[dict], threshold: float | None) -> dict | None:
    """Where the arm first reaches `threshold`: the first evaluation point whose mean over seeds does, and each
    seed's first (None: not reached within the budget, itself a result)."""
    if threshold is None or curve is None:
        return None
    first = next((point for point, mean in zip(curve["points"], curve["mean"]) if mean >= threshold), None)
    per_seed = [next((row["env_steps"] for row in result["evals"] if row["return_mean"] >= threshold), None)
                for result in results]
    return {"threshold": threshold, "mean_curve": first, "per_seed": per_seed,
            "seeds_reached": sum(steps is not None for steps in per_seed)}


def reference_lines(trials: list[Trial]) -> dict[str, dict]:
    """The random, best constant action and RAM-heuristic policies' returns on each game of the experiment (the
    reference lines), over as many full-length episodes as a trial's evaluation, on its env settings."""
    from envenc_ray.config import game_name
    from envenc_ray.rl.evaluate import reference_returns

    references = {}
    for trial in trials:
        game = game_name(trial.config.env.game)
        if game not in references:
            references[game] = reference_returns(trial.config)
    return references


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap interval of the mean over seeds (axis 1) for every row of `values`."""
    seeds = values.shape[1]
    picks = rng.integers(seeds, size=(BOOTSTRAP_RESAMPLES, seeds))
    means = values[:, picks].mean(axis=2)  # (rows, resamples)
    return np.percentile(means, 2.5, axis=1), np.percentile(means, 97.5, axis=1)


def mean_curve(curves: list[list[list[float | None]]], rng: np.random.Generator):
    """(steps, mean, low, high) over seeds on the union of their step counts; each seed's curve is linearly
    interpolated there, from its first finished episode on (before that there is no return to average)."""
    grid = np.unique([point[0] for curve in curves for point in curve]).astype(float)
    values = []
    for curve in curves:
        known = np.array([point for point in curve if point[1] is not None], dtype=float).reshape(-1, 2)
        values.append(np.interp(grid, known[:, 0], known[:, 1], left=np.nan) if len(known) else np.full(len(grid),
                                                                                                      np.nan))
    values = np.array(values).T  # (grid points, seeds)
    defined = ~np.isnan(values).any(axis=1)
    grid, values = grid[defined], values[defined]
    if not len(grid):
        return grid, grid, grid, grid
    low, high = bootstrap_ci(values, rng)
    return grid, values.mean(axis=1), low, high


def plot_curves(summary: dict, path: Path) -> None:
    rng = np.random.default_rng(0)
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for arm, record in summary["arms"].items():
        if not any(seed["curve"] for seed in record["seeds"].values()):  # none yet, or a zero-shot arm
            continue
        steps, mean, low, high = mean_curve([seed["curve"] for seed in record["seeds"].values()], rng)
        line, = axis.plot(steps, mean, label=f"{arm} ({len(record['seeds'])} seeds)")
        axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis.set_title(textwrap.fill(summary["question"], 80), fontsize=10)
    axis.set(xlabel="env steps (of each arm's own training)",
             ylabel="mean training episode return", xlim=(0, max(record["steps"] for record in summary["arms"].values())))
    _save_banded(figure, axis, path)


def plot_eval_curves(summary: dict, path: Path) -> None:
    """Greedy evaluation return vs env steps per arm (mean over seeds, 95% bootstrap band), with the random and
    RAM-heuristic policies' returns and the threshold as horizontal lines."""
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for arm, record in summary["arms"].items():
        curve = record["eval_curve"]
        if curve is None:
            continue
        line, = axis.plot(curve["points"], curve["mean"], marker="o", markersize=3,
                          label=f"{arm} ({len(record['seeds'])} seeds)")
        axis.fill_between(curve["points"], *zip(*curve["ci95"]), color=line.get_color(), alpha=0.2, linewidth=0)
    styles = {"random": ("dimgrey", "--"), "constant": ("tab:purple", "-."), "heuristic": ("darkgoldenrod", ":")}
    for game, reference in summary["references"].items():
        for policy, (color, style) in styles.items():
            if policy in reference:
                axis.axhline(reference[policy]["return_mean"], color=color, linestyle=style,
                             label=f"{reference_label(policy, reference)} ({game})")
    if summary["threshold"] is not None:
        axis.axhline(summary["threshold"], color="black", linewidth=0.8, label=f"threshold {summary['threshold']:g}")
    axis.set_title(textwrap.fill(summary["question"], 80), fontsize=10)
    axis.set(xlabel="env steps (agent steps; frameskip 4)", ylabel=f"greedy evaluation return "
             f"({summary['evaluation']['episodes']} full episodes)")
    _save_banded(figure, axis, path)


def _save_banded(figure, axis, path: Path) -> None:
    """The legend, grid and file of a plot whose lines carry 95% bootstrap bands over seeds."""
    axis.legend(title="shaded: 95% bootstrap CI over seeds", fontsize="small", title_fontsize="small")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_eval_returns(summary: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7.5, 4.0))
    names = list(summary["arms"])
    for position, arm in enumerate(names):
        record = summary["arms"][arm]
        if not record["seeds"]:
            continue
        per_seed = [seed["eval"]["return_mean"] for seed in record["seeds"].values()]
        axis.scatter([position] * len(per_seed), per_seed, color="grey", s=14, zorder=2)
        low, high = record["eval_return_ci95"]
        mean = record["eval_return_mean"]
        axis.errorbar([position], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color="black", capsize=6,
                      zorder=3)
    axis.set_xticks(range(len(names)), names)
    axis.set_xlim(-0.5, len(names) - 0.5)
    axis.set(title=f"Greedy evaluation after {summary['steps']} env steps, {summary['evaluation']['episodes']} "
                   "episodes per seed, no step cap\n(grey: each seed's mean; black: 95% bootstrap CI over seeds)",
             ylabel="mean episode return")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(summary: dict, out_dir: Path) -> None:
    header = ["arm", "seeds", "eval return", "95% CI", "mean over run", "steps to threshold", "env steps/s",
              "probe R2", "encoder share"]
    lines = []
    for arm, record in summary["arms"].items():
        speeds = [seed["env_steps_per_s"] for seed in record["seeds"].values() if seed["env_steps_per_s"]]
        encoder = record["diagnostics"]["encoder"] or {}
        share = record["diagnostics"]["encoder_share_of_sampling"]
        ci = record["eval_return_ci95"]
        reached = record["steps_to_threshold"]
        lines.append([arm, str(len(record["seeds"])), _fmt(record["eval_return_mean"]),
                      f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-", _fmt(record["eval_return_auc_mean"]),
                      "-" if reached is None else "not reached" if reached["mean_curve"] is None
                      else str(reached["mean_curve"]), _fmt(np.mean(speeds) if speeds else None),
                      _fmt(encoder.get("probe_r2_latent_mean")), _fmt(share)])
    _print_rows(header, lines)
    for game, reference in summary["references"].items():
        print(f"experiment: {game}: " + ", ".join(
            f"{reference_label(policy, reference)} {reference[policy]['return_mean']:.3g}"
            for policy in ("random", "constant", "heuristic") if policy in reference))
    print(f"experiment: results in {out_dir / 'results.json'}, plots curves.png, eval_curves.png and eval_returns.png")


def _print_rows(header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    for line in [header, *lines]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"
