"""Encoder stage: windows, the four autoencoders, export round trips, Ray Train runs, resume, bad input.

Fixture data is synthetic but structured: per episode, three object positions follow smooth trajectories
and the hidden states are a fixed non-linear embedding of them plus noise, so reconstruction, temporal
smoothness and linear probes all have something real to find.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from envenc_ray.config import EncoderConfig, EnvEncConfig
from envenc_ray.data.probes import ridge_probe_r2, split_by_episode
from envenc_ray.data.schema import hidden_schema, write_parquet_atomic
from envenc_ray.encoder.environment import EnvironmentEncoder
from envenc_ray.encoder.export import load_encoder, save_encoder
from envenc_ray.encoder.models import KINDS, build_autoencoder, build_windows

# The tokens kind reads per-token (T, D) states, not these pooled ones: tests/test_tokens.py covers it.
POOLED_KINDS = [kind for kind in KINDS if kind != "tokens"]
from envenc_ray.encoder.train import check_shards, read_hidden, train_encoder
from envenc_ray.layout import RunLayout
from envenc_ray.errors import ConfigError, DataError, InputError, ModelError

HIDDEN_SIZE = 32
EPISODE_LENGTHS = (40, 48, 36, 44, 52, 40)


def synthetic_episodes(lengths=EPISODE_LENGTHS, hidden_size=HIDDEN_SIZE, seed=0):
    """episode_ids, steps, hidden (N, D) float32, objects (list of JSON) in episode/step order."""
    rng = np.random.default_rng(seed)
    w1, w2 = rng.normal(size=(6, 24)), rng.normal(size=(24, hidden_size)) / 3
    offset = rng.normal(size=hidden_size) * 2  # a large shared component, as real VLM states have
    episode_ids, steps, hidden, objects = [], [], [], []
    for episode, length in enumerate(lengths):
        t = np.arange(length)
        player_y = 100 + 40 * np.sin(0.15 * t + rng.uniform(0, 6))
        ball_x = 80 + 60 * np.sin(0.23 * t + rng.uniform(0, 6))
        ball_y = 100 + 50 * np.cos(0.11 * t + rng.uniform(0, 6))
        z = np.stack([(player_y - 100) / 40, (ball_x - 80) / 60, (ball_y - 100) / 50], 1)
        h = np.tanh(np.concatenate([z, z**2 - 0.5], 1) @ w1) @ w2 + offset
        hidden.append(h + 0.05 * rng.normal(size=h.shape))
        episode_ids += [episode] * length
        steps += list(range(length))
        objects += [json.dumps({"player_y": float(a), "ball_x": float(b), "ball_y": float(c), "lives": 3})
                    for a, b, c in zip(player_y, ball_x, ball_y)]
    return np.array(episode_ids), np.array(steps), np.concatenate(hidden).astype(np.float32), objects


def write_hidden(run_dir: Path, shards: int = 2, dtype: str = "float32", **kwargs) -> None:
    """hidden/part-*.parquet with rows dealt round-robin over the shards (so no shard is in step order)."""
    episode_ids, steps, hidden, objects = synthetic_episodes(**kwargs)
    for shard in range(shards):
        rows = slice(shard, None, shards)
        write_parquet_atomic(hidden_table(episode_ids[rows], steps[rows], hidden[rows], objects[rows], dtype),
                             run_dir / "hidden" / f"part-{shard}.parquet")


def hidden_table(episode_ids, steps, hidden, objects, dtype="float32") -> pa.Table:
    schema = hidden_schema(hidden.shape[1], dtype)
    flat = pa.array(hidden.reshape(-1), type=pa.float32()).cast(schema.field("hidden").type.value_type)
    return pa.Table.from_arrays(
        [pa.array(episode_ids, pa.int64()), pa.array(steps, pa.int32()),
         pa.FixedSizeListArray.from_arrays(flat, hidden.shape[1]), pa.array(objects, pa.string())],
        schema=schema,
    )


def make_config(tmp_path: Path, **encoder) -> EnvEncConfig:
    settings = dict(latent_dim=8, hidden_dims=[32], window=3, codebook_size=16, epochs=6, batch_size=16,
                    lr=3e-3, patience=10, num_workers=2, cpus_per_worker=0.5)
    settings.update(encoder)
    return EnvEncConfig.model_validate(
        {"experiment": {"name": "enc", "run_root": str(tmp_path / "runs")}, "encoder": settings}
    )


def window_batch(hidden: np.ndarray, windows: np.ndarray, kind: str) -> torch.Tensor:
    x = hidden[windows]
    return torch.from_numpy(x if kind == "temporal" else x[:, -1])


# ------------------------------------------------------------------------------------------- windows


def test_windows_stay_inside_episodes_and_pad_with_the_first_frame():
    episode_ids = np.array([7, 7, 3, 7, 3, 3, 7, 9])  # rows out of order, three episodes
    steps = np.array([2, 0, 1, 1, 0, 2, 3, 0])
    windows = build_windows(episode_ids, steps, 3)
    for row, window in enumerate(windows):
        assert window[-1] == row  # a window ends with its own frame
        assert (episode_ids[window] == episode_ids[row]).all()  # never crosses an episode boundary
        assert (np.diff(steps[window]) >= 0).all()  # oldest first
    by_key = {(e, s): i for i, (e, s) in enumerate(zip(episode_ids, steps))}
    assert list(windows[by_key[7, 0]]) == [by_key[7, 0]] * 3  # first frame: padded with itself
    assert list(windows[by_key[7, 1]]) == [by_key[7, 0], by_key[7, 0], by_key[7, 1]]
    assert list(windows[by_key[7, 3]]) == [by_key[7, 1], by_key[7, 2], by_key[7, 3]]
    assert list(windows[by_key[3, 2]]) == [by_key[3, 0], by_key[3, 1], by_key[3, 2]]
    assert list(windows[by_key[9, 0]]) == [by_key[9, 0]] * 3  # a one-frame episode is all padding


def test_window_longer_than_every_episode_and_duplicate_steps_are_data_errors():
    episode_ids, steps = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 1, 2])
    assert build_windows(episode_ids, steps, 3).shape == (5, 3)  # as long as the longest episode: fine
    with pytest.raises(DataError, match="longer than every episode"):
        build_windows(episode_ids, steps, 4)
    with pytest.raises(DataError, match="twice"):
        build_windows(np.array([0, 0]), np.array([1, 1]), 1)


# -------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def real_hidden(tiny_vlm_dir, pong_frames):
    """The tiny VLM's pooled hidden states of 64 consecutive real Pong frames, as one episode."""
    from envenc_ray.vlm.backbone import TruncatedVLM

    hidden = TruncatedVLM.from_pretrained(tiny_vlm_dir).embed(pong_frames).numpy()
    return np.zeros(len(hidden), np.int64), np.arange(len(hidden)), hidden


