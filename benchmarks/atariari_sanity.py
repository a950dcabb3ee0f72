"""AtariARI sanity check (issue 25): weighted F1 per RAM byte of raw grey pixels beside the run's hidden states and
encoder latents, on the rows train-encoder probes (its held-out episodes, its probe subsample).

Raw pixels hold every position exactly, so their F1 on the position bytes should sit well above AtariARI's random
CNN; a number below it would point at the probe, not at the representation. After collect, embed, train-encoder:

    python benchmarks/atariari_sanity.py configs/pong-tiny.yaml --set experiment.run_root=$PWD/runs ...
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from envenc_ray.config import load_config
from envenc_ray.data.collect import read_frame_shape
from envenc_ray.data.probes import split_by_episode
from envenc_ray.data.schema import frames_to_array, read_table
from envenc_ray.encoder.metrics import atariari_f1, mean_or_none
from envenc_ray.encoder.models import build_windows, effective_window
from envenc_ray.encoder.train import atariari_probes, check_shards, probe_subsample, read_hidden, read_ram
from envenc_ray.envs.annotate import ATARIARI_RAM
from envenc_ray.layout import RunLayout


def grey_pixels(frames_dir) -> np.ndarray:
    """(N, 105 * 80) grey frames averaged over 2 x 2 pixels, sorted by (episode, step) as `read_ram` checks the
    hidden rows are."""
    table = read_table(frames_dir, "frames (envenc collect)", ("episode_id", "step", "frame"), only_required=True)
    order = np.lexsort((table["step"].to_numpy(), table["episode_id"].to_numpy()))
    height, width, _ = read_frame_shape(frames_dir)
    grey = frames_to_array(table["frame"], (height, width, 3))[order].astype(np.float32).mean(-1)
    return grey.reshape(len(grey), height // 2, 2, width // 2, 2).mean((2, 4)).reshape(len(grey), -1)


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.configs, args.set)
    layout = RunLayout.of(config)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)  # read_hidden reads through Ray Data
    shards, hidden_shape, _ = check_shards(layout.hidden)
    data = read_hidden(shards, hidden_shape)
    train_rows, val_rows = split_by_episode(data.episode_ids, config.encoder.val_fraction, config.experiment.seed)
    probe_rows = probe_subsample(train_rows, hidden_shape, config.experiment.seed)
    print(f"{len(data.hidden)} frames of {layout.game}: {len(probe_rows)} probe rows of "
          f"{len(np.unique(data.episode_ids[train_rows]))} episodes, {len(val_rows)} held-out rows of "
          f"{len(np.unique(data.episode_ids[val_rows]))} episodes")

    started = time.perf_counter()
    ram = read_ram(layout.frames, data.episode_ids, data.steps)  # also checks frames/ holds the hidden rows
    results = {"grey pixels 105x80": atariari_f1(grey_pixels(layout.frames), ram, ATARIARI_RAM[layout.game],
                                                 probe_rows, val_rows)}
    windows = build_windows(data.episode_ids, data.steps, effective_window(config.encoder))
    run = atariari_probes(config, data, windows, probe_rows, val_rows)
    results[f"hidden state ({config.vlm.model}, {config.vlm.pooling} pooling)"] = run["hidden"]
    results[f"{config.encoder.kind} encoder latent"] = run["latent"]
    for name, f1 in results.items():
        print(f"{name}: mean {mean_or_none(f1):.3f} | " + " ".join(f"{k} {v:.3f}" for k, v in f1.items()))
    print(f"{time.perf_counter() - started:.0f} s")

if __name__ == "__main__":
    main()
