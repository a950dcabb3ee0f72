"""Where the VLM of a run lives: the base model as given, or the finetuned one `envenc advise` made.

    base_model_path(config)     'builtin:tiny' -> <run>/vlm (built there on first use); else vlm.model
    resolve_model_path(config)  the VLM every later stage reads: the base model, or with
                                stage2.method 'finetuned' the one <run>/advise.json points at
    shared_dir(config)          <run_root>/_shared: artifacts that runs and experiment arms share

Computed here once, so embed, Serve, the RL connector, evaluation and the benchmarks all load the same model.
"""

from __future__ import annotations

from pathlib import Path

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import ModelError
from envenc_ray.files import read_json

BUILTIN_TINY = "builtin:tiny"
ADVISE_POINTER = "advise.json"  # in the run directory: which shared finetuned VLM this run reads
SHARED = "_shared"


def shared_dir(config: EnvEncConfig) -> Path:
    return Path(config.experiment.run_root) / SHARED


def base_model_path(config: EnvEncConfig) -> str:
    """'builtin:tiny' -> <run>/vlm (built there on first use); anything else is used as given."""
    if config.vlm.model != BUILTIN_TINY:
        return config.vlm.model
    from envenc_ray.vlm.tiny import build_tiny_vlm

    model_dir = config.run_dir / "vlm"
    if not (model_dir / "config.json").exists():
        print(f"building the built-in tiny VLM (seed {config.vlm.tiny_seed}) in {model_dir}")
        build_tiny_vlm(model_dir, seed=config.vlm.tiny_seed)
    return str(model_dir)


def resolve_model_path(config: EnvEncConfig) -> str:
    """The VLM that embed, Serve and the agent read under `config.stage2.method`."""
    if config.stage2.method == "pretrained":
        return base_model_path(config)
    pointer = read_json(config.run_dir / ADVISE_POINTER)
    if pointer is None or not (Path(pointer["vlm"]) / "config.json").is_file():
        raise ModelError(f"stage2.method is 'finetuned' but {config.run_dir / ADVISE_POINTER} names no finetuned "
                         "VLM yet: run `envenc advise CONFIG` (or `envenc run CONFIG`) first")
    from envenc_ray.config import advise_settings_hash

    if pointer["settings_hash"] != advise_settings_hash(config):
        raise ModelError(f"the finetuned VLM in {pointer['vlm']} was made with other vlm/advise settings than this "
                         "config's: rerun `envenc advise CONFIG` to make (or find) the matching one")
    return pointer["vlm"]
