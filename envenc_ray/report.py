"""Stage `report`: <run>/report/ = report.md + PNG plots + metrics.json, from the artifacts of a run.

Every number in the report is read from a stage's own output file (frames/_collect.json,
encoder/metrics.json, agent/ metrics, evaluation results); a stage that has not run is listed as
missing rather than guessed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from envenc_ray.config import EnvEncConfig  # noqa: E402
from envenc_ray.errors import DataError  # noqa: E402

logger = logging.getLogger(__name__)


def report(config: EnvEncConfig) -> Path:
    """Write <run>/report/ from whatever stages of the run have finished; returns report.md's path."""
    run_dir = config.run_dir
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} does not exist; run `envenc run` (or the stages) for this config first")
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: {config.experiment.name}", "", f"Game: {config.env.game}; VLM: {config.vlm.model} "
             f"(layer {config.vlm.layer}, pooling {config.vlm.pooling}); encoder: {config.encoder.kind}.", ""]
    metrics: dict = {"experiment": config.experiment.name}

    for section in (_data_section, _encoder_section, _agent_section, _service_section):
        section_lines, section_metrics = section(run_dir, out)
        lines += section_lines + [""]
        metrics.update(section_metrics)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report_path = out / "report.md"
    report_path.write_text("\n".join(lines))
    print(f"report: {report_path}")
    return report_path


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _data_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    meta = _read_json(run_dir / "frames" / "_collect.json")
    embed = _read_json(run_dir / "hidden" / "_embed.json")
    if meta is None:
        return ["## Data", "", "No frames recorded yet (`envenc collect`)."], {}
    lines = ["## Data", "", f"{meta['collect']['episodes']} episodes of {meta['game']} "
             f"(policy {meta['collect']['policy']}, epsilon {meta['collect']['epsilon']}, "
             f"at most {meta['collect']['max_steps_per_episode']} steps each)."]
    metrics = {"collect_episodes": meta["collect"]["episodes"]}
    if embed:
        lines.append(f"{embed['frames']} frames embedded into {embed['hidden_size']}-dim hidden states in "
                     f"{embed['seconds']:.1f} s ({embed['frames'] / embed['seconds']:.1f} frames/s, Ray Data).")
        metrics.update(frames=embed["frames"], hidden_size=embed["hidden_size"],
                       embed_frames_per_s=embed["frames"] / embed["seconds"])
    return lines, metrics


def _encoder_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    encoder_metrics = _read_json(run_dir / "encoder" / "metrics.json")
    if encoder_metrics is None:
        return ["## Encoder", "", "No encoder trained yet (`envenc train-encoder`)."], {}
    epochs = encoder_metrics["epochs"]
    best = next(e for e in epochs if e["epoch"] == encoder_metrics["best_epoch"])
    x = [e["epoch"] for e in epochs]

    figure, (loss_axis, cosine_axis, probe_axis) = plt.subplots(1, 3, figsize=(15, 4.2))
    loss_axis.plot(x, [e["train_mse"] for e in epochs], label="train")
    loss_axis.plot(x, [e["val_mse"] for e in epochs], label="validation")
    loss_axis.set(title="Reconstruction error", xlabel="epoch", ylabel="MSE (standardised hidden state)",
                  yscale="log")
    loss_axis.legend()
    cosine_axis.plot(x, [e["val_consecutive_cosine_latent"] for e in epochs], label="latent")
    cosine_axis.axhline(best["val_consecutive_cosine_hidden"], color="grey", linestyle="--", label="raw hidden state")
    cosine_axis.axhline(best["val_consecutive_cosine_hidden_standardized"], color="black", linestyle=":",
                        label="standardised hidden state")
    cosine_axis.set(title="Consecutive frames: mean cosine similarity", xlabel="epoch",
                    ylabel="cosine (1 = identical)")
    cosine_axis.legend()
    keys = sorted(best["probe_r2_latent"])
    hidden_r2 = encoder_metrics["baseline"].get("probe_r2_hidden", {})
    positions = range(len(keys))
    probe_axis.bar([p - 0.2 for p in positions], [best["probe_r2_latent"][k] for k in keys], width=0.4,
                   label="from latent")
    probe_axis.bar([p + 0.2 for p in positions], [hidden_r2.get(k, float("nan")) for k in keys], width=0.4,
                   label="from raw hidden state")
    probe_axis.set_xticks(list(positions), keys, rotation=35, ha="right")
    probe_axis.set(title=f"Linear probes of game state (epoch {best['epoch']})", ylabel="R² on validation episodes",
                   ylim=(min(0.0, *[best["probe_r2_latent"][k] for k in keys]) - 0.05, 1.25))
    probe_axis.legend(loc="upper left", ncol=2)
    for axis in (loss_axis, cosine_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(out / "encoder.png", dpi=110)
    plt.close(figure)

    lines = ["## Encoder", "", f"{encoder_metrics['kind']} encoder, latent {encoder_metrics['latent_dim']}, "
             f"window {encoder_metrics['window']}; best epoch {best['epoch']} of {len(epochs)}.", "",
             "| metric | value |", "|---|---|",
             f"| validation reconstruction MSE | {best['val_mse']:.4f} |",
             f"| validation explained variance | {best['val_explained_variance']:.3f} |",
             f"| consecutive-frame cosine, latent | {best['val_consecutive_cosine_latent']:.3f} |",
             f"| consecutive-frame cosine, raw hidden state | {best['val_consecutive_cosine_hidden']:.3f} |",
             f"| probe R² (mean), latent | {best['probe_r2_latent_mean']:.3f} |",
             f"| probe R² (mean), raw hidden state | {best['probe_r2_hidden_mean']:.3f} |",
             "", "![encoder metrics](encoder.png)"]
    metrics = {"encoder": {k: best[k] for k in ("val_mse", "val_explained_variance", "val_consecutive_cosine_latent",
                                                 "val_consecutive_cosine_hidden", "probe_r2_latent_mean",
                                                 "probe_r2_hidden_mean")} | {"best_epoch": best["epoch"]}}
    return lines, metrics


def _agent_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    return ["## Agent", "", "No agent trained yet (`envenc train`)."], {}


def _service_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    return ["## Encoder service", "", "No service measurements yet (`envenc train` through Serve)."], {}
