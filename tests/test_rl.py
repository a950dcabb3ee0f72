"""RL stage: the latent connector, RLModules per observation mode, PPO and DreamerV3 on real ALE Pong with the
tiny VLM and a small untrained encoder, checkpoints and resume, evaluation, the gym wrapper, bad input.

Budgets are tiny (64-step PPO batches, 2 sub-envs, 1-2 iterations): the assertions are on counts (one
encoder call per vector step), shapes and dtypes (the learner sees latents, not frames) and round trips
(checkpoint weights restore exactly), not on learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from envenc_ray.config import EncoderConfig, EnvEncConfig, load_config
from envenc_ray.errors import ConfigError, DataError, ModelError, UnsupportedGameError

LATENT_DIM = 8
ENCODER = EncoderConfig(kind="temporal", latent_dim=LATENT_DIM, hidden_dims=[32], window=2)
NUM_ENVS = 2
PPO_TINY = {"train_batch_size": 64, "minibatch_size": 32, "num_epochs": 1, "rollout_fragment_length": 32,
            "fcnet_hiddens": [32], "num_envs_per_env_runner": NUM_ENVS}


@pytest.fixture(scope="module")
def environment_encoder(tiny_vlm_dir):
    """(EnvironmentEncoder, encoder_dir): the tiny VLM + an untrained temporal encoder, saved as an export."""
    import torch

    from envenc_ray.config import VLMConfig
    from envenc_ray.encoder.environment import EnvironmentEncoder
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, load_encoder, save_encoder
    from envenc_ray.encoder.models import build_autoencoder
    from envenc_ray.vlm.backbone import TruncatedVLM

    vlm = TruncatedVLM.from_config(VLMConfig(num_threads=1), model_path=tiny_vlm_dir, game="pong")
    torch.manual_seed(0)
    encoder = build_autoencoder(ENCODER, vlm.hidden_size).encoder_module()
    encoder_dir = Path(tiny_vlm_dir).parent / "encoder"
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": ENCODER.kind,
                   "hidden_size": vlm.hidden_size, "latent_dim": LATENT_DIM, "window": encoder.window,
                   "encoder": ENCODER.model_dump(mode="json")}
    save_encoder(encoder, encoder_dir, description, metrics={})
    return EnvironmentEncoder(vlm, load_encoder(encoder_dir)), encoder_dir


def make_config(tmp_path: Path, tiny_vlm_dir, encoder_dir, name: str = "rl", game: str = "pong", **rl
                ) -> EnvEncConfig:
    return EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path), "name": name},
        "env": {"game": game},
        "vlm": {"model": str(tiny_vlm_dir), "num_threads": 1},
        "encoder": ENCODER.model_dump(),
        "rl": {"encoder_dir": str(encoder_dir), "cpus_per_env_runner": 0.5, **rl},
    })


def rgb_episode(frame: np.ndarray):
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    episode = SingleAgentEpisode(observation_space=gym.spaces.Box(0, 255, frame.shape, np.uint8),
                                 action_space=gym.spaces.Discrete(6))
    episode.add_env_reset(observation=frame)
    return episode


# ----------------------------------------------------------------------------- connector and observer


def test_observer_one_call_per_step_windows_fresh_at_reset(environment_encoder, pong_frames):
    from envenc_ray.rl.observations import EpisodeObserver

    encoder, _ = environment_encoder
    observer = EpisodeObserver("latent+pixels", encoder, frame_stack=4, pixel_size=84)
    first = observer.observe(["a", "b", "c"], list(pong_frames[:3]), fresh=[True] * 3)
    assert observer.encode_calls == 1 and observer.frames_encoded == 3
    expected, windows = encoder.encode(pong_frames[:3], None)
    np.testing.assert_allclose(np.stack([o["latent"] for o in first]), expected, rtol=1e-5, atol=1e-6)
    assert first[0]["pixels"].shape == (84, 84, 4) and first[0]["pixels"].dtype == np.uint8
    assert all((first[0]["pixels"][..., i] == first[0]["pixels"][..., 0]).all() for i in range(4))

    # next step: "a" and "b" continue (their windows are sent along), "c" was reset (fresh window and stack)
    second = observer.observe(["a", "b", "c"], list(pong_frames[3:6]), fresh=[False, False, True])
    assert observer.encode_calls == 2
    expected, _ = encoder.encode(pong_frames[3:6], [windows[0], windows[1], None])
    np.testing.assert_allclose(np.stack([o["latent"] for o in second]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(second[0]["pixels"][..., :3], first[0]["pixels"][..., 1:])
    assert not np.array_equal(second[0]["pixels"][..., 3], first[0]["pixels"][..., 3])
    observer.retain(["a"])
    assert observer.num_tracked == 1


def test_connector_rewrites_last_observation_of_every_episode(environment_encoder, tiny_vlm_dir, pong_frames):
    from envenc_ray.rl.connector import LatentObservations
    from envenc_ray.config import VLMConfig
    from envenc_ray.encoder.served import ServedPair
    from envenc_ray.rl.encoder_source import EncoderSource

    _, encoder_dir = environment_encoder
    pair = ServedPair(str(tiny_vlm_dir), str(encoder_dir), VLMConfig(num_threads=1), "pong")
    source = EncoderSource(kind="in_process", latent_dim=LATENT_DIM, window=2, pair=pair)
    frame_space = gym.spaces.Box(0, 255, pong_frames.shape[1:], np.uint8)
    connector = LatentObservations(frame_space, gym.spaces.Discrete(6), obs_mode="latent", source=source)
    assert connector.observation_space == gym.spaces.Box(-np.inf, np.inf, (LATENT_DIM,), np.float32)

    episodes = [rgb_episode(frame) for frame in pong_frames[:3]]
    connector(rl_module=None, batch={}, episodes=episodes)
    connector(rl_module=None, batch={}, episodes=episodes)  # nothing new: no second encode
    for episode in episodes:
        latent = episode.get_observations(-1)
        assert latent.shape == (LATENT_DIM,) and latent.dtype == np.float32
    assert connector.num_calls == 1 and connector.observer.encode_calls == 1

    for i, episode in enumerate(episodes):  # one step each; the last episode ends here
        episode.add_env_step(observation=pong_frames[3 + i], action=0, reward=0.0, terminated=(i == 2))
    connector(rl_module=None, batch={}, episodes=episodes)
    assert connector.observer.encode_calls == 2 and connector.observer.frames_encoded == 6
    assert connector.observer.num_tracked == 2  # the finished episode's window was dropped
    numpy_episode = episodes[0].to_numpy()  # what the learner gets: latents only
    assert numpy_episode.get_observations().shape == (2, LATENT_DIM)


# ----------------------------------------------------------------------------- gym wrapper and bad input


def test_gym_wrapper_passes_env_checker_and_batches_encoder_calls(environment_encoder, tmp_path, tiny_vlm_dir):
    from gymnasium.utils.env_checker import check_env

    from envenc_ray.rl.gym_wrapper import EnvEncEnv, EnvEncVectorEnv

    encoder, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="latent+pixels")
    env = EnvEncEnv(config, encoder=encoder)
    check_env(env, skip_render_check=True)
    env.close()

    vector_env = EnvEncVectorEnv(config, num_envs=3, encoder=encoder)
    observations, _ = vector_env.reset(seed=0)
    assert vector_env.observation_space.contains(observations)
    calls = vector_env.observer.encode_calls
    for _ in range(3):
        observations, rewards, terminateds, truncateds, _ = vector_env.step(vector_env.action_space.sample())
        assert vector_env.observation_space.contains(observations)
    assert vector_env.observer.encode_calls == calls + 3  # one call for all 3 sub-envs per step
    assert observations["latent"].shape == (3, LATENT_DIM) and observations["pixels"].shape == (3, 84, 84, 4)
    vector_env.close()


def test_bad_inputs_say_what_to_fix(environment_encoder, tmp_path, tiny_vlm_dir):
    from envenc_ray.rl.encoder_source import encoder_source
    from envenc_ray.rl.observations import EpisodeObserver
    from envenc_ray.rl.evaluate import evaluate
    from envenc_ray.rl.algorithm import build_algorithm

    _, encoder_dir = environment_encoder
    with pytest.raises(ConfigError, match="obs_mode"):
        load_config([], ["rl.algo=dreamerv3", "rl.obs_mode=pixels"])
    with pytest.raises(ConfigError, match="rl.overlap .* even number"):
        load_config([], ["rl.overlap=true", "rl.num_envs_per_env_runner=3"])
    with pytest.raises(ConfigError, match="rl.obs_mode"):
        load_config([], ["rl.obs_mode=frames"])
    missing = make_config(tmp_path, tiny_vlm_dir, tmp_path / "no-encoder")
    with pytest.raises(ModelError, match="train-encoder"):
        encoder_source(missing)
    with pytest.raises(UnsupportedGameError, match="unknown game"):
        build_algorithm(make_config(tmp_path, tiny_vlm_dir, encoder_dir, game="not_a_game"))
    with pytest.raises(ModelError, match="needs an encoder"):
        EpisodeObserver("latent", encoder=None)
    with pytest.raises(DataError, match="no checkpoint"):
        evaluate(make_config(tmp_path, tiny_vlm_dir, encoder_dir, name="untrained"))


# ----------------------------------------------------------------------------- PPO (real RLlib)


def batch_recorder():
    """A connector for the end of the Learner's pipeline: records what the loss will see (local learner)."""
    from ray.rllib.connectors.connector_v2 import ConnectorV2

    class RecordBatch(ConnectorV2):
        def __call__(self, *, rl_module, batch, episodes, **kwargs):
            self.seen = {module: (tuple(columns["obs"].shape), str(columns["obs"].dtype))
                         for module, columns in batch.items()}
            return batch

    return RecordBatch()


