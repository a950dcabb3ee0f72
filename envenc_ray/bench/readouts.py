"""`envenc bench encoder --readouts`: what each read-out of the built-in tiny VLM keeps of the game, and its cost.

For each read-out (the tiny VLM built at a patch size, `vlm.layer`, `vlm.pooling`) on the run's collected frames
(`envenc collect`, annotated): ms/frame of `TruncatedVLM.embed` at batch 32 with the config's torch threads, timed
in interleaved rounds so that every read-out sees the same load of a shared machine, and the held-out ridge-probe
R^2 of every annotated variable (train-encoder's episode split and probe rows: the same rows for every read-out).
The first row is the config's own read-out (with its vlm.tiny_patch_size): the baseline. Every read-out uses
the tiny VLM's random weights (`vlm.tiny_seed`), also for a config that finetunes it (stage2.method finetuned).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from envenc_ray.bench.common import machine_facts, phase, write_json
from envenc_ray.config import BUILTIN_TINY, EnvEncConfig
from envenc_ray.encoder.diagnostics import AnnotatedFrames
from envenc_ray.errors import ConfigError
from envenc_ray.layout import RunLayout
from envenc_ray.vlm.backbone import TruncatedVLM
from envenc_ray.vlm.tiny import MARKER_FILE, build_tiny_vlm

# (patch size, vlm.layer, vlm.pooling): layer 0 is the projected vision-tower output (no decoder layer runs)
READOUTS = (
    (16, 2, "image_mean"),
    (16, 0, "spatial"),
    (16, 1, "spatial"),
    (16, 2, "spatial"),
    (8, 0, "spatial"),
    (8, 1, "spatial"),
    (8, 2, "spatial"),
)
TIMING_BATCH = 32
TIMING_ROUNDS = 7


def bench_readouts(config: EnvEncConfig, json_out: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Time and probe the config's read-out and READOUTS on <run>/frames/; print the table, write the JSON."""
    if config.vlm.model != BUILTIN_TINY:
        raise ConfigError(f"--readouts compares read-outs of the built-in tiny VLM, but vlm.model is "
                          f"{config.vlm.model!r}; set vlm.model=builtin:tiny")
    started = time.perf_counter()
    layout = RunLayout.of(config)
    frames = AnnotatedFrames.of(config)
    options = [(config.vlm.tiny_patch_size, config.vlm.layer, config.vlm.pooling), *READOUTS]
    models = {patch: tiny_model(layout.bench / f"tiny-patch{patch}", config.vlm.tiny_seed, patch)
              for patch in sorted({patch for patch, _, _ in options})}
    vlms = [TruncatedVLM.from_config(config.vlm.model_copy(update={"layer": layer, "pooling": pooling}),
                                     model_path=models[patch], game=layout.game) for patch, layer, pooling in options]

    phase(f"time: {len(options)} read-outs, batch {TIMING_BATCH}, {TIMING_ROUNDS} interleaved rounds")
    batch = frames.frames(0, TIMING_BATCH)
    for vlm in vlms:
        vlm.embed(batch)  # warm-up
    samples: list[list[float]] = [[] for _ in vlms]
    for _ in range(TIMING_ROUNDS):
        for vlm, times in zip(vlms, samples):
            start = time.perf_counter()
            vlm.embed(batch)
            times.append((time.perf_counter() - start) * 1000 / TIMING_BATCH)

    rows = []
    for (patch, layer, pooling), vlm, times in zip(options, vlms, samples):
        name = f"patch {patch}, layer {vlm.layer}, {pooling}"
        phase(f"probe: {name}")
        features = frames.embed(vlm, config.embed.batch_size, name)
        rows.append({"name": name, "patch_size": patch, "layer": vlm.layer, "pooling": pooling,
                     "features": int(features.shape[1]), "image_tokens": vlm.num_image_tokens,
                     "ms_per_frame": statistics.median(times), "ms_per_frame_samples": times,
                     "probe_r2": frames.probe_r2(features, config)})
    baseline_ms = rows[0]["ms_per_frame"]
    for row in rows:
        row["cost_vs_baseline"] = row["ms_per_frame"] / baseline_ms
    results = {
        "command": command or " ".join(sys.argv),
        "settings": {"frames": frames.table.num_rows, "episodes": len(set(frames.episode_ids.tolist())),
                     "timing_batch": TIMING_BATCH, "timing_rounds": TIMING_ROUNDS,
                     "torch_threads": config.vlm.num_threads, "vlm": config.vlm.model_dump(mode="json"),
                     "baseline": rows[0]["name"]},
        "machine": machine_facts(),
        "readouts": rows,
        "wall_s": time.perf_counter() - started,
    }
    json_path = Path(json_out) if json_out else layout.bench / "readouts.json"
    write_json(results, json_path)
    print_table(rows, json_path)
    return results


def tiny_model(folder: Path, seed: int, patch_size: int) -> Path:
    """The tiny VLM at `patch_size` in `folder`, built on first use (the same weights for every read-out of it)."""
    if not (folder / MARKER_FILE).is_file():
        build_tiny_vlm(folder, seed=seed, patch_size=patch_size, measure=False, report=False)
    return folder


def print_table(rows: list[dict], json_path: Path) -> None:
    variables = sorted({key for row in rows for key in row["probe_r2"]})
    print(f"{'read-out':<32} {'ms/frame':>8} {'x base':>6}  " + " ".join(f"{v:>9}" for v in variables))
    for row in rows:
        r2 = " ".join(f"{row['probe_r2'].get(v, float('nan')):>9.3f}" for v in variables)
        print(f"{row['name']:<32} {row['ms_per_frame']:>8.2f} {row['cost_vs_baseline']:>6.2f}  {r2}")
    print(f"wrote {json_path}")
