"""The stage registry, and `envenc run`: every stage in order on one Ray session, skipping the current ones.

    preflight (cheap checks: run dir writable, model present, no artifact of another config)
    -> collect -> [advise, with stage2.method 'finetuned' or joint_from 'finetuned'] -> embed -> train-encoder
    (collect, advise, embed and train-encoder not for rl.obs_mode 'state': it reads the RAM, not frames)
    -> [reward-model, with rl.reward 'model' or 'env+model']
    -> [serve: deploy the encoder service once, for latents from Serve] -> train -> evaluate -> report,
    with manifest.json recording what each stage did and how long it took.

`STAGES` is the one list of stages: the CLI builds its stage subcommands and their help from it, and
`run` is a loop over it. Each stage declares the run artifacts it reads and writes (names of `RunLayout`
attributes) and `current(config)`: why its output already matches this config and its inputs (then it is
skipped, and says so), or None. The same function is what the stage's entry checks when it is run alone,
so a stage is skipped for one reason only. Outputs record what made them (the hash of the config sections
they depend on, the fingerprint of their input artifact), so a changed setting or a remade input makes
every later stage stale, and an interrupted run resumes at the first unfinished stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from envenc_ray.config import BUILTIN_TINY, EnvEncConfig
from envenc_ray.data.advise import advise, advise_current
from envenc_ray.data.collect import collect, collect_current
from envenc_ray.data.collect import output_hash as frames_hash
from envenc_ray.data.embed import embed, embed_current
from envenc_ray.data.embed import output_hash as hidden_hash
from envenc_ray.encoder.train import encoder_current, train_encoder
from envenc_ray.encoder.train import output_hash as encoder_hash
from envenc_ray.errors import ConfigError, DataError, ModelError
from envenc_ray.files import read_json, write_json_atomic, write_text_atomic
from envenc_ray.layout import RunLayout, synced_run
from envenc_ray.report import report, report_current
from envenc_ray.rl.evaluate import REFERENCE_FILE, evaluate, evaluation_current, reference_returns
from envenc_ray.rl.reward.model import output_hash as reward_model_hash
from envenc_ray.rl.reward.train import reward_model_current, train_reward_model
from envenc_ray.rl.train import agent_config_hash, train, training_current
from envenc_ray.runtime import ensure_ray
from envenc_ray.serve.client import deploy_encoder
from envenc_ray.serve.deployment import serve

PACKAGES = ("envenc-ray", "ray", "torch", "transformers", "gymnasium", "ale-py", "numpy", "pyarrow")


def _always(config: EnvEncConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One stage of the data flow: what it is, what it reads and writes, when it is current, how it runs."""

    name: str
    help: str
    run: Callable[..., Any]  # the stage's entry function, run(config, **options): `envenc <name>` calls it
    reads: tuple[str, ...] = ()  # RunLayout artifacts it reads
    writes: str | None = None  # the RunLayout artifact it writes
    current: Callable[[EnvEncConfig], str | None] | None = None  # why its output is current, or None
    in_run: Callable[[EnvEncConfig], bool] = _always  # whether `envenc run` includes it for this config
    run_in_pipeline: Callable[[EnvEncConfig], Any] | None = None  # what `envenc run` calls instead of `run`
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None  # CLI options beyond CONFIG, --set
    options: Callable[[argparse.Namespace], dict] = lambda args: {}  # CLI options -> keyword arguments of run


@dataclass(frozen=True)
class StageResult:
    """What one stage did in `envenc run` (the manifest's record of it)."""

    name: str
    skipped: bool
    seconds: float
    summary: dict


def _makes_representation(config: EnvEncConfig) -> bool:
    """The state reference (rl.obs_mode 'state') reads the objects from the RAM: it needs no frames, VLM or
    encoder."""
    return config.rl.obs_mode != "state"


def _latents_from_serve(config: EnvEncConfig) -> bool:
    return config.rl.reads_latents and config.rl.encoder_source == "serve"


def _serve_current(config: EnvEncConfig) -> str | None:
    """The service is needed only while the agent is still to train or to evaluate."""
    if training_current(config) and evaluation_current(config):
        return "the agent is trained and evaluated already (nothing will call the encoder)"
    return None


