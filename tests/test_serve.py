"""The EnvironmentEncoder Serve app: real Serve on the session's Ray, the tiny VLM, small untrained encoders.

One app (temporal encoder) is deployed once for the module, with the HTTP proxy on a free loopback port;
a second (per-frame MLP encoder) joins it in its own test. Serve is shut down at the end of the module so
other test modules on the same Ray session start from a clean slate.
"""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from envenc_ray.config import EncoderConfig, EnvEncConfig
from envenc_ray.errors import ConfigError, InputError, ModelError

REPO = Path(__file__).resolve().parents[1]
HIDDEN_SIZE = 128  # the tiny VLM's decoder width
TEMPORAL = EncoderConfig(kind="temporal", latent_dim=8, hidden_dims=[32], window=3)
MLP = EncoderConfig(kind="mlp", latent_dim=6, hidden_dims=[32])
MAX_FRAMES = 16  # serve.max_frames_per_call of the test app: small, so "too many frames" is cheap


def save_untrained_encoder(settings: EncoderConfig, encoder_dir: Path, hidden_size: int = HIDDEN_SIZE,
                           seed: int = 0) -> Path:
    """An exported encoder with seeded random weights, as `envenc train-encoder` writes one."""
    import torch

    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
    from envenc_ray.encoder.models import build_autoencoder

    torch.manual_seed(seed)
    encoder = build_autoencoder(settings, hidden_size).encoder_module()
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": settings.kind,
                   "hidden_size": hidden_size, "hidden_shape": [hidden_size], "latent_dim": settings.latent_dim,
                   "window": encoder.window, "encoder": settings.model_dump(mode="json")}
    save_encoder(encoder, encoder_dir, description, metrics={})
    return encoder_dir


def make_config(tmp_path: Path, tiny_vlm_dir: Path, settings: EncoderConfig, name: str, port: int = 8000
                ) -> EnvEncConfig:
    return EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path), "name": name},
        "vlm": {"model": str(tiny_vlm_dir), "num_threads": 1},
        "encoder": settings.model_dump(),
        "serve": {"num_cpus": 0.5, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 3.0,
                  "max_batch_calls": 4, "max_ongoing_requests": 8, "max_frames_per_call": MAX_FRAMES,
                  "cache_size": 256, "http": True, "http_host": "127.0.0.1", "http_port": port},
    })


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def temporal_app(ray_session, tmp_path_factory, tiny_vlm_dir):
    """(config, client) of the temporal-encoder app, HTTP on 127.0.0.1:<free port>; Serve shut down after."""
    from ray import serve

    from envenc_ray.serve.client import deploy_encoder

    root = tmp_path_factory.mktemp("serve-runs")
    config = make_config(root, tiny_vlm_dir, TEMPORAL, "temporal", port=free_port())
    save_untrained_encoder(TEMPORAL, config.run_dir / "encoder")
    client = deploy_encoder(config, http=True, timeout_s=60)
    yield config, client
    serve.shutdown()


@pytest.fixture(scope="module")
def local_encoder(temporal_app, tiny_vlm_dir):
    """The in-process EnvironmentEncoder over the same VLM and encoder: the reference."""
    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import load_encoder
    from envenc_ray.vlm.backbone import TruncatedVLM

    config, _ = temporal_app
    vlm = TruncatedVLM.from_config(config.vlm, model_path=tiny_vlm_dir, game="pong")
    return EnvironmentEncoder(vlm, load_encoder(config.run_dir / "encoder"))


@pytest.mark.slow
def test_latents_equal_in_process_with_windows_across_calls(temporal_app, local_encoder, pong_frames):
    _, client = temporal_app
    assert (client.latent_dim, client.window) == (TEMPORAL.latent_dim, TEMPORAL.window)
    # four episodes stepping together (one frame each per call), as an EnvRunner's vector env does
    first, second, third = pong_frames[0:4], pong_frames[4:8], pong_frames[8:12]

    latents, windows = client.encode(first)  # all fresh
    expected, expected_windows = local_encoder.encode(first)
    np.testing.assert_allclose(latents, expected, atol=1e-5)
    assert latents.dtype == np.float32 and len(windows) == 4

    latents, windows = client.encode(second, windows)  # continued episodes
    expected, expected_windows = local_encoder.encode(second, expected_windows)
    np.testing.assert_allclose(latents, expected, atol=1e-5)
    for got, want in zip(windows, expected_windows):
        np.testing.assert_allclose(got, want, atol=1e-5)

    windows[1] = None  # episode 1 was reset: its window starts fresh
    expected_windows[1] = None
    latents, _ = client.encode(third, windows)
    expected, _ = local_encoder.encode(third, expected_windows)
    np.testing.assert_allclose(latents, expected, atol=1e-5)
    fresh, _ = local_encoder.encode(third[1:2])
    np.testing.assert_allclose(latents[1], fresh[0], atol=1e-5)

    np.testing.assert_allclose(client.hidden(first), local_encoder.hidden(first), atol=1e-5)


