"""RAM annotations checked against real ALE rollouts: scores against rewards, positions against frames
and against physics (bounded motion), advice against the corpus vocabulary, heuristics against random."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from envenc_ray.encoder.metrics import ATARIARI_MIN_ENTROPY, label_entropy
from envenc_ray.envs.annotate import (ADVICE_PHRASES, ANNOTATED_GAMES, ATARIARI_RAM, Annotation, advice_corpus,
                                      get_annotator)
from envenc_ray.envs.atari import make_env
from envenc_ray.errors import InputError, UnsupportedGameError

ROLLOUT_STEPS = {"pong": 2000, "breakout": 1500, "boxing": 1200, "freeway": 1200}
FRAME_EVERY = 8  # keep every 8th frame of a rollout for the pixel checks


@dataclass
class Rollout:
    """Step i: `rams[i]` and `annotations[i]` before the action, `rewards[i]` and `dones[i]` after it."""

    action_meanings: list[str]
    rams: list[np.ndarray]
    annotations: list[Annotation]
    rewards: list[float]
    dones: list[bool]
    frames: dict[int, np.ndarray]

    def transitions(self):
        """(i, i+1) pairs inside one episode."""
        return [(i, i + 1) for i in range(len(self.annotations) - 1) if not self.dones[i]]


@functools.cache
def rollout(game: str) -> Rollout:
    """A seeded rollout with sticky actions: the heuristic, with a random action 30% of the time so that
    both sides score and the positions cover more of the screen."""
    env = make_env(game, seed=0)  # sticky actions at ALE v5's default 0.25
    meanings = env.unwrapped.get_action_meanings()
    annotator = get_annotator(game, meanings)
    rng = np.random.default_rng(0)
    observation, _ = env.reset(seed=0)
    annotator.reset()
    record = Rollout(meanings, [], [], [], [], {})
    for step in range(ROLLOUT_STEPS[game]):
        ram = env.unwrapped.ale.getRAM()
        annotation = annotator.annotate(ram)
        if step % FRAME_EVERY == 0:
            record.frames[step] = observation
        action = annotation.heuristic_action if rng.random() > 0.3 else int(rng.integers(env.action_space.n))
        observation, reward, terminated, truncated, _ = env.step(action)
        record.rams.append(ram.copy())
        record.annotations.append(annotation)
        record.rewards.append(float(reward))
        record.dones.append(terminated or truncated)
        if terminated or truncated:
            observation, _ = env.reset()
            annotator.reset()
    env.close()
    return record


def play(game: str, policy: str, seed: int, max_steps: int) -> float:
    """Summed reward of one episode capped at `max_steps`, sticky actions on."""
    env = make_env(game, seed=seed)
    annotator = get_annotator(game, env.unwrapped.get_action_meanings())
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    annotator.reset()
    total = 0.0
    for _ in range(max_steps):
        annotation = annotator.annotate(env.unwrapped.ale.getRAM())
        action = annotation.heuristic_action if policy == "heuristic" else int(rng.integers(env.action_space.n))
        _, reward, terminated, truncated, _ = env.step(action)
        total += reward
        if terminated or truncated:
            break
    env.close()
    return total


# ---- scores against rewards --------------------------------------------------------------------------


def test_pong_scores_change_exactly_when_a_point_is_won_or_lost():
    run = rollout("pong")
    points = {"player_score": 0, "enemy_score": 0}
    for i, j in run.transitions():
        before, after = run.annotations[i].objects, run.annotations[j].objects
        assert after["player_score"] - before["player_score"] == (run.rewards[i] == 1), f"step {i}"
        assert after["enemy_score"] - before["enemy_score"] == (run.rewards[i] == -1), f"step {i}"
        points["player_score"] += run.rewards[i] == 1
        points["enemy_score"] += run.rewards[i] == -1
    assert points["player_score"] >= 2 and points["enemy_score"] >= 2, points  # both branches were exercised


@pytest.mark.parametrize("game", ["breakout", "boxing", "freeway"])
def test_scores_follow_rewards(game):
    run = rollout(game)
    episode_reward = 0.0
    for i, annotation in enumerate(run.annotations):
        if i == 0 or run.dones[i - 1]:
            episode_reward = 0.0
        objects = annotation.objects
        # Breakout's and Freeway's score is the episode's summed reward; Boxing's reward is the lead's change.
        score = objects["player_score"] - objects["enemy_score"] if game == "boxing" else objects["score"]
        assert score == episode_reward, f"step {i}: score {score}, summed reward {episode_reward}"
        episode_reward += run.rewards[i]
    assert sum(1 for r in run.rewards if r != 0) >= 8  # enough scoring events to mean something


def test_breakout_lives_count_down_one_at_a_time():
    run = rollout("breakout")
    lives = [a.objects["lives"] for a in run.annotations]
    assert lives[0] == 5
    drops = [lives[i] - lives[j] for i, j in run.transitions() if lives[i] != lives[j]]
    assert drops and all(drop == 1 for drop in drops), drops


# ---- positions ----------------------------------------------------------------------------------------

# Largest step-to-step move in screen pixels (measured maxima: paddles 24, Pong ball 16, Breakout ball 8
# and 14 once it has sped up, boxers 9, chicken 4 also when knocked back, cars 4) with some headroom; a wrong
# address jumps far more, and the sprite test below pins the offsets.
MAX_STEP = {
    "pong": {"player_y": 30, "enemy_y": 30, "ball_x": 20, "ball_y": 20},
    "breakout": {"player_x": 30, "ball_x": 20, "ball_y": 20},
    "boxing": {"player_x": 12, "player_y": 12, "enemy_x": 12, "enemy_y": 12},
    "freeway": {"player_y": 8, **{f"car{lane}_x": 6 for lane in range(10)}},
}


@pytest.mark.parametrize("game", ANNOTATED_GAMES)
def test_positions_move_continuously_and_stay_on_screen(game):
    """Within play (ball in play, no point scored at that step) every object moves a bounded distance.
    Cars wrap around the screen edge, so their motion is taken modulo the screen width."""
    run = rollout(game)
    steps = {key: [] for key in MAX_STEP[game]}
    for i, j in run.transitions():
        before, after = run.annotations[i].objects, run.annotations[j].objects
        if run.rewards[i] != 0 or not before.get("ball_in_play", 1) or not after.get("ball_in_play", 1):
            continue
        for key in MAX_STEP[game]:
            step = after[key] - before[key]
            if key.startswith("car"):
                step = (step + 80) % 160 - 80
            steps[key].append(abs(step))
            axis_size = 160 if key.endswith("_x") else 210
            assert 0 <= after[key] < axis_size, f"{key} = {after[key]} off screen at step {j}"
    for key, limit in MAX_STEP[game].items():
        assert len(steps[key]) > 200, f"too few in-play transitions for {key}"
        assert max(steps[key]) <= limit, f"{key} jumped {max(steps[key])} px in one step"
        assert np.mean(steps[key]) > 0.2, f"{key} hardly moves: is it the right address?"


def _sprite_centre(frame: np.ndarray, colour, rows, cols) -> tuple[float, float] | None:
    mask = np.all(frame[rows[0]:rows[1], cols[0]:cols[1]] == colour, axis=-1)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return (xs.min() + xs.max()) / 2 + cols[0], (ys.min() + ys.max()) / 2 + rows[0]


# Per game: object prefix, its RGB colour, and the frame region (rows, columns) where only it has that colour.
SPRITES = {
    "pong": [("player", (92, 186, 92), (34, 194), (0, 160)), ("enemy", (213, 130, 74), (34, 194), (0, 160)),
             ("ball", (236, 236, 236), (34, 194), (0, 160))],
    "breakout": [("player", (200, 72, 72), (189, 194), (8, 152)), ("ball", (200, 72, 72), (93, 189), (8, 152))],
    "boxing": [("player", (214, 214, 214), (36, 178), (28, 132)), ("enemy", (0, 0, 0), (36, 178), (28, 132))],
    # The chicken's colour is also the median strip's (rows 102-104) at its column.
    "freeway": [("player", (252, 252, 84), (105, 200), (40, 52)), ("player", (252, 252, 84), (0, 102), (40, 52)),
                ("car0", (210, 210, 64), (171, 181), (8, 160)), ("car4", (162, 98, 33), (107, 117), (8, 160)),
                ("car9", (167, 26, 26), (27, 37), (8, 160))],
}


@pytest.mark.parametrize("game", ANNOTATED_GAMES)
def test_positions_are_sprite_centres_on_the_frame(game):
    """Decoded positions land on the sprites. Sprites clipped by a screen edge, overlapping another of the
    same colour or stretched by a punching arm are off-centre, hence 'most', not 'all'."""
    run = rollout(game)
    errors = []
    for step, frame in run.frames.items():
        objects = run.annotations[step].objects
        for name, colour, rows, cols in SPRITES[game]:
            centre = _sprite_centre(frame, colour, rows, cols)
            if centre is None or (name == "ball" and not objects["ball_in_play"]):
                continue
            for axis, key in enumerate((f"{name}_x", f"{name}_y")):
                if key in objects:
                    errors.append(abs(objects[key] - centre[axis]))
    assert len(errors) > 100
    assert np.mean(np.array(errors) <= 1.0) >= 0.85, f"only {np.mean(np.array(errors) <= 1.0):.0%} within 1 px"


# ---- advice ---------------------------------------------------------------------------------------------

# What each advice phrase must make the agent do, by action meaning (Pong's joystick RIGHT moves up).
EXPECTED_MEANING = {
    "pong": {"up": "RIGHT", "down": "LEFT", "stay": "NOOP"},
    "breakout": {"left": "LEFT", "right": "RIGHT", "stay": "NOOP", "ball": "FIRE"},
    "boxing": {"up": "UP", "down": "DOWN", "left": "LEFT", "right": "RIGHT", "punch": "FIRE"},
    "freeway": {"up": "UP", "wait": "NOOP"},
}


def _score_text(game: str, objects) -> str:
    if game == "pong":
        return f"{objects['enemy_score']}-{objects['player_score']}"  # left paddle first, as on screen
    if game == "boxing":
        return f"{objects['player_score']}-{objects['enemy_score']}"  # white first, as on screen
    return str(objects["score"])


# The AtariARI positions that move in our rollouts
ATARIARI_MOVING = {"pong": {"player_y", "enemy_y", "ball_x", "ball_y"}, "breakout": {"player_x", "ball_x", "ball_y"},
                   "boxing": {"player_x", "player_y", "enemy_x", "enemy_y"}, "freeway": {"player_y", "enemy_car_x_0"}}


@pytest.mark.parametrize("game", ANNOTATED_GAMES)
def test_atariari_position_bytes_carry_the_game_state_of_a_rollout(game):
    """AtariARI's address list (ATARIARI_RAM) against real play: its position bytes pass the entropy filter."""
    rams = np.stack(rollout(game).rams)
    kept = {name for name, address in ATARIARI_RAM[game].items() if label_entropy(rams[:, address]) >= ATARIARI_MIN_ENTROPY}
    assert ATARIARI_MOVING[game] <= kept, ATARIARI_MOVING[game] - kept
    if game == "pong":  # the paddles' x bytes never move in ALE v5: the filter drops them
        assert not {"player_x", "enemy_x"} & kept


