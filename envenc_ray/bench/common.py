"""What both benchmarks share: the model and encoder they time, machine facts, progress lines, JSON output."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from envenc_ray.config import EnvEncConfig
from envenc_ray.encoder.served import ServedPair
from envenc_ray.files import write_json_atomic


def model_and_encoder(config: EnvEncConfig) -> tuple[ServedPair, bool]:
    """The run's served pair and whether its encoder is untrained: without a trained encoder, an untrained one of
    config.encoder (timing only)."""
    import torch

    from envenc_ray.layout import RunLayout
    from envenc_ray.vlm.paths import resolve_model_path
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
    from envenc_ray.encoder.models import build_autoencoder
    from envenc_ray.vlm.backbone import TruncatedVLM

    trained = RunLayout.of(config).agent_encoder
    if (trained / "config.json").is_file():
        return ServedPair.of(config), False
    model_path = resolve_model_path(config)
    hidden_size = TruncatedVLM.from_config(config.vlm, model_path=model_path, output=config.encoder.inputs).hidden_size
    torch.manual_seed(config.experiment.seed)
    encoder = build_autoencoder(config.encoder, hidden_size).encoder_module()
    encoder_dir = Path(tempfile.mkdtemp(prefix="envenc-bench-")) / "encoder"
    save_encoder(encoder, encoder_dir, {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": config.encoder.kind,
                                        "hidden_size": hidden_size, "latent_dim": config.encoder.latent_dim,
                                        "window": encoder.window, "encoder": config.encoder.model_dump(mode="json")},
                 metrics={})
    print(f"bench: no trained encoder in {trained}: timing an untrained "
          f"{config.encoder.kind} encoder (same shapes and cost)")
    return ServedPair.of(config, model_path, encoder_dir), True


def bench_encoder_pair(pair: ServedPair, dtype: str, compile: bool = False):
    """The EnvironmentEncoder the benchmarks time, in `dtype`, its VLM layers compiled or not (torch threads are set
    once by the caller)."""
    return pair.load(pair.vlm.model_copy(update={"dtype": dtype, "num_threads": None, "compile": compile}))


def machine_facts() -> dict[str, Any]:
    import ray
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        isa = sorted(flag for flag in flags if flag.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except (OSError, StopIteration):
        isa = []
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "load_average_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "transformers": transformers.__version__}


def phase(text: str) -> None:
    print(f"bench: {text}", flush=True)


def write_json(results: dict[str, Any], path: Path) -> None:
    def without_raw_latencies(value):
        if isinstance(value, dict):
            return {k: without_raw_latencies(v) for k, v in value.items() if k != "_latencies"}
        return value

    write_json_atomic(path, without_raw_latencies(results))
