"""Game-state annotations from the Atari RAM: objects, scores, advice sentences, heuristic actions.

    annotator = get_annotator("pong", env.unwrapped.get_action_meanings())
    annotator.reset()                                   # at every episode start
    annotation = annotator.annotate(env.unwrapped.ale.getRAM())
    annotation.objects            # {"player_y": 120.0, "ball_x": 80.0, ..., "player_score": 3, ...}
    annotation.advice             # "a game of pong, the score is 1-3, the right player should move up"
    annotation.description        # "the ball is at column 4 row 6, below the right paddle, ..."
    annotation.heuristic_action   # index into the env's action space, chosen by the same decision

Positions are the centre of the object in screen pixels of the 210x160 frame (x to the right, y down),
converted from RAM by per-sprite offsets measured against real frames on ale-py 0.12.1, so probes and
plots can be read against the image. A ball that is not on screen (not served or launched yet, or a
missed Breakout ball falling out below the paddle) has `ball_in_play` 0 and coordinates -1. Between Pong
points the enemy paddle slides off the top of the screen (negative y) and reappears at the serve.

The advice names the move the heuristic takes, so a sentence and `heuristic_action` never disagree. The
score in a sentence reads as the frame shows it: left-right for two-player games (Pong's agent is the
RIGHT paddle, so "3-1" there means the agent has 1), the agent's own score for the others.

The description names what an agent needs to see, in words a small VLM can learn to say: each object's
cell in a GRID x GRID grid over the 210x160 frame, where the ball is relative to the agent's paddle, lives
and score. It is a pure function of `objects`, so it can be rebuilt from recorded frames at any time.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np

from envenc_ray.config import game_name
from envenc_ray.errors import InputError, UnsupportedGameError

ANNOTATED_GAMES = ("pong", "breakout", "boxing", "freeway")
FRAME_HEIGHT, FRAME_WIDTH = 210, 160
# Descriptions place objects in a 10 x 10 grid (16 px columns, 21 px rows): fine enough that a probe of
# the model's state can recover positions, coarse enough that every cell is one short number word.
GRID = 10

# Every phrase an advice sentence can end with, per game: the tokenizer of the built-in tiny VLM is
# trained on sentences built from these, so its vocabulary covers all advice text.
ADVICE_PHRASES = {
    "pong": ("the right player should move up", "the right player should move down", "the right player should stay"),
    "breakout": ("the paddle should move left", "the paddle should move right", "the paddle should stay",
                 "the player should fire to launch the ball"),
    "boxing": ("the white boxer should move up", "the white boxer should move down",
               "the white boxer should move left", "the white boxer should move right",
               "the white boxer should punch"),
    "freeway": ("the chicken should move up", "the chicken should wait"),
}


def advice_sentence(game: str, score: str, phrase: str) -> str:
    """The seed's sentence shape: game, score, what the controlled player should do."""
    return f"a game of {game}, the score is {score}, {phrase}"


def advice_corpus(seed: int = 0, per_game: int = 400) -> list[str]:
    """Sentences covering the advice vocabulary of every annotated game (scores drawn at random)."""
    rng = random.Random(seed)
    sentences = []
    for game in ANNOTATED_GAMES:
        for _ in range(per_game):
            if game in ("pong", "boxing"):
                score = f"{rng.randint(0, 21 if game == 'pong' else 99)}-{rng.randint(0, 21 if game == 'pong' else 99)}"
            else:
                score = str(rng.randint(0, 999))
            sentences.append(advice_sentence(game, score, rng.choice(ADVICE_PHRASES[game])))
    return sentences


def describe_corpus(seed: int = 0, per_game: int = 400) -> list[str]:
    """Description sentences of every annotated game, decoded from random RAM (covers the whole vocabulary)."""
    rng = np.random.default_rng(seed)
    sentences = []
    for game in ANNOTATED_GAMES:
        annotator = _ANNOTATORS[game](list(_ANNOTATORS[game].moves.values()))
        for _ in range(per_game):
            sentences.append(annotator.describe(annotator.decode(rng.integers(0, 256, 128).tolist())))
    return sentences


