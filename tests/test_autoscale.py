"""Serve autoscaling of the encoder under load from RLlib EnvRunners (bench/autoscale.py at a tiny size):
1 -> 2 replicas while two EnvRunners sample latents from it, back to 1 once they stop."""

from __future__ import annotations

import pytest

from test_rl import environment_encoder, make_config  # noqa: F401  (fixture and helper shared with the RL tests)


@pytest.mark.slow
def test_encoder_scales_up_under_env_runner_load_and_back_down(ray_session, environment_encoder, tmp_path,  # noqa: F811
                                                              tiny_vlm_dir):
    from envenc_ray.bench.autoscale import bench_autoscale

    _, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, num_env_runners=2, num_envs_per_env_runner=2,
                         cpus_per_env_runner=0.5, train_batch_size=64, minibatch_size=32, num_epochs=1,
                         rollout_fragment_length=16, fcnet_hiddens=[32])
    # two replicas of a quarter CPU fit beside the two EnvRunners on 2 CPUs; one call in flight per EnvRunner
    # is above a target of 0.5 per replica until the second replica runs; short delays keep the test short
    config.serve = config.serve.model_copy(update={
        "num_cpus": 0.25, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0.5,
        "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0})
    results = bench_autoscale(config, str(tmp_path / "autoscale.json"), load_timeout_s=150, idle_timeout_s=120)

    load = [row for row in results["timeline"] if row["phase"] == "load"]
    assert load[0]["replicas"] == 1 and results["max_replicas_seen"] == 2, results["timeline"]
    assert results["scale_up_s"] is not None and results["final_replicas"] == 1, results["timeline"]
    assert set(results["throughput_by_replicas"]) == {"1", "2"}
    assert all(row["env_steps_per_s_mean"] > 0 for row in results["throughput_by_replicas"].values())
    assert (tmp_path / "autoscale.json").is_file()