@pytest.mark.slow
def test_ppo_latent_learner_sees_latents_one_encode_per_vector_step(ray_session, environment_encoder, tmp_path,
                                                                    tiny_vlm_dir):
    from envenc_ray.rl.checkpoints import latents_identity, load_policy, save_checkpoint
    from envenc_ray.rl.encoder_source import encoder_source
    from envenc_ray.rl.ppo import build_ppo_config

    _, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="latent", num_env_runners=0, **PPO_TINY)
    algo = build_ppo_config(config, encoder_source(config)).build_algo()
    try:
        recorder = batch_recorder()
        algo.learner_group._learner._learner_connector.append(recorder)
        result = algo.train()
        runners = result["env_runners"]
        vector_steps = runners["num_env_steps_sampled"] / NUM_ENVS
        # one encoder call per vector step (+1 for the initial reset), each with every sub-env's frame
        assert runners["envenc_encode_calls"] == vector_steps + 1
        assert runners["envenc_frames_encoded"] == NUM_ENVS * runners["envenc_encode_calls"]
        connector = algo.env_runner._env_to_module.connectors[0]
        assert connector.observer.encode_calls == connector.num_calls == vector_steps + 1
        # the learner trained on latents, never on 210x160x3 frames
        shape, dtype = recorder.seen["default_policy"]
        assert shape[-1:] == (LATENT_DIM,) and len(shape) == 2 and dtype == "torch.float32"
        assert algo.get_module().observation_space.shape == (LATENT_DIM,)

        checkpoint = save_checkpoint(algo, config, tmp_path / "agent", 1, latents_identity(config))
        weights = algo.learner_group.get_weights()["default_policy"]
    finally:
        algo.stop()
    restored = build_ppo_config(config, encoder_source(config)).build_algo()
    try:
        restored.restore_from_path(str(checkpoint))
        restored_weights = restored.learner_group.get_weights()["default_policy"]
        module = load_policy(config, checkpoint, restored.get_module().observation_space,
                             restored.get_module().action_space)
    finally:
        restored.stop()
    for name, value in weights.items():
        np.testing.assert_array_equal(np.asarray(restored_weights[name]), np.asarray(value))
        np.testing.assert_array_equal(module.state_dict()[name].numpy(), np.asarray(value))
    # The same shapes and settings but other encoder weights: the policy would read other latents. Refused.
    other = make_config(tmp_path, tiny_vlm_dir, other_encoder_weights(encoder_dir, tmp_path / "other"),
                        obs_mode="latent", num_env_runners=0, **PPO_TINY)
    with pytest.raises(DataError, match=r"trained on the encoder in .*sha256 .* but this config reads .*other"):
        load_policy(other, checkpoint, module.observation_space, module.action_space)