def _deploy_for_agent(config: EnvEncConfig) -> dict:
    """Start the encoder service once; every EnvRunner of the agent connects to it by app name."""
    client = deploy_encoder(config, app_name=config.rl.serve_app)
    what = "vision features" if config.stage2.joint else "latent"  # joint: the module makes latents
    print(f"serve: app {config.rl.serve_app!r} up ({what} {client.latent_dim}, window {client.window})")
    return {"app": config.rl.serve_app, "latent_dim": client.latent_dim}


def _evaluate_with_references(config: EnvEncConfig) -> dict:
    """Greedy evaluation of the newest checkpoint plus the reference returns (random, best constant action, RAM
    heuristic)."""
    result = evaluate(config)
    write_json_atomic(RunLayout.of(config).agent / REFERENCE_FILE, reference_returns(config))
    return result


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--http", action="store_true",
                        help="also serve POST /encode (.npy in, .npy out) on serve.http_host:http_port")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the newest in <run>/agent/)")
    parser.add_argument("--episodes", type=int, help="greedy episodes to play (default rl.eval_episodes)")
    parser.add_argument("--gif", help="write the first episode as an animated GIF to this path")


STAGES: tuple[Stage, ...] = (
    Stage("collect", "play the game and record frames, RAM annotations and advice to <run>/frames/",
          run=collect, writes="frames", current=collect_current, in_run=_makes_representation),
    Stage("advise", "finetune the VLM on (frame, text) pairs from the RAM annotations (Ray Train) into a shared, "
          "content-addressed vlm/ that the run reads with stage2.method=finetuned (or joint_from=finetuned)",
          run=advise, reads=("frames",), writes="advise_pointer", current=advise_current,
          in_run=lambda config: config.stage2.reads_finetuned_vlm and _makes_representation(config)),
    Stage("embed", "run the truncated VLM over recorded frames into <run>/hidden/ (Ray Data)",
          run=embed, reads=("frames", "advise_pointer"), writes="hidden", current=embed_current,
          in_run=_makes_representation),
    Stage("train-encoder", "train the autoencoder on hidden states (Ray Train), export the encoder to <run>/encoder/",
          run=train_encoder, reads=("hidden",), writes="encoder", current=encoder_current,
          in_run=_makes_representation),
    Stage("reward-model", "make preference triples by branching the emulator, train the transformer reward model on "
          "them (Ray Train, Bradley-Terry) and export it to <run>/reward_model/ for rl.reward 'model' or 'env+model'",
          run=train_reward_model, reads=("agent_encoder",), writes="reward_model", current=reward_model_current,
          in_run=lambda config: config.rl.reward != "env"),
    Stage("serve", "host the truncated VLM + encoder as a Ray Serve deployment (foreground until Ctrl-C)",
          run=serve, reads=("agent_encoder",), current=_serve_current, in_run=_latents_from_serve,
          run_in_pipeline=_deploy_for_agent, add_arguments=_serve_arguments,
          options=lambda args: {"http": args.http}),
    Stage("train", "train an RLlib agent (PPO or DreamerV3) on latents, pixels or both",
          run=train, reads=("agent_encoder",), writes="agent", current=training_current),
    Stage("evaluate", "run an agent checkpoint for N greedy episodes (writes <run>/agent/eval.json)",
          run=evaluate, reads=("agent",), current=evaluation_current, run_in_pipeline=_evaluate_with_references,
          add_arguments=_evaluate_arguments,
          options=lambda args: {"checkpoint": args.checkpoint, "episodes": args.episodes, "gif": args.gif}),
    Stage("report", "write report.md, plots and metrics.json for a run (CONFIG... or a run directory)",
          run=report, writes="report", current=report_current),
)


def stages_of(config: EnvEncConfig) -> list[Stage]:
    """The stages `envenc run` runs for this config, in order."""
    return [stage for stage in STAGES if stage.in_run(config)]


def run_stage(stage: Stage, config: EnvEncConfig) -> StageResult:
    """One stage inside `envenc run`: skipped (saying why) when current, else its pipeline entry."""
    started = time.perf_counter()
    reason = stage.current(config) if stage.current else None
    if reason:
        print(f"{stage.name}: skipped, {reason}")
        return StageResult(stage.name, True, round(time.perf_counter() - started, 2), {})
    ensure_ray()  # for the first stage with work to do: a rerun with every stage current starts no Ray
    started = time.perf_counter()  # a stage's time is its own, not Ray's start-up
    with synced_run(config):
        output = (stage.run_in_pipeline or stage.run)(config)
    summary = dataclasses.asdict(output) if dataclasses.is_dataclass(output) else output
    summary = summary if isinstance(summary, dict) else {"output": str(summary)}
    return StageResult(stage.name, bool(summary.get("skipped")), round(time.perf_counter() - started, 2), summary)