@pytest.mark.parametrize("game", ANNOTATED_GAMES)
def test_advice_states_the_score_and_the_heuristic_move(game):
    run = rollout(game)
    phrases = "|".join(re.escape(phrase) for phrase in ADVICE_PHRASES[game])
    pattern = re.compile(rf"a game of {game}, the score is (\d+(?:-\d+)?), ({phrases})")
    used = set()
    for annotation in run.annotations:
        match = pattern.fullmatch(annotation.advice)
        assert match, annotation.advice
        assert match.group(1) == _score_text(game, annotation.objects), annotation
        phrase = match.group(2)
        used.add(phrase)
        expected = EXPECTED_MEANING[game][phrase.split()[-1]]
        assert run.action_meanings[annotation.heuristic_action] == expected, (phrase, annotation.heuristic_action)
    assert len(used) >= 2, f"the heuristic only ever says {used}"


def _tokens(sentence: str) -> set[str]:
    """Words, single digits and punctuation: numbers are spelled digit by digit, since the corpus draws
    scores at random and cannot hold every number as a whole word."""
    return set(re.findall(r"[a-z]+|\d|[^\sa-z\d]", sentence))


def test_advice_uses_only_the_corpus_vocabulary():
    """Every word is in the corpus, and every sentence is a corpus sentence but for its score."""
    corpus = advice_corpus()
    vocabulary = set().union(*map(_tokens, corpus))
    shapes = {re.sub(r"\d+", "N", sentence) for sentence in corpus}
    for game in ANNOTATED_GAMES:
        for annotation in rollout(game).annotations:
            unknown = _tokens(annotation.advice) - vocabulary
            assert not unknown, f"{annotation.advice!r}: {unknown} not in advice_corpus()"
            assert re.sub(r"\d+", "N", annotation.advice) in shapes, annotation.advice


