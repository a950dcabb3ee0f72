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
from envenc_ray.files import read_json, write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)

# Every artifact the report reads, relative to the run directory.
INPUTS = ("frames/_collect.json", "hidden/_embed.json", "encoder/metrics.json", "agent/train.json",
          "agent/progress.jsonl", "agent/eval.json", "agent/reference.json")


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

    report_path = out / "report.md"
    write_text_atomic(report_path, "\n".join(lines))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))  # last: it marks the report done
    print(f"report: {report_path}")
    return report_path


def _data_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    meta = read_json(run_dir / "frames" / "_collect.json")
    embed = read_json(run_dir / "hidden" / "_embed.json")
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
    encoder_metrics = read_json(run_dir / "encoder" / "metrics.json")
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


def _progress(run_dir: Path) -> list[dict]:
    path = run_dir / "agent" / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _agent_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    rows = _progress(run_dir)
    meta = read_json(run_dir / "agent" / "train.json")
    if not rows or meta is None:
        return ["## Agent", "", "No agent trained yet (`envenc train`)."], {}
    evaluation = read_json(run_dir / "agent" / "eval.json")
    reference = read_json(run_dir / "agent" / "reference.json") or {}
    curve = [(r["env_steps_lifetime"], r["episode_return_mean"]) for r in rows if r["episode_return_mean"] is not None]

    figure, axis = plt.subplots(figsize=(8, 4.5))
    if curve:
        axis.plot(*zip(*curve), marker="o", markersize=3, label=f"{meta['algo']} on {meta['obs_mode']} (training episodes)")
    else:
        axis.text(0.5, 0.5, "no training episode finished yet", ha="center", va="center", transform=axis.transAxes)
    for policy, style in (("random", ":"), ("heuristic", "--")):
        if policy in reference:
            axis.axhline(reference[policy]["return_mean"], color="grey" if policy == "random" else "black",
                         linestyle=style, label=f"{policy} policy ({reference['episodes']} episodes)")
    if evaluation:
        axis.errorbar([rows[-1]["env_steps_lifetime"]], [evaluation["return_mean"]], yerr=[evaluation["return_std"]],
                      fmt="D", color="tab:red", capsize=4, label=f"greedy evaluation ({evaluation['episodes']} episodes)")
    axis.set(title="Learning curve", xlabel="environment steps", ylabel="episode return (mean)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "learning_curve.png", dpi=110)
    plt.close(figure)

    summary = meta.get("summary") or {}
    lines = ["## Agent", "", f"{meta['algo'].upper()} on `{meta['obs_mode']}` observations: {rows[-1]['iteration']} "
             f"iterations, {rows[-1]['env_steps_lifetime']:.0f} env steps"
             + (f", {summary['seconds']:.0f} s" if summary.get("seconds") else "") + ".", "",
             "| policy | return (mean ± std) |", "|---|---|"]
    metrics: dict = {"agent": {"algo": meta["algo"], "obs_mode": meta["obs_mode"], "iterations": rows[-1]["iteration"],
                               "env_steps": rows[-1]["env_steps_lifetime"],
                               "train_return_last": curve[-1][1] if curve else None}}
    if evaluation:
        lines.append(f"| trained agent, greedy | {evaluation['return_mean']:.2f} ± {evaluation['return_std']:.2f} |")
        metrics["agent"]["eval_return_mean"] = evaluation["return_mean"]
        metrics["agent"]["eval_return_std"] = evaluation["return_std"]
    for policy in ("random", "heuristic"):
        if policy in reference:
            lines.append(f"| {policy} | {reference[policy]['return_mean']:.2f} ± {reference[policy]['return_std']:.2f} |")
            metrics["agent"][f"{policy}_return_mean"] = reference[policy]["return_mean"]
    if reference.get("max_steps"):
        lines.append(f"\nEvaluation episodes are capped at {reference['max_steps']} env steps.")
    lines += ["", "![learning curve](learning_curve.png)"]
    return lines, metrics


def _service_section(run_dir: Path, out: Path) -> tuple[list[str], dict]:
    rows = [r for r in _progress(run_dir) if r.get("encoder_call_ms") is not None]
    if not rows:
        return ["## Encoder service", "", "No encoder calls measured (pixels-only agent, or no agent yet)."], {}
    x = [r["iteration"] for r in rows]
    figure, (speed_axis, latency_axis) = plt.subplots(1, 2, figsize=(12, 4))
    speed_axis.plot(x, [r["env_steps_per_s"] for r in rows], marker="o", markersize=3)
    speed_axis.set(title="Training throughput (learner included)", xlabel="iteration", ylabel="env steps / s")
    latency_axis.plot(x, [r["encoder_call_ms"] for r in rows], marker="o", markersize=3, label="ms per call")
    latency_axis.set(title="Encoder calls seen by the EnvRunners", xlabel="iteration", ylabel="latency per call (ms)")
    frames_axis = latency_axis.twinx()
    frames_axis.plot(x, [r["encoder_frames_per_call"] for r in rows], color="tab:orange", linestyle="--",
                     label="frames per call")
    frames_axis.set(ylabel="frames per call")
    handles = latency_axis.get_legend_handles_labels()[0] + frames_axis.get_legend_handles_labels()[0]
    latency_axis.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower right")
    for axis in (speed_axis, latency_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylim(bottom=0)
    frames_axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(out / "service.png", dpi=110)
    plt.close(figure)

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    metrics = {"service": {"encoder_call_ms": mean("encoder_call_ms"),
                           "encoder_frames_per_call": mean("encoder_frames_per_call"),
                           "frames_per_s_per_runner": 1000 * mean("encoder_frames_per_call") / mean("encoder_call_ms"),
                           "env_steps_per_s": mean("env_steps_per_s")}}
    service = metrics["service"]
    lines = ["## Encoder service", "",
             f"Seen by the EnvRunners over {len(rows)} iterations: {service['encoder_call_ms']:.1f} ms per encode call "
             f"of {service['encoder_frames_per_call']:.1f} frames ({service['frames_per_s_per_runner']:.0f} frames/s "
             f"per runner); training ran at {service['env_steps_per_s']:.0f} env steps/s, learner included.",
             "", "![encoder service](service.png)"]
    return lines, metrics
