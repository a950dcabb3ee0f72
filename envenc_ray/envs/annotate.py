"""Game-state annotations from the Atari RAM: objects, scores, advice sentences, heuristic actions.

RAM addresses come from the AtariARI annotations (see ../shared/atari-ram-facts.md). Advice sentences
follow the seed's style: "a game of pong, the score is 2-0, the right player should move down".
"""

from __future__ import annotations

import random

ANNOTATED_GAMES = ("pong", "breakout", "boxing", "freeway")

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