@pytest.mark.parametrize("game", ANNOTATED_GAMES)
def test_objects_are_flat_json_numbers(game):
    objects = rollout(game).annotations[-1].objects
    assert all(type(value) in (int, float) for value in objects.values()), objects
    assert json.loads(json.dumps(objects)) == objects


# ---- heuristics -----------------------------------------------------------------------------------------

# Two capped episodes per policy, seeds 0 and 1. Measured over seeds 0-9 at 400 steps: Pong heuristic
# 0 or -1 per episode, random -6 to -10; Breakout heuristic 9 to 20, random 0 to 3.
@pytest.mark.parametrize("game, margin", [("pong", 8), ("breakout", 10)])
def test_heuristic_beats_random(game, margin):
    heuristic = sum(play(game, "heuristic", seed, max_steps=400) for seed in (0, 1))
    random_policy = sum(play(game, "random", seed, max_steps=400) for seed in (0, 1))
    assert heuristic >= random_policy + margin, (heuristic, random_policy)


# Boxing is left out: its minimal action set is all 18 actions in the full set's order.
@pytest.mark.parametrize("game", ["pong", "breakout", "freeway"])
def test_actions_are_looked_up_by_meaning_in_the_full_action_set(game):
    run = rollout(game)
    env = make_env(game, full_action_space=True)
    full_meanings = env.unwrapped.get_action_meanings()
    env.close()
    full = get_annotator(game, full_meanings)
    moved = set()
    for i, (ram, annotation) in enumerate(zip(run.rams[:300], run.annotations[:300])):
        if i == 0 or run.dones[i - 1]:
            full.reset()
        action = full.annotate(ram).heuristic_action
        assert full_meanings[action] == run.action_meanings[annotation.heuristic_action], f"step {i}"
        moved.add(action != annotation.heuristic_action)
    assert True in moved  # some move sits at another index in the full set


