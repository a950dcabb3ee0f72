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
from envenc_ray.encoder.metrics import mean_or_none, probe_means  # noqa: E402
from envenc_ray.errors import DataError  # noqa: E402
from envenc_ray.files import read_json, write_text_atomic  # noqa: E402
from envenc_ray.layout import RunLayout  # noqa: E402

logger = logging.getLogger(__name__)

# Mean AtariARI F1 of the paper's reference encoders (Anand et al. 2019, NeurIPS, table 2), beside ours.
ATARIARI_REFERENCE = {
    "pong": {"random CNN": 0.17, "ST-DIM": 0.81, "supervised CNN": 0.87},
    "breakout": {"random CNN": 0.51, "ST-DIM": 0.88, "supervised CNN": 0.94},
    "boxing": {"random CNN": 0.19, "ST-DIM": 0.58, "supervised CNN": 0.83},
    "freeway": {"random CNN": 0.50, "ST-DIM": 0.81, "supervised CNN": 0.98},
}


def inputs(layout: RunLayout) -> list[Path]:
    """Every artifact file the report reads."""
    return [layout.frames / "_collect.json", layout.advise_pointer, layout.hidden / "_embed.json",
            layout.encoder / "metrics.json", layout.agent / "train.json", layout.agent / "progress.jsonl",
            layout.agent / "eval.json", layout.agent / "reference.json"]


def report_current(config: EnvEncConfig) -> str | None:
    """Why <run>/report/ is newer than every artifact it reads, or None."""
    layout = RunLayout.of(config)
    done = layout.report / "metrics.json"
    present = [path for path in inputs(layout) if path.is_file()]
    if done.is_file() and all(path.stat().st_mtime <= done.stat().st_mtime for path in present):
        return f"{layout.report} is newer than every artifact it reads"
    return None


def report(config: EnvEncConfig) -> Path:
    """Write <run>/report/ from whatever stages of the run have finished; returns report.md's path."""
    layout = RunLayout.of(config)
    if not layout.run_dir.is_dir():
        raise DataError(f"{layout.run_dir} does not exist; run `envenc run` (or the stages) for this config first")
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: {config.experiment.name}", "", f"Game: {config.env.game}; VLM: {config.vlm.model} "
             f"(layer {config.vlm.layer}, pooling {config.vlm.pooling}); encoder: {config.encoder.kind}.", ""]
    metrics: dict = {"experiment": config.experiment.name}

    sections = (_data_section, _advice_section, _encoder_section, _representation_section, _atariari_section,
                _agent_section, _service_section)
    for section in sections:  # each reads its artifacts and writes its plots into <run>/report/
        section_lines, section_metrics = section(config, layout)
        lines += section_lines + [""]
        metrics.update(section_metrics)

    report_path = out / "report.md"
    write_text_atomic(report_path, "\n".join(lines))
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))  # last: it marks the report done
    print(f"report: {report_path}")
    return report_path


def _data_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    meta = read_json(layout.frames / "_collect.json")
    embed = read_json(layout.hidden / "_embed.json")
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