@pytest.mark.parametrize("source", ["synthetic", "real"])
@pytest.mark.parametrize("kind", POOLED_KINDS)
def test_each_kind_reduces_its_reconstruction_loss(kind, source, one_torch_thread, request):
    if source == "real":  # hidden states of real Pong frames from the built-in tiny VLM
        episode_ids, steps, hidden = request.getfixturevalue("real_hidden")
    else:
        episode_ids, steps, hidden, _ = synthetic_episodes()
    config = EncoderConfig(kind=kind, latent_dim=8, hidden_dims=[32], window=3, codebook_size=16)
    windows = build_windows(episode_ids, steps, config.window if kind == "temporal" else 1)
    torch.manual_seed(0)
    model = build_autoencoder(config, hidden.shape[1])
    model.encoder_module().set_normalization(hidden.mean(0), hidden.std(0))
    x_all = window_batch(hidden, windows, kind)
    model.init_codebook(x_all[:256], generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def reconstruction_mse() -> float:
        with torch.no_grad():
            reconstruction, latent, _ = model(x_all)
        assert latent.shape == (len(x_all), 8)
        assert reconstruction.shape == x_all.shape
        return F.mse_loss(reconstruction, model.normalize(x_all)).item()

    before = reconstruction_mse()
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = x_all[torch.randint(len(x_all), (32,), generator=generator)]
        reconstruction, _, aux_loss = model(x)
        loss = F.mse_loss(reconstruction, model.normalize(x)) + aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = reconstruction_mse()
    assert after < 0.6 * before, (kind, source, before, after)
    if kind == "vq" and source == "synthetic":
        used = len(torch.unique(model.encoder_module().codes(x_all)))
        assert used >= 4, f"only {used} of 16 codes in use"
        assert torch.equal(model.encode(x_all[:5]), model.encoder_module().quantizer.codebook[
            model.encoder_module().codes(x_all[:5])])  # the VQ latent is the code vector


@pytest.mark.parametrize("kind", POOLED_KINDS)
def test_export_round_trip_gives_identical_latents_without_the_decoder(kind, tmp_path):
    config = EncoderConfig(kind=kind, latent_dim=8, hidden_dims=[32, 16], window=3, codebook_size=16)
    torch.manual_seed(1)
    model = build_autoencoder(config, HIDDEN_SIZE)
    model.encoder_module().set_normalization(np.full(HIDDEN_SIZE, 0.5), np.full(HIDDEN_SIZE, 2.0))
    save_encoder(model.encoder_module(), tmp_path / "encoder",
                 {"format": "envenc-encoder", "format_version": 1, "kind": kind, "hidden_size": HIDDEN_SIZE,
                  "encoder": config.model_dump(mode="json")}, metrics={})
    loaded = load_encoder(tmp_path / "encoder")
    x = torch.randn(5, *model.encoder_module().input_shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.encode(x))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "encoder" / "model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert "input_mean" in names and "input_std" in names  # normalisation travels with the weights
    assert not any(name.startswith("decoder") for name in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]  # no temporary folder left behind


def test_wrong_hidden_size_and_broken_exports_are_clear_errors(tmp_path):
    config = EncoderConfig(kind="temporal", latent_dim=4, hidden_dims=[8], window=2)
    encoder = build_autoencoder(config, HIDDEN_SIZE).encoder_module()
    with pytest.raises(InputError, match="hidden size 32"):
        encoder(torch.zeros(3, 2, HIDDEN_SIZE + 1))
    with pytest.raises(InputError):
        encoder(torch.zeros(3, HIDDEN_SIZE))  # a per-frame batch given to the temporal encoder

    with pytest.raises(ModelError, match="not an exported encoder"):
        load_encoder(tmp_path / "nowhere")
    description = {"format": "envenc-encoder", "format_version": 1, "kind": "temporal",
                   "hidden_size": HIDDEN_SIZE, "encoder": config.model_dump(mode="json")}
    save_encoder(encoder, tmp_path / "encoder", description, metrics={})
    (tmp_path / "encoder" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="does not hold the weights"):
        load_encoder(tmp_path / "encoder")
    save_encoder(encoder, tmp_path / "encoder", {**description, "hidden_size": HIDDEN_SIZE + 1}, metrics={})
    with pytest.raises(ModelError, match="does not hold the weights"):
        load_encoder(tmp_path / "encoder")  # config.json and weights disagree on the hidden size


def test_ridge_probe_recovers_a_linear_target_and_not_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 20))
    targets = {"linear": features @ rng.normal(size=20), "noise": rng.normal(size=400)}
    r2 = ridge_probe_r2(features, targets, np.arange(300), np.arange(300, 400))
    assert r2["linear"] > 0.99
    assert r2["noise"] < 0.1


