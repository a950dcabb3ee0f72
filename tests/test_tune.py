"""Stage `tune`: real Ray Tune + RLlib PPO on Pong with the tiny VLM and an untrained encoder, at tiny sizes.

The sweep test runs two trials (a grid over rl.lr), each an RLlib PPO with one remote EnvRunner inside the
trial's placement group, getting latents from ONE shared Serve deployment; the assertions are on what the
sweep wrote (results, a loadable best.yaml holding the winner's value) and that latents flowed. The error
tests check that a bad sweep fails before launching: an unknown or encoder-changing key, and trials that can
never fit the 2-CPU cluster (Tune itself would wait forever).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml

from envenc_ray.config import EncoderConfig, EnvEncConfig, load_config
from envenc_ray.errors import ConfigError

ENCODER = EncoderConfig(kind="temporal", latent_dim=8, hidden_dims=[32], window=2)
PPO_TINY = {"train_batch_size": 64, "minibatch_size": 32, "num_epochs": 1, "rollout_fragment_length": 32,
            "fcnet_hiddens": [32], "num_envs_per_env_runner": 2, "num_env_runners": 1, "cpus_per_env_runner": 0.5}


def save_untrained_encoder(encoder_dir: Path, hidden_size: int = 128) -> None:
    import torch

    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
    from envenc_ray.encoder.models import build_autoencoder

    torch.manual_seed(0)
    encoder = build_autoencoder(ENCODER, hidden_size).encoder_module()
    save_encoder(encoder, encoder_dir, {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": ENCODER.kind,
                                        "hidden_size": hidden_size, "latent_dim": ENCODER.latent_dim,
                                        "window": encoder.window, "encoder": ENCODER.model_dump(mode="json")},
                 metrics={})


def make_config(tmp_path: Path, tiny_vlm_dir, **rl) -> EnvEncConfig:
    return EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path / "runs"), "name": "sweep"},
        "env": {"game": "pong", "max_episode_steps": 16},  # short episodes: returns exist after one iteration
        "vlm": {"model": str(tiny_vlm_dir), "num_threads": 1},
        "encoder": ENCODER.model_dump(),
        "serve": {"num_cpus": 0.5, "max_replicas": 1},
        "rl": {**PPO_TINY, **rl},
    })


def write_sweep(tmp_path: Path, params: dict, **top) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"metric": "episode_return_mean", "mode": "max", "params": params, **top}))
    return path


@pytest.mark.slow
def test_grid_sweep_over_lr_shares_one_deployment_and_writes_the_best_config(ray_session, tmp_path, tiny_vlm_dir):
    from ray import serve

    from envenc_ray.pipeline.tune import tune

    config = make_config(tmp_path, tiny_vlm_dir, encoder_source="serve", serve_app="envenc-tune-test", iterations=2)
    save_untrained_encoder(config.run_dir / "encoder")
    sweep = write_sweep(tmp_path, {"rl.lr": {"grid": [1.0e-4, 3.0e-4]}})

    summary = tune(config, str(sweep))

    trials = summary["trials"]
    assert sorted(t["params"]["rl.lr"] for t in trials) == [1.0e-4, 3.0e-4]
    assert all(t["status"] == "DONE" and t["iterations"] == 2 for t in trials), trials
    assert all(t["encoder_call_ms"] > 0 for t in trials)  # latents came through the Serve app
    # 1 CPU (trial process + learner) + 1 EnvRunner x 0.5, next to the 0.5-CPU replica: one trial at a time
    assert summary["trial_resources"]["max_concurrent_trials"] == 1
    assert "envenc-tune-test" not in serve.status().applications  # the sweep deployed it, so it removed it

    out = config.run_dir / "tune"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["rl.lr"] for row in rows] == [str(t["params"]["rl.lr"]) for t in trials]
    assert json.loads((out / "results.json").read_text())["trials"] == json.loads(json.dumps(trials, default=str))

    best = max(trials, key=lambda t: t["metric"])
    assert summary["best"]["trial"] == best["trial"]
    best_config = load_config([out / "best.yaml"])
    assert best_config.rl.lr == best["params"]["rl.lr"]
    # everything else is the sweep's config as given
    assert best_config == config.model_copy(update={"rl": config.rl.model_copy(update={"lr": best_config.rl.lr})})


def test_unknown_bad_and_encoder_changing_keys_are_refused_before_launching(tmp_path, tiny_vlm_dir):
    from envenc_ray.pipeline.tune import tune

    config = make_config(tmp_path, tiny_vlm_dir)
    cases = [
        ({"rl.lrr": {"grid": [1.0e-4]}}, r"unknown key 'rl\.lrr' in sweep file .*sweep\.yaml.*known keys here"),
        ({"rl.lr": {"grid": [1.0e-4, -1.0]}}, r"bad value for 'rl\.lr' in sweep file .*sweep\.yaml"),
        ({"rl.minibatch_size": {"choice": [32, 128]}}, r"rl\.minibatch_size \(128\) > rl\.train_batch_size"),
        ({"encoder.latent_dim": {"grid": [8, 16]}}, r"'encoder\.latent_dim' cannot vary per trial.*encoder"),
        ({"env.game": {"choice": ["pong", "breakout"]}}, r"'env\.game' cannot vary per trial"),
        ({"rl.lr": [1.0e-4, 3.0e-4]}, r"bad value for 'rl\.lr'"),  # a plain list is a fixed value, not a grid
        ({"rl.lr": {"grid": [1.0e-4], "uniform": [0, 1]}}, r"params\.rl\.lr must be a plain value or one of"),
        ({"rl.lr": {"loguniform": [0.0, 1.0e-3]}}, r"low > 0"),
        # RLlib's own check, which would otherwise fail inside every trial: 3 runners x 2 envs x 32 steps != 64
        ({"rl.num_env_runners": {"grid": [1, 3]}}, r"RLlib refuses the trial with .*rl\.num_env_runners=3"),
    ]
    for params, message in cases:
        with pytest.raises(ConfigError, match=message):
            tune(config, str(write_sweep(tmp_path, params)))
    with pytest.raises(ConfigError, match=r"unknown key 'metrc'"):
        tune(config, str(write_sweep(tmp_path, {"rl.lr": 1.0e-4}, metrc="x")))
    with pytest.raises(ConfigError, match=r"metric 'return' is not a metrics_row key"):
        tune(config, str(write_sweep(tmp_path, {"rl.lr": 1.0e-4}, metric="return")))
    with pytest.raises(ConfigError, match=r"grace_period \(3\) > max_t \(2"):
        tune(config.model_copy(update={"rl": config.rl.model_copy(update={"iterations": 2})}),
             str(write_sweep(tmp_path, {"rl.lr": 1.0e-4}, scheduler={"type": "asha", "grace_period": 3})))
    with pytest.raises(ConfigError, match="does not exist"):
        tune(config, str(tmp_path / "missing.yaml"))


def test_trials_that_can_never_fit_the_cluster_fail_fast(ray_session, tmp_path, tiny_vlm_dir):
    from envenc_ray.pipeline.tune import tune

    config = make_config(tmp_path, tiny_vlm_dir, encoder_source="serve", rollout_fragment_length=None)
    sweep = write_sweep(tmp_path, {"rl.num_env_runners": {"grid": [1, 4]}})
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"a trial needs 3 CPUs .*4 EnvRunners x 0\.5.*cluster has 2, 0\.5 of them "
                                          r"held by the shared encoder deployment.*wait forever"):
        tune(config, str(sweep))
    # in-process latents need no replica, yet a GPU learner on a CPU-only cluster never fits either
    gpu = write_sweep(tmp_path, {"rl.num_gpus_per_learner": 1.0, "rl.num_learners": 1})
    with pytest.raises(ConfigError, match=r"a trial needs 1 GPUs"):
        tune(config.model_copy(update={"rl": config.rl.model_copy(update={"encoder_source": "in_process"})}),
             str(gpu))
    assert time.perf_counter() - started < 30  # checked before anything is deployed or launched


def test_trial_resources_are_what_rllib_asks_for(tmp_path, tiny_vlm_dir):
    from envenc_ray.rl.ppo import build_ppo_config
    from envenc_ray.pipeline.trials import trial_bundles

    for settings in ({}, {"num_env_runners": 3, "cpus_per_env_runner": 0.25, "rollout_fragment_length": None},
                     {"num_learners": 2},
                     {"num_env_runners": 0}):
        config = make_config(tmp_path, tiny_vlm_dir, obs_mode="pixels", **settings)
        algo_config = build_ppo_config(config, None)
        expected = algo_config.algo_class.default_resource_request(algo_config).bundles
        ours = [{k: v for k, v in bundle.items() if v} for bundle in trial_bundles(config)]
        assert ours == [{k: v for k, v in bundle.items() if v} for bundle in expected], settings
