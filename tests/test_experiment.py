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
