"""Per-token hidden states (vlm.pooling 'tokens') and the tokens encoder: storage, model, bad combinations,
the centred consecutive-frame cosine, and the whole path embed -> train-encoder -> Serve -> one PPO iteration
on real Pong frames with the built-in tiny VLM (T = 75 tokens of D = 128 per frame).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from envenc_ray.config import EncoderConfig
from envenc_ray.data.schema import hidden_column, hidden_schema, hidden_shape_of, hidden_to_array, write_parquet_atomic
from envenc_ray.errors import ConfigError, ModelError

TOKENS = EncoderConfig(kind="tokens", latent_dim=8, hidden_dims=[32], window=2, token_queries=2)
TOKENS_RUN = ("vlm.pooling=tokens", "encoder.kind=tokens", "encoder.token_queries=2")


@pytest.fixture(scope="module")
def token_states(tiny_vlm_dir, pong_frames):
    """(TruncatedVLM with tokens pooling, its (64, T, D) states of 64 consecutive real Pong frames)."""
    from envenc_ray.config import VLMConfig
    from envenc_ray.vlm.backbone import TruncatedVLM

    vlm = TruncatedVLM.from_config(VLMConfig(pooling="tokens", num_threads=1), model_path=tiny_vlm_dir)
    return vlm, vlm.embed(pong_frames).numpy()


# ------------------------------------------------------------------------------------------- metrics


def test_centred_cosine_tells_a_static_representation_from_a_moving_one():
    from envenc_ray.encoder.metrics import consecutive_pairs, mean_cosine

    rng = np.random.default_rng(0)
    steps, dims = 200, 64
    offset = 10 * rng.normal(size=dims)  # the large shared component every VLM state has
    walk = np.cumsum(rng.normal(size=(steps, dims)), axis=0)  # moves smoothly: neighbours are alike
    moving = offset + walk / np.linalg.norm(walk, axis=1, keepdims=True).mean() * 3
    static = offset + 0.01 * rng.normal(size=(steps, dims))  # hardly changes: what is left is noise
    pairs = consecutive_pairs(np.zeros(steps, np.int64), np.arange(steps))

    assert mean_cosine(static, pairs) > 0.99 and mean_cosine(moving, pairs) > 0.9  # uncentred: both "smooth"
    assert abs(mean_cosine(static, pairs, centred=True)) < 0.1
    assert mean_cosine(moving, pairs, centred=True) > 0.8
    tokens = moving.reshape(steps, 4, 16)  # per-token states are flattened: the same number
    assert mean_cosine(tokens, pairs, centred=True) == pytest.approx(mean_cosine(moving, pairs, centred=True))


def test_ridge_probe_on_flattened_token_states(token_states):
    """T*D = 9600 features for 48 train rows: the probe works from the rows' (48, 48) Gram matrix, which gives
    the SVD's singular values and projections, and recovers a target the token states carry strongly."""
    from envenc_ray.data.probes import _thin_svd, ridge_probe_r2

    _, states = token_states
    flat = states.reshape(len(states), -1).astype(np.float64)
    std = flat[:48].std(0)
    standardized = (flat - flat[:48].mean(0)) / np.where(std > 1e-12, std, 1.0)
    u, s, val_projection = _thin_svd(standardized[:48], standardized[48:])
    u_ref, s_ref, vt_ref = np.linalg.svd(standardized[:48], full_matrices=False)
    rank = len(s)
    assert rank >= 40 and u.shape == (48, rank)  # centring removes one direction; near-duplicate frames a few
    np.testing.assert_allclose(s[::-1], s_ref[:rank], rtol=1e-6)  # eigh orders ascending
    signs = np.sign((u[:, ::-1] * u_ref[:, :rank]).sum(0))  # singular vectors are defined up to sign
    np.testing.assert_allclose(val_projection[:, ::-1] * signs, standardized[48:] @ vt_ref[:rank].T, atol=1e-6)

    targets = {"main_directions": standardized @ vt_ref[:3].T @ np.array([1.0, -2.0, 0.5])}
    assert ridge_probe_r2(states, targets, np.arange(48), np.arange(48, 64))["main_directions"] > 0.9


# ------------------------------------------------------------------------------------------- storage