@pytest.mark.slow
def test_overlapped_sampler_sees_what_the_plain_one_sees(ray_session, environment_encoder, tmp_path, tiny_vlm_dir):
    # rl.overlap: two groups of sub-envs sampled in two threads. With the same seed, encoder and (greedy) policy,
    # every sub-env's latents, rewards and episode ends equal the plain runner's; short episodes put resets inside.
    from envenc_ray.rl.overlap import OverlappedEnvRunner
    from envenc_ray.rl.ppo import build_ppo_config
    from envenc_ray.rl.encoder_source import encoder_source

    _, encoder_dir = environment_encoder
    chunks, default_steps, plain_state = {}, {}, None
    for overlap in (False, True):
        settings = PPO_TINY | {"num_envs_per_env_runner": 4, "rollout_fragment_length": None}  # None: RLlib's 'auto'
        config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="latent", num_env_runners=0,
                             overlap=overlap, **settings)
        config.env.max_episode_steps = 13
        algo = build_ppo_config(config, encoder_source(config)).build_algo()
        try:
            runner = algo.env_runner
            assert isinstance(runner, OverlappedEnvRunner) == overlap
            if overlap:
                runner.set_state(plain_state)  # the same policy weights in both groups
            else:
                plain_state = runner.get_state()
            episodes = [e for _ in range(3) for e in runner.sample(num_timesteps=40, explore=False)]
            metrics = runner.get_metrics()
            # PPO's own call (no count): the iteration's batch, whichever sampler
            default_steps[overlap] = sum(len(e) for e in runner.sample(explore=False))
        finally:
            algo.stop()
        chunks[overlap] = [(np.asarray(e.get_observations()), np.asarray(e.get_rewards()), e.is_terminated,
                            e.is_truncated) for e in episodes]
        calls = metrics["envenc_encode_calls"]
        calls = calls.peek() if hasattr(calls, "peek") else calls
        frames = metrics["envenc_frames_encoded"]
        frames = frames.peek() if hasattr(frames, "peek") else frames
        assert frames == calls * (2 if overlap else 4)  # one encoder call per group per step, for its sub-envs

    assert default_steps[True] == default_steps[False] == 64  # rl.train_batch_size
    plain, overlapped = chunks[False], chunks[True]
    assert len(plain) == len(overlapped) and sum(c[3] for c in plain) >= 4  # truncations inside the samples
    for observations, rewards, terminated, truncated in plain:
        match = [i for i, c in enumerate(overlapped) if c[0].shape == observations.shape
                 and np.allclose(c[0], observations, atol=1e-5) and np.array_equal(c[1], rewards)]
        assert match, "a plain sub-env's episode chunk has no equal in the overlapped runner's"
        assert overlapped.pop(match[0])[2:] == (terminated, truncated)


