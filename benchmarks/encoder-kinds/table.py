"""Print the README's table from the metrics.json copies beside this file (run.sh makes them).

Usage: python benchmarks/encoder-kinds/table.py   (rows in run.sh's order; the hidden state's row from the first)
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ("temporal-w4-d64", "temporal-w2-d64", "temporal-w4-d128", "temporal-w4-d64-e60", "mlp-d64", "vq-d64", "linear-d64", "linear-d128",
         "linear-d128-e60")
COLUMNS = ("ball_x", "ball_y", "player_y", "enemy_y", "ball_dx", "ball_dy")


def row(name: str, dim: int | str, r2: dict, state_mean: float, velocity_mean: float, seconds: str) -> str:
    cells = [f"{r2[c]:.2f}" for c in COLUMNS] + [f"{state_mean:.2f}", f"{velocity_mean:.2f}"]
    return f"| {name} | {dim} | {' | '.join(cells)} | {seconds} |"


print("| variant | latent dim | " + " | ".join(COLUMNS) + " | state mean | velocity mean | train-encoder seconds |")
print("|---" * (len(COLUMNS) + 5) + "|")
runs = [(name, json.loads((HERE / f"{name}.json").read_text())) for name in ORDER if (HERE / f"{name}.json").exists()]
baseline = runs[0][1]["baseline"]
print(row("hidden state (spatial read-out, no encoder)", runs[0][1]["hidden_size"], baseline["probe_r2_hidden"],
          baseline["probe_r2_hidden_mean"], baseline["probe_r2_hidden_velocity_mean"], "-"))
for name, metrics in runs:
    best = next(e for e in metrics["epochs"] if e["epoch"] == metrics["best_epoch"])
    seconds = sum(metrics["timings"].values())  # read + train + export + AtariARI probes
    print(row(name, metrics["latent_dim"], best["probe_r2_latent"], best["probe_r2_latent_mean"],
              best["probe_r2_latent_velocity_mean"], f"{seconds:.0f}"))
