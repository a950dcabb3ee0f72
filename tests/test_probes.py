"""Probes of game state beyond the ridge R² of positions: velocities derived from consecutive frames, and the
AtariARI protocol (a linear classifier per RAM byte, weighted F1, the low-entropy filter)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from envenc_ray.data.probes import probe_targets, ridge_probe_r2
from envenc_ray.encoder.metrics import atariari_f1, label_entropy, weighted_f1, with_velocities
from envenc_ray.envs.annotate import ATARIARI_RAM

PONG = ATARIARI_RAM["pong"]


def pong_ram(rows: int, seed: int = 0) -> np.ndarray:
    """RAM whose AtariARI Pong bytes are: ball_x one of 8 values, ball_y one of 2 (ln 2 = 0.69 nats), enemy_score 1
    on a fifth of the rows (0.50 nats: kept by a filter in bits, dropped by AtariARI's in nats), the rest constant."""
    rng = np.random.default_rng(seed)
    ram = np.zeros((rows, 128), dtype=np.uint8)
    ram[:, PONG["ball_x"]] = rng.choice(np.arange(60, 180, 15), size=rows)
    ram[:, PONG["ball_y"]] = rng.choice([40, 90], size=rows)
    ram[:, PONG["enemy_score"]] = np.arange(rows) % 5 == 0
    return ram


def one_hot(values: np.ndarray) -> np.ndarray:
    return np.eye(256, dtype=np.float32)[values]


def test_atariari_f1_is_perfect_on_the_byte_one_hot_and_chance_on_noise(one_torch_thread):
    ram = pong_ram(600)
    train_rows, test_rows = np.arange(400), np.arange(400, 600)
    rng = np.random.default_rng(1)
    informative = np.concatenate([one_hot(ram[:, PONG["ball_x"]]), one_hot(ram[:, PONG["ball_y"]]),
                                  rng.normal(size=(600, 16)).astype(np.float32)], axis=1)
    f1 = atariari_f1(informative, ram, PONG, train_rows, test_rows)
    # the constant bytes and enemy_score (0.50 nats) are dropped; ball_y's ln 2 = 0.69 nats is kept
    assert set(f1) == {"ball_x", "ball_y"}
    assert f1["ball_x"] > 0.99 and f1["ball_y"] > 0.99

    noise = atariari_f1(rng.normal(size=(600, 32)).astype(np.float32), ram, PONG, train_rows, test_rows)
    assert set(noise) == {"ball_x", "ball_y"}
    assert noise["ball_x"] < 0.3  # 8 equally likely values: chance is 1/8
    assert noise["ball_y"] < 0.65  # 2 values: chance is 1/2


def test_label_entropy_is_in_nats_and_weighted_f1_weighs_classes_by_their_count():
    assert label_entropy(np.array([3, 3, 3, 3])) == 0.0
    assert label_entropy(np.array([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4))
    # class 0: precision 1, recall 1/2 -> F1 2/3; class 1: precision 2/3, recall 1 -> F1 4/5; two rows each
    assert weighted_f1(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # a class only ever predicted (7) weighs nothing; one never predicted (2) scores 0 with its weight
    assert weighted_f1(np.array([7, 1, 1]), np.array([2, 1, 1])) == pytest.approx(2 / 3)


def test_velocities_come_from_consecutive_frames_of_one_episode_with_the_object_in_both():
    episode_ids = np.array([0, 0, 0, 0, 1, 1])
    steps = np.array([0, 1, 2, 3, 0, 1])
    objects = {
        "ball_x": np.array([10.0, 13.0, -1.0, 20.0, 30.0, 28.0]),
        "ball_y": np.array([20.0, 18.0, -1.0, 25.0, 40.0, 45.0]),
        "ball_in_play": np.array([1, 1, 0, 1, 1, 1]),
        "player_y": np.array([100.0, 104.0, 110.0, 109.0, 50.0, 50.0]),
        "car0_x": np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    }
    out = with_velocities(objects, episode_ids, steps)
    nan = np.nan
    # row 2 has no ball, row 3's predecessor has none, row 4 starts an episode: no ball velocity there
    np.testing.assert_array_equal(out["ball_dx"], [nan, 3.0, nan, nan, nan, -2.0])
    np.testing.assert_array_equal(out["ball_dy"], [nan, -2.0, nan, nan, nan, 5.0])
    np.testing.assert_array_equal(out["player_dy"], [nan, 4.0, 6.0, -1.0, nan, 0.0])
    assert "car0_dx" not in out and "player_dx" not in out  # cars are not moving objects; no player_x given

    gap = with_velocities(objects, episode_ids, np.array([0, 1, 3, 4, 0, 1]))  # a step missing between rows 1 and 2
    assert np.isnan(gap["player_dy"][2]) and gap["player_dy"][3] == -1.0


def test_ridge_probes_fit_and_score_a_velocity_on_the_rows_where_it_is_defined():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 12))
    velocity = features @ rng.normal(size=12)
    velocity[::3] = np.nan  # undefined on a third of the rows; a fit over them would see NaN
    targets = {"position": features @ rng.normal(size=12), "velocity": velocity, "flat": np.where(np.isnan(velocity), np.nan, 1.0)}
    kept = probe_targets(targets, np.arange(300), np.arange(300, 400))
    assert set(kept) == {"position", "velocity"}  # 'flat' is constant where defined
    r2 = ridge_probe_r2(features, kept, np.arange(300), np.arange(300, 400))
    assert list(r2) == ["position", "velocity"] and min(r2.values()) > 0.99
