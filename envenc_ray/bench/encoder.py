"""`envenc bench encoder`: what the EnvironmentEncoder costs, from the naive script to the Serve handle.

On one model (the config's VLM at its layer, plus the run's encoder) and real ALE frames, it measures
frames/s and latency of
  (a) naive:      the HF processor + the full VLM forward (LM head included), one frame at a time
  (b) in-process: EnvironmentEncoder.encode on batches of C*N frames (tensor preprocessing, truncated VLM)
  (c) serve:      C caller threads, each sending N frames per call through the Serve handle (EncoderClient,
                  temporal window state carried across calls as an EnvRunner would)
with the same torch thread count everywhere (the replica's), plus the fast-path variants (client-side
resize off, cache hits, bfloat16, torch.compile'd layers in process), a batch-size sweep (JSON + PNG), the FLOPs
per frame (FlopCounterMode) and the machine's measured matmul peak, so `achieved / peak` says how close to the
hardware the path runs and the op profile says what holds it back.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from envenc_ray.bench.common import bench_encoder_pair, machine_facts, model_and_encoder, phase, write_json
from envenc_ray.config import EnvEncConfig
from envenc_ray.envs.atari import random_rollout_frames
from envenc_ray.files import replaced_atomically
from envenc_ray.layout import RunLayout

logger = logging.getLogger(__name__)

BENCH_APP = "envenc-bench"
SWEEP_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def bench_encoder(config: EnvEncConfig, json_out: str | None = None, callers: int = 2, frames_per_call: int = 16,
                  *, seconds: float = 4.0, num_frames: int = 512, sweep: tuple[int, ...] = SWEEP_BATCHES,
                  serve_bf16: bool = True, plot_out: str | None = None, command: str | None = None
                  ) -> dict[str, Any]:
    """Run the benchmark, print a short table, write JSON (and the sweep PNG next to it); return the results.

    `seconds` is the measuring time of each timed phase (the whole run stays under ~2-3 minutes on
    2 cores with the defaults); `num_frames` distinct Pong frames are cycled through.
    """
    import torch

    from envenc_ray.serve.replica import replica_threads

    started = time.perf_counter()
    threads = replica_threads(config)
    torch.set_num_threads(threads)
    batch = callers * frames_per_call
    results: dict[str, Any] = {
        "command": command or " ".join(sys.argv),
        "settings": {"callers": callers, "frames_per_call": frames_per_call, "in_process_batch": batch,
                     "torch_threads": threads, "seconds_per_phase": seconds, "frames": num_frames,
                     "vlm": config.vlm.model_dump(mode="json"), "serve": config.serve.model_dump(mode="json")},
        "machine": machine_facts(),
    }
    frames = random_rollout_frames(config.env, config.experiment.seed, num_frames)
    unique = len({frame.tobytes() for frame in frames})
    results["frames"] = {"count": len(frames), "unique": unique, "duplicate_rate": 1 - unique / len(frames),
                         "shape": list(frames.shape[1:]), "game": config.env.game}

    pair, untrained = model_and_encoder(config)
    model_path, encoder_dir = pair.model_path, Path(pair.encoder_dir)
    results["model"] = {"model_path": model_path, "encoder_dir": str(encoder_dir), "untrained_encoder": untrained}
    encoder_fp32 = bench_encoder_pair(pair, "float32")
    vlm = encoder_fp32.vlm
    results["model"].update({"hidden_size": vlm.hidden_size, "layers_kept": vlm.num_layers,
                             "layers_total": vlm.total_layers, "tokens_per_frame": vlm.sequence_length,
                             "image_size": list(vlm.image_size), "latent_dim": encoder_fp32.latent_dim,
                             "window": encoder_fp32.window})

    phase("FLOPs and matmul peak")
    flops = count_flops(encoder_fp32, model_path, frames[0])
    results["flops_per_frame"] = flops
    results["peak"] = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16),
                       "threads": threads}

    phase("(a) naive: HF processor + full VLM forward, one frame at a time")
    results["naive"] = bench_naive(model_path, vlm, frames, seconds)

    phase(f"sweep: frames/s vs batch size {list(sweep)} (float32, bfloat16)")
    encoder_bf16 = bench_encoder_pair(pair, "bfloat16")
    results["sweep"] = {
        "batch_sizes": list(sweep),
        "float32": [bench_in_process(encoder_fp32, frames, size, min(seconds, 1.5))["frames_per_s"] for size in sweep],
        "bfloat16": [bench_in_process(encoder_bf16, frames, size, min(seconds, 1.5))["frames_per_s"] for size in sweep],
    }
    results["op_profile"] = op_profile(encoder_fp32, frames[:batch])
    results["bf16_accuracy"] = bf16_accuracy(encoder_fp32, encoder_bf16, frames[:batch])

    phase(f"in-process with torch.compile'd VLM layers (vlm.compile), batch {batch}: compile, then time")
    results["in_process_compiled"] = {}
    for dtype in ("float32", "bfloat16"):
        compiled = bench_encoder_pair(pair, dtype, compile=True)
        t = time.perf_counter()
        compiled.encode(frames[:batch])
        warm_up_s = time.perf_counter() - t
        results["in_process_compiled"][dtype] = bench_in_process(compiled, frames, batch, seconds) | {
            "compile_s": warm_up_s}
        del compiled

    # (b) and (c) alternate in rounds, so that both see the same load on a shared machine
    results["serve"], in_process = bench_serve(config, model_path, encoder_dir, frames, callers, frames_per_call,
                                               seconds, {"float32": encoder_fp32, "bfloat16": encoder_bf16}, serve_bf16)
    results["in_process"], results["in_process_bf16"] = in_process["float32"], in_process["bfloat16"]
    del encoder_bf16
    results["ratios"] = ratios(results)
    results["limits"] = limits(results)
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = os.getloadavg()

    json_path = Path(json_out) if json_out else RunLayout.of(config).bench / "encoder.json"
    png_path = Path(plot_out) if plot_out else json_path.with_suffix(".png")
    plot_sweep(results, png_path)
    results["plot"] = str(png_path)
    write_json(results, json_path)
    print_table(results, json_path, png_path)
    return results


# ------------------------------------------------------------------------------------------ counting


def count_flops(encoder, model_path: str, frame: np.ndarray) -> dict[str, float]:
    """FLOPs of one frame: our path (truncated VLM + encoder) and the naive one (full model + LM head)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def counted(fn) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            fn()
        return float(counter.get_total_flops())

    vlm_flops = counted(lambda: encoder.vlm.embed(frame[None]))
    hidden = encoder.hidden(frame[None])
    encoder_flops = counted(lambda: encoder.encode_hidden(hidden))
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    inputs = processor(images=frame, text=encoder.vlm.family.prompt_text(processor, encoder.vlm.prompt),
                       return_tensors="pt")
    naive_flops = counted(lambda: model(**inputs))
    return {"ours": vlm_flops + encoder_flops, "vlm": vlm_flops, "encoder": encoder_flops, "naive_full_model": naive_flops}


