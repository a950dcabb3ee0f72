"""Which VLM a run reads: the folder every stage after collect loads its truncated VLM from.

    base_model_path(config)     'builtin:tiny' -> <run>/vlm (built there on first use); else vlm.model
    resolve_model_path(config)  the VLM every later stage reads: the base model, or with
                                stage2.method 'finetuned' (or 'joint' from finetuned) the one
                                <run>/advise.json points at

Here in vlm/, beside the tiny VLM it builds, not in layout.py: layout.py is shared ground and names folders,
while this builds a model and checks the advise pointer against the vlm/advise settings. Its own module, not
tiny.py: tiny.py makes one model (spec, weights, tokenizer), this picks among any vlm.model, the tiny one and
advise's finetuned one, and imports tiny.py only when it builds. 'builtin:tiny' itself is config.BUILTIN_TINY,
the default of vlm.model, which backbone.py checks too.
"""

from __future__ import annotations

from pathlib import Path

from envenc_ray.config import BUILTIN_TINY, EnvEncConfig, advise_settings_hash
from envenc_ray.errors import ModelError
from envenc_ray.files import read_json
from envenc_ray.layout import RunLayout


def base_model_path(config: EnvEncConfig) -> str:
    """'builtin:tiny' -> <run>/vlm (built there on first use, and again when vlm.tiny_seed or vlm.tiny_patch_size
    differs from its build); anything else is used as given."""
    if config.vlm.model != BUILTIN_TINY:
        return config.vlm.model
    from envenc_ray.vlm.tiny import MARKER_FILE, build_tiny_vlm

    model_dir = RunLayout.of(config).vlm
    wanted = {"seed": config.vlm.tiny_seed, "patch_size": config.vlm.tiny_patch_size}
    built = read_json(model_dir / MARKER_FILE)
    if built is None or {"seed": built["seed"], "patch_size": built["spec"]["patch_size"]} != wanted:
        print(f"building the built-in tiny VLM (seed {config.vlm.tiny_seed}, patch {config.vlm.tiny_patch_size}) in "
              f"{model_dir}")
        build_tiny_vlm(model_dir, seed=config.vlm.tiny_seed, patch_size=config.vlm.tiny_patch_size)
    return str(model_dir)


def resolve_model_path(config: EnvEncConfig) -> str:
    """The VLM that embed, Serve and the agent read under `config.stage2` (absolute if a folder)."""
    if not config.stage2.reads_finetuned_vlm:
        model = base_model_path(config)
    else:
        model = _finetuned_model_path(config)
    return str(Path(model).resolve()) if Path(model).exists() else model


def _finetuned_model_path(config: EnvEncConfig) -> str:
    pointer_path = RunLayout.of(config).advise_pointer
    pointer = read_json(pointer_path)
    if pointer is None or not (Path(pointer["vlm"]) / "config.json").is_file():
        raise ModelError(f"stage2 reads the finetuned VLM but {pointer_path} names none yet: run "
                         "`envenc advise CONFIG` (or `envenc run CONFIG`) first")
    if pointer["settings_hash"] != advise_settings_hash(config):
        raise ModelError(f"the finetuned VLM in {pointer['vlm']} was made with other vlm/advise settings than this "
                         "config's: rerun `envenc advise CONFIG` to make (or find) the matching one")
    return pointer["vlm"]