@pytest.mark.slow
def test_client_side_resize_and_split_give_the_same_latents(temporal_app, local_encoder, pong_frames):
    from envenc_ray.serve.client import EncoderClient

    _, client = temporal_app
    raw = EncoderClient.from_handle(client.handle, resize=False)
    frames = pong_frames[:MAX_FRAMES + 4]  # more than one call's worth: the clients split it
    resized_latents, _ = client.encode(frames)
    raw_latents, _ = raw.encode(frames)
    expected, _ = local_encoder.encode(frames)
    np.testing.assert_allclose(resized_latents, expected, atol=1e-5)
    np.testing.assert_allclose(raw_latents, expected, atol=1e-5)


@pytest.mark.slow
def test_client_works_inside_a_ray_actor(temporal_app, pong_frames):
    """The RL connector ships the client to EnvRunner actors: it must pickle and call from there."""
    import ray

    _, client = temporal_app

    @ray.remote(num_cpus=0)
    class EnvRunnerLike:
        def __init__(self, encoder_client):
            self.client = encoder_client

        def step(self, frames, windows):
            return self.client.encode(frames, windows)

    runner = EnvRunnerLike.remote(client)
    latents, windows = ray.get(runner.step.remote(pong_frames[:3], None), timeout=120)
    again, _ = ray.get(runner.step.remote(pong_frames[3:6], windows), timeout=60)
    expected, expected_windows = client.encode(pong_frames[:3])
    np.testing.assert_allclose(latents, expected, atol=1e-6)
    np.testing.assert_allclose(again, client.encode(pong_frames[3:6], expected_windows)[0], atol=1e-6)
    ray.kill(runner)


@pytest.mark.slow
def test_per_frame_encoder_app(temporal_app, tiny_vlm_dir, pong_frames, tmp_path):
    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import load_encoder
    from envenc_ray.serve.client import deploy_encoder, shutdown
    from envenc_ray.vlm.backbone import TruncatedVLM

    config = make_config(tmp_path, tiny_vlm_dir, MLP, "mlp")
    save_untrained_encoder(MLP, config.run_dir / "encoder")
    client = deploy_encoder(config, app_name="envenc-mlp")
    try:
        latents, windows = client.encode(pong_frames[:6], [None] * 6)
        local = EnvironmentEncoder(TruncatedVLM.from_config(config.vlm, model_path=tiny_vlm_dir),
                                   load_encoder(config.run_dir / "encoder"))
        np.testing.assert_allclose(latents, local.encode(pong_frames[:6])[0], atol=1e-5)
        assert windows is None and client.window == 1 and latents.shape == (6, MLP.latent_dim)
    finally:
        shutdown("envenc-mlp")  # the temporal app stays, so Serve does too