def test_token_states_round_trip_through_parquet_as_float16(tmp_path, token_states):
    _, states = token_states
    schema = hidden_schema(states.shape[1:], "float16")
    assert hidden_shape_of(schema.field("hidden").type) == (75, 128)
    table = pa.Table.from_arrays(
        [pa.array(np.zeros(len(states)), pa.int64()), pa.array(np.arange(len(states)), pa.int32()),
         hidden_column(states, schema.field("hidden").type), pa.array(["{}"] * len(states))], schema=schema)
    write_parquet_atomic(table, tmp_path / "part-0.parquet")

    from envenc_ray.encoder.train import check_shards

    _, hidden_shape, _ = check_shards(tmp_path)
    restored = hidden_to_array(pq.read_table(tmp_path / "part-0.parquet")["hidden"])
    assert hidden_shape == (75, 128) and restored.shape == states.shape and restored.dtype == np.float32
    np.testing.assert_allclose(restored, states, rtol=1e-3, atol=1e-3)  # float16 storage


# ------------------------------------------------------------------------------------------- the model


def test_tokens_encoder_learns_exports_and_steps_like_training(token_states, pong_frames, tmp_path):
    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, load_encoder, save_encoder
    from envenc_ray.encoder.models import build_autoencoder, build_windows

    vlm, states = token_states
    windows = build_windows(np.zeros(len(states), np.int64), np.arange(len(states)), TOKENS.window)
    torch.manual_seed(0)
    model = build_autoencoder(TOKENS, states.shape[1:])
    model.encoder_module().set_normalization(states.mean(0), states.std(0))  # per (token, dim)
    x_all = torch.from_numpy(states[windows])  # (64, k, T, D)

    def reconstruction_mse() -> float:
        with torch.no_grad():
            reconstruction, latent, _ = model(x_all)
        assert latent.shape == (64, TOKENS.latent_dim) and reconstruction.shape == x_all.shape
        return F.mse_loss(reconstruction, model.normalize(x_all)).item()

    before = reconstruction_mse()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = x_all[torch.randint(len(x_all), (16,), generator=generator)]
        reconstruction, _, _ = model(x)
        loss = F.mse_loss(reconstruction, model.normalize(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert reconstruction_mse() < 0.6 * before

    # exported without the decoder; the loaded encoder gives the same latents
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "tokens", "hidden_size": 128,
                   "hidden_shape": [75, 128], "latent_dim": TOKENS.latent_dim, "window": TOKENS.window,
                   "encoder": TOKENS.model_dump(mode="json")}
    save_encoder(model.encoder_module(), tmp_path / "encoder", description, metrics={})
    loaded = load_encoder(tmp_path / "encoder")
    with torch.no_grad():
        assert torch.equal(loaded(x_all[:5]), model.encode(x_all[:5]))

    # one frame per call with the episode's (k-1, T, D) window state: the training windows' latents
    service = EnvironmentEncoder(vlm, loaded)
    frames = pong_frames[10:14]
    hidden = service.hidden(frames)
    assert hidden.shape == (4, 75, 128)
    state, stepped = None, []
    for t in range(4):
        latents, state = service.encode(frames[t:t + 1], state)
        assert state[0].shape == (TOKENS.window - 1, 75, 128)
        stepped.append(latents[0])
    expected_windows = build_windows(np.zeros(4, np.int64), np.arange(4), TOKENS.window)
    with torch.no_grad():
        expected = loaded(torch.from_numpy(hidden[expected_windows])).numpy()
    np.testing.assert_allclose(np.stack(stepped), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad combinations


def test_tokens_with_the_wrong_encoder_kind_fails_early_and_says_what_to_set(tmp_path, debug_config, token_states,
                                                                            tiny_vlm_dir):
    from envenc_ray.data.embed import embed
    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
    from envenc_ray.encoder.models import build_autoencoder
    from envenc_ray.encoder.train import train_encoder
    from envenc_ray.rl.encoder_source import encoder_source
    from envenc_ray.serve.replica import replica_spec

    # from the settings, before any frame is read (none were recorded here)
    with pytest.raises(ConfigError, match="set encoder.kind=tokens"):
        embed(debug_config("vlm.pooling=tokens"))
    with pytest.raises(ConfigError, match="set vlm.pooling=tokens"):
        embed(debug_config("encoder.kind=tokens"))
    with pytest.raises(ConfigError, match="set encoder.kind=tokens"):
        train_encoder(debug_config("vlm.pooling=tokens", "encoder.kind=mlp"))

    # from the data: hidden/ holds pooled states but the config asks for the tokens encoder
    config = debug_config(*TOKENS_RUN)
    vlm, states = token_states
    pooled = states.mean(1)
    schema = hidden_schema(pooled.shape[1:])
    write_parquet_atomic(pa.Table.from_arrays(
        [pa.array(np.arange(64) // 32, pa.int64()), pa.array(np.arange(64) % 32, pa.int32()),
         hidden_column(pooled, schema.field("hidden").type), pa.array(["{}"] * 64)], schema=schema),
        config.run_dir / "hidden" / "part-0.parquet")
    with pytest.raises(ConfigError, match=r"hidden holds one pooled vector per frame; set vlm.pooling=tokens"):
        train_encoder(config)
    assert not (config.run_dir / "encoder").exists()

    # the model, the in-process encoder, the Serve app and the RL driver refuse the mix too
    with pytest.raises(ConfigError, match="set vlm.pooling=tokens"):
        build_autoencoder(TOKENS, 128)
    temporal = EncoderConfig(kind="temporal", latent_dim=8, hidden_dims=[32], window=2)
    with pytest.raises(ConfigError, match="set encoder.kind=tokens"):
        EnvironmentEncoder(vlm, build_autoencoder(temporal, 128).encoder_module())
    encoder_dir = tmp_path / "temporal-encoder"
    save_encoder(build_autoencoder(temporal, 128).encoder_module(), encoder_dir,
                 {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "temporal", "hidden_size": 128,
                  "latent_dim": 8, "window": 2, "encoder": temporal.model_dump(mode="json")}, metrics={})
    mixed = debug_config("vlm.pooling=tokens", f"vlm.model={tiny_vlm_dir}", f"rl.encoder_dir={encoder_dir}",
                         "rl.encoder_source=in_process")
    with pytest.raises(ConfigError, match="set encoder.kind=tokens"):
        replica_spec(mixed, encoder_dir=encoder_dir)
    with pytest.raises(ConfigError, match="set encoder.kind=tokens"):
        encoder_source(mixed)
    with pytest.raises(ModelError, match="token states per frame"):  # another prompt: another T
        EnvironmentEncoder(vlm, build_autoencoder(TOKENS, (74, 128)).encoder_module())


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tokens_embed_train_serve_and_one_ppo_iteration(ray_session, debug_config, tiny_vlm_dir, pong_frames):
    from envenc_ray.data.collect import collect
    from envenc_ray.data.embed import embed
    from envenc_ray.encoder.train import train_encoder
    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.train import metrics_row
    from envenc_ray.serve.client import deploy_encoder, shutdown

    app = "envenc-tokens-test"  # the debug preset's PPO calls it (rl.encoder_source: serve)
    config = debug_config(*TOKENS_RUN, f"vlm.model={tiny_vlm_dir}", f"rl.serve_app={app}", "rl.fcnet_hiddens=[32]")
    collect(config)
    summary = embed(config)
    assert summary.frames == 2 * 48 and summary.hidden_shape == (75, 128)
    shard = sorted((config.run_dir / "hidden").glob("*.parquet"))[0]
    hidden_type = pq.read_schema(shard).field("hidden").type
    assert hidden_shape_of(hidden_type) == (75, 128) and hidden_type.value_type.value_type == pa.float16()
    assert json.loads((config.run_dir / "hidden" / "_embed.json").read_text())["hidden_shape"] == [75, 128]

    result = train_encoder(config)
    metrics = json.loads((config.run_dir / "encoder" / "metrics.json").read_text())
    exported = json.loads((config.run_dir / "encoder" / "config.json").read_text())
    assert not result["skipped"] and metrics["kind"] == "tokens" and metrics["hidden_shape"] == [75, 128]
    assert exported["hidden_shape"] == [75, 128] and exported["window"] == 2
    best = metrics["epochs"][metrics["best_epoch"] - 1]
    for key in ("val_consecutive_cosine_hidden_centred", "val_consecutive_cosine_latent_centred",
                "val_consecutive_cosine_hidden", "probe_r2_hidden_mean", "probe_r2_latent_mean"):
        assert key in best, key
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]

    client = deploy_encoder(config, app_name=app)
    try:
        latents, windows = client.encode(pong_frames[:4])
        assert latents.shape == (4, config.encoder.latent_dim) and latents.dtype == np.float32
        assert len(windows) == 4 and windows[0].shape == (1, 75, 128)
        again, _ = client.encode(pong_frames[4:8], windows)
        assert np.isfinite(again).all() and not np.allclose(again, latents)
        assert client.hidden(pong_frames[:2]).shape == (2, 75, 128)

        algo = build_algorithm(config)
        try:
            row = metrics_row(algo.train())
        finally:
            algo.stop()
    finally:
        shutdown(app)
    num_envs = config.rl.num_envs_per_env_runner
    assert row["env_steps"] == config.rl.train_batch_size
    assert row["encoder_calls"] == row["env_steps"] / num_envs + 1 and row["encoder_frames_per_call"] == num_envs
