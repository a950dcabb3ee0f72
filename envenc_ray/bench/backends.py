"""`envenc bench encoder --backend vllm`: the transformers and vLLM backends of one VLM, side by side, one run.

Both read the config's VLM at its layer and pooling (`vlm.final_norm` as vLLM needs it) on the same real ALE
frames, in this process: TruncatedVLM (tensor preprocessing, one forward per batch) and vLLM's pooling
runner (its HF processor on PIL images, its scheduler). For each batch size the two alternate in rounds, so
a shared machine's load drifts hit both alike; the JSON has frames/s and latency per backend and batch, the
ratio vllm/transformers, the load time of each (vLLM's CPU worker is bound to as many cores as TruncatedVLM
has torch threads: `VLLM_CPU_OMP_THREADS_BIND`, unless set), and how far their states are apart (same HF-processor
pixels: max abs difference; from uint8 frames: the lowest cosine similarity).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from envenc_ray.bench.common import machine_facts, phase, write_json
from envenc_ray.bench.encoder import bench_in_process, pooled
from envenc_ray.config import EnvEncConfig
from envenc_ray.envs.atari import random_rollout_frames
from envenc_ray.layout import RunLayout, shared_vllm_dir
from envenc_ray.vlm.paths import resolve_model_path

BATCHES = (1, 8, 32)


def bench_backends(config: EnvEncConfig, json_out: str | None = None, *, seconds: float = 4.0, num_frames: int = 256,
                   batches: tuple[int, ...] = BATCHES, rounds: int = 3, command: str | None = None) -> dict[str, Any]:
    """Time both backends; print a table, write JSON (default <run>/bench/encoder-vllm.json), return it."""
    import torch
    import vllm

    from envenc_ray.serve.replica import replica_threads
    from envenc_ray.vlm.backbone import TruncatedVLM
    from envenc_ray.vlm.vllm_backend import VLLMBackend, vllm_checkpoint

    started = time.perf_counter()
    threads = replica_threads(config)
    torch.set_num_threads(threads)
    layout = RunLayout.of(config)
    model_path = resolve_model_path(config)
    results: dict[str, Any] = {
        "command": command or " ".join(sys.argv),
        "settings": {"vlm": config.vlm.model_dump(mode="json"), "batches": list(batches), "rounds": rounds,
                     "seconds_per_backend_and_batch": seconds, "torch_threads": threads},
        "machine": machine_facts() | {"vllm": vllm.__version__},
    }
    frames = random_rollout_frames(config.env, config.experiment.seed, num_frames)

    phase("load: TruncatedVLM (transformers) and the vLLM pooling engine")
    t = time.perf_counter()
    reference = TruncatedVLM.from_config(config.vlm, model_path=model_path, game=layout.game)
    load_transformers = time.perf_counter() - t
    # the same core count for both: vLLM's CPU worker binds its OpenMP threads to these cores
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    results["settings"]["vllm_cpu_omp_threads_bind"] = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    t = time.perf_counter()
    checkpoint = vllm_checkpoint(config.vlm, model_path, shared_vllm_dir(config))
    engine = VLLMBackend.from_config(config.vlm, model_path, checkpoint, game=layout.game)
    load_vllm = time.perf_counter() - t
    results["load_s"] = {"transformers": load_transformers, "vllm": load_vllm}
    results["model"] = {"model_path": model_path, "vllm_checkpoint": str(checkpoint), "layers_kept": reference.num_layers,
                        "layers_total": reference.total_layers, "tokens_per_frame": reference.sequence_length}
    results["parity"] = parity(reference, engine, frames[:16])

    # bench_in_process times `.encode` on batches of distinct frames: here the states, without an encoder
    backends = {"transformers": SimpleNamespace(encode=reference.embed), "vllm": SimpleNamespace(encode=engine.embed)}
    results["throughput"] = {}
    for size in batches:
        phase(f"batch {size}: {rounds} rounds of {seconds / rounds:.1f} s per backend, alternating")
        runs: dict[str, list] = {name: [] for name in backends}
        for _ in range(rounds):
            for name, backend in backends.items():
                runs[name].append(bench_in_process(backend, frames, size, seconds / rounds))
        row = {name: pooled(parts) for name, parts in runs.items()}
        row["vllm_over_transformers"] = row["vllm"]["frames_per_s"] / row["transformers"]["frames_per_s"]
        results["throughput"][str(size)] = row
    results["wall_s"] = time.perf_counter() - started

    json_path = Path(json_out) if json_out else layout.bench / "encoder-vllm.json"
    write_json(results, json_path)
    print_table(results, json_path)
    return results


def parity(reference, engine, frames: np.ndarray) -> dict[str, float]:
    """How far the two backends' states are apart on the same frames."""
    import torch

    text = reference.family.prompt_text(reference.processor, reference.prompt)
    pixel_values = reference.processor(images=list(frames), text=[text] * len(frames), return_tensors="pt")[
        "pixel_values"]
    same_pixels = reference.embed_vision_inputs({"pixel_values": pixel_values})
    ours = engine.embed(frames)
    from_frames = reference.embed(frames)
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(1), from_frames.flatten(1))
    return {"max_abs_diff_same_pixels": float((ours - same_pixels).abs().max()),
            "largest_state_entry": float(same_pixels.abs().max()),
            "min_cosine_from_uint8_frames": float(cosine.min())}


def print_table(results: dict[str, Any], json_path: Path) -> None:
    print(f"\n{'batch':>5s} {'transformers f/s':>17s} {'vLLM f/s':>9s} {'vLLM/transformers':>18s} "
          f"{'p50 ms (t / v)':>16s}")
    for size, row in results["throughput"].items():
        print(f"{size:>5s} {row['transformers']['frames_per_s']:17.0f} {row['vllm']['frames_per_s']:9.0f} "
              f"{row['vllm_over_transformers']:18.2f} {row['transformers']['p50_ms']:7.1f} / {row['vllm']['p50_ms']:.1f}")
    p, load = results["parity"], results["load_s"]
    print(f"parity: max |vLLM - transformers| {p['max_abs_diff_same_pixels']:.1e} on the same pixels (largest entry "
          f"{p['largest_state_entry']:.1f}); cosine from uint8 frames >= {p['min_cosine_from_uint8_frames']:.5f}")
    print(f"load: transformers {load['transformers']:.1f} s, vLLM {load['vllm']:.1f} s; bench {results['wall_s']:.0f} s; "
          f"results in {json_path}")