@pytest.mark.slow
def test_redeploying_with_another_encoder_replaces_every_replica(temporal_app, tiny_vlm_dir, pong_frames, tmp_path):
    """Three swaps of a running app's encoder in a row: when `deploy_encoder` returns, every call reaches a replica
    of the new encoder (its identity, and its latents), never one left from the deploy before."""
    from ray import serve

    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import load_encoder
    from envenc_ray.files import weights_sha256
    from envenc_ray.serve.client import deploy_encoder, shutdown
    from envenc_ray.vlm.backbone import TruncatedVLM

    config = make_config(tmp_path, tiny_vlm_dir, MLP, "swap")
    vlm = TruncatedVLM.from_config(config.vlm, model_path=tiny_vlm_dir)
    identities = []
    try:
        for seed in (1, 2, 3):
            encoder_dir = save_untrained_encoder(MLP, tmp_path / f"encoder-{seed}", seed=seed)
            client = deploy_encoder(config, app_name="envenc-swap", encoder_dir=str(encoder_dir))
            handle = serve.get_app_handle("envenc-swap")
            answers = [handle.info.remote().result(timeout_s=60) for _ in range(8)]
            assert {a["encoder_dir"] for a in answers} == {str(encoder_dir.resolve())}
            assert {a["encoder_sha256"] for a in answers} == {weights_sha256(encoder_dir)}
            assert len({a["deploy_id"] for a in answers}) == 1
            local = EnvironmentEncoder(vlm, load_encoder(encoder_dir))
            np.testing.assert_allclose(client.encode(pong_frames[:4], [None] * 4)[0],
                                       local.encode(pong_frames[:4])[0], atol=1e-5)
            identities.append((answers[0]["encoder_sha256"], answers[0]["deploy_id"]))
        assert len(set(identities)) == 3, "each swap serves a new encoder from a new deploy"
    finally:
        shutdown("envenc-swap")  # the temporal app stays, so Serve does too


def test_autoscaling_and_resources_are_applied(temporal_app):
    from envenc_ray.serve.deployment import deployment_details

    config, client = temporal_app
    details = deployment_details()
    applied = details["deployment_config"]
    autoscaling = applied["autoscaling_config"]
    assert autoscaling["min_replicas"] == config.serve.min_replicas == 1
    assert autoscaling["max_replicas"] == config.serve.max_replicas == 2
    assert autoscaling["target_ongoing_requests"] == config.serve.target_ongoing_requests == 3.0
    assert applied["max_ongoing_requests"] == 8 >= applied["user_config"]["max_batch_calls"] == 4
    assert applied["ray_actor_options"]["num_cpus"] == 0.5
    assert applied["ray_actor_options"]["num_gpus"] == 0.0
    assert details["status"] == "HEALTHY"
    assert 1 <= len(details["replicas"]) <= 2
    info = client.info  # the replica runs with the same live settings and one torch thread
    assert info["max_batch_calls"] == 4 and info["max_frames_per_call"] == MAX_FRAMES
    assert info["num_threads"] == 1


def test_metrics_are_pushed_within_the_look_back_window_and_ray_warns_nothing():
    import warnings

    from envenc_ray.config import ServeConfig
    from envenc_ray.serve.deployment import configured_deployment

    for look_back, pushed in ((30.0, 10.0), (5.0, 2.5)):  # Ray's 10 s, or half the window when that is shorter
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deployment = configured_deployment(ServeConfig(look_back_period_s=look_back))
        applied = deployment._deployment_config.autoscaling_config
        assert (applied.look_back_period_s, applied.metrics_interval_s) == (look_back, pushed)
        assert not [str(w.message) for w in caught if "metrics_interval_s" in str(w.message)]


def test_bad_inputs_get_clear_errors_and_the_replica_stays_healthy(temporal_app, pong_frames):
    _, client = temporal_app
    handle = client.handle
    window = np.zeros((TEMPORAL.window - 1, HIDDEN_SIZE), np.float32)
    bad_calls = [
        ((pong_frames[:2].astype(np.float32),), InputError, "uint8"),
        ((pong_frames[:2, :, :, 0],), InputError, "4 axes"),
        ((pong_frames[:2].transpose(0, 3, 1, 2),), InputError, "channels-first"),
        ((np.zeros((MAX_FRAMES + 1, 8, 8, 3), np.uint8),), InputError, "max_frames_per_call"),
        ((pong_frames[:2], [window]), InputError, "2 frames but 1 window"),
        ((pong_frames[:2], [np.zeros((5, 5), np.float32), None]), InputError, "window state 0 has shape"),
        ((pong_frames[:2], [None, np.full_like(window, np.nan)]), InputError, "non-finite"),
        # finite but extreme window states overflow the encoder: a non-finite output, refused as such
        ((pong_frames[:2], [np.full_like(window, 3e38), None]), ModelError, "non-finite latents"),
    ]
    for args, error_type, words in bad_calls:
        frames, windows = (*args, None)[:2]
        with pytest.raises(error_type, match=words):
            client._call("encode", frames, windows, False)  # straight to the replica (the client checks locally)
        latents, _ = client.encode(pong_frames[:2])  # a good call right after succeeds
        assert np.isfinite(latents).all() and latents.shape == (2, TEMPORAL.latent_dim)
    with pytest.raises(InputError, match="uint8"):  # the client refuses locally, before any round trip
        client.encode(pong_frames[:2].astype(np.float32))
    with pytest.raises(InputError):
        handle.encode.remote(pong_frames[:2], None, True).result(timeout_s=30)  # resized=True, wrong size
    stats = client.stats()[0]
    assert stats["errors"]["InputError"] >= 8 and stats["errors"]["ModelError"] >= 1