@pytest.mark.parametrize("game", ["pong", "breakout"])
def test_reset_forgets_the_previous_frame(game):
    """The ball's velocity comes from the previous frame: after reset() an annotator acts like a new one,
    while a remembered frame from elsewhere changes its decisions (so this test can tell the difference)."""
    run = rollout(game)
    in_play = [i for i, a in enumerate(run.annotations) if a.objects["ball_in_play"]]
    tail = run.rams[in_play[len(in_play) // 2]:][:20]
    fresh = get_annotator(game, run.action_meanings)
    expected = [fresh.annotate(ram) for ram in tail]
    changed_by_stale_frame = 0
    for other in in_play[:200:10]:
        annotator = get_annotator(game, run.action_meanings)
        annotator.annotate(run.rams[other])
        changed_by_stale_frame += annotator.annotate(tail[0]) != expected[0]
        annotator.annotate(run.rams[other])
        annotator.reset()
        assert [annotator.annotate(ram) for ram in tail] == expected
    assert changed_by_stale_frame > 0


# ---- bad input -------------------------------------------------------------------------------------------


def test_game_names_and_ale_ids_are_both_accepted():
    ram = rollout("pong").rams[100]
    meanings = rollout("pong").action_meanings
    assert get_annotator("ALE/Pong-v5", meanings).annotate(ram) == get_annotator("pong", meanings).annotate(ram)


def test_unknown_game_names_the_supported_ones():
    with pytest.raises(UnsupportedGameError) as error:
        get_annotator("ALE/SpaceInvaders-v5", ["NOOP", "FIRE"])
    message = str(error.value)
    assert "SpaceInvaders" in message and all(game in message for game in ANNOTATED_GAMES), message


def test_action_set_without_the_needed_moves_is_an_input_error():
    with pytest.raises(InputError, match="RIGHT"):
        get_annotator("pong", ["NOOP", "UP", "DOWN"])  # Freeway's action set


@pytest.mark.parametrize(
    "ram",
    [np.zeros(127, np.uint8), np.zeros((1, 128), np.uint8), np.zeros(128, np.int64), np.zeros(128, np.float32),
     [0] * 128],
    ids=["short", "2d", "int64", "float32", "list"],
)
def test_malformed_ram_is_an_input_error(ram):
    annotator = get_annotator("pong", rollout("pong").action_meanings)
    with pytest.raises(InputError, match=r"uint8 array of shape \(128,\)"):
        annotator.annotate(ram)
