"""`envenc run` end to end at tiny sizes (real Ray, Serve, Ray Train, RLlib, ALE), and its preflight."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from envenc_ray.errors import ConfigError, DataError, ModelError
from envenc_ray.pipeline import preflight, run

REPO = Path(__file__).resolve().parents[1]
STAGES = ["collect", "embed", "train-encoder", "serve", "train", "evaluate", "report"]


@pytest.mark.slow
def test_reduced_pipeline_end_to_end_then_everything_skips(ray_session, tmp_path, debug_config):
    from ray import serve

    config = debug_config()
    try:
        manifest = run(config)
        assert list(manifest["stages"]) == STAGES
        assert not any(stage["skipped"] for stage in manifest["stages"].values())
        report_dir = config.run_dir / "report"
        for name in ("report.md", "metrics.json", "encoder.png", "learning_curve.png", "service.png"):
            assert (report_dir / name).is_file(), name
        metrics = json.loads((report_dir / "metrics.json").read_text())
        assert metrics["frames"] == 2 * 48  # debug preset: 2 episodes x 48 steps
        assert metrics["agent"]["iterations"] == 1 and "random_return_mean" in metrics["agent"]
        assert metrics["service"]["encoder_frames_per_call"] == pytest.approx(2.0)  # 2 sub-envs, one call each step
        report = (report_dir / "report.md").read_text()
        assert "## Encoder" in report and "![learning curve](learning_curve.png)" in report
        recorded = json.loads((config.run_dir / "manifest.json").read_text())
        assert recorded["versions"]["ray"] and recorded["config_hash"] == manifest["config_hash"]

        again = run(config)
        assert all(stage["skipped"] for stage in again["stages"].values()), again["stages"]
        for name in STAGES:  # the time it took to make each output survives the run that skipped it
            assert again["stages"][name]["seconds_to_make"] == manifest["stages"][name]["seconds"]
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_envenc_run_in_a_fresh_folder_with_the_default_relative_run_root(tmp_path):
    """What a new user does, through the CLI: in a fresh working directory with a copy of configs/, `envenc run`
    with the default run root `runs` (relative) and every stage: advise's Ray Train workers, embed's Ray Data actors,
    the Serve replica and the EnvRunners all run outside that directory, so they must be handed absolute paths.
    Then a second run skips every stage. It also checks what advise adds to the report (all three probes)."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    command = [sys.executable, "-m", "envenc_ray.cli", "run", "configs/pong-tiny.yaml", "configs/debug.yaml",
               "--set", "stage2.method=finetuned", "--set", "advise.epochs=1", "--set", "advise.batch_size=8",
               "--set", "advise.eval_pairs=4", "--set", "advise.cpus_per_worker=0.5"]
    fresh_ray = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    first = subprocess.run(command, cwd=tmp_path, env=fresh_ray, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "debug"  # the default experiment.run_root, taken from the working directory
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["collect", "advise", "embed", "train-encoder", "serve", "train", "evaluate",
                                        "report"]
    assert not any(stage["skipped"] for stage in manifest["stages"].values())

    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    probes = metrics["probe_r2"]
    assert set(probes) == {"untrained", "hidden", "latent"}
    assert set(probes["untrained"]) == set(probes["hidden"]) >= set(probes["latent"]) >= {"ball_x", "player_y"}
    # advise.train 'above_readout' (the default): the finetuned VLM's read-out is the VLM's as given
    assert probes["hidden"] == pytest.approx(probes["untrained"], abs=1e-6, nan_ok=True)
    assert {"ball_dx", "ball_dy", "player_dy"} <= set(probes["latent"])  # velocities from consecutive frames
    assert set(metrics["probe_r2_velocity_mean"]) == set(metrics["probe_r2_mean"]) == set(probes)  # kept apart
    # AtariARI: the Pong bytes that move in these 96 frames (paddle x and the scores stay constant: dropped)
    atariari = metrics["atariari_f1"]
    assert set(atariari) == set(metrics["atariari_f1_mean"]) == {"hidden", "latent"}
    assert set(atariari["hidden"]) == set(atariari["latent"]) == {"player_y", "enemy_y", "ball_x", "ball_y"}
    assert all(0 <= f1 <= 1 for values in atariari.values() for f1 in values.values())
    advice = metrics["advice"]
    assert 0 <= advice["action_accuracy_heldout"] <= 1 and 0 < advice["chance_accuracy"] <= 1
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Advice finetuning (stage 2)" in report and "![probes](probes.png)" in report
    assert "## AtariARI probes" in report and "| ST-DIM (Anand et al. 2019) | 0.81 |" in report
    assert (run_dir / "report" / "advice.png").is_file() and (run_dir / "report" / "probes.png").is_file()
    hidden_meta = json.loads((run_dir / "hidden" / "_embed.json").read_text())
    assert hidden_meta["model"] == json.loads((run_dir / "advise.json").read_text())["vlm"]
    assert hidden_meta["model"].startswith(str(tmp_path / "runs" / "_shared"))

    second = subprocess.run(command, cwd=tmp_path, env=fresh_ray, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = json.loads((run_dir / "manifest.json").read_text())
    assert all(stage["skipped"] for stage in again["stages"].values()), again["stages"]
    assert "every stage was already done" in second.stdout


def test_preflight_rejects_bad_setups_before_work(tmp_path, debug_config):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        preflight(debug_config(run_root=not_a_folder))
    with pytest.raises(ModelError, match="not a directory"):
        preflight(debug_config(f"vlm.model={tmp_path / 'no-such-model'}"))
    preflight(debug_config("vlm.model=llava-hf/llava-1.5-7b-hf"))  # a hub name is not checked offline

    config = debug_config()
    frames_dir = config.run_dir / "frames"
    frames_dir.mkdir(parents=True)
    (frames_dir / "_collect.json").write_text(json.dumps({"config_hash": "0123456789abcdef"}))
    with pytest.raises(DataError, match=r"frames was written by another config"):
        preflight(config)