def test_exhausted_retries_raise_a_service_error(temporal_app, pong_frames):
    from envenc_ray.serve.client import EncoderClient, EncoderServiceError

    _, client = temporal_app
    impatient = EncoderClient.from_handle(client.handle, timeout_s=1e-4, retries=1, backoff_s=0.01)
    impatient._info = client.info
    with pytest.raises(EncoderServiceError, match="after 2 attempts"):
        impatient.encode(pong_frames[:4])
    with pytest.raises(EncoderServiceError, match="no-such-app"):
        EncoderClient.connect("no-such-app")


def test_repeated_frames_are_served_from_the_cache(temporal_app, pong_frames):
    _, client = temporal_app
    frames = pong_frames[40:48]
    first = client.hidden(frames)
    before = client.stats()[0]
    second = client.hidden(frames)
    after = client.stats()[0]
    np.testing.assert_array_equal(first, second)
    assert after["cache_hits"] - before["cache_hits"] == len(frames)
    assert after["frames_computed"] == before["frames_computed"]  # no forward at all
    assert 0 < after["cache_hit_rate"] <= 1
    twice = np.concatenate([pong_frames[50:52], pong_frames[50:52]])  # duplicates inside one call
    client.hidden(twice)
    assert client.stats()[0]["duplicate_hits"] - after["duplicate_hits"] == 2


def test_http_route_round_trips_npy_and_npz(temporal_app, pong_frames):
    config, client = temporal_app
    url = f"http://127.0.0.1:{config.serve.http_port}"
    frames = pong_frames[20:23]

    buffer = io.BytesIO()
    np.save(buffer, frames)
    latents = np.load(io.BytesIO(post(f"{url}/encode", buffer.getvalue())))
    np.testing.assert_allclose(latents, client.encode(frames)[0], atol=1e-6)

    _, windows = client.encode(frames)
    buffer = io.BytesIO()
    np.savez(buffer, frames=frames, windows=np.stack(windows), fresh=np.array([False, True, False]))
    answer = np.load(io.BytesIO(post(f"{url}/encode", buffer.getvalue())))
    expected, expected_windows = client.encode(frames, [windows[0], None, windows[2]])
    np.testing.assert_allclose(answer["latents"], expected, atol=1e-6)
    np.testing.assert_allclose(answer["windows"], np.stack(expected_windows), atol=1e-6)

    with pytest.raises(urllib.error.HTTPError) as error:
        post(f"{url}/encode", b"not an array")
    assert error.value.code == 400 and "npy" in json.loads(error.value.read())["error"]
    with urllib.request.urlopen(f"{url}/stats", timeout=30) as response:
        assert json.loads(response.read())["calls"] > 0


def post(url: str, body: bytes) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def test_yaml_config_parses_and_builds_the_app(temporal_app, tiny_vlm_dir):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from envenc_ray.serve.deployment import APP_NAME, DEPLOYMENT_NAME

    config, _ = temporal_app
    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve_encoder.yaml").read_text()))
    (app,) = schema.applications
    assert app.name == APP_NAME and schema.http_options.host == "127.0.0.1"
    module, _, attribute = app.import_path.partition(":")
    builder = getattr(__import__(module, fromlist=[attribute]), attribute)
    args = {**app.args, "config": [str(REPO / path) for path in app.args["config"]],
            "overrides": [f"vlm.pooling={config.vlm.pooling}"],  # the read-out the fixture's encoder reads
            "model_dir": str(tiny_vlm_dir), "encoder_dir": str(config.run_dir / "encoder")}
    built = builder(args)
    assert isinstance(built, Application)
    with pytest.raises(ConfigError, match="unknown args"):
        builder({**args, "modle_dir": "typo"})
    assert DEPLOYMENT_NAME == "EnvironmentEncoder"