def run(config: EnvEncConfig) -> dict:
    """Run the whole pipeline for `config`; returns the manifest."""
    preflight(config)
    layout = RunLayout.of(config)
    write_text_atomic(layout.config_copy, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    previous = read_json(layout.manifest) or {}
    manifest = {
        "experiment": config.experiment.name,
        "config_hash": config.section_hash(*EnvEncConfig.model_fields),
        "versions": {"python": platform.python_version(), **_versions()},
        # Per stage: this run's outcome, and the wall time of the run that made the stage's output.
        "stages": {},
    }
    stages = stages_of(config)
    overall_started = time.perf_counter()
    # One header line per stage (each stage draws its own progress bar below it).
    for number, stage in enumerate(stages, start=1):
        elapsed = time.perf_counter() - overall_started
        print(f"== [{number}/{len(stages)}] {stage.name}  (run time so far {elapsed:.0f} s)", flush=True)
        result = run_stage(stage, config)
        made_by = previous.get("stages", {}).get(stage.name, {}) if result.skipped else {}
        manifest["stages"][stage.name] = {
            "skipped": result.skipped,
            "seconds": result.seconds,
            "seconds_to_make": made_by.get("seconds_to_make", None if result.skipped else result.seconds),
        }
        write_text_atomic(layout.manifest, json.dumps(manifest, indent=2))
    manifest["seconds"] = round(time.perf_counter() - overall_started, 2)
    write_text_atomic(layout.manifest, json.dumps(manifest, indent=2))
    ran = [name for name, record in manifest["stages"].items() if not record["skipped"]]
    print(f"run: {config.experiment.name} done in {manifest['seconds']:.0f} s "
          f"({'ran ' + ', '.join(ran) if ran else 'every stage was already done'}); report in {layout.report}")
    return manifest


# ------------------------------------------------------------------------------------------ preflight


def preflight(config: EnvEncConfig) -> None:
    """Everything that can be checked in a second, before any stage spends minutes."""
    layout = RunLayout.of(config)
    try:
        layout.run_dir.mkdir(parents=True, exist_ok=True)
        probe = layout.run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"run directory {layout.run_dir} is not writable ({error.strerror}); set "
                          "experiment.run_root to a folder you can write to") from None

    model = config.vlm.model
    if model != BUILTIN_TINY and _looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise ModelError(f"vlm.model {model!r} is not a directory; point it at a Hugging Face model folder, a hub "
                         "name (org/model) or use builtin:tiny")
    if config.rl.reads_latents and config.rl.encoder_dir and not layout.agent_encoder.is_dir():
        raise ModelError(f"rl.encoder_dir {config.rl.encoder_dir!r} does not exist; unset it to train one in "
                         f"{layout.encoder}")

    for artifact, recorded_hash, current_hash in _artifact_hashes(config, layout):
        if recorded_hash is not None and recorded_hash != current_hash:
            raise DataError(f"{artifact} was written by another config (hash {recorded_hash}, this config "
                            f"{current_hash}); use a new experiment.name, or delete {artifact} to redo it")


def _artifact_hashes(config: EnvEncConfig, layout: RunLayout):
    """(artifact, hash recorded in it, hash this config would write) for each stage output present."""
    yield layout.frames, _recorded(layout.frames / "_collect.json", "config_hash"), frames_hash(config)
    yield layout.hidden, _recorded(layout.hidden / "_embed.json", "config_hash"), hidden_hash(config)
    yield layout.encoder, _recorded(layout.encoder / "config.json", "config_hash"), encoder_hash(config)
    yield layout.agent, _recorded(layout.agent / "train.json", "agent_hash"), agent_config_hash(config)
    if config.rl.reward != "env":
        recorded = _recorded(layout.reward_model / "config.json", "config_hash")
        yield layout.reward_model, recorded, reward_model_hash(config)


def _recorded(path: Path, key: str) -> str | None:
    return (read_json(path) or {}).get(key)


def _looks_like_path(model: str) -> bool:
    """Hub names are 'org/model'; anything else (absolute, relative, nested) is a local folder."""
    return model.startswith(("/", ".", "~")) or model.count("/") != 1


def _versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