def _encoder_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    encoder_metrics = read_json(layout.encoder / "metrics.json")
    if encoder_metrics is None:
        return ["## Encoder", "", "No encoder trained yet (`envenc train-encoder`)."], {}
    epochs = encoder_metrics["epochs"]
    best = next(e for e in epochs if e["epoch"] == encoder_metrics["best_epoch"])
    x = [e["epoch"] for e in epochs]

    figure, (loss_axis, cosine_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss_axis.plot(x, [e["train_mse"] for e in epochs], label="train")
    loss_axis.plot(x, [e["val_mse"] for e in epochs], label="validation")
    loss_axis.set(title="Reconstruction error", xlabel="epoch", ylabel="MSE (standardised hidden state)",
                  yscale="log")
    loss_axis.legend()
    # Uncentred cosines of raw VLM states are ~1 for any frames (a large shared mean dominates them); the
    # centred ones (mean over the validation frames removed) tell a static representation from a moving one.
    centred = "val_consecutive_cosine_latent_centred" in best
    latent_key = "val_consecutive_cosine_latent_centred" if centred else "val_consecutive_cosine_latent"
    cosine_axis.plot(x, [e.get(latent_key) for e in epochs], label="latent")
    hidden_key = "val_consecutive_cosine_hidden_centred" if centred else "val_consecutive_cosine_hidden"
    cosine_axis.axhline(best[hidden_key], color="grey", linestyle="--", label="hidden state")
    cosine_axis.set(title=f"Consecutive frames: {'centred ' if centred else ''}cosine similarity", xlabel="epoch",
                    ylabel="cosine (1 = identical)")
    cosine_axis.legend()
    for axis in (loss_axis, cosine_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    figure.savefig(layout.report / "encoder.png", dpi=110)
    plt.close(figure)

    lines = ["## Encoder", "", f"{encoder_metrics['kind']} encoder, latent {encoder_metrics['latent_dim']}, "
             f"window {encoder_metrics['window']}; best epoch {best['epoch']} of {len(epochs)}.", "",
             "| metric | value |", "|---|---|",
             f"| validation reconstruction MSE | {best['val_mse']:.4f} |",
             f"| validation explained variance | {best['val_explained_variance']:.3f} |",
             f"| consecutive-frame cosine, latent | {best['val_consecutive_cosine_latent']:.3f} |",
             f"| consecutive-frame cosine, raw hidden state | {best['val_consecutive_cosine_hidden']:.3f} |",
             *([f"| centred consecutive-frame cosine, latent | {best['val_consecutive_cosine_latent_centred']:.3f} |",
                f"| centred consecutive-frame cosine, hidden state | {best['val_consecutive_cosine_hidden_centred']:.3f} |"]
               if centred else []),
             f"| probe R² (mean), latent | {best['probe_r2_latent_mean']:.3f} |",
             f"| probe R² (mean), raw hidden state | {best['probe_r2_hidden_mean']:.3f} |",
             "", "![encoder metrics](encoder.png)"]
    keys = ("val_mse", "val_explained_variance", "val_consecutive_cosine_latent", "val_consecutive_cosine_hidden",
            "val_consecutive_cosine_latent_centred", "val_consecutive_cosine_hidden_centred", "probe_r2_latent_mean",
            "probe_r2_hidden_mean")
    metrics = {"encoder": {k: best[k] for k in keys if k in best} | {"best_epoch": best["epoch"]}}
    return lines, metrics


def _representation_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    """Probe R² per game variable: the VLM as given (untrained), the VLM the run reads (hidden), the latent."""
    encoder_metrics = read_json(layout.encoder / "metrics.json")
    if encoder_metrics is None:
        return ["## What the representation knows", "", "No encoder trained yet (`envenc train-encoder`)."], {}
    best = next(e for e in encoder_metrics["epochs"] if e["epoch"] == encoder_metrics["best_epoch"])
    hidden = encoder_metrics["baseline"]["probe_r2_hidden"]
    if not config.stage2.reads_finetuned_vlm:
        untrained = hidden  # the run reads the VLM as given: its hidden state is the untrained one
    else:
        from envenc_ray.encoder.diagnostics import base_probe_r2

        untrained = base_probe_r2(config)
    probes = {"untrained": untrained, "hidden": hidden, "latent": best["probe_r2_latent"]}
    keys = sorted(probes["latent"])
    means, velocity_means = ({name: probe_means({k: values[k] for k in keys if k in values})[part]
                              for name, values in probes.items()} for part in (0, 1))

    labels = {"untrained": "VLM as given (untrained)", "hidden": f"VLM the run reads ({config.stage2.method})",
              "latent": "encoder latent"}
    figure, axis = plt.subplots(figsize=(max(7.0, 1.1 * len(keys) + 2), 4.2))
    for offset, name in zip((-0.27, 0.0, 0.27), probes):
        axis.bar([p + offset for p in range(len(keys))], [probes[name].get(k, float("nan")) for k in keys], width=0.27,
                 label=f"{labels[name]}, mean {_fmt(means[name])} (velocities {_fmt(velocity_means[name])})")
    axis.set_xticks(list(range(len(keys))), keys, rotation=35, ha="right")
    lowest = min([0.0] + [v for values in probes.values() for v in values.values() if v == v])
    axis.set(title="Linear probes of game state on held-out episodes", ylabel="ridge-probe R²",
             ylim=(max(lowest, -1.0) - 0.05, 1.3))
    axis.axhline(0, color="black", linewidth=0.6)
    axis.legend(loc="upper left", fontsize=8, ncol=3)
    figure.tight_layout()
    figure.savefig(layout.report / "probes.png", dpi=110)
    plt.close(figure)

    lines = ["## What the representation knows", "",
             "Held-out ridge-probe R² of each annotated variable (1 = linearly decodable, 0 = no better than its mean).",
             "", "| variable | untrained VLM | VLM read | latent |", "|---|---|---|---|"]
    lines += [f"| {k} | {_fmt(untrained.get(k))} | {_fmt(hidden.get(k))} | {_fmt(probes['latent'].get(k))} |" for k in keys]
    lines += [f"| **mean**, state | {_fmt(means['untrained'])} | {_fmt(means['hidden'])} | {_fmt(means['latent'])} |",
              f"| **mean**, velocities (`_dx`, `_dy`) | {_fmt(velocity_means['untrained'])} | "
              f"{_fmt(velocity_means['hidden'])} | {_fmt(velocity_means['latent'])} |",
              "", "![probes](probes.png)"]
    return lines, {"probe_r2": probes, "probe_r2_mean": means, "probe_r2_velocity_mean": velocity_means}


def _atariari_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    """AtariARI F1 per RAM variable of the VLM read and the latent, beside the paper's reference encoders."""
    probes = (read_json(layout.encoder / "metrics.json") or {}).get("atariari_f1")
    if not probes:
        return [], {}  # no encoder yet, no RAM recorded, or a game AtariARI does not annotate
    means = {name: mean_or_none(values) for name, values in probes.items()}
    lines = ["## AtariARI probes", "",
             "Per RAM variable of AtariARI (Anand et al. 2019), weighted F1 of a linear classifier of the byte's "
             "value on the held-out episodes; variables whose label entropy is below 0.6 nats are dropped.", "",
             "| variable | VLM read | latent |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(probes['hidden'].get(k))} | {_fmt(probes['latent'].get(k))} |" for k in sorted(probes["latent"])]
    lines += [f"| **mean** | {_fmt(means['hidden'])} | {_fmt(means['latent'])} |", "",
              "| encoder | mean F1 |", "|---|---|",
              f"| VLM read ({config.stage2.method}), this run | {_fmt(means['hidden'])} |",
              f"| encoder latent, this run | {_fmt(means['latent'])} |"]
    lines += [f"| {name} (Anand et al. 2019) | {value:.2f} |" for name, value in ATARIARI_REFERENCE[layout.game].items()]
    return lines, {"atariari_f1": probes, "atariari_f1_mean": means}


def _advice_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    """The advise stage: held-out loss, and the move parsed from greedy generation against chance."""
    pointer = read_json(layout.advise_pointer)
    advice = read_json(Path(pointer["metrics"])) if pointer else None
    if advice is None:
        return [], {}
    epochs = advice["epochs"]
    per_game = advice.get("per_game", {})
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([0] + [e["epoch"] for e in epochs], [advice["val_loss_before"]] + [e["val_loss"] for e in epochs],
                   marker="o", label="held-out")
    loss_axis.plot([e["epoch"] for e in epochs], [e["train_loss"] for e in epochs], marker="o", label="train")
    loss_axis.set(title="Advice finetuning: answer-token loss", xlabel="epoch (0 = before)", ylabel="cross-entropy")
    loss_axis.legend()
    games = list(per_game)
    accuracy_axis.bar([p - 0.2 for p in range(len(games))], [per_game[g]["accuracy"] for g in games], width=0.4,
                      label="greedy generation")
    accuracy_axis.bar([p + 0.2 for p in range(len(games))], [per_game[g]["chance"] for g in games], width=0.4,
                      label="chance (majority move)")
    accuracy_axis.set_xticks(list(range(len(games))), games)
    accuracy_axis.set(title="Advised move vs the RAM heuristic (held-out)", ylabel="accuracy", ylim=(0, 1.15))
    accuracy_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(layout.report / "advice.png", dpi=110)
    plt.close(figure)
    accuracy, chance = advice["action_accuracy_heldout"], advice["chance_accuracy"]
    lines = ["## Advice finetuning (stage 2)", "",
             f"{advice['method']} finetuning on `{advice['text']}` text from {advice['source']}: "
             f"{advice['pairs']['train']} training, {advice['pairs']['val']} held-out pairs; best epoch "
             f"{advice['best_epoch']} of {len(epochs)}. Finetuned VLM: `{pointer['vlm']}`.", "",
             "| metric | value |", "|---|---|",
             f"| held-out answer loss before -> after | {_fmt(advice['val_loss_before'])} -> {_fmt(advice['val_loss_best'])} |",
             f"| advised move accuracy, held-out greedy generation | {_fmt(accuracy)} |",
             f"| chance (majority move) | {_fmt(chance)} |", ""]
    lines += [f"Example: target `{e['target']}`, generated `{e['generated']}`" for e in advice.get("examples", [])[:1]]
    lines += ["", "![advice](advice.png)"]
    keys = ("action_accuracy_heldout", "chance_accuracy", "val_loss_before", "val_loss_best", "per_game")
    return lines, {"advice": {key: advice.get(key) for key in keys}}


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _progress(layout: RunLayout) -> list[dict]:
    path = layout.agent / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _agent_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    from envenc_ray.rl.evaluate import reference_label

    rows = _progress(layout)
    meta = read_json(layout.agent / "train.json")
    if not rows or meta is None:
        return ["## Agent", "", "No agent trained yet (`envenc train`)."], {}
    evaluation = read_json(layout.agent / "eval.json")
    reference = read_json(layout.agent / "reference.json") or {}
    curve = [(r["env_steps_lifetime"], r["episode_return_mean"]) for r in rows if r["episode_return_mean"] is not None]

    figure, axis = plt.subplots(figsize=(8, 4.5))
    if curve:
        axis.plot(*zip(*curve), marker="o", markersize=3, label=f"{meta['algo']} on {meta['obs_mode']} (training episodes)")
    else:
        axis.text(0.5, 0.5, "no training episode finished yet", ha="center", va="center", transform=axis.transAxes)
    for policy, color, style in (("random", "grey", ":"), ("constant", "tab:purple", "-."), ("heuristic", "black", "--")):
        if policy in reference:
            axis.axhline(reference[policy]["return_mean"], color=color, linestyle=style,
                         label=f"{reference_label(policy, reference)} ({reference['episodes']} episodes)")
    if evaluation:
        axis.errorbar([rows[-1]["env_steps_lifetime"]], [evaluation["return_mean"]], yerr=[evaluation["return_std"]],
                      fmt="D", color="tab:red", capsize=4, label=f"greedy evaluation ({evaluation['episodes']} episodes)")
    axis.set(title="Learning curve", xlabel="environment steps", ylabel="episode return (mean)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(layout.report / "learning_curve.png", dpi=110)
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
    for policy in ("random", "constant", "heuristic"):
        if policy in reference:
            lines.append(f"| {reference_label(policy, reference)} | {reference[policy]['return_mean']:.2f} ± "
                         f"{reference[policy]['return_std']:.2f} |")
            metrics["agent"][f"{policy}_return_mean"] = reference[policy]["return_mean"]
    if reference.get("max_steps"):
        lines.append(f"\nEvaluation episodes are capped at {reference['max_steps']} env steps.")
    lines += ["", "![learning curve](learning_curve.png)"]
    return lines, metrics


def _service_section(config: EnvEncConfig, layout: RunLayout) -> tuple[list[str], dict]:
    rows = [r for r in _progress(layout) if r.get("encoder_call_ms") is not None]
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
    figure.savefig(layout.report / "service.png", dpi=110)
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
