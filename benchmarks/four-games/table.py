"""Issue 25's goals per game from the four committed reports (`<game>/metrics.json`): python table.py"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
POSITIONS = {"pong": ["ball_x", "ball_y", "player_y", "enemy_y"], "breakout": ["ball_x", "ball_y", "player_x"],
             "boxing": ["player_x", "player_y", "enemy_x", "enemy_y"], "freeway": ["player_y"]}
BALL_VELOCITY = {"pong": ["ball_dx", "ball_dy"], "breakout": ["ball_dx", "ball_dy"]}
ST_DIM = {"pong": 0.81, "breakout": 0.88, "boxing": 0.58, "freeway": 0.81}  # Anand et al. 2019, mean F1


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


print("| game | latent state mean (>= 0.9) | latent positions (each >= 0.8) | latent ball velocity (>= 0.7) "
      "| AtariARI F1 mean, latent / VLM read (>= ST-DIM) | frames |")
print("|---|---|---|---|---|---|")
for game, positions in POSITIONS.items():
    metrics = json.loads((HERE / game / "metrics.json").read_text())
    latent = metrics["probe_r2"]["latent"]
    f1 = metrics.get("atariari_f1_mean", {})
    velocity = ", ".join(f"{k} {cell(latent.get(k))}" for k in BALL_VELOCITY.get(game, [])) or "(no ball)"
    print(f"| {game} | {cell(metrics['probe_r2_mean']['latent'])} "
          f"| {', '.join(f'{k} {cell(latent.get(k))}' for k in positions)} | {velocity} "
          f"| {cell(f1.get('latent'))} / {cell(f1.get('hidden'))} (ST-DIM {ST_DIM[game]:.2f}) | {metrics['frames']} |")
