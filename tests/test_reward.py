"""Reward model: preference triples branched from real ALE Pong, the transformer reward model trained by Ray Train
with a Bradley-Terry loss, its held-out preference accuracy, the connector that writes its rewards into RLlib
episodes (a real PPO iteration with rl.reward 'model'), and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from envenc_ray.config import EnvConfig, EnvEncConfig, RewardModelConfig
from envenc_ray.errors import ConfigError, DataError, ModelError
from test_rl import ENCODER, LATENT_DIM, PPO_TINY, environment_encoder  # noqa: F401  (a fixture)

TINY_MODEL = RewardModelConfig(d_model=16, heads=2, layers=1)


def saved_model(folder: Path, representation_dim: int, representation: str = "latent", seed: int = 0) -> Path:
    """A reward model with random weights exported as the stage exports one (for connector and loader tests)."""
    from envenc_ray.rl.reward.model import build_reward_model, save_reward_model

    torch.manual_seed(seed)
    model = build_reward_model(TINY_MODEL, representation_dim)
    description = {"representation": representation, "representation_dim": representation_dim,
                   "settings": TINY_MODEL.model_dump(mode="json")}
    save_reward_model(model, folder, description, metrics={})
    return folder


def pong_env_at_branch_point():
    """A sticky-free Pong env played by the heuristic up to its first branch point (the ball near the paddle)."""
    from envenc_ray.envs.annotate import get_annotator
    from envenc_ray.envs.atari import make_env
    from envenc_ray.rl.reward.preferences import is_branch_point

    env = make_env("pong", repeat_action_probability=0.0)
    annotator = get_annotator("pong", env.unwrapped.get_action_meanings())
    env.reset(seed=3)
    previous = None
    for _ in range(500):
        annotation = annotator.annotate(env.unwrapped.ale.getRAM())
        if is_branch_point("pong", annotation.objects, previous, reach_steps=2):
            return env, annotator
        previous = annotation.objects
        env.step(annotation.heuristic_action)
    raise AssertionError("no branch point in 500 steps")


# ------------------------------------------------------------------------------------------- triples


def test_branches_replay_exactly_and_the_higher_return_wins():
    from envenc_ray.rl.reward.preferences import branch, preference_pairs

    env, annotator = pong_env_at_branch_point()
    moves = [2, 3, 0]  # RIGHT (up), LEFT (down), NOOP
    ram_before = env.unwrapped.ale.getRAM().copy()
    frames, returns = branch(env.unwrapped, annotator, moves, horizon=8)
    again_frames, again_returns = branch(env.unwrapped, annotator, moves, horizon=8)
    np.testing.assert_array_equal(env.unwrapped.ale.getRAM(), ram_before)  # the state was restored
    assert returns == again_returns
    for frame, again in zip(frames, again_frames):
        np.testing.assert_array_equal(frame, again)  # sticky actions off + cloned RNG: deterministic
    assert not np.array_equal(frames[0], frames[1])  # up and down show different paddles
    for winner, loser in preference_pairs(returns):
        assert returns[winner] > returns[loser]
    env.close()


def test_preference_pairs_keep_every_difference_and_drop_ties():
    from envenc_ray.rl.reward.preferences import preference_pairs

    assert preference_pairs([0.0, 0.0, -1.0]) == [(0, 2), (1, 2)]
    assert preference_pairs([-1.0, 0.0, 1.0]) == [(1, 0), (2, 0), (2, 1)]
    assert preference_pairs([0.0, 0.0, 0.0]) == []


def test_a_rollout_keeps_its_non_tied_branch_points_and_counts_the_ties():
    from envenc_ray.rl.reward.preferences import COUNTS_KEY, play_and_branch, preference_pairs

    settings = RewardModelConfig(max_steps_per_episode=800)
    table = play_and_branch(EnvConfig(game="pong"), settings, seed=11, episode=4, context=3)
    counts = json.loads(table.schema.metadata[COUNTS_KEY])
    assert counts["steps"] == 800 and counts["branch_points"] > table.num_rows > 0
    rows = table.to_pylist()
    assert counts["pairs"] == sum(len(preference_pairs(row["branch_returns"])) for row in rows)
    assert counts["pairs"] + counts["tied_pairs"] == 3 * counts["branch_points"]
    for row in rows:
        assert row["episode_id"] == 4 and 1 <= len(row["context"]) <= 3
        assert len(row["branch_frames"]) == len(row["branch_actions"]) == 3
        assert len(set(row["branch_returns"])) > 1  # only rows with a triple are kept
        assert all(len(frame) == 210 * 160 * 3 for frame in [*row["context"], *row["branch_frames"]])


# ------------------------------------------------------------------------------------- model and connector


def test_exported_model_round_trips_and_refuses_a_damaged_file(tmp_path):
    from envenc_ray.rl.reward.model import load_reward_model

    folder = saved_model(tmp_path / "reward_model", LATENT_DIM)
    model = load_reward_model(folder)
    previous, current = torch.randn(5, LATENT_DIM), torch.randn(5, LATENT_DIM)
    rewards = model(previous, current)
    assert rewards.shape == (5,) and torch.isfinite(rewards).all()
    torch.testing.assert_close(load_reward_model(folder)(previous, current), rewards)

    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="does not hold a reward model envenc can build"):
        load_reward_model(folder)


def latent_episode(latents: np.ndarray, env_rewards: list[float]):
    from ray.rllib.env.single_agent_episode import SingleAgentEpisode

    space = gym.spaces.Box(-np.inf, np.inf, latents.shape[1:], np.float32)
    episode = SingleAgentEpisode(observation_space=space, action_space=gym.spaces.Discrete(6))
    episode.add_env_reset(observation=latents[0])
    for latent, reward in zip(latents[1:], env_rewards):
        episode.add_env_step(observation=latent, action=0, reward=reward)
    return episode


@pytest.mark.parametrize("mode", ["model", "env+model"])
def test_connector_writes_each_new_step_once(tmp_path, mode):
    from envenc_ray.rl.reward.connector import ModelRewards
    from envenc_ray.rl.reward.model import RewardSource, load_reward_model

    folder = saved_model(tmp_path / "reward_model", LATENT_DIM)
    source = RewardSource(model_dir=str(folder), mode=mode, scale=0.5, representation="latent")
    connector = ModelRewards(source=source)
    latents = np.random.default_rng(0).normal(size=(4, 2, LATENT_DIM)).astype(np.float32)  # (t, episode, D)
    episodes = [latent_episode(latents[:1, i], []) for i in range(2)]
    connector(rl_module=None, batch={}, episodes=episodes)  # reset: nothing to reward yet
    for t in range(1, 4):
        for i, episode in enumerate(episodes):
            episode.add_env_step(observation=latents[t, i], action=0, reward=float(i))  # env rewards 0 and 1
        connector(rl_module=None, batch={}, episodes=episodes)
        connector(rl_module=None, batch={}, episodes=episodes)  # nothing new: no second write

    model = load_reward_model(folder)
    for i, episode in enumerate(episodes):
        expected = 0.5 * model(torch.from_numpy(latents[:-1, i]), torch.from_numpy(latents[1:, i])).numpy()
        expected += float(i) if mode == "env+model" else 0.0
        np.testing.assert_allclose(episode.get_rewards(), expected, rtol=1e-5, atol=1e-6)


def test_pixel_rewards_read_the_raw_frame_before_the_latent_connector(tmp_path, pong_frames):
    from envenc_ray.rl.connector import LatentObservations, make_env_to_module
    from envenc_ray.rl.reward.connector import ModelRewards
    from envenc_ray.rl.reward.model import RewardSource, load_reward_model, pixel_representation

    size = 16
    folder = saved_model(tmp_path / "reward_model", size * size, representation="pixels")
    source = RewardSource(model_dir=str(folder), mode="model", scale=1.0, representation="pixels", pixel_size=size)
    pieces = make_env_to_module("pixels", None, rewards=source)()
    assert [type(piece) for piece in pieces] == [ModelRewards, LatentObservations]
    from test_rl import rgb_episode

    episode = rgb_episode(pong_frames[0])
    pieces[0](rl_module=None, batch={}, episodes=[episode])
    episode.add_env_step(observation=pong_frames[1], action=0, reward=0.0)
    pieces[0](rl_module=None, batch={}, episodes=[episode])
    grey = torch.from_numpy(pixel_representation(pong_frames[:2], size))
    expected = load_reward_model(folder)(grey[:1], grey[1:]).item()
    assert episode.get_rewards(-1) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------- bad input


def reward_config(tmp_path: Path, encoder_dir, obs_mode: str = "latent", **reward_model) -> EnvEncConfig:
    return EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path), "name": "reward"},
        "encoder": ENCODER.model_dump(),
        "rl": {"encoder_dir": str(encoder_dir), "obs_mode": obs_mode, "reward": "model"},
        "reward_model": reward_model,
    })


def test_reward_source_refuses_a_model_for_another_representation(tmp_path):
    from envenc_ray.rl.reward.model import reward_source

    config = reward_config(tmp_path, tmp_path / "encoder")
    with pytest.raises(ModelError, match=r"no reward model in .*reward_model.*rl.reward is 'model': run "
                                         r"`envenc reward-model CONFIG` first"):
        reward_source(config, latent_dim=LATENT_DIM)
    saved_model(tmp_path / "reward" / "reward_model", 2 * LATENT_DIM)
    with pytest.raises(ModelError) as error:
        reward_source(config, latent_dim=LATENT_DIM)
    message = str(error.value)
    assert "built for 16-d latent representations but the agent's encoder gives 8-d ones" in message
    assert "rerun `envenc reward-model CONFIG`" in message and "\n" not in message
    with pytest.raises(ConfigError, match="reads the agent's latents but rl.obs_mode is 'pixels'"):
        reward_source(reward_config(tmp_path, tmp_path / "encoder", obs_mode="pixels"), latent_dim=None)
    assert reward_source(config.model_copy(update={"rl": config.rl.model_copy(update={"reward": "env"})}),
                         latent_dim=LATENT_DIM) is None


def test_empty_and_one_class_preference_sets_are_refused(tmp_path):
    from envenc_ray.files import write_json_atomic
    from envenc_ray.rl.reward.preferences import SCHEMA, META_FILE, shard_path
    from envenc_ray.rl.reward.train import Triples, check_triples, represent_triples
    from envenc_ray.data.schema import write_parquet_atomic
    import pyarrow as pa

    folder = tmp_path / "preferences"
    write_json_atomic(folder / META_FILE, {"hash": "x", "context": 1, "frame_shape": [210, 160, 3]})
    for episode in range(2):  # rollouts whose every branch tied keep no row
        write_parquet_atomic(pa.Table.from_pylist([], schema=SCHEMA), shard_path(folder, episode))
    with pytest.raises(DataError, match=r"preference set in .*preferences is empty: every branch tied; raise "
                                        r"reward_model.episodes"):
        represent_triples(folder, RewardModelConfig(representation="pixels", episodes=2))

    representations = np.zeros((4, 3), np.float32)
    one_class = Triples(representations, representations, representations, np.array([0, 0, 1, 1]),
                        np.array([[2, 0], [2, 3], [2, 0], [2, 3]]))
    with pytest.raises(DataError, match=r"is one-class: every one of its 4 triples is won by action 2"):
        check_triples(one_class, folder)
    one_rollout = Triples(representations, representations, representations, np.zeros(4, int),
                          np.array([[2, 0], [0, 3], [2, 0], [3, 2]]))
    with pytest.raises(DataError, match="all come from rollout 0; the held-out accuracy needs whole held-out rollouts"):
        check_triples(one_rollout, folder)


def test_config_refuses_heads_that_do_not_divide_the_width():
    from envenc_ray.config import load_config

    with pytest.raises(ConfigError, match=r"reward_model.heads \(3\) must divide reward_model.d_model \(64\)"):
        load_config([], ["reward_model.heads=3"])


def test_envenc_run_includes_the_stage_only_when_the_agent_uses_the_model(debug_config):
    from envenc_ray.pipeline import stages_of

    assert "reward-model" not in [stage.name for stage in stages_of(debug_config())]
    names = [stage.name for stage in stages_of(debug_config("rl.reward=env+model"))]
    assert names.index("train-encoder") < names.index("reward-model") < names.index("train")


# ------------------------------------------------------------------------------------ stage and PPO (Ray)


@pytest.mark.slow
def test_reward_model_on_pong_pixels_beats_chance_and_the_moves(ray_session, debug_config):
    """The stage end to end on pixels: held-out preference accuracy well above 0.5 and above what the two moves
    alone predict; the export reproduces it; a rerun is skipped."""
    from envenc_ray.rl.reward.model import load_reward_model
    from envenc_ray.rl.reward.train import represent_triples, reward_model_current, split_by_rollout, train_reward_model

    config = debug_config("reward_model.representation=pixels", "reward_model.episodes=8",
                          "reward_model.max_steps_per_episode=3000", "reward_model.epochs=25")
    summary = train_reward_model(config)
    folder = config.run_dir / "reward_model"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["preferences"]["pairs"] == metrics["triples"]["train"] + metrics["triples"]["heldout"] > 500
    assert 0 < metrics["preferences"]["tie_rate"] < 1 and len(metrics["winner_moves"]) == 3
    assert metrics["heldout_accuracy"] >= 0.65
    assert metrics["heldout_accuracy"] >= metrics["move_baseline_accuracy"] + 0.05
    assert summary["heldout_accuracy"] == metrics["heldout_accuracy"]

    # the exported (centred) model ranks the held-out triples exactly as the best epoch did
    triples = represent_triples(config.run_dir / "preferences", config.reward_model)
    train_rows, val_rows = split_by_rollout(triples.episode_ids, config.reward_model.val_fraction)
    model = load_reward_model(folder)

    def rewards(rows):
        inputs, winners, losers = (torch.from_numpy(a[rows]) for a in (triples.inputs, triples.winners, triples.losers))
        with torch.no_grad():
            return model(inputs, winners), model(inputs, losers)

    held_out_winners, held_out_losers = rewards(val_rows)
    accuracy = float((held_out_winners > held_out_losers).float().mean())
    assert accuracy == pytest.approx(metrics["heldout_accuracy"], abs=1e-6)
    assert float(torch.cat(rewards(train_rows)).mean()) == pytest.approx(0.0, abs=1e-4)  # centred on training
    assert "held-out preference accuracy" in reward_model_current(config)
    assert train_reward_model(config)["skipped"]


@pytest.mark.slow
def test_ppo_iteration_trains_on_the_reward_models_rewards(ray_session, environment_encoder, tiny_vlm_dir,
                                                           tmp_path):
    """rl.reward 'model': the latent reward model (made by the stage from the agent's own encoder) writes every
    sampled step's reward, and the learner's episodes carry exactly those rewards."""
    from ray.rllib.connectors.connector_v2 import ConnectorV2

    from envenc_ray.rl.algorithm import build_algorithm, train_iteration
    from envenc_ray.rl.reward.model import load_reward_model
    from envenc_ray.rl.reward.train import train_reward_model
    from envenc_ray.rl.runner_errors import new_error_key
    from envenc_ray.rl.train import metrics_row

    _, encoder_dir = environment_encoder
    config = EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path), "name": "ppo-reward"},
        "vlm": {"model": str(tiny_vlm_dir), "num_threads": 1},
        "encoder": ENCODER.model_dump(),
        "rl": {"encoder_dir": str(encoder_dir), "cpus_per_env_runner": 0.5, "num_env_runners": 0, "reward": "model",
               "reward_model_scale": 2.0, **PPO_TINY},
        "reward_model": {"episodes": 2, "max_steps_per_episode": 1200, "epochs": 2, "num_workers": 1, "d_model": 16,
                         "heads": 2},
    })
    summary = train_reward_model(config)
    assert summary["triples"]["train"] > 0 and summary["triples"]["heldout"] > 0
    description = json.loads((config.run_dir / "reward_model" / "config.json").read_text())
    assert description["representation"] == "latent" and description["representation_dim"] == LATENT_DIM

    class RecordEpisodes(ConnectorV2):
        """First piece of the learner connector: what the learner's batch is built from."""

        def __call__(self, *, rl_module, batch, episodes, **kwargs):
            self.episodes = [(np.stack(e.get_observations()), np.asarray(e.get_rewards())) for e in episodes]
            return batch

    error_key = new_error_key()
    algo = build_algorithm(config, error_key)
    try:
        recorder = RecordEpisodes()
        algo.learner_group._learner._learner_connector.prepend(recorder)
        result = train_iteration(algo, error_key)
    finally:
        algo.stop()
    runners = result["env_runners"]
    assert runners["envenc_reward_steps"] == runners["num_env_steps_sampled"] == 64
    model = load_reward_model(config.run_dir / "reward_model")
    learned = np.concatenate([rewards for _, rewards in recorder.episodes])
    assert len(learned) == 64
    for observations, rewards in recorder.episodes:
        with torch.no_grad():
            expected = 2.0 * model(torch.from_numpy(observations[:-1]), torch.from_numpy(observations[1:])).numpy()
        np.testing.assert_allclose(rewards, expected, rtol=1e-4, atol=1e-5)
    assert np.std(learned) > 0 and runners["envenc_model_reward"] == pytest.approx(learned.sum(), rel=1e-4)
    assert np.isfinite(result["learners"]["default_policy"]["total_loss"])
    row = metrics_row(result)
    assert row["model_reward"] == runners["envenc_model_reward"] and row["env_reward"] == runners["envenc_env_reward"]
