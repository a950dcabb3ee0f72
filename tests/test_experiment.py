"""Stage `experiment`: a real tiny experiment through Ray Tune (2 arms x 2 seeds x 192 env steps), then a resume.

The arms are PPO on pixels and PPO on latents (the untrained tiny VLM + a 2-epoch encoder, built once before
the trials). Assertions are on what the experiment wrote: results.json's structure, every trial ending at
exactly the budget, seeds that give different agents, and a rerun after one trial's result is lost (as after
a kill) that runs that trial only and rebuilds no artifact. The error tests need no Ray: a bad arms file fails
before anything starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

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

    from envenc_ray.rl.experiment import experiment

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

    from envenc_ray.rl.experiment import experiment

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
    from envenc_ray.rl.experiment import experiment

    for arm, message in (({"init_from": "nowhere"}, "init_from: 'nowhere'"), ({"steps": 0}, "0 only with init_from"),
                         ({"encoder_from": "b"}, "encoder_from: 'b'")):
        arms = write_arms(tmp_path, {"question": "q", "arms": {"a": arm, "b": {"init_from": "a"}}})
        with pytest.raises(ConfigError, match=message):
            experiment(debug_config(), str(arms), seeds=1, steps=64)


def test_arms_that_set_what_the_experiment_owns_fail_before_anything_runs(debug_config, tmp_path):
    from envenc_ray.rl.experiment import experiment

    arms = write_arms(tmp_path, {"question": "q", "arms": {"a": {"experiment.seed": 3}}})
    with pytest.raises(ConfigError, match=r"arm 'a' sets 'experiment.seed'.*--seeds"):
        experiment(debug_config(), str(arms), seeds=1, steps=64)

    arms = write_arms(tmp_path, {"question": "q", "arms": {"a": {"rl.lr": "fast"}}})
    with pytest.raises(ConfigError, match=r"rl.lr"):
        experiment(debug_config(), str(arms), seeds=1, steps=64)


def test_a_budget_that_is_not_a_whole_number_of_iterations_is_refused(debug_config, tmp_path):
    from envenc_ray.rl.experiment import experiment

    arms = write_arms(tmp_path, ARMS)
    with pytest.raises(ConfigError, match=r"--steps 100 is not a whole number of iterations of 64 .*--steps 64 or 128"):
        experiment(debug_config(), str(arms), seeds=1, steps=100)
