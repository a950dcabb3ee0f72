"""Shared fixtures: one Ray cluster per test session, real ALE frames, the built-in tiny VLM."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(items):
    """A test that uses the session's Ray is slow by definition (`pytest -m "not slow"` starts no Ray)."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request, monkeypatch):
    """Tests outside the slow set must not start Ray (they would make `pytest -m "not slow"` slow): fail
    them at ray.init, so a missing `slow` marker shows up as an error, not as a slow fast set."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray but is not marked slow; add @pytest.mark.slow")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 logical CPUs, like this machine; no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pong_frames() -> np.ndarray:
    """64 consecutive real Pong frames (uint8, 64x210x160x3) from a seeded random rollout."""
    from envenc_ray.config import EnvConfig
    from envenc_ray.envs.atari import random_rollout_frames

    return random_rollout_frames(EnvConfig(game="pong", repeat_action_probability=0.0), seed=0, count=64)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """The built-in tiny VLM (seed 0), built once per session into a temporary directory."""
    from envenc_ray.vlm.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "vlm", seed=0, measure=False, report=False)


@pytest.fixture
def debug_config(tmp_path):
    """Factory of configs: the embedded default + the debug preset, run root in tmp_path, plus overrides."""
    from envenc_ray.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"

    def make(*overrides: str, run_root: Path | None = None):
        return load_config([configs / "pong-tiny.yaml", configs / "debug.yaml"],
                           [f"experiment.run_root={run_root or tmp_path}", *overrides])

    return make


def kill_when(args: list[str], env: dict, log: Path, ready, timeout_s: float, what: str) -> None:
    """Run the command `args` in its own process group until `ready()` holds, then SIGKILL the whole group (the
    command and the Ray it started), as a session that ends would. Fails if it ends first or takes too long."""
    import signal
    import subprocess
    import time

    with log.open("w") as output:
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert process.poll() is None, f"the command ended before {what}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture
def served_run():
    """Factory: `envenc run` of a config, then its Serve app on the first frames. Returns the manifest, the hidden
    states embed stored, those frames (uint8), what the service computes of them and its info; rows by (episode,
    step)."""
    from types import SimpleNamespace

    def run_and_serve(config, count: int = 6) -> SimpleNamespace:
        from ray import serve

        from envenc_ray.data.schema import frames_to_array, hidden_to_array, read_table
        from envenc_ray.pipeline import run
        from envenc_ray.serve.client import EncoderClient

        order = [("episode_id", "ascending"), ("step", "ascending")]
        try:
            manifest = run(config)
            client = EncoderClient.connect(app_name=config.rl.serve_app)
            hidden = read_table(config.run_dir / "hidden", "hidden", ("episode_id", "step", "hidden")).sort_by(order)
            frames = read_table(config.run_dir / "frames", "frames", ("episode_id", "step", "frame")).sort_by(order)
            frames_uint8 = frames_to_array(frames["frame"][:count], (210, 160, 3))
            served, info = client.hidden(frames_uint8), client.info
        finally:
            serve.shutdown()
        return SimpleNamespace(manifest=manifest, stored=hidden_to_array(hidden["hidden"]), frames=frames_uint8,
                               served=served, info=info)

    return run_and_serve


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that check values, not speed: one intra-op thread keeps them quick on a shared 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