def column(x: float) -> int:
    """Grid column (0 = left) of a screen x coordinate; off-screen values clamp to the edge cells."""
    return min(GRID - 1, max(0, int(x * GRID // FRAME_WIDTH)))


def row(y: float) -> int:
    """Grid row (0 = top) of a screen y coordinate; off-screen values clamp to the edge cells."""
    return min(GRID - 1, max(0, int(y * GRID // FRAME_HEIGHT)))


@dataclass(frozen=True)
class Annotation:
    objects: dict[str, int | float]  # flat and numeric: JSON-serializable as is
    advice: str
    heuristic_action: int  # index into the env's action space
    description: str = ""


# ---------------------------------------------------------------------------------------------------
# RAM addresses: indices into the 128-byte `ale.getRAM()`. Positions from the AtariARI annotations
# (Anand et al. 2019, atariari/benchmark/ram_annotations.py); scores, lives and clocks from ALE's own
# reward code (Arcade-Learning-Environment src/games/supported/<Game>.cpp, whose addresses 0x80+i are
# index i here). Every address below was checked on ale-py 0.12.1 against frames or rewards; the pixel
# offsets (screen centre = RAM value + offset) were measured on frames.
# ---------------------------------------------------------------------------------------------------

PONG_PLAYER_Y, PONG_ENEMY_Y = 51, 50
PONG_BALL_X, PONG_BALL_Y = 49, 54  # ball_y is 0 while no ball is served
PONG_ENEMY_SCORE, PONG_PLAYER_SCORE = 13, 14  # ALE Pong.cpp; plain binary
PONG_PLAYER_X, PONG_ENEMY_X = 141.5, 17.5  # paddles never move sideways (RAM 46 and 45 are constant)

BREAKOUT_PADDLE_X = 72
BREAKOUT_BALL_X, BREAKOUT_BALL_Y = 99, 101  # ball_y is 0 until the ball is launched
BREAKOUT_BALL_GONE_Y = 185  # from here on a missed ball is below the paddle and no longer drawn
BREAKOUT_SCORE_LOW, BREAKOUT_SCORE_HIGH = 77, 76  # ALE Breakout.cpp: BCD, 77 = tens/units, 76 = hundreds
BREAKOUT_LIVES = 57  # ALE Breakout.cpp

BOXING_PLAYER_X, BOXING_PLAYER_Y, BOXING_ENEMY_X, BOXING_ENEMY_Y = 32, 34, 33, 35
BOXING_PLAYER_SCORE, BOXING_ENEMY_SCORE = 18, 19  # ALE Boxing.cpp: BCD, 0xC0 is a knock-out (100)
BOXING_MINUTES, BOXING_SECONDS = 16, 17  # ALE Boxing.cpp: minutes in the high nibble, seconds BCD

FREEWAY_CHICKEN_Y = 14  # grows as the chicken walks up the screen
FREEWAY_SCORE = 103  # ALE Freeway.cpp: BCD
FREEWAY_CAR_X = 108  # 108..117: one car per lane, lane 0 (RAM 108) at the bottom, lane 9 at the top

# The AtariARI benchmark's own variables (Anand et al. 2019, atariari/benchmark/ram_annotations.py at
# mila-iqia/atari-representation-learning), copied as published so its probe numbers compare with the paper's:
# a multi-byte variable is one variable per byte, named <name>_<i>, as AtariARI splits them. They differ from
# the decoded objects above where AtariARI kept raw bytes (Breakout's score at 84, ALE reads 76-77) or bytes
# that do not move in ALE v5 (Pong's paddle x, 45 and 46; the low-entropy filter drops those).
ATARIARI_RAM: dict[str, dict[str, int]] = {
    "pong": {"player_y": 51, "player_x": 46, "enemy_y": 50, "enemy_x": 45, "ball_x": 49, "ball_y": 54,
             "enemy_score": 13, "player_score": 14},
    "breakout": {"ball_x": 99, "ball_y": 101, "player_x": 72, "blocks_hit_count": 77, "score": 84,
                 **{f"block_bit_map_{i}": i for i in range(30)}},
    "boxing": {"player_x": 32, "player_y": 34, "enemy_x": 33, "enemy_y": 35, "enemy_score": 19, "clock": 17,
               "player_score": 18},
    "freeway": {"player_y": 14, "score": 103, **{f"enemy_car_x_{i}": 108 + i for i in range(10)}},
}

# ---------------------------------------------------------------------------------------------------


def _bcd(byte: int) -> int:
    return (byte >> 4) * 10 + (byte & 0x0F)


def _toward(position: float, target: float, deadzone: float) -> int:
    """-1, 0 or +1: the direction that brings `position` to within `deadzone` of `target`."""
    if target > position + deadzone:
        return 1
    if target < position - deadzone:
        return -1
    return 0


def _bounce(position: float, low: float, high: float) -> float:
    """Fold a straight-line extrapolation back into [low, high], as a ball bouncing between two walls."""
    span = high - low
    offset = (position - low) % (2 * span)
    return low + span - abs(offset - span)


def _intercept(
    ball: tuple[float, float], previous: tuple[float, float] | None, axis: int, line: float, low: float, high: float
) -> float | None:
    """Where (on the other axis) the ball will cross `line` on `axis`, bouncing off walls at low/high.

    None when the ball is not heading for the line (or its motion is unknown)."""
    if previous is None:
        return None
    velocity = [ball[0] - previous[0], ball[1] - previous[1]]
    if (line - ball[axis]) * velocity[axis] <= 0:  # standing still or moving away
        return None
    steps = (line - ball[axis]) / velocity[axis]
    other = 1 - axis
    return _bounce(ball[other] + velocity[other] * steps, low, high)


def _checked_ram(ram: np.ndarray) -> list[int]:
    if not isinstance(ram, np.ndarray) or ram.dtype != np.uint8 or ram.shape != (128,):
        got = f"{type(ram).__name__} {getattr(ram, 'dtype', '')} {getattr(ram, 'shape', '')}".strip()
        raise InputError(
            f"annotate() needs the Atari RAM as a uint8 array of shape (128,), got {got}; "
            "pass env.unwrapped.ale.getRAM()"
        )
    return ram.tolist()  # Python ints: no uint8 wrap-around below, and objects stay JSON-serializable


class Annotator:
    """Decodes one game's RAM into objects, advice and a heuristic action. One per episode stream.

    A subclass sets `game`, `moves` (advice phrase -> action meaning) and implements `decode` and
    `decide`; `reset` clears what `decide` remembers between frames."""

    game: str
    moves: dict[str, str]

    def __init__(self, action_meanings: list[str]):
        missing = sorted(set(self.moves.values()) - set(action_meanings))
        if missing:
            raise InputError(
                f"{self.game} annotations need the actions {missing}, which are not in the env's action "
                f"meanings {list(action_meanings)}; pass env.unwrapped.get_action_meanings() of a {self.game} env"
            )
        self._action_index = {meaning: action_meanings.index(meaning) for meaning in self.moves.values()}
        self.reset()

    def reset(self) -> None:
        """Forget the previous frame: call at every episode start."""

    def annotate(self, ram: np.ndarray) -> Annotation:
        objects = self.decode(_checked_ram(ram))
        phrase = self.decide(objects)
        return Annotation(
            objects=objects,
            advice=advice_sentence(self.game, self.score_text(objects), phrase),
            heuristic_action=self._action_index[self.moves[phrase]],
            description=self.describe(objects),
        )

    def decode(self, ram: list[int]) -> dict[str, int | float]:
        raise NotImplementedError

    def describe(self, objects: dict[str, int | float]) -> str:
        """Where things are, in grid cells, and the score: see the module docstring."""
        raise NotImplementedError

    def decide(self, objects: dict[str, int | float]) -> str:
        """The advice phrase of the move to make; `moves` maps it to the action."""
        raise NotImplementedError

    def score_text(self, objects: dict[str, int | float]) -> str:
        return str(objects["score"])


class PongAnnotator(Annotator):
    """The agent is the right (green) paddle; joystick RIGHT moves it up, LEFT down."""

    game = "pong"
    up, down, stay = ADVICE_PHRASES["pong"]
    moves = {up: "RIGHT", down: "LEFT", stay: "NOOP"}
    BALL_Y_RANGE = (36.0, 192.0)  # ball centre between the top and bottom walls
    PADDLE_FACE_X = 139.0  # ball centre x when it touches the agent's paddle

    def reset(self) -> None:
        self._previous_ball: tuple[float, float] | None = None
        self._previous_player_y: float | None = None

    def decode(self, ram: list[int]) -> dict[str, int | float]:
        in_play = ram[PONG_BALL_Y] != 0
        return {
            "player_x": PONG_PLAYER_X,
            "player_y": float(ram[PONG_PLAYER_Y] - 6),
            "enemy_x": PONG_ENEMY_X,
            "enemy_y": float(ram[PONG_ENEMY_Y] - 7.5),
            "ball_x": float(ram[PONG_BALL_X] - 48.5) if in_play else -1.0,
            "ball_y": float(ram[PONG_BALL_Y] - 12.5) if in_play else -1.0,
            "ball_in_play": int(in_play),
            "player_score": int(ram[PONG_PLAYER_SCORE]),
            "enemy_score": int(ram[PONG_ENEMY_SCORE]),
        }

    def describe(self, objects: dict[str, int | float]) -> str:
        player_y = objects["player_y"]
        if objects["ball_in_play"]:
            ball_y = objects["ball_y"]
            side = "above" if ball_y < player_y - 8 else "below" if ball_y > player_y + 8 else "level with"
            ball = f"the ball is at column {column(objects['ball_x'])} row {row(ball_y)}, {side} the right paddle"
        else:
            ball = "there is no ball"
        return (f"{ball}, the right paddle is at row {row(player_y)}, the left paddle is at row "
                f"{row(objects['enemy_y'])}, the score is {self.score_text(objects)}")

    def decide(self, objects: dict[str, int | float]) -> str:
        if not objects["ball_in_play"]:
            self._previous_ball = None
            target = sum(self.BALL_Y_RANGE) / 2  # wait for the serve in the middle
        else:
            ball = (objects["ball_x"], objects["ball_y"])
            target = _intercept(ball, self._previous_ball, 0, self.PADDLE_FACE_X, *self.BALL_Y_RANGE)
            self._previous_ball = ball
            if target is None:
                target = ball[1]  # ball going away: shadow it
        # The paddle has momentum (it moves up to ~20 px per step): steer where it will be next step,
        # and stay while the ball would meet it within half its height (8 px).
        player_y = objects["player_y"]
        velocity = 0.0 if self._previous_player_y is None else player_y - self._previous_player_y
        self._previous_player_y = player_y
        direction = _toward(player_y + velocity, target, deadzone=8)  # +1 is down the screen
        return {1: self.down, -1: self.up, 0: self.stay}[direction]

    def score_text(self, objects: dict[str, int | float]) -> str:
        return f"{objects['enemy_score']}-{objects['player_score']}"  # as on screen: left paddle first


class BreakoutAnnotator(Annotator):
    """Launch the ball when there is none, then get the paddle under where the ball will come down."""

    game = "breakout"
    left, right, stay, fire = ADVICE_PHRASES["breakout"]
    moves = {left: "LEFT", right: "RIGHT", stay: "NOOP", fire: "FIRE"}
    BALL_X_RANGE = (9.0, 151.0)  # ball centre between the side walls
    PADDLE_TOP_Y = 187.0  # ball centre y when it touches the paddle

    def reset(self) -> None:
        self._previous_ball: tuple[float, float] | None = None

    def decode(self, ram: list[int]) -> dict[str, int | float]:
        in_play = 0 < ram[BREAKOUT_BALL_Y] < BREAKOUT_BALL_GONE_Y
        return {
            "player_x": float(ram[BREAKOUT_PADDLE_X] - 39.5),
            "ball_x": float(ram[BREAKOUT_BALL_X] - 48.5) if in_play else -1.0,
            "ball_y": float(ram[BREAKOUT_BALL_Y] + 10.5) if in_play else -1.0,
            "ball_in_play": int(in_play),
            "score": _bcd(ram[BREAKOUT_SCORE_LOW]) + 100 * (ram[BREAKOUT_SCORE_HIGH] & 0x0F),
            "lives": int(ram[BREAKOUT_LIVES]),
        }

    def describe(self, objects: dict[str, int | float]) -> str:
        paddle_x = objects["player_x"]
        if objects["ball_in_play"]:
            ball_x = objects["ball_x"]
            side = "left of" if ball_x < paddle_x - 8 else "right of" if ball_x > paddle_x + 8 else "above"
            ball = f"the ball is at column {column(ball_x)} row {row(objects['ball_y'])}, {side} the paddle"
        else:
            ball = "there is no ball"
        return (f"{ball}, the paddle is at column {column(paddle_x)}, {objects['lives']} lives left, "
                f"the score is {objects['score']}")

    def decide(self, objects: dict[str, int | float]) -> str:
        if not objects["ball_in_play"]:
            self._previous_ball = None
            return self.fire
        ball = (objects["ball_x"], objects["ball_y"])
        target = _intercept(ball, self._previous_ball, 1, self.PADDLE_TOP_Y, *self.BALL_X_RANGE)
        self._previous_ball = ball
        if target is None:
            target = ball[0]  # ball rising: stay under it
        direction = _toward(objects["player_x"], target, deadzone=3)
        return {1: self.right, -1: self.left, 0: self.stay}[direction]


class BoxingAnnotator(Annotator):
    """The agent is the white boxer: line up with the black one, close in to arm's length, punch."""

    game = "boxing"
    up, down, left, right, punch = ADVICE_PHRASES["boxing"]
    moves = {up: "UP", down: "DOWN", left: "LEFT", right: "RIGHT", punch: "FIRE"}
    # Seen from above, a boxer's gloves are at the top and bottom of its sprite: punches land from beside
    # the opponent, shifted up or down by about a glove's offset (measured from where rewards came).
    PUNCH_DX = 14.0
    PUNCH_DY = 8.0

    def decode(self, ram: list[int]) -> dict[str, int | float]:
        return {
            "player_x": float(ram[BOXING_PLAYER_X] + 11.5),
            "player_y": float(ram[BOXING_PLAYER_Y] + 61),
            "enemy_x": float(ram[BOXING_ENEMY_X] + 9.5),  # the black sprite is drawn 2 px further left
            "enemy_y": float(ram[BOXING_ENEMY_Y] + 60),
            "player_score": _boxing_score(ram[BOXING_PLAYER_SCORE]),
            "enemy_score": _boxing_score(ram[BOXING_ENEMY_SCORE]),
            "clock_seconds": 60 * (ram[BOXING_MINUTES] >> 4) + _bcd(ram[BOXING_SECONDS]),
        }

    def describe(self, objects: dict[str, int | float]) -> str:
        minutes, seconds = divmod(int(objects["clock_seconds"]), 60)
        return (f"the white boxer is at column {column(objects['player_x'])} row {row(objects['player_y'])}, "
                f"the black boxer is at column {column(objects['enemy_x'])} row {row(objects['enemy_y'])}, "
                f"the score is {self.score_text(objects)}, the clock shows {minutes}:{seconds:02d}")

    def decide(self, objects: dict[str, int | float]) -> str:
        dy = objects["player_y"] - objects["enemy_y"]
        target_y = objects["enemy_y"] + (self.PUNCH_DY if dy >= 0 else -self.PUNCH_DY)  # the nearer glove line
        vertical = _toward(objects["player_y"], target_y, deadzone=3)
        if vertical:
            return self.down if vertical > 0 else self.up
        side = 1 if objects["player_x"] >= objects["enemy_x"] else -1  # stay on the side we are on
        horizontal = _toward(objects["player_x"], objects["enemy_x"] + side * self.PUNCH_DX, deadzone=3)
        if horizontal:
            return self.right if horizontal > 0 else self.left
        return self.punch

    def score_text(self, objects: dict[str, int | float]) -> str:
        return f"{objects['player_score']}-{objects['enemy_score']}"  # as on screen: white first


def _boxing_score(byte: int) -> int:
    return 100 if byte == 0xC0 else _bcd(byte)


class FreewayAnnotator(Annotator):
    """The agent is the left chicken; it walks up through ten lanes of traffic."""

    game = "freeway"
    up, wait = ADVICE_PHRASES["freeway"]
    moves = {up: "UP", wait: "NOOP"}
    CHICKEN_X = 47.5  # centre; the chicken only moves vertically
    CHICKEN_TOP = 4.0  # from its centre
    LANE_HEIGHT = 16.0
    BOTTOM_LANE_EDGE = 183.0  # bottom edge of lane 0; lane k is LANE_HEIGHT * k higher
    # Pixels per env step at frameskip 4 (measured): lanes 0-4 drive right, 5-9 left, fastest in the middle.
    LANE_SPEED = (0.8, 1.0, 1.33, 2.0, 4.0, -4.0, -2.0, -1.33, -1.0, -0.8)
    CROSSING_STEPS = 6  # env steps the chicken needs to clear a lane

    def decode(self, ram: list[int]) -> dict[str, int | float]:
        objects: dict[str, int | float] = {"player_y": float(196.5 - ram[FREEWAY_CHICKEN_Y])}
        for lane in range(10):
            objects[f"car{lane}_x"] = (ram[FREEWAY_CAR_X + lane] + 0.5) % 160  # cars wrap at the screen edge
        objects["score"] = _bcd(ram[FREEWAY_SCORE])
        return objects

    def describe(self, objects: dict[str, int | float]) -> str:
        cars = " ".join(str(column(objects[f"car{lane}_x"])) for lane in range(10))
        return (f"the chicken is at row {row(objects['player_y'])}, the cars from the bottom lane up are at "
                f"columns {cars}, the score is {objects['score']}")

    def decide(self, objects: dict[str, int | float]) -> str:
        # The lane the chicken's head enters next: the lowest one whose bottom edge is above it.
        head = objects["player_y"] - self.CHICKEN_TOP
        next_lane = max(0, math.ceil((self.BOTTOM_LANE_EDGE - head) / self.LANE_HEIGHT))
        if next_lane < 10 and self._car_coming(next_lane, objects[f"car{next_lane}_x"]):
            return self.wait
        return self.up

    def _car_coming(self, lane: int, car_x: float) -> bool:
        """The lane's car reaches the chicken's column before the chicken could cross the lane."""
        speed = self.LANE_SPEED[lane]
        distance = self.CHICKEN_X - car_x if speed > 0 else car_x - self.CHICKEN_X  # > 0: still to come
        return -8 <= distance <= 8 + abs(speed) * self.CROSSING_STEPS  # 8: half a car plus half a chicken


_ANNOTATORS: dict[str, type[Annotator]] = {
    cls.game: cls for cls in (PongAnnotator, BreakoutAnnotator, BoxingAnnotator, FreewayAnnotator)
}


@functools.lru_cache(maxsize=None)
def _describer(game: str) -> Annotator:
    """An annotator used only for its stateless `describe` (its own moves stand in for an env's actions)."""
    cls = _ANNOTATORS[game]
    return cls(list(cls.moves.values()))


TEXT_KINDS = ("advice", "describe", "both")


def answer_text(game: str, objects: dict[str, int | float], advice: str, kind: str) -> str:
    """The text a VLM learns to say about a frame: its advice sentence, its description, or both.

    'both' puts the description first, so the advised move is generated after (and conditioned on) where
    things are."""
    if kind not in TEXT_KINDS:
        raise InputError(f"text kind must be one of {', '.join(TEXT_KINDS)}; got {kind!r}")
    if kind == "advice":
        return advice
    description = _describer(game_name(game)).describe(objects)
    return description if kind == "describe" else f"{description}; {advice}"


def advised_phrase(game: str, text: str) -> str | None:
    """The advice phrase of `game` that `text` ends its advice with (None if it names no move)."""
    found = [phrase for phrase in ADVICE_PHRASES[game_name(game)] if phrase in text]
    return max(found, key=text.rindex) if found else None  # the last one named, if a model rambles


def get_annotator(game: str, action_meanings: list[str]) -> Annotator:
    """The annotator of `game` ('pong' or 'ALE/Pong-v5'); actions are looked up by meaning, so the
    minimal and the full action set both work."""
    name = game_name(game)
    if name not in _ANNOTATORS:
        raise UnsupportedGameError(
            f"no RAM annotations for game {game!r}; annotated games are {', '.join(ANNOTATED_GAMES)} "
            "(use the policy 'random' to record other games without annotations)"
        )
    return _ANNOTATORS[name](list(action_meanings))
