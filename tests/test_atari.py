"""envs/atari.py: ALE v5 envs and the FIRE press games like Breakout wait for."""

from envenc_ray.envs.atari import FireOnLifeStart, make_env

NOOP = 0


def play_noop(env, steps: int) -> tuple[list[int], bool]:
    """Lives seen over `steps` NOOP steps, and whether the episode ended."""
    _, info = env.reset(seed=0)
    lives = [info["lives"]]
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(NOOP)
        lives.append(info["lives"])
        if terminated or truncated:
            return lives, True
    return lives, False


def test_fire_on_life_start_serves_every_life_and_only_where_fire_exists():
    # a policy that never presses FIRE: Breakout never serves, so no life is ever lost
    lives, ended = play_noop(make_env("breakout", repeat_action_probability=0.0), 2000)
    assert set(lives) == {5} and not ended
    # pressed at reset and after each lost life, the same policy loses all five lives to served balls
    env = make_env("breakout", repeat_action_probability=0.0, fire_on_life_start=True)
    assert isinstance(env, FireOnLifeStart)
    lives, ended = play_noop(env, 2000)
    assert ended and lives[-1] == 0 and sorted(set(lives), reverse=True) == [5, 4, 3, 2, 1, 0]
    # Freeway has no FIRE: the setting leaves its env as it is
    assert not isinstance(make_env("freeway", fire_on_life_start=True), FireOnLifeStart)


def test_reference_returns_name_the_best_constant_action(debug_config):
    """The constant reference plays every action of the env's set alone and keeps the best: its returns are those
    of that action played again, and no action's mean beats it. On Breakout, with FIRE pressed at each life's
    start, LEFT alone scores points without reading the screen (what a degenerate greedy agent gets)."""
    from envenc_ray.rl.evaluate import reference_label, reference_returns

    config = debug_config("env.game=breakout", "env.fire_on_life_start=true", "rl.eval_max_steps=600")
    reference = reference_returns(config, episodes=2)
    constant = reference["constant"]
    meanings = make_env("breakout").unwrapped.get_action_meanings()
    assert set(constant["per_action"]) == set(meanings)
    assert constant["return_mean"] == max(constant["per_action"].values()) > 0
    assert reference_label("constant", reference) == f"constant {constant['action']}"
    env = make_env("breakout", fire_on_life_start=True)  # the same action, seeds and cap, played again
    replayed = []
    for episode in range(2):
        env.reset(seed=config.experiment.seed + episode)
        total = 0.0
        for _ in range(600):
            _, reward, terminated, truncated, _ = env.step(meanings.index(constant["action"]))
            total += reward
            if terminated or truncated:
                break
        replayed.append(total)
    assert replayed == constant["returns"]
    assert {"random", "heuristic"} <= set(reference)
