"""Finish the trials of the first Atari-100k Pong run that trained but were never evaluated.

Why this exists: in that run every trial trained its 100 iterations (100,409 env steps: RLlib adds a few
steps per iteration where episodes end) and saved its policy, then failed the experiment's old exact-budget
check (`steps != budget`, since relaxed to "the iteration that reaches the budget"), so no trial wrote its
result.json (every trial trained 100 iterations, 100,317 to 100,458 env steps). Rather than spend another 90 minutes retraining, this script, for each such trial, takes the
learning curve Ray Tune recorded for it (tune/run-*/trial_<arm>_seed<s>/result.json, the latest run that
reached the budget), plays the same greedy full-length evaluation `run_trial` would have played with
`envenc_ray.rl.evaluate.evaluate` on the saved policy, and writes the trial's result.json exactly as
`run_trial` does (same fingerprint), then results.json and the plots with the experiment's own summary
functions (what `envenc experiment` writes once every trial is done; rerunning the command in README.md now
gives the same files). The one field it cannot recover is the encoder's share of the sampling time (Tune's
reports do not hold it): null. Nothing here needs Ray: the artifacts are current and evaluation runs in
process.

    python benchmarks/results/atari100k-pong/evaluate_saved_trials.py
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from envenc_ray.config import load_config  # noqa: E402
from envenc_ray.files import write_json_atomic  # noqa: E402
from envenc_ray.layout import RunLayout  # noqa: E402
from envenc_ray.rl.evaluate import evaluate  # noqa: E402
from envenc_ray.pipeline.experiment import (RESULT_FILE, absolute_paths, build_artifacts, eval_episodes,  # noqa: E402
                                            load_arms, plan_trials, plot_curves, plot_eval_returns, print_table,
                                            summarize_arms, trial_config)
from envenc_ray.runtime import set_torch_threads  # noqa: E402

COMMAND = "envenc experiment configs/pong-tiny.yaml --arms configs/experiments/atari100k-pong.yaml"

ARMS = ROOT / "configs/experiments/atari100k-pong.yaml"


def tune_curve(out_dir: Path, arm: str, seed: int, budget: int) -> list[dict] | None:
    """The reports of the latest Tune run of this trial that reached the budget."""
    for run in sorted((out_dir / "tune").glob("run-*"), reverse=True):
        path = run / f"trial_{arm}_seed{seed}" / "result.json"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and rows[-1]["env_steps"] >= budget:
            return rows
    return None


def main() -> None:
    spec = load_arms(ARMS)
    base = absolute_paths(load_config([ROOT / "configs/pong-tiny.yaml"], [f"experiment.run_root={ROOT / 'runs'}"]))
    dump = base.model_dump(mode="json")
    arm_configs = {arm: trial_config(dump, spec.overrides(arm), str(ARMS)) for arm in spec.arms}
    artifacts_root = RunLayout.of(base).artifacts
    out_dir = RunLayout.of(base).experiments / ARMS.stem
    encoders = build_artifacts(arm_configs, artifacts_root)  # all current: nothing is rebuilt
    set_torch_threads(2)
    trials = plan_trials(spec, arm_configs, encoders, spec.seeds, spec.steps, artifacts_root, out_dir)
    recovered = []
    for trial in trials:
        policy = trial.directory / "policy"
        rows = tune_curve(out_dir, trial.arm, trial.seed, spec.steps)
        if trial.is_done() or rows is None or not (policy / "policy.safetensors").is_file():
            print(f"{trial.key}: {'done' if trial.is_done() else 'not trained to the budget'}; left as it is")
            continue
        started = time.perf_counter()
        evaluation = evaluate(trial.config, checkpoint=policy)
        curve = [[int(row["env_steps"]), None if math.isnan(row["episode_return_mean"]) else row["episode_return_mean"]]
                 for row in rows]
        train_s = rows[-1]["time_total_s"]
        speeds = [row["env_steps_per_s"] for row in rows if not math.isnan(row["env_steps_per_s"])]
        write_json_atomic(trial.directory / RESULT_FILE, {
            "arm": trial.arm,
            "seed": trial.seed,
            "fingerprint": trial.fingerprint,
            "env_steps": curve[-1][0],
            "iterations": rows[-1]["training_iteration"],
            "curve": curve,
            "eval": {key: evaluation[key] for key in ("episodes", "return_mean", "return_std", "returns", "lengths")},
            "wall_s": train_s + time.perf_counter() - started,
            "train_s": train_s,
            "env_steps_per_s": sum(speeds) / len(speeds),
            "encoder_share_of_sampling": None,
            "recovered_by": "benchmarks/results/atari100k-pong/evaluate_saved_trials.py",
        })
        recovered.append(trial.key)
        print(f"{trial.key}: evaluated, return {evaluation['return_mean']:.2f}", flush=True)

    summary = {
        "arms_file": str(ARMS.relative_to(ROOT)),
        "question": spec.question,
        "command": COMMAND,
        "steps": spec.steps,
        "seeds": list(range(spec.seeds)),
        "evaluation": {"episodes": eval_episodes(arm_configs), "max_steps": None, "policy": "greedy"},
        "curve": "(env steps, RLlib's mean return of the recent training episodes) after each iteration",
        "trials_run": [],
        "trials_evaluated_by": {"benchmarks/results/atari100k-pong/evaluate_saved_trials.py": recovered},
        "arms": summarize_arms(spec, arm_configs, encoders, trials),
    }
    write_json_atomic(out_dir / "results.json", summary)
    plot_curves(summary, out_dir / "curves.png")
    plot_eval_returns(summary, out_dir / "eval_returns.png")
    print_table(summary, out_dir)


if __name__ == "__main__":
    main()
