"""`envenc run`: every stage in order on one Ray session, skipping the ones whose output is current.

    preflight (cheap checks: run dir writable, model present, no artifact of another config)
    -> collect -> [advise, with stage2.method 'finetuned'] -> embed -> train-encoder -> [deploy the encoder service once] -> train -> evaluate
    -> report, with manifest.json recording what each stage did and how long it took.

Each stage decides itself whether its output already matches the config (and says so), so an
interrupted run resumes at the first unfinished stage.
"""

from __future__ import annotations

import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import yaml

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import ConfigError, DataError, ModelError
from envenc_ray.files import read_json, write_text_atomic

MANIFEST = "manifest.json"
CONFIG_COPY = "config.yaml"  # the resolved config, so `envenc report RUN_DIR` can rebuild the report
PACKAGES = ("envenc-ray", "ray", "torch", "transformers", "gymnasium", "ale-py", "numpy", "pyarrow")


def run(config: EnvEncConfig) -> dict:
    """Run the whole pipeline for `config`; returns the manifest."""
    from envenc_ray.runtime import ensure_ray

    preflight(config)
    run_dir = config.run_dir
    write_text_atomic(run_dir / CONFIG_COPY, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    previous = read_json(run_dir / MANIFEST) or {}
    manifest = {
        "experiment": config.experiment.name,
        "config_hash": config.section_hash(*EnvEncConfig.model_fields),
        "versions": {"python": platform.python_version(), **_versions()},
        # Per stage: this run's outcome, and the wall time of the run that made the stage's output.
        "stages": {},
    }
    ensure_ray()
    stages = _stages(config)
    overall_started = time.perf_counter()
    # One header line per stage (each stage draws its own progress bar below it).
    for number, (name, entry) in enumerate(stages, start=1):
        elapsed = time.perf_counter() - overall_started
        print(f"== [{number}/{len(stages)}] {name}  (run time so far {elapsed:.0f} s)", flush=True)
        started = time.perf_counter()
        result = entry()
        skipped = result.get("skipped") if isinstance(result, dict) else getattr(result, "skipped", False)
        seconds = round(time.perf_counter() - started, 2)
        made_by = previous.get("stages", {}).get(name, {}) if skipped else {}
        manifest["stages"][name] = {
            "skipped": bool(skipped),
            "seconds": seconds,
            "seconds_to_make": made_by.get("seconds_to_make", None if skipped else seconds),
        }
        write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2))
    manifest["seconds"] = round(time.perf_counter() - overall_started, 2)
    write_text_atomic(run_dir / MANIFEST, json.dumps(manifest, indent=2))
    ran = [name for name, record in manifest["stages"].items() if not record["skipped"]]
    print(f"run: {config.experiment.name} done in {manifest['seconds']:.0f} s "
          f"({'ran ' + ', '.join(ran) if ran else 'every stage was already done'}); report in {run_dir / 'report'}")
    return manifest


def _stages(config: EnvEncConfig) -> list[tuple[str, Callable[[], object]]]:
    from envenc_ray.data.advise import advise
    from envenc_ray.data.collect import collect
    from envenc_ray.data.embed import embed
    from envenc_ray.encoder.train import train_encoder
    from envenc_ray.rl.train import train

    stages = [("collect", lambda: collect(config))]
    if config.stage2.method == "finetuned":
        stages.append(("advise", lambda: advise(config)))
    stages += [
        ("embed", lambda: embed(config)),
        ("train-encoder", lambda: train_encoder(config)),
    ]
    if config.rl.obs_mode != "pixels" and config.rl.encoder_source == "serve":
        stages.append(("serve", lambda: _deploy(config)))
    stages += [
        ("train", lambda: train(config)),
        ("evaluate", lambda: _evaluate(config)),
        ("report", lambda: _report(config)),
    ]
    return stages


def _evaluate(config: EnvEncConfig) -> dict:
    """Greedy evaluation of the newest checkpoint plus the random / heuristic reference returns."""
    from envenc_ray.rl.evaluate import evaluate, reference_returns

    if _evaluation_current(config):
        print(f"evaluate: skipped, {config.run_dir / 'agent' / 'eval.json'} already evaluates the newest checkpoint")
        return {"skipped": True}
    result = evaluate(config)
    reference_returns(config)
    return result


