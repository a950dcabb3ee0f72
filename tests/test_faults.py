"""Faults (issue #14) on the real components: the encoder replica killed while PPO samples through it.

Serve replaces the dead replica, EncoderClient retries the calls it lost (backoff, then the router holds new
calls until the new replica is up), and training goes on with no iteration lost or shortened.
"""

from __future__ import annotations

import threading
import time

import pytest

from test_rl import PPO_TINY, environment_encoder, make_config  # noqa: F401 - environment_encoder is a fixture


@pytest.mark.slow
def test_killing_the_encoder_replica_during_ppo_sampling_loses_no_iteration(ray_session, environment_encoder,
                                                                            tmp_path, tiny_vlm_dir):
    import ray

    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.train import metrics_row
    from envenc_ray.serve.client import deploy_encoder, shutdown
    from envenc_ray.serve.deployment import deployment_details

    _, encoder_dir = environment_encoder
    app = "envenc-fault-test"
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, num_env_runners=1, encoder_source="serve",
                         serve_app=app, **PPO_TINY)
    deploy_encoder(config, app_name=app, encoder_dir=str(encoder_dir))
    try:
        algo = build_algorithm(config)
        try:
            rows = [metrics_row(algo.train())]
            replica = deployment_details(app)["replicas"][0]
            killed = threading.Event()

            def kill_mid_iteration() -> None:
                time.sleep(0.5)  # inside the next iteration's sampling
                ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=True)
                killed.set()

            killer = threading.Thread(target=kill_mid_iteration)
            killer.start()
            rows += [metrics_row(algo.train()) for _ in range(2)]
            killer.join()
        finally:
            algo.stop()
        assert killed.is_set()
        replicas = deployment_details(app)["replicas"]
        assert [r["replica_id"] for r in replicas] != [replica["replica_id"]]  # Serve started a new one
        assert all(r["state"] == "RUNNING" for r in replicas), replicas
    finally:
        shutdown(app)
    assert [row["iteration"] for row in rows] == [1, 2, 3]
    # every iteration sampled its full batch, the one with the kill included
    assert [row["env_steps"] for row in rows] == [PPO_TINY["train_batch_size"]] * 3, rows
    assert rows[-1]["env_steps_lifetime"] == 3 * PPO_TINY["train_batch_size"], rows


@pytest.mark.slow
def test_a_killed_env_runner_is_recreated_and_training_goes_on(ray_session, environment_encoder, tmp_path,
                                                               tiny_vlm_dir):
    import os
    import signal

    from envenc_ray.rl.algorithm import build_algorithm, train_iteration
    from envenc_ray.rl.runner_errors import new_error_key
    from envenc_ray.rl.train import metrics_row

    _, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, num_env_runners=1, **PPO_TINY)
    error_key = new_error_key()
    algo = build_algorithm(config, error_key)
    try:
        rows = [metrics_row(train_iteration(algo, error_key))]
        group = algo.env_runner_group
        (pid,) = group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()  # Ray restarts the actor (the VLM loads again), RLlib then restores it
        while time.monotonic() < killed_at + 90 and algo._counters["total_num_restored_workers"] == 0:
            rows.append(metrics_row(train_iteration(algo, error_key)))
        print(f"env runner: restored {time.monotonic() - killed_at:.1f} s after SIGKILL, "
              f"{len(rows) - 1} iteration(s) later")
        rows += [metrics_row(train_iteration(algo, error_key)) for _ in range(2)]
        (new_pid,) = group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
        assert new_pid != pid and group.num_healthy_remote_workers() == 1
        assert algo._counters["total_num_restored_workers"] == 1
    finally:
        algo.stop()
    # the iteration that lost its EnvRunner may sample less; the ones after it sample full batches again
    assert [row["env_steps"] for row in rows[-2:]] == [PPO_TINY["train_batch_size"]] * 2, rows