def other_encoder_weights(encoder_dir: Path, out: Path) -> Path:
    """A copy of the exported encoder with every weight changed: same description, other latents."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(encoder_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    save_file({name: tensor + 0.5 for name, tensor in weights.items()}, str(out / "model.safetensors"))
    return out


@pytest.mark.slow
def test_ppo_pixels_on_a_remote_env_runner(ray_session, environment_encoder, tmp_path, tiny_vlm_dir):
    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.train import metrics_row

    _, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="pixels", num_env_runners=1, **PPO_TINY)
    algo = build_algorithm(config)
    try:
        row = metrics_row(algo.train())
        assert algo.get_module().observation_space == gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    finally:
        algo.stop()
    assert row["env_steps"] == 64 and row["encoder_calls"] is None  # the pixel baseline never calls the encoder


@pytest.mark.slow
def test_train_checkpoints_resumes_and_evaluates(ray_session, environment_encoder, tmp_path, tiny_vlm_dir):
    """latent+pixels (Dict observation, fused module) on a remote EnvRunner, through the stage entry."""
    from envenc_ray.rl.evaluate import evaluate
    from envenc_ray.rl.train import train

    _, encoder_dir = environment_encoder
    settings = dict(obs_mode="latent+pixels", num_env_runners=1, checkpoint_every=1, eval_max_steps=12, **PPO_TINY)
    first = train(make_config(tmp_path, tiny_vlm_dir, encoder_dir, iterations=1, **settings))
    agent_dir = tmp_path / "rl" / "agent"
    assert first["iterations"] == 1 and (agent_dir / "checkpoint_000001" / "policy.safetensors").is_file()
    assert first["encoder_call_ms"] > 0
    assert train(make_config(tmp_path, tiny_vlm_dir, encoder_dir, iterations=1, **settings))["skipped"]

    second = train(make_config(tmp_path, tiny_vlm_dir, encoder_dir, iterations=2, **settings))
    rows = [json.loads(line) for line in (agent_dir / "progress.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and second["iterations"] == 2
    assert rows[1]["env_steps_lifetime"] == 2 * rows[0]["env_steps_lifetime"]  # counters restored, not reset
    assert rows[1]["encoder_frames_per_call"] == NUM_ENVS
    assert (agent_dir / "progress.csv").read_text().count("\n") == 3
    assert any((agent_dir / "tb").iterdir())

    with pytest.raises(DataError, match="different agent"):
        train(make_config(tmp_path, tiny_vlm_dir, encoder_dir, iterations=3, **(settings | {"obs_mode": "latent"})))
    with pytest.raises(DataError, match="trained on the encoder in"):  # resuming on other encoder weights
        train(make_config(tmp_path, tiny_vlm_dir, other_encoder_weights(encoder_dir, tmp_path / "other"),
                          iterations=3, **settings))

    # 3 episodes on 2 sub-envs: the first sub-env to finish plays the third episode
    result = evaluate(make_config(tmp_path, tiny_vlm_dir, encoder_dir, iterations=2, **settings), episodes=3,
                      gif=tmp_path / "eval.gif")
    assert result["lengths"] == [12, 12, 12] and len(result["returns"]) == 3
    assert (tmp_path / "eval.gif").stat().st_size > 0


def test_dreamer_import_raises_no_gymnasium_observation_warning():
    """RLlib's dreamerv3 package warns at import about its own float64 debug CartPole; our import is silent.
    A fresh interpreter turns every UserWarning into an error, so any such warning fails the import."""
    import subprocess
    import sys

    probe = "import envenc_ray.rl.dreamer, ray.rllib.algorithms.dreamerv3"
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", probe], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_dreamerv3_on_latents_trains_and_evaluates(ray_session, environment_encoder, tmp_path, tiny_vlm_dir):
    from envenc_ray.rl.evaluate import evaluate
    from envenc_ray.rl.train import train

    _, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, algo="dreamerv3", obs_mode="latent",
                         num_env_runners=1, num_envs_per_env_runner=NUM_ENVS, iterations=1,
                         dreamer_model_size="XS", dreamer_batch_size_B=2, dreamer_batch_length_T=8,
                         dreamer_horizon_H=4, dreamer_training_ratio=8, eval_max_steps=5)
    summary = train(config)
    rows = [json.loads(line) for line in (tmp_path / "rl" / "agent" / "progress.jsonl").read_text().splitlines()]
    assert summary["iterations"] == 1 and rows[0]["WORLD_MODEL_L_total"] is not None
    assert rows[0]["encoder_frames_per_call"] == NUM_ENVS
    result = evaluate(config, episodes=2)  # the RSSM state is carried per episode
    assert result["lengths"] == [5, 5]


@pytest.mark.slow
@pytest.mark.parametrize("obs_mode", ["latent", "latent+pixels"])
def test_ppo_through_serve(ray_session, environment_encoder, tmp_path, tiny_vlm_dir, obs_mode):
    from envenc_ray.files import weights_sha256
    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.checkpoints import check_latents, latents_identity
    from envenc_ray.rl.train import metrics_row
    from envenc_ray.serve.client import deploy_encoder, shutdown

    _, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode=obs_mode, num_env_runners=1,
                         encoder_source="serve", serve_app="envenc-rl-test", **PPO_TINY)
    deploy_encoder(config, app_name="envenc-rl-test", encoder_dir=str(encoder_dir))
    try:
        # what an agent records of the service: the weights the replica loaded
        served = latents_identity(config)
        assert served["encoder_sha256"] == weights_sha256(encoder_dir) and served["encoder_dir"] == str(encoder_dir)
        assert served["vlm_sha256"] == weights_sha256(tiny_vlm_dir)
        algo = build_algorithm(config)
        try:
            row = metrics_row(algo.train())
        finally:
            algo.stop()
        if obs_mode == "latent":  # an app serving other encoder weights: an agent of this one is refused there
            other = other_encoder_weights(encoder_dir, tmp_path / "other")
            other_config = config.model_copy(update={"rl": config.rl.model_copy(update={
                "encoder_dir": str(other), "serve_app": "envenc-rl-test-other"})})
            deploy_encoder(other_config, app_name="envenc-rl-test-other", encoder_dir=str(other))
            try:
                with pytest.raises(DataError, match=r"trained on the encoder in .*sha256 .* but this config reads .*other"):
                    check_latents(served, latents_identity(other_config), "the agent")
            finally:
                shutdown("envenc-rl-test-other")
    finally:
        shutdown("envenc-rl-test")
    assert row["encoder_calls"] == row["env_steps"] / NUM_ENVS + 1 and row["encoder_frames_per_call"] == NUM_ENVS


@pytest.mark.slow
def test_encoder_error_in_a_remote_env_runner_reaches_the_driver(ray_session, environment_encoder, tmp_path,
                                                                 tiny_vlm_dir):
    """RLlib ends an EnvRunner on any exception; train() still raises the encoder's own error and message."""
    import shutil

    from envenc_ray.rl.train import train

    _, encoder_dir = environment_encoder
    broken = tmp_path / "broken-encoder"
    shutil.copytree(encoder_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")  # config.json is fine: the driver can't tell
    config = make_config(tmp_path, tiny_vlm_dir, broken, num_env_runners=1, iterations=1, **PPO_TINY)
    with pytest.raises(ModelError, match="in an EnvRunner: .*does not hold the weights"):
        train(config)