# ------------------------------------------------------------------------------- EnvironmentEncoder


class PixelMeanVLM:
    """A cheap stand-in with TruncatedVLM's interface (hidden_size, embed) whose width the tests choose:
    a fixed map of the frame's banded mean colours to D dims. The real tiny VLM is tested below."""

    pooling = "image_mean"

    def __init__(self, hidden_size: int = HIDDEN_SIZE):
        self.hidden_size = hidden_size
        self.projection = torch.randn(3 * 8, hidden_size, generator=torch.Generator().manual_seed(0))

    def embed_frames(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        frames = frames_uint8.float() / 255
        rows = frames.mean(2).reshape(len(frames), 8, -1, 3).mean(2)  # (N, 8 bands, 3 colours)
        return rows.flatten(1) @ self.projection


def test_environment_encoder_windows_match_training_windows():
    config = EncoderConfig(kind="temporal", latent_dim=6, hidden_dims=[16], window=3)
    torch.manual_seed(0)
    encoder = build_autoencoder(config, HIDDEN_SIZE).encoder_module().eval()
    vlm = PixelMeanVLM()
    service = EnvironmentEncoder(vlm, encoder)
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 16, 16, 3), dtype=np.uint8)  # 2 episodes x 5

    # Step both episodes together, one frame each per call, carrying each episode's window state.
    states, stepped = None, []
    for t in range(5):
        latents, states = service.encode(frames[:, t], states)
        assert latents.dtype == np.float32 and latents.shape == (2, 6)
        assert len(states) == 2 and states[0].shape == (2, HIDDEN_SIZE)
        stepped.append(latents)
    stepped = np.stack(stepped, axis=1)  # (episode, t, latent)

    # The same latents as the training windows (episode-first-frame padding) of the episodes' hidden states.
    hidden = service.hidden(frames.reshape(10, 16, 16, 3))
    windows = build_windows(np.repeat([0, 1], 5), np.tile(np.arange(5), 2), 3)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(hidden[windows])).numpy().reshape(2, 5, 6)
    np.testing.assert_allclose(stepped, expected, rtol=1e-5, atol=1e-6)

    # A fresh episode (None) next to a running one: only the running one uses its state.
    mixed, _ = service.encode(frames[:, 4], [None, states[1]])
    with torch.no_grad():
        fresh = encoder(torch.from_numpy(np.repeat(hidden[4][None, None], 3, axis=1))).numpy()
    np.testing.assert_allclose(mixed[0], fresh[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(mixed[0], stepped[0, 4])

    with pytest.raises(InputError, match="window states"):
        service.encode(frames[:, 0], [None])
    with pytest.raises(InputError, match="uint8"):
        service.encode(frames[:, 0].astype(np.float32))
    with pytest.raises(ModelError, match="hidden size"):
        EnvironmentEncoder(PixelMeanVLM(hidden_size=HIDDEN_SIZE + 8), encoder)


def test_environment_encoder_on_the_tiny_vlm_and_real_frames(tiny_vlm_dir, pong_frames):
    from envenc_ray.vlm.backbone import TruncatedVLM

    vlm = TruncatedVLM.from_pretrained(tiny_vlm_dir)
    config = EncoderConfig(kind="temporal", latent_dim=8, hidden_dims=[32], window=3)
    torch.manual_seed(0)
    encoder = build_autoencoder(config, vlm.hidden_size).encoder_module().eval()
    service = EnvironmentEncoder(vlm, encoder)
    frames = pong_frames[:6]
    hidden = service.hidden(frames)
    assert hidden.dtype == np.float32 and hidden.shape == (6, vlm.hidden_size)

    states, stepped = None, []  # one episode, one frame per call, as an EnvRunner would
    for t in range(6):
        latents, states = service.encode(frames[t:t + 1], states)
        stepped.append(latents[0])
    windows = build_windows(np.zeros(6, dtype=np.int64), np.arange(6), 3)
    with torch.no_grad():
        expected = encoder(torch.from_numpy(hidden[windows])).numpy()
    np.testing.assert_allclose(np.stack(stepped), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(stepped[0], stepped[5])  # the frames differ, so do their latents

    narrow = build_autoencoder(config, vlm.hidden_size // 2).encoder_module()
    with pytest.raises(ModelError, match="hidden size"):
        EnvironmentEncoder(vlm, narrow)


def test_environment_encoder_is_stateless_for_per_frame_kinds():
    encoder = build_autoencoder(EncoderConfig(kind="mlp", latent_dim=6, hidden_dims=[16]), HIDDEN_SIZE).encoder_module()
    service = EnvironmentEncoder(PixelMeanVLM(), encoder)
    frames = np.random.default_rng(1).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    latents, states = service.encode(frames)
    assert states is None and latents.shape == (3, 6)
    with torch.no_grad():
        np.testing.assert_array_equal(latents, encoder(torch.from_numpy(service.hidden(frames))).numpy())


# ------------------------------------------------------------------------------ train-encoder (Ray)


EPOCH_FIELDS = {
    "epoch", "train_loss", "train_mse", "val_mse", "val_explained_variance", "val_consecutive_cosine_latent",
    "val_consecutive_cosine_hidden", "val_consecutive_cosine_hidden_standardized", "probe_r2_latent",
    "probe_r2_latent_mean", "probe_r2_hidden_mean", "probe_r2_latent_velocity_mean", "probe_r2_hidden_velocity_mean",
    "codebook_usage", "codebook_perplexity", "train_seconds",
    "eval_seconds", "epoch_seconds", "started_at", "session",
}


@pytest.mark.slow
def test_train_encoder_trains_exports_and_then_skips(ray_session, tmp_path):
    from safetensors.torch import load_file

    config = make_config(tmp_path, kind="temporal", epochs=6)
    write_hidden(config.run_dir)
    summary = train_encoder(config)
    assert not summary["skipped"] and summary["epochs"] == 6 and summary["resumed_from_epoch"] == 0

    encoder_dir = config.run_dir / "encoder"
    assert sorted(p.name for p in encoder_dir.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    assert json.loads((encoder_dir / "config.json").read_text())["vlm_dtype"] == "float32"  # 'auto', unchecked
    metrics = json.loads((encoder_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5, 6]
    for entry in metrics["epochs"]:
        assert EPOCH_FIELDS <= set(entry), EPOCH_FIELDS - set(entry)
    assert set(metrics["timings"]) == {"read_s", "train_s", "export_s", "atariari_s"}
    assert metrics["atariari_f1"] == {}  # hidden states without frames/: no RAM to probe
    # 'lives' is constant: skipped; the velocities come from consecutive steps
    assert metrics["probe_targets"] == ["ball_dx", "ball_dy", "ball_x", "ball_y", "player_dy", "player_y"]
    assert metrics["episodes"]["train"] + metrics["episodes"]["val"] == len(EPISODE_LENGTHS)
    assert metrics["frames"]["train"] + metrics["frames"]["val"] == sum(EPISODE_LENGTHS)
    first, best = metrics["epochs"][0], metrics["epochs"][metrics["best_epoch"] - 1]
    assert best["val_mse"] < 0.8 * first["val_mse"]  # training improved the held-out reconstruction
    assert metrics["epochs"][-1]["train_loss"] < first["train_loss"]
    assert best["val_explained_variance"] > first["val_explained_variance"]
    positions = ("ball_x", "ball_y", "player_y")
    assert min(metrics["baseline"]["probe_r2_hidden"][k] for k in positions) > 0.9  # the positions are in the hidden
    assert np.mean([best["probe_r2_latent"][k] for k in positions]) > 0.3  # states, and partly in the 8-dim latent
    assert 0 < best["val_consecutive_cosine_latent"] <= 1

    # The exported encoder gives the latents of the trained model's best epoch, bit for bit.
    run_folder = next(RunLayout.of(config).encoder_train.iterdir())
    trained = build_autoencoder(config.encoder, HIDDEN_SIZE)
    trained.load_state_dict(load_file(str(run_folder / f"epoch-{metrics['best_epoch']:04d}" / "model.safetensors")))
    shards, hidden_size, _ = check_shards(config.run_dir / "hidden")
    data = read_hidden(shards, hidden_size)
    windows = build_windows(data.episode_ids, data.steps, 3)
    _, val_rows = split_by_episode(data.episode_ids, config.encoder.val_fraction, config.experiment.seed)
    x = window_batch(data.hidden, windows[val_rows], "temporal")
    with torch.no_grad():
        assert torch.equal(load_encoder(encoder_dir)(x), trained.encode(x))
    with torch.no_grad():  # and that reconstruction error is the one metrics.json reports for that epoch
        reconstruction, _, _ = trained(x)
        assert F.mse_loss(reconstruction, trained.normalize(x)).item() == pytest.approx(best["val_mse"], rel=1e-4)

    again = train_encoder(config)
    assert again["skipped"] and again["best_epoch"] == metrics["best_epoch"]


RESUME_TOLERANCE = 0.10  # relative difference of the best val_mse, resumed vs uninterrupted (docs/reliability.md)


@pytest.mark.slow
def test_train_encoder_killed_after_a_checkpoint_resumes_from_it(ray_session, tmp_path):
    """The first run is a separate driver process, SIGKILLed once Ray Train has registered a checkpoint;
    the rerun (same config) must continue from that checkpoint's epoch, not from epoch 1."""
    epochs = 8  # the kill lands after the first checkpoints: the rerun still has epochs to continue with
    config = make_config(tmp_path, kind="vq", epochs=epochs, patience=epochs)
    write_hidden(config.run_dir, dtype="float16")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = open(tmp_path / "first-run.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "envenc_ray.cli", "train-encoder", str(config_file)],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    snapshot, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        found = list(RunLayout.of(config).encoder_train.glob("*/checkpoint_manager_snapshot.json"))
        if found and "epoch-" in found[0].read_text():
            snapshot = found[0]
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    log.close()
    assert snapshot is not None, (tmp_path / "first-run.log").read_text()[-3000:]
    assert first.returncode == -signal.SIGKILL
    assert not (config.run_dir / "encoder").exists(), "the first run finished before it was killed"
    restored = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
    restored_epoch = int(restored.split("-")[1])
    assert 1 <= restored_epoch < epochs

    summary = train_encoder(config)
    assert summary["resumed_from_epoch"] == restored_epoch
    metrics = json.loads((config.run_dir / "encoder" / "metrics.json").read_text())
    history = metrics["epochs"]
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))  # each epoch once, none redone
    killed_session, rerun_session = history[0]["session"], history[-1]["session"]
    assert killed_session != rerun_session
    assert [e["session"] for e in history] == [killed_session] * restored_epoch + [rerun_session] * (epochs - restored_epoch)
    best = history[metrics["best_epoch"] - 1]
    assert best["val_mse"] < 0.8 * history[0]["val_mse"]
    assert best["codebook_usage"] > 0 and best["codebook_perplexity"] >= 2  # more than one code in use
    assert not list(config.run_dir.glob(".encoder*"))  # no temporary export left behind

    # the same training without the kill ends within the stated tolerance (RESUME_TOLERANCE) of the resumed one
    straight_config = make_config(tmp_path / "straight", kind="vq", epochs=epochs, patience=epochs)
    write_hidden(straight_config.run_dir, dtype="float16")
    train_encoder(straight_config)
    straight = json.loads((straight_config.run_dir / "encoder" / "metrics.json").read_text())
    straight_best = straight["epochs"][straight["best_epoch"] - 1]["val_mse"]
    print(f"train-encoder: best val_mse {best['val_mse']:.4f} resumed after epoch {restored_epoch}, "
          f"{straight_best:.4f} uninterrupted")
    assert abs(best["val_mse"] - straight_best) <= RESUME_TOLERANCE * straight_best


@pytest.mark.slow
def test_train_encoder_stops_early_and_exports_the_best_epoch(ray_session, tmp_path):
    # A learning rate this high makes the validation error stall or jump within a few epochs.
    config = make_config(tmp_path, kind="mlp", epochs=30, patience=2, lr=0.5)
    write_hidden(config.run_dir)
    summary = train_encoder(config)
    metrics = json.loads((config.run_dir / "encoder" / "metrics.json").read_text())
    val_mse = [e["val_mse"] for e in metrics["epochs"]]
    assert summary["stopped_early"] and metrics["stopped_early"]
    assert len(val_mse) == metrics["best_epoch"] + 2 < 30  # patience 2: two epochs without improvement
    assert metrics["best_epoch"] == int(np.argmin(val_mse)) + 1
    exported = json.loads((config.run_dir / "encoder" / "config.json").read_text())
    assert exported["best_epoch"] == metrics["best_epoch"]


# --------------------------------------------------------------------------------------- bad input


def _no_artifacts(run_dir: Path) -> bool:
    return not (run_dir / "encoder").exists() and not list(run_dir.glob(".encoder*"))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no_shards", "no Parquet shards"),
        ("empty", "holds no rows"),
        ("corrupt", "not a readable Parquet file"),
        ("missing_column", "lacks column"),
        ("mixed_hidden_sizes", "mix hidden sizes"),
    ],
)
def test_bad_hidden_shards_fail_before_ray_with_nothing_written(tmp_path, damage, message):
    config = make_config(tmp_path, kind="mlp")
    hidden_dir = config.run_dir / "hidden"
    hidden_dir.mkdir(parents=True)
    episode_ids, steps, hidden, objects = synthetic_episodes()
    table = hidden_table(episode_ids, steps, hidden, objects)
    if damage == "empty":
        pq.write_table(table.slice(0, 0), hidden_dir / "part-0.parquet")
    elif damage == "corrupt":
        pq.write_table(table, hidden_dir / "part-0.parquet")
        (hidden_dir / "part-1.parquet").write_bytes(b"PAR1 this is not really parquet")
    elif damage == "missing_column":
        pq.write_table(table.drop_columns(["hidden"]), hidden_dir / "part-0.parquet")
    elif damage == "mixed_hidden_sizes":
        pq.write_table(table, hidden_dir / "part-0.parquet")
        wider = np.concatenate([hidden, hidden[:, :4]], axis=1)
        pq.write_table(hidden_table(episode_ids, steps, wider, objects), hidden_dir / "part-1.parquet")
    with pytest.raises(DataError, match=message):
        train_encoder(config)
    assert _no_artifacts(config.run_dir)


@pytest.mark.slow
def test_bad_input_found_while_reading_is_a_clear_error(ray_session, tmp_path):
    corrupt_pages = make_config(tmp_path / "pages", kind="mlp")
    write_hidden(corrupt_pages.run_dir, shards=1)
    shard = corrupt_pages.run_dir / "hidden" / "part-0.parquet"
    raw = bytearray(shard.read_bytes())
    raw[200:2000] = bytes(b ^ 0x5A for b in raw[200:2000])  # data pages broken, footer intact
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        train_encoder(corrupt_pages)
    assert _no_artifacts(corrupt_pages.run_dir)

    config = make_config(tmp_path / "window", kind="temporal", window=53)  # the longest episode has 52 frames
    write_hidden(config.run_dir)
    with pytest.raises(DataError, match="longer than every episode"):
        train_encoder(config)
    assert _no_artifacts(config.run_dir) and not (config.run_dir / "encoder_train").exists()

    one_episode = make_config(tmp_path / "one", kind="mlp")
    write_hidden(one_episode.run_dir, lengths=(30,))
    with pytest.raises(DataError, match="at least 2"):
        train_encoder(one_episode)
    assert _no_artifacts(one_episode.run_dir)

    too_big = make_config(tmp_path / "big", kind="mlp", num_workers=2, cpus_per_worker=4)
    write_hidden(too_big.run_dir)
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        train_encoder(too_big)
    assert _no_artifacts(too_big.run_dir)
