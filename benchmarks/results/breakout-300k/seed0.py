"""Seed 0 of breakout-300k.yaml so far: each finished trial's training and greedy-evaluation curves, with the
reference policies' returns on the protocol's env settings (random, best constant action, RAM heuristic; 8 full
episodes, `rl/evaluate.reference_returns`). Reads seed-0/<arm>.json (a trial's result.json); writes seed0.png and
references.json beside this file.

    python benchmarks/results/breakout-300k/seed0.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from envenc_ray.config import load_config  # noqa: E402
from envenc_ray.rl.evaluate import reference_label, reference_returns  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def references() -> dict:
    """The protocol's common env settings, full-length evaluation episodes, as the experiment computes them."""
    common = yaml.safe_load((ROOT / "configs/experiments/breakout-300k.yaml").read_text())["common"]
    overrides = [f"{key}={'null' if value is None else value}" for key, value in common.items() if key.startswith("env.")]
    config = load_config([ROOT / "configs/pong-tiny.yaml"],
                         [*overrides, "rl.eval_episodes=8", "rl.eval_max_steps=null", "experiment.run_root=/tmp/breakout-refs"])
    return reference_returns(config)


def main() -> None:
    reference = references()
    (HERE / "references.json").write_text(json.dumps(reference, indent=1))
    figure, (train_axis, eval_axis) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for path in sorted((HERE / "seed-0").glob("*.json")):
        trial = json.loads(path.read_text())
        points = [(steps, value) for steps, value in trial["curve"] if value is not None]
        train_axis.plot(*zip(*points), label=f"{trial['arm']} (training episodes)")
        evals = [(e["env_steps"], e["return_mean"]) for e in trial["evals"]]
        eval_axis.plot(*zip(*evals), marker="o", label=f"{trial['arm']} (greedy, 8 episodes)")
    for axis in (train_axis, eval_axis):
        for policy, color, style in (("random", "grey", ":"), ("constant", "tab:purple", "-."),
                                     ("heuristic", "black", "--")):
            axis.axhline(reference[policy]["return_mean"], color=color, linestyle=style,
                         label=f"{reference_label(policy, reference)} ({reference[policy]['return_mean']:.2f})")
        axis.set(xlabel="agent steps (frameskip 4)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    train_axis.set(title="Breakout, seed 0: training return", ylabel="episode return")
    eval_axis.set(title="greedy evaluation return")
    figure.tight_layout()
    figure.savefig(HERE / "seed0.png", dpi=110)
    print(f"wrote {HERE / 'seed0.png'} and references.json: " + ", ".join(
        f"{reference_label(p, reference)} {reference[p]['return_mean']:.2f}" for p in ("random", "constant", "heuristic")))


if __name__ == "__main__":
    main()