def _evaluation_current(config: EnvEncConfig) -> bool:
    """agent/eval.json (and reference.json) evaluate the newest checkpoint with these settings."""
    from envenc_ray.rl.train import latest_checkpoint

    agent_dir = config.run_dir / "agent"
    checkpoint = latest_checkpoint(agent_dir)
    previous = read_json(agent_dir / "eval.json")
    return (checkpoint is not None and previous is not None and (agent_dir / "reference.json").is_file()
            and previous["checkpoint"] == str(checkpoint[1]) and previous["episodes"] == config.rl.eval_episodes)


def _training_current(config: EnvEncConfig) -> bool:
    """agent/ holds rl.iterations iterations of this very agent (what `train` checks before skipping)."""
    from envenc_ray.rl.train import agent_config_hash, latest_checkpoint

    agent_dir = config.run_dir / "agent"
    checkpoint, meta = latest_checkpoint(agent_dir), read_json(agent_dir / "train.json")
    return (checkpoint is not None and meta is not None and meta["agent_hash"] == agent_config_hash(config)
            and checkpoint[0] >= config.rl.iterations)


def _deploy(config: EnvEncConfig) -> dict:
    """Start the encoder service once; every EnvRunner of the agent connects to it by app name."""
    from envenc_ray.serve.client import deploy_encoder

    if _training_current(config) and _evaluation_current(config):
        print("serve: skipped, the agent is trained and evaluated already (nothing will call the encoder)")
        return {"skipped": True}
    client = deploy_encoder(config, app_name=config.rl.serve_app)
    print(f"serve: app {config.rl.serve_app!r} up (latent {client.latent_dim}, window {client.window})")
    return {"skipped": False}


def _report(config: EnvEncConfig) -> dict:
    """Rebuild the report unless it is newer than every artifact it reads."""
    from envenc_ray.report import INPUTS, report

    done = config.run_dir / "report" / "metrics.json"
    inputs = [config.run_dir / name for name in INPUTS if (config.run_dir / name).is_file()]
    if done.is_file() and all(path.stat().st_mtime <= done.stat().st_mtime for path in inputs):
        print(f"report: skipped, {done.parent} is newer than every artifact it reads")
        return {"skipped": True}
    return {"skipped": False, "path": str(report(config))}


# ------------------------------------------------------------------------------------------ preflight


def preflight(config: EnvEncConfig) -> None:
    """Everything that can be checked in a second, before any stage spends minutes."""
    run_dir = config.run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"run directory {run_dir} is not writable ({error.strerror}); set experiment.run_root "
                          "to a folder you can write to") from None

    model = config.vlm.model
    if model != "builtin:tiny" and _looks_like_path(model) and not Path(model).expanduser().is_dir():
        raise ModelError(f"vlm.model {model!r} is not a directory; point it at a Hugging Face model folder, a hub "
                         "name (org/model) or use builtin:tiny")
    if config.rl.obs_mode != "pixels" and config.rl.encoder_dir and not Path(config.rl.encoder_dir).is_dir():
        raise ModelError(f"rl.encoder_dir {config.rl.encoder_dir!r} does not exist; unset it to train one in "
                         f"{run_dir / 'encoder'}")

    for artifact, recorded_hash, current_hash in _artifact_hashes(config):
        if recorded_hash is not None and recorded_hash != current_hash:
            raise DataError(f"{artifact} was written by another config (hash {recorded_hash}, this config "
                            f"{current_hash}); use a new experiment.name, or delete {artifact} to redo it")


def _artifact_hashes(config: EnvEncConfig):
    """(artifact, hash recorded in it, hash this config would write) for each stage output present."""
    from envenc_ray.data.embed import output_hash as hidden_hash
    from envenc_ray.encoder.train import output_hash as encoder_hash
    from envenc_ray.rl.train import agent_config_hash

    run_dir = config.run_dir
    yield (run_dir / "frames", _recorded(run_dir / "frames" / "_collect.json", "config_hash"),
           config.section_hash("experiment", "env", "collect"))
    yield run_dir / "hidden", _recorded(run_dir / "hidden" / "_embed.json", "config_hash"), hidden_hash(config)
    yield run_dir / "encoder", _recorded(run_dir / "encoder" / "config.json", "config_hash"), encoder_hash(config)
    yield run_dir / "agent", _recorded(run_dir / "agent" / "train.json", "agent_hash"), agent_config_hash(config)


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


