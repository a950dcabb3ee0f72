"""Stage `experiment`: a real tiny experiment through Ray Tune (2 arms x 2 seeds x 192 env steps), then a resume.

The arms are PPO on pixels and PPO on latents (the untrained tiny VLM + a 2-epoch encoder, built once before
the trials). Assertions are on what the experiment wrote: results.json's structure, every trial ending at
exactly the budget, seeds that give different agents, and a rerun after one trial's result is lost (as after
a kill) that runs that trial only and rebuilds no artifact. Then `envenc experiment` as a subprocess on the
state reference and pixels, killed (SIGKILL, Ray included) after its first evaluation point and rerun: the
trials continue from their checkpoints, every evaluation point once, and `--status` tells before, mid and
after. The error tests need no Ray: a bad arms file fails before anything starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import kill_when

from envenc_ray.errors import ConfigError

STEPS = 192  # 3 PPO iterations of the debug preset's 64 env steps
ARMS = {
    "question": "Pixels or latents? (test)",
    "arms": {"pixels": {"rl.obs_mode": "pixels"}, "latent": {"rl.obs_mode": "latent", "stage2.method": "pretrained"}},
}
# Short episodes so that training returns exist after two iterations and the evaluation episode ends quickly;
# no remote EnvRunner, so a trial takes 1 CPU and the 2-CPU session runs two trials at once.
TINY = ("env.max_episode_steps=40", "rl.num_env_runners=0", "rl.fcnet_hiddens=[32]")


def write_arms(tmp_path: Path, arms: dict) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(arms))
    return path


@pytest.mark.slow
def test_tiny_experiment_has_equal_budgets_and_resumes_only_the_unfinished_trial(ray_session, debug_config, tmp_path):
    from safetensors.numpy import load_file

    from envenc_ray.pipeline.experiment import experiment

    config = debug_config(*TINY)
    arms = write_arms(tmp_path, ARMS)

    summary = experiment(config, str(arms), seeds=2, steps=STEPS)

    out = config.run_dir / "experiments" / "tiny"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))
    assert sorted(summary["trials_run"]) == ["latent/0", "latent/1", "pixels/0", "pixels/1"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "eval_returns.png").stat().st_size > 0
    assert summary["evaluation"]["max_steps"] is None  # full-length episodes (here cut by env.max_episode_steps)
    assert set(summary["arms"]) == {"pixels", "latent"}
    for arm, record in summary["arms"].items():
        assert set(record["seeds"]) == {"0", "1"}
        for result in record["seeds"].values():
            assert result["env_steps"] == STEPS and result["curve"][-1][0] == STEPS  # the same budget for all
            assert [point[0] for point in result["curve"]] == [64, 128, 192]
            assert math.isfinite(result["curve"][-1][1])  # episodes of 40 steps ended during training
            assert result["eval"]["episodes"] == 1 and result["eval"]["lengths"] == [40]
            assert result["wall_s"] > result["train_s"] > 0
        low, high = record["eval_return_ci95"]
        assert low <= record["eval_return_mean"] <= high
    assert summary["arms"]["pixels"]["diagnostics"]["encoder"] is None
    latent = summary["arms"]["latent"]["diagnostics"]
    assert isinstance(latent["encoder"]["probe_r2_latent_mean"], float)
    assert 0 < latent["encoder_share_of_sampling"] < 1

    # The trial seed is the agent's: the two seeds of an arm start from (and end with) different weights.
    weights = [load_file(str(out / "trials" / "pixels" / f"seed-{seed}" / "policy" / "policy.safetensors"))
               for seed in (0, 1)]
    assert any((weights[0][key] != weights[1][key]).any() for key in weights[0])

    # A lost result (a trial killed before writing it) is rerun alone; the encoder is reused, not rebuilt.
    encoder_file = Path(latent["encoder"]["encoder_dir"]) / "model.safetensors"
    kept = {path: path.stat().st_mtime_ns for path in [encoder_file, *(out / "trials").glob("*/seed-*/result.json")]
            if path.parts[-3:-1] != ("latent", "seed-1")}
    (out / "trials" / "latent" / "seed-1" / "result.json").unlink()

    resumed = experiment(config, str(arms), seeds=2, steps=STEPS)

    assert resumed["trials_run"] == ["latent/1"]
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert resumed["arms"]["latent"]["seeds"]["1"]["env_steps"] == STEPS
    assert resumed["arms"]["pixels"]["seeds"] == summary["arms"]["pixels"]["seeds"]


@pytest.mark.slow
def test_transfer_arms_start_from_the_source_policy_and_read_its_encoder(ray_session, debug_config, tmp_path):
    """Generalisation: Pong's agent evaluated zero-shot on Breakout and finetuned there, on Pong's latents."""
    from safetensors.numpy import load_file

    from envenc_ray.pipeline.experiment import experiment

    transfer = {"init_from": "source", "encoder_from": "source", "env.game": "breakout"}
    arms = write_arms(tmp_path, {
        "question": "Transfer (test)",
        "common": {"rl.obs_mode": "latent", "stage2.method": "pretrained", "env.full_action_space": True},
        "arms": {"zero-shot": {**transfer, "steps": 0}, "finetune": {**transfer, "steps": 64}, "source": {}},
    })
    config = debug_config(*TINY)
    summary = experiment(config, str(arms), seeds=1, steps=128)

    assert sorted(summary["trials_run"]) == ["finetune/0", "source/0", "zero-shot/0"]
    records = {arm: record["seeds"]["0"] for arm, record in summary["arms"].items()}
    assert records["source"]["env_steps"] == 128 and records["finetune"]["env_steps"] == 64
    assert records["zero-shot"]["env_steps"] == 0 and records["zero-shot"]["curve"] == []
    assert records["zero-shot"]["eval"]["lengths"] == [40] and records["finetune"]["eval"]["lengths"] == [40]
    trials = config.run_dir / "experiments" / "tiny" / "trials"
    weights = {arm: load_file(str(trials / arm / "seed-0" / "policy" / "policy.safetensors")) for arm in records}
    source = weights["source"]
    assert all((weights["zero-shot"][key] == source[key]).all() for key in source)  # Pong's policy, as trained
    assert any((weights["finetune"][key] != source[key]).any() for key in source)  # then trained on Breakout
    encoders = {arm: record["diagnostics"]["encoder"]["encoder_dir"] for arm, record in summary["arms"].items()}
    assert len(set(encoders.values())) == 1  # one latent space: Pong's VLM and encoder for every arm
    assert summary["arms"]["finetune"]["init_from"] == "source" and summary["arms"]["zero-shot"]["steps"] == 0


def test_transfer_keys_name_another_plain_arm(debug_config, tmp_path):
    from envenc_ray.pipeline.experiment import experiment

    for arm, message in (({"init_from": "nowhere"}, "init_from: 'nowhere'"), ({"steps": 0}, "0 only with init_from"),
                         ({"encoder_from": "b"}, "encoder_from: 'b'")):
        arms = write_arms(tmp_path, {"question": "q", "arms": {"a": arm, "b": {"init_from": "a"}}})
        with pytest.raises(ConfigError, match=message):
            experiment(debug_config(), str(arms), seeds=1, steps=64)


def test_arms_that_set_what_the_experiment_owns_fail_before_anything_runs(debug_config, tmp_path):
    from envenc_ray.pipeline.experiment import experiment

    arms = write_arms(tmp_path, {"question": "q", "arms": {"a": {"experiment.seed": 3}}})
    with pytest.raises(ConfigError, match=r"arm 'a' sets 'experiment.seed'.*--seeds"):
        experiment(debug_config(), str(arms), seeds=1, steps=64)

    arms = write_arms(tmp_path, {"question": "q", "arms": {"a": {"rl.lr": "fast"}}})
    with pytest.raises(ConfigError, match=r"rl.lr"):
        experiment(debug_config(), str(arms), seeds=1, steps=64)


def test_a_budget_that_is_not_a_whole_number_of_iterations_is_refused(debug_config, tmp_path):
    from envenc_ray.pipeline.experiment import experiment

    arms = write_arms(tmp_path, ARMS)
    with pytest.raises(ConfigError, match=r"--steps 100 is not a whole number of iterations of 64 .*--steps 64 or 128"):
        experiment(debug_config(), str(arms), seeds=1, steps=100)


RESUME_STEPS, RESUME_EVERY = 640, 128  # 10 PPO iterations of 64 env steps, evaluated every 2
RESUME_ARMS = {"question": "State reference and pixels, killed and resumed (test)", "eval_every": RESUME_EVERY,
               "threshold": -5.0, "common": {"rl.lr_anneal_steps": RESUME_STEPS},  # a schedule to resume too
               "arms": {"state": {"rl.obs_mode": "state"}, "pixels": {"rl.obs_mode": "pixels"}}}


def _refuse_ray(monkeypatch) -> None:
    """`--status` reads files only: starting Ray (or RLlib's algorithm) would fail the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("experiment --status started Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("envenc_ray.runtime.ensure_ray", refuse)


@pytest.mark.slow
def test_a_killed_experiment_resumes_every_trial_from_its_last_evaluation_point(debug_config, tmp_path, monkeypatch):
    from envenc_ray.pipeline.experiment import experiment_status

    root = Path(__file__).resolve().parents[1]
    arms = write_arms(tmp_path, RESUME_ARMS)
    overrides = [f"experiment.run_root={tmp_path}", *TINY]
    args = [sys.executable, "-m", "envenc_ray.cli", "experiment", str(root / "configs/pong-tiny.yaml"),
            str(root / "configs/debug.yaml"), "--arms", str(arms), "--seeds", "1", "--steps", str(RESUME_STEPS),
            *[item for setting in overrides for item in ("--set", setting)]]
    env = {**os.environ, "RAY_ADDRESS": ""}
    config = debug_config(*TINY)
    trials = config.run_dir / "experiments" / "tiny" / "trials"
    _refuse_ray(monkeypatch)

    assert [row["state"] for row in experiment_status(config, str(arms), seeds=1, steps=RESUME_STEPS)] == [
        "not started", "not started"]

    kill_when(args, env, tmp_path / "killed-experiment.log", lambda: list(trials.glob("*/seed-0/progress.json")),
              150, "its first evaluation point")
    time.sleep(2)  # Ray's own processes end with their driver
    before = {arm: json.loads(path.read_text()) for arm in ("state", "pixels")
              if (path := trials / arm / "seed-0" / "progress.json").is_file()}
    assert before and all(record["evals"] and record["env_steps"] < RESUME_STEPS for record in before.values())
    assert not list(trials.glob("*/seed-0/result.json")), "killed after the first evaluation point, before the end"
    mid = subprocess.run([*args, "--status"], env=env, capture_output=True, text=True, timeout=60)
    assert mid.returncode == 0, mid.stderr[-2000:]
    for arm, record in before.items():  # e.g. "state  0  128/640  1/5  -3  partial"
        assert re.search(rf"^{arm} +0 +{record['env_steps']}/{RESUME_STEPS} .* partial *$", mid.stdout, re.M), mid.stdout

    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    assert f"{len(before)} resumed from their last evaluation point" in finished.stdout

    points = list(range(RESUME_EVERY, RESUME_STEPS + 1, RESUME_EVERY))
    summary = json.loads((config.run_dir / "experiments" / "tiny" / "results.json").read_text())
    for arm in ("state", "pixels"):
        result = json.loads((trials / arm / "seed-0" / "result.json").read_text())
        assert [row["point"] for row in result["evals"]] == points  # every evaluation point, once
        assert [row["env_steps"] for row in result["evals"]] == points
        assert all(row["episodes"] == 1 and row["lengths"] == [40] for row in result["evals"])
        curve_steps = [step for step, _ in result["curve"]]
        assert curve_steps == list(range(64, RESUME_STEPS + 1, 64))  # continued, not restarted nor repeated
        assert result["env_steps"] == RESUME_STEPS and result["iterations"] == RESUME_STEPS // 64
        if arm in before:  # the rows written before the kill are kept as they were
            assert result["evals"][:len(before[arm]["evals"])] == before[arm]["evals"]
            assert result["curve"][:len(before[arm]["curve"])] == before[arm]["curve"]
        record = summary["arms"][arm]
        assert record["eval_curve"]["points"] == points and record["steps_to_threshold"]["threshold"] == -5.0
        assert record["eval_return_auc_mean"] == pytest.approx(
            sum((a + b) / 2 for a, b in zip(record["eval_curve"]["mean"], record["eval_curve"]["mean"][1:]))
            / (len(points) - 1))
    assert summary["arms"]["state"]["obs_mode"] == "state"
    assert summary["arms"]["state"]["diagnostics"]["encoder"] is None  # no VLM, no encoder
    assert not (config.run_dir / "artifacts").exists()  # nothing built for state and pixels arms
    assert set(summary["references"]["pong"]) >= {"random", "heuristic"}
    assert (config.run_dir / "experiments" / "tiny" / "eval_curves.png").stat().st_size > 0

    after = experiment_status(config, str(arms), seeds=1, steps=RESUME_STEPS)
    assert [(row["state"], row["env_steps"], row["evaluations"]) for row in after] == [
        ("done", RESUME_STEPS, f"{len(points)}/{len(points)}")] * 2


def test_state_observation_is_the_fixed_size_object_vector_of_the_ram():
    import numpy as np

    from envenc_ray.config import EnvConfig
    from envenc_ray.rl.state import make_agent_env

    env = make_agent_env(EnvConfig(game="pong"), "state")
    observation, _ = env.reset(seed=0)
    positions = len(env.positions)
    assert observation.shape == env.observation_space.shape == (2 * positions + 1,)  # + the ball's presence flag
    assert not observation[positions:2 * positions].any()  # no change at an episode's first step
    seen = [observation]
    for _ in range(300):
        observation, *_ = env.step(env.action_space.sample())
        seen.append(observation)
    seen = np.array(seen)
    assert seen.dtype == np.float32 and np.abs(seen).max() <= 2.0  # about [-1, 1]
    ball = [env.positions.index("ball_x"), env.positions.index("ball_y")]
    missing = seen[:, -1] == 0
    assert missing.any() and (~missing).any()  # points are scored: the ball leaves the screen and comes back
    assert not seen[missing][:, ball].any() and not seen[missing][:, [positions + i for i in ball]].any()
    assert seen[:, positions:2 * positions].any()  # things move
    env.close()


def test_state_arms_need_an_annotated_game_and_the_pipeline_builds_no_representation_for_them(debug_config, tmp_path):
    from envenc_ray.pipeline import stages_of
    from envenc_ray.pipeline.experiment import experiment

    arms = write_arms(tmp_path, {"question": "q", "arms": {"state": {"rl.obs_mode": "state",
                                                                     "env.game": "space_invaders"}}})
    with pytest.raises(ConfigError, match=r"arm 'state'.*annotated for pong, breakout, boxing, freeway only"):
        experiment(debug_config(), str(arms), seeds=1, steps=64)
    names = [stage.name for stage in stages_of(debug_config("rl.obs_mode=state", "rl.encoder_source=in_process"))]
    assert names == ["train", "evaluate", "report"]
    with pytest.raises(ConfigError, match=r"rl.reward=env for the state reference"):
        debug_config("rl.obs_mode=state", "rl.reward=model")


def test_arms_make_their_encoder_through_the_pipelines_stages(debug_config):
    from envenc_ray.pipeline.experiment import encoder_stages

    assert [stage.name for stage in encoder_stages(debug_config())] == ["collect", "embed", "train-encoder"]
    finetuned = debug_config("stage2.method=finetuned")
    assert [stage.name for stage in encoder_stages(finetuned)] == ["collect", "advise", "embed", "train-encoder"]


@pytest.mark.parametrize("name", ["freeway-300k", "breakout-300k"])
def test_the_300k_protocols_check_out_before_anything_runs(debug_config, name):
    """Every arm of the protocol validates (keys, RLlib's batch rules, budget and interval in whole iterations)."""
    from envenc_ray.config import load_config
    from envenc_ray.pipeline.experiment import evaluation_points, load_experiment
    from envenc_ray.pipeline.trials import check_rllib_settings

    root = Path(__file__).resolve().parents[1]
    config = load_config([root / "configs/pong-tiny.yaml"], [f"experiment.run_root={debug_config().experiment.run_root}"])
    path = root / "configs/experiments" / f"{name}.yaml"
    spec, arm_configs, seeds, steps, _ = load_experiment(config, path, None, None)
    assert set(arm_configs) == {"pixels", "state", "latent", "latent-pooled"} and seeds == 3
    assert len(evaluation_points(steps, spec.eval_every)) == 12 and spec.threshold == 10
    for arm, arm_config in arm_configs.items():
        check_rllib_settings(arm_config, spec.overrides(arm), arm)
        assert (arm_config.rl.clip_param, arm_config.rl.vf_loss_coeff, arm_config.rl.grad_clip) == (0.1, 0.5, 0.5)
    assert arm_configs["latent-pooled"].vlm.pooling == "last"
