"""Overload (issue #14): callers at 4x the service's measured capacity. The replica survives, calls beyond
max_ongoing_requests + max_queued_requests are rejected at once with Serve's BackPressureError, the served
ones keep a bounded latency, and EncoderClient backs off, retries, and then fails with a clear error.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError

from envenc_ray.config import EncoderConfig, EnvEncConfig
from envenc_ray.serve.client import EncoderClient, EncoderServiceError


class Handle:
    """A deployment handle stand-in whose calls are rejected with back-pressure `rejections` times, then answer."""

    def __init__(self, rejections: int):
        self.rejections, self.calls = rejections, []

    def __getattr__(self, method: str):
        handle = self

        class Method:
            @staticmethod
            def remote(*args):
                handle.calls.append(time.monotonic())
                return Response(len(handle.calls) <= handle.rejections)

        return Method


class Response:
    def __init__(self, rejected: bool):
        self.rejected = rejected

    def result(self, timeout_s: float):
        if self.rejected:
            raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
        return {"latent_dim": 8}

    def cancel(self) -> None:
        raise AssertionError("a rejected call was never queued: nothing to cancel")


def test_client_backs_off_and_retries_back_pressure_then_answers():
    handle = Handle(rejections=2)
    client = EncoderClient(handle, retries=3, backoff_s=0.05)
    assert client.latent_dim == 8
    gaps = np.diff(handle.calls)
    assert len(handle.calls) == 3 and gaps[0] >= 0.05 and gaps[1] >= 0.10  # exponential backoff: 0.05, 0.1 s


def test_client_fails_with_a_clear_overload_error_within_its_deadline():
    handle = Handle(rejections=100)
    client = EncoderClient(handle, app_name="envenc-encoder", retries=3, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(EncoderServiceError, match=r"overloaded.*rejected 4 times.*serve.max_replicas"):
        client.info
    assert len(handle.calls) == 4 and time.monotonic() - started < 0.05 * (1 + 2 + 4) + 0.5


def overload_config(tmp_path, tiny_vlm_dir) -> EnvEncConfig:
    return EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path), "name": "overload"},
        "vlm": {"model": str(tiny_vlm_dir), "num_threads": 1},
        "encoder": EncoderConfig(kind="mlp", latent_dim=8, hidden_dims=[16]).model_dump(),
        # one replica that takes 2 calls at once and queues 4 more per caller's router: 6 in the system at most
        "serve": {"num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1, "max_batch_calls": 2,
                  "max_ongoing_requests": 2, "max_queued_requests": 4, "cache_size": 0},
    })


def call(client: EncoderClient, frames: np.ndarray) -> tuple[str, float]:
    """(outcome, seconds) of one raw handle call: 'served', 'rejected' (back-pressure) or the error's type."""
    started = time.perf_counter()
    try:
        client.handle.encode.remote(frames, None, True).result(timeout_s=60)
        return "served", time.perf_counter() - started
    except BackPressureError:
        return "rejected", time.perf_counter() - started
    except Exception as error:  # noqa: BLE001 - counted and asserted to be none
        return type(error).__name__, time.perf_counter() - started


@pytest.mark.slow
def test_four_times_capacity_is_queued_to_a_bound_and_the_rest_rejected_fast(ray_session, tmp_path, tiny_vlm_dir,
                                                                             pong_frames):
    from envenc_ray.serve.client import deploy_encoder, shutdown
    from envenc_ray.serve.deployment import deployment_details
    from test_serve import save_untrained_encoder

    config = overload_config(tmp_path, tiny_vlm_dir)
    save_untrained_encoder(EncoderConfig.model_validate(config.encoder.model_dump()), config.run_dir / "encoder")
    app = "envenc-overload-test"
    client = deploy_encoder(config, app_name=app, timeout_s=60)
    try:
        frames, _ = client._prepare(pong_frames[:8])  # resized once here, as EncoderClient sends them
        replicas_before = [r["replica_id"] for r in deployment_details(app)["replicas"]]

        # capacity: two callers back to back (what fills the replica's batch of 2) for 3 s
        served, stop = [], time.monotonic() + 3.0

        def closed_loop() -> None:
            while time.monotonic() < stop:
                served.append(call(client, frames))

        threads = [threading.Thread(target=closed_loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(outcome == "served" for outcome, _ in served), served
        capacity = len(served) / 3.0  # calls/s

        # 4x capacity, open loop (arrivals do not wait for answers) for 4 s
        rate, seconds = 4 * capacity, 4.0
        with ThreadPoolExecutor(max_workers=64) as pool:
            futures, started = [], time.monotonic()
            for i in range(int(rate * seconds)):
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
                futures.append(pool.submit(call, client, frames))
            outcomes = [future.result() for future in futures]
        counts = {kind: sum(1 for outcome, _ in outcomes if outcome == kind) for kind, _ in outcomes}
        latency = {kind: np.percentile([s for o, s in outcomes if o == kind], [50, 99]).round(3).tolist()
                   for kind in ("served", "rejected") if counts.get(kind)}
        print(f"overload: capacity {capacity:.1f} calls/s of 8 frames; offered {rate:.1f}/s for {seconds:.0f} s: "
              f"{counts}; p50/p99 s {latency}")
        assert set(counts) <= {"served", "rejected"}, counts  # nothing else: no crash, no timeout
        assert counts.get("rejected", 0) > 0.3 * len(outcomes), counts  # the excess is turned away
        # the replica kept serving (below capacity: the 64 caller threads share the 2 cores with it)
        assert counts.get("served", 0) >= 0.3 * capacity * seconds, counts
        service_time = 2 / capacity  # seconds per call at a replica running 2 at once
        assert latency["rejected"][1] < 0.5, latency  # rejected at once, not after waiting in a queue
        # a served call waited behind at most the queue bound (4) plus the calls running (2)
        assert latency["served"][1] < (4 + 2) * service_time + 1.0, (latency, service_time)
        details = deployment_details(app)
        assert [r["replica_id"] for r in details["replicas"]] == replicas_before  # the same replica, alive
        assert all(r["state"] == "RUNNING" for r in details["replicas"]), details["replicas"]
        assert client.encode(pong_frames[:2])[0].shape == (2, 8)  # and it still answers
    finally:
        shutdown(app)
