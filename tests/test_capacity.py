"""The cluster model of docs/performance.md (bench/capacity.py) on made-up measurements with known answers."""

from __future__ import annotations

import pytest

from envenc_ray.bench.capacity import autoscaling_target, cost_per_frame, measure_terms, predict, replicas_needed


def synthetic_runs():
    """A replica at 100 frames/s from batch 16 on (10 ms per frame), 50 frames/s at batch 1; one EnvRunner of 8
    envs sampling 50 env steps/s (160 ms per vector step) with 100 ms encoder calls: t_env = 60 ms, and Serve adds
    100 - 8 x c(8) = 11.1 ms to each call."""
    encoder = {"sweep": {"batch_sizes": [1, 2, 4, 8, 16, 32], "float32": [50, 60, 75, 90, 100, 100]}}
    rollout = {"settings": {"num_envs_per_env_runner": 8},
               "modes": {"latent_serve": {"sample_env_steps_per_s": 50.0, "encoder_ms_per_call": 100.0}}}
    return encoder, rollout


def test_terms_come_from_the_sweep_and_the_rollout():
    terms = measure_terms(*synthetic_runs())
    assert terms["t_env_s"] == pytest.approx(0.060)
    assert terms["serve_overhead_s"] == pytest.approx(0.100 - 8 / 90)
    assert terms["saturation_batch"] == 8  # 90 frames/s is within 10% of the best 100
    assert cost_per_frame(terms["per_frame_s"], 8) == pytest.approx(1 / 90)
    assert 1 / 90 > cost_per_frame(terms["per_frame_s"], 12) > 1 / 100  # between 8 and 16, in log2 of the batch
    assert cost_per_frame(terms["per_frame_s"], 1000) == pytest.approx(1 / 100)


def test_predictions_bounds_and_replicas_needed():
    terms = measure_terms(*synthetic_runs())
    assert predict(terms, runners=1, replicas=1)["env_steps_per_s"] == pytest.approx(50.0)  # the measured run
    four = predict(terms, runners=4, replicas=1)
    assert four["bound_runners"] == pytest.approx(200.0) and four["bound_replicas"] == pytest.approx(90.0)
    assert four["env_steps_per_s"] == pytest.approx(90.0)  # one replica at batch 8 is the bottleneck
    # closed loop: a busy replica's next forward takes the calls queued meanwhile, the other E/R - 1 callers' ones
    unsaturated = terms | {"saturation_batch": 32}
    assert predict(unsaturated, runners=2, replicas=1)["bound_replicas"] == pytest.approx(90.0)  # one call: 8 frames
    assert predict(unsaturated, runners=3, replicas=1)["bound_replicas"] == pytest.approx(100.0)  # two: 16 frames
    assert predict(terms, runners=4, replicas=5)["env_steps_per_s"] == pytest.approx(200.0)
    assert replicas_needed(terms, 1) == 1 and replicas_needed(terms, 4) == 3  # 2 x 90 < 200 <= 3 x 90
    assert predict(terms, 4, 3, cores=2)["env_steps_per_s"] == pytest.approx(2 / (0.060 / 8 + 1 / 90))
    # a caller is away 60 + 11.1 ms between calls whose forward takes 88.9 ms: 1.8 callers keep a replica busy
    assert autoscaling_target(terms, 1) == pytest.approx(1.8) and autoscaling_target(terms, 2) == pytest.approx(3.6)
