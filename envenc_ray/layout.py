"""Where things live: every folder of a run, the VLM it reads, the encoder its agent reads, its game's name.

    RunLayout.of(config)        the run directory's artifacts (frames/, hidden/, encoder/, agent/, ...),
                                `agent_encoder` (rl.encoder_dir, else <run>/encoder) and the canonical game
    base_model_path(config)     'builtin:tiny' -> <run>/vlm (built there on first use); else vlm.model
    resolve_model_path(config)  the VLM every later stage reads: the base model, or with
                                stage2.method 'finetuned' (or 'joint' from finetuned) the one
                                <run>/advise.json points at
    shared_dir(config)          <run_root>/_shared: artifacts that runs and experiment arms share
    synced_run(config)          around a stage on the driver: a run on a URI run root down, then up (storage.py)

Computed here once, so collect, embed, Serve, the RL connector, evaluation, the report and the benchmarks all
read and write the same places; no other module spells a run folder's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from envenc_ray.config import EnvEncConfig
from envenc_ray.envs.atari import game_name
from envenc_ray.errors import ModelError
from envenc_ray.files import read_json
from envenc_ray.storage import local_root, synced

BUILTIN_TINY = "builtin:tiny"
SHARED = "_shared"


@dataclass(frozen=True)
class RunLayout:
    """The artifacts of one run directory (see docs/architecture.md for what each holds)."""

    run_dir: Path
    game: str  # 'ALE/Pong-v5' and 'pong' are both 'pong': the name annotations, prompts and advice use
    agent_encoder: Path  # the exported encoder the agent, Serve and evaluation read

    @classmethod
    def of(cls, config: EnvEncConfig) -> RunLayout:
        run_dir = config.run_dir
        encoder = Path(config.rl.encoder_dir) if config.rl.encoder_dir else run_dir / "encoder"
        return cls(run_dir=run_dir, game=game_name(config.env.game), agent_encoder=encoder)

    @property
    def frames(self) -> Path:  # Parquet shards of recorded episodes (collect)
        return self.run_dir / "frames"

    @property
    def vlm(self) -> Path:  # the built-in tiny VLM, built on first use
        return self.run_dir / "vlm"

    @property
    def advise_pointer(self) -> Path:  # which shared finetuned VLM this run reads (advise)
        return self.run_dir / "advise.json"

    @property
    def hidden(self) -> Path:  # Parquet shards of hidden states (embed)
        return self.run_dir / "hidden"

    @property
    def encoder(self) -> Path:  # the exported encoder train-encoder writes
        return self.run_dir / "encoder"

    @property
    def encoder_train(self) -> Path:  # Ray Train's run folders of train-encoder (<resume key>/), for resuming
        return self.run_dir / "encoder_train"

    @property
    def agent(self) -> Path:  # RLlib checkpoints, progress, train.json, eval.json, reference.json (train, evaluate)
        return self.run_dir / "agent"

    @property
    def preferences(self) -> Path:  # Parquet shards of preference triples branched from rollouts (reward-model)
        return self.run_dir / "preferences"

    @property
    def reward_model(self) -> Path:  # the reward model reward-model exports and rl.reward reads
        return self.run_dir / "reward_model"

    @property
    def reward_model_train(self) -> Path:  # Ray Train's run folders of reward-model (<resume key>/), for resuming
        return self.run_dir / "reward_model_train"

    @property
    def report(self) -> Path:  # report.md, plots, metrics.json (report)
        return self.run_dir / "report"

    @property
    def logs(self) -> Path:  # Ray's own logs of our commands (driver and workers), shown with --verbose
        return self.run_dir / "logs"

    @property
    def bench(self) -> Path:  # benchmark JSON and plots unless --json says elsewhere
        return self.run_dir / "bench"

    @property
    def experiments(self) -> Path:  # one folder per arms file of `envenc experiment`
        return self.run_dir / "experiments"

    @property
    def artifacts(self) -> Path:  # `envenc experiment`: one run directory per distinct data key, shared by arms
        return self.run_dir / "artifacts"

    @property
    def encoders(self) -> Path:  # in such an artifact run: one exported encoder per encoder section
        return self.run_dir / "encoders"

    @property
    def tune(self) -> Path:  # `envenc tune` trials, results and best.yaml
        return self.run_dir / "tune"

    @property
    def manifest(self) -> Path:  # what each stage of `envenc run` did and how long it took
        return self.run_dir / "manifest.json"

    @property
    def config_copy(self) -> Path:  # the resolved config, so `envenc report RUN_DIR` can rebuild the report
        return self.run_dir / "config.yaml"


def shared_dir(config: EnvEncConfig) -> Path:
    return local_root(config.experiment.run_root) / SHARED


def synced_run(config: EnvEncConfig):
    """Around a stage on the driver: the run (on a URI run root) down before, what it wrote up after."""
    return synced(config.run_dir, shared_dir(config))


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
    from envenc_ray.config import advise_settings_hash

    if pointer["settings_hash"] != advise_settings_hash(config):
        raise ModelError(f"the finetuned VLM in {pointer['vlm']} was made with other vlm/advise settings than this "
                         "config's: rerun `envenc advise CONFIG` to make (or find) the matching one")
    return pointer["vlm"]