def matmul_peak(dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul at the current torch thread count: the practical compute ceiling."""
    import torch

    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def op_profile(encoder, frames: np.ndarray) -> dict[str, float]:
    """Share of in-process time per op family (matmul vs the rest): what bounds achieved / peak."""
    from torch.profiler import ProfilerActivity, profile

    encoder.encode(frames)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(2):
            encoder.encode(frames)
    families = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear_backward"),
                "attention": ("aten::_scaled_dot_product",),
                "conv (patch embedding)": ("aten::mkldnn_convolution", "aten::convolution"),
                "resize": ("aten::_upsample",)}
    shares = {name: 0.0 for name in families} | {"elementwise and other": 0.0}
    total = 0.0
    for event in profiler.key_averages():
        self_time = event.self_cpu_time_total
        total += self_time
        family = next((name for name, prefixes in families.items() if event.key.startswith(prefixes)), None)
        shares[family or "elementwise and other"] += self_time
    return {name: value / total for name, value in shares.items()} if total else shares


# ------------------------------------------------------------------------------------------ the three paths


def latency_stats(latencies: list[float], frames: int, wall: float) -> dict[str, Any]:
    values = np.array(latencies) * 1e3
    return {"frames_per_s": frames / wall, "p50_ms": float(np.percentile(values, 50)),
            "p99_ms": float(np.percentile(values, 99)), "calls": len(latencies), "frames": frames, "wall_s": wall,
            "_latencies": list(latencies)}


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Several measuring rounds as one: all frames over all wall time, percentiles over all calls."""
    latencies = [latency for measured in rounds for latency in measured["_latencies"]]
    out = latency_stats(latencies, sum(m["frames"] for m in rounds), sum(m["wall_s"] for m in rounds))
    out["rounds_frames_per_s"] = [m["frames_per_s"] for m in rounds]
    return out


def bench_naive(model_path: str, vlm, frames: np.ndarray, seconds: float) -> dict[str, float]:
    """What a user writes first: AutoProcessor + AutoModelForImageTextToText, one frame per forward."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    text = vlm.family.prompt_text(processor, vlm.prompt)
    latencies = []
    with torch.inference_mode():
        for frame in frames[:3]:
            model(**processor(images=frame, text=text, return_tensors="pt"))
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(latencies) < 20:
            frame = frames[len(latencies) % len(frames)]
            t = time.perf_counter()
            model(**processor(images=frame, text=text, return_tensors="pt"))
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    return latency_stats(latencies, len(latencies), wall)


def bench_in_process(encoder, frames: np.ndarray, batch: int, seconds: float) -> dict[str, float]:
    """EnvironmentEncoder.encode on consecutive batches of `batch` distinct frames (fresh windows)."""
    if batch > len(frames):
        frames = np.concatenate([frames] * -(-batch // len(frames)))
    batches = [frames[i : i + batch] for i in range(0, len(frames) - batch + 1, batch)]
    encoder.encode(batches[0])
    latencies, done = [], 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < 2:
        t = time.perf_counter()
        encoder.encode(batches[len(latencies) % len(batches)])
        latencies.append(time.perf_counter() - t)
        done += batch
    return latency_stats(latencies, done, time.perf_counter() - start)


def bf16_accuracy(encoder_fp32, encoder_bf16, frames: np.ndarray) -> dict[str, float]:
    """How far bfloat16 moves hidden states and latents from float32 (relative error, cosine)."""
    out = {}
    for name, fn in (("hidden", lambda e: e.hidden(frames)), ("latents", lambda e: e.encode(frames)[0])):
        exact, approx = fn(encoder_fp32), fn(encoder_bf16)
        cosine = np.sum(exact * approx, 1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(approx, axis=1))
        out[f"{name}_relative_error"] = float(np.linalg.norm(exact - approx) / np.linalg.norm(exact))
        out[f"{name}_min_cosine"] = float(cosine.min())
    return out


def run_callers(clients: list, frames: np.ndarray, frames_per_call: int, seconds: float,
                repeat_same: bool = False) -> dict[str, float]:
    """Each client in its own thread: calls of `frames_per_call` frames, windows carried across calls."""
    latencies: list[list[float]] = [[] for _ in clients]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(clients) + 1)
    deadline = [0.0]

    def caller(index: int, client) -> None:
        windows = None
        offset = index * frames_per_call * 7  # callers walk different parts of the rollout
        barrier.wait()
        try:
            while time.perf_counter() < deadline[0]:
                start = 0 if repeat_same else offset % (len(frames) - frames_per_call)
                chunk = frames[start : start + frames_per_call]
                t = time.perf_counter()
                _, windows = client.encode(chunk, windows)
                latencies[index].append(time.perf_counter() - t)
                offset += frames_per_call
        except BaseException as error:  # reported below: a failed caller must not look like a slow one
            errors.append(error)

    threads = [threading.Thread(target=caller, args=(i, c), daemon=True) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    flat = [latency for per_caller in latencies for latency in per_caller]
    return latency_stats(flat, len(flat) * frames_per_call, wall)


def bench_serve(config: EnvEncConfig, model_path: str, encoder_dir: Path, frames: np.ndarray, callers: int,
                frames_per_call: int, seconds: float, encoders: dict, with_bf16: bool, rounds: int = 3
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(c) and its fast-path variants through one Serve app, each round next to an in-process (b) round.

    Returns (serve results, in-process results per dtype). Each variant runs `rounds` times for
    seconds/2 in turn with the others, so slow drifts of a shared machine's load hit all alike.
    """
    from envenc_ray.serve.client import EncoderClient, deploy_encoder
    from envenc_ray.serve.deployment import run_app, shutdown_app

    batch, per_round = callers * frames_per_call, seconds / 2
    out: dict[str, Any] = {}
    measured: dict[str, list] = {}
    no_cache = config.model_copy(deep=True)
    no_cache.serve.cache_size = 0  # cycling a few hundred frames would otherwise be all cache hits
    phase(f"(b) in-process batches of {batch} alternating with (c) Serve: {callers} callers x {frames_per_call} "
          f"frames per call, cache off; variants: no client-side resize, one caller")
    t = time.perf_counter()
    client = deploy_encoder(no_cache, app_name=BENCH_APP, model_path=model_path, encoder_dir=encoder_dir)
    out["deploy_s"] = time.perf_counter() - t

    def clients(**options):
        made = [EncoderClient.from_handle(client.handle, app_name=BENCH_APP, **options) for _ in range(callers)]
        for made_client in made:
            made_client.encode(frames[:frames_per_call])  # warm: info, router, replica
        return made

    def measure(name: str, run) -> None:
        measured.setdefault(name, []).append(run())

    try:
        resized, raw = clients(), clients(resize=False)
        for _ in range(rounds):
            measure("in_process", lambda: bench_in_process(encoders["float32"], frames, batch, per_round))
            measure("handle", lambda: run_callers(resized, frames, frames_per_call, per_round))
            measure("no_client_resize", lambda: run_callers(raw, frames, frames_per_call, per_round))
            measure("one_caller", lambda: run_callers(resized[:1], frames, frames_per_call, per_round))
        out["replica_after_fp32_rounds"] = replica_stats(client)
        out["client_resize_cost"] = client_resize_cost(client, frames[:frames_per_call])

        phase("(c) variant: cache on, every call repeats the same frames (replica restart)")
        cached = config.model_copy(deep=True)
        cached.serve.cache_size = max(config.serve.cache_size, 4 * frames_per_call)
        run_app(cached, app_name=BENCH_APP, model_path=model_path, encoder_dir=encoder_dir)
        repeating = clients()
        before = replica_stats(client)
        measure("cache_all_hits", lambda: run_callers(repeating, frames, frames_per_call, seconds, repeat_same=True))
        measured["cache_all_hits"][0]["hit_rate"] = hit_rate_between(before, replica_stats(client))

        if with_bf16:
            phase("(b) and (c) with vlm.dtype=bfloat16 (replica restart)")
            bf16 = no_cache.model_copy(deep=True)
            bf16.vlm.dtype = "bfloat16"
            run_app(bf16, app_name=BENCH_APP, model_path=model_path, encoder_dir=encoder_dir)
            bf16_clients = clients()
            for _ in range(rounds):
                measure("in_process_bf16", lambda: bench_in_process(encoders["bfloat16"], frames, batch, per_round))
                measure("bf16", lambda: run_callers(bf16_clients, frames, frames_per_call, per_round))
            out["replica_after_bf16_rounds"] = replica_stats(client)
        else:
            measure("in_process_bf16", lambda: bench_in_process(encoders["bfloat16"], frames, batch, seconds))
    finally:
        shutdown_app(BENCH_APP)
    results = {name: pooled(runs) for name, runs in measured.items()}
    results["cache_all_hits"]["hit_rate"] = measured["cache_all_hits"][0]["hit_rate"]
    in_process = {"float32": results.pop("in_process"), "bfloat16": results.pop("in_process_bf16")}
    return out | results, in_process


def client_resize_cost(client, frames: np.ndarray) -> dict[str, float]:
    """What resizing on the client costs the caller per call, and the bytes it saves per call."""
    client._prepare(frames)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        resized, _ = client._prepare(frames)
    return {"ms_per_call": (time.perf_counter() - start) / repeats * 1e3, "bytes_per_call_raw": int(frames.nbytes),
            "bytes_per_call_resized": int(resized.nbytes)}


def replica_stats(client) -> dict[str, Any]:
    stats = client.stats()
    keys = ("calls", "frames", "batches", "mean_calls_per_batch", "mean_frames_per_forward", "busy_s",
            "busy_frames_per_s", "cache_hits", "duplicate_hits", "cache_misses", "cache_hit_rate")
    return {key: stats[0][key] for key in keys} | {"replicas": len(stats)}


def hit_rate_between(before: dict, after: dict) -> float:
    hits = (after["cache_hits"] + after["duplicate_hits"]) - (before["cache_hits"] + before["duplicate_hits"])
    misses = after["cache_misses"] - before["cache_misses"]
    return hits / (hits + misses) if hits + misses else 0.0


# ------------------------------------------------------------------------------------------ summary


def ratios(results: dict[str, Any]) -> dict[str, float]:
    naive = results["naive"]["frames_per_s"]
    ours = results["in_process"]["frames_per_s"]
    served = results["serve"]["handle"]["frames_per_s"]
    flops = results["flops_per_frame"]["ours"]
    peak32, peak16 = results["peak"]["float32"], results["peak"]["bfloat16"]
    out = {
        "b_over_a": ours / naive,
        "c_over_b": served / ours,
        "achieved_over_peak_in_process": ours * flops / peak32,
        "achieved_over_peak_in_process_bf16": results["in_process_bf16"]["frames_per_s"] * flops / peak16,
        "achieved_over_peak_in_process_compiled": results["in_process_compiled"]["float32"]["frames_per_s"]
        * flops / peak32,
        "achieved_over_peak_in_process_compiled_bf16": results["in_process_compiled"]["bfloat16"]["frames_per_s"]
        * flops / peak16,
        "compiled_over_eager_in_process": results["in_process_compiled"]["float32"]["frames_per_s"] / ours,
        "achieved_over_peak_serve": served * flops / peak32,
        "achieved_over_peak_naive": naive * results["flops_per_frame"]["naive_full_model"] / peak32,
        "best_possible_b_over_a_at_fp32_peak": peak32 / flops / naive,
        "bf16_over_fp32_in_process": results["in_process_bf16"]["frames_per_s"] / ours,
        "client_resize_gain": served / results["serve"]["no_client_resize"]["frames_per_s"],
        "cache_all_hits_over_no_cache": results["serve"]["cache_all_hits"]["frames_per_s"] / served,
        "two_callers_over_one": served / results["serve"]["one_caller"]["frames_per_s"],
    }
    if "bf16" in results["serve"]:
        out["bf16_over_fp32_serve"] = results["serve"]["bf16"]["frames_per_s"] / served
        out["c_over_b_bf16"] = results["serve"]["bf16"]["frames_per_s"] / results["in_process_bf16"]["frames_per_s"]
    return out


def limits(results: dict[str, Any]) -> str:
    profile = results["op_profile"]
    flops = results["flops_per_frame"]["ours"]
    return (f"{flops / 1e6:.0f} MFLOP per frame at {results['peak']['float32'] / 1e9:.0f} GFLOP/s fp32 peak "
            f"({results['peak']['threads']} thread(s)) caps this model at {results['peak']['float32'] / flops:.0f} "
            f"frames/s; in-process time is {profile['matmul']:.0%} matmul (small 128-wide GEMMs run below the "
            f"large-matmul peak), {profile['attention']:.0%} attention, "
            f"{profile['elementwise and other']:.0%} elementwise/other (memory-bound: norms, activations, copies)")


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    settings = results["settings"]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ax.plot(sweep["batch_sizes"], sweep["float32"], "o-", label="(b) in-process, float32")
    ax.plot(sweep["batch_sizes"], sweep["bfloat16"], "s-", label="in-process, bfloat16")
    ax.axhline(results["naive"]["frames_per_s"], color="grey", linestyle="--",
               label="(a) naive HF processor + full model, 1 frame")
    ax.plot([settings["in_process_batch"]], [results["serve"]["handle"]["frames_per_s"]], "D", color="C3",
            markersize=9, label=f"(c) Serve, float32: {settings['callers']} callers x {settings['frames_per_call']} frames")
    if "bf16" in results["serve"]:
        ax.plot([settings["in_process_batch"]], [results["serve"]["bf16"]["frames_per_s"]], "D", color="C1",
                markeredgecolor="black", markersize=9, label="(c) Serve, bfloat16")
    flops, peak = results["flops_per_frame"]["ours"], results["peak"]["float32"]
    ax.axhline(peak / flops, color="black", linestyle=":", label="float32 matmul peak / FLOPs per frame")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sweep["batch_sizes"], [str(size) for size in sweep["batch_sizes"]])
    ax.set_xlabel("frames per forward (batch size)")
    ax.set_ylabel("throughput (frames/s)")
    model = results["model"]
    ax.set_title(f"EnvironmentEncoder throughput vs batch size, Pong frames\n{settings['vlm']['model']} VLM: "
                 f"{model['layers_kept']}/{model['layers_total']} decoder layers, "
                 f"{settings['torch_threads']} torch thread(s), {results['machine']['cpu']}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def print_table(results: dict[str, Any], json_path: Path, png_path: Path) -> None:
    s = results["settings"]
    rows = [
        ("(a) naive HF, 1 frame/forward", results["naive"]),
        (f"(b) in-process, batch {s['in_process_batch']}", results["in_process"]),
        (f"    bfloat16, batch {s['in_process_batch']}", results["in_process_bf16"]),
        ("    torch.compile'd layers", results["in_process_compiled"]["float32"]),
        ("    torch.compile'd layers, bfloat16", results["in_process_compiled"]["bfloat16"]),
        (f"(c) Serve, {s['callers']} x {s['frames_per_call']} frames/call", results["serve"]["handle"]),
        ("    no client-side resize", results["serve"]["no_client_resize"]),
        ("    1 caller", results["serve"]["one_caller"]),
        ("    cache: repeated frames", results["serve"]["cache_all_hits"]),
    ]
    if "bf16" in results["serve"]:
        rows.append(("    bfloat16", results["serve"]["bf16"]))
    print(f"\n{'path':42s} {'frames/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, row in rows:
        print(f"{name:42s} {row['frames_per_s']:9.0f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}")
    r = results["ratios"]
    print(f"\nb/a {r['b_over_a']:.2f}x   c/b {r['c_over_b']:.2f}   achieved/peak (b) {r['achieved_over_peak_in_process']:.0%}"
          f" (bf16 {r['achieved_over_peak_in_process_bf16']:.0%}, compiled {r['achieved_over_peak_in_process_compiled']:.0%},"
          f" compiled bf16 {r['achieved_over_peak_in_process_compiled_bf16']:.0%})"
          f"   (c) {r['achieved_over_peak_serve']:.0%}   bf16/fp32 {r['bf16_over_fp32_in_process']:.2f}x"
          f"   client resize {r['client_resize_gain']:.2f}x   cache hits {r['cache_all_hits_over_no_cache']:.2f}x")
    cost = results["serve"]["client_resize_cost"]
    print(f"client-side resize: {cost['ms_per_call']:.1f} ms per {s['frames_per_call']}-frame call in the caller, "
          f"{cost['bytes_per_call_raw'] / 1e6:.2f} -> {cost['bytes_per_call_resized'] / 1e6:.2f} MB per call; "
          f"rollout duplicate frames {results['frames']['duplicate_rate']:.1%}")
    print(f"FLOPs/frame {results['flops_per_frame']['ours'] / 1e6:.0f} M (naive {results['flops_per_frame']['naive_full_model'] / 1e6:.0f} M);"
          f" peak fp32 {results['peak']['float32'] / 1e9:.0f} GFLOP/s, bf16 {results['peak']['bfloat16'] / 1e9:.0f} GFLOP/s")
    print(f"limits: {results['limits']}")
    print(f"bench: {results['wall_s']:.0f} s; results in {json_path}, plot in {png_path}")
