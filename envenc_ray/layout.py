"""Where things live: every folder of a run and of the shared folder next to it, and the run's game name.

    RunLayout.of(config)        the run directory's artifacts (frames/, hidden/, encoder/, agent/, ...),
                                `agent_encoder` (rl.encoder_dir, else <run>/encoder) and the canonical game
    shared_dir(config)          <run_root>/_shared: artifacts that runs and experiment arms share
                                (shared_frames_root, shared_advise_dir, shared_vllm_dir name its folders)
    synced_run(config)          around a stage on the driver: a run on a URI run root down, then up (storage.py)

Computed here once, so collect, embed, Serve, the RL connector, evaluation, the report and the benchmarks all
read and write the same places; no other module spells a run folder's name. Shared ground: it imports only
config, files, storage and the like, so every folder may import it. Which VLM a run reads is vlm/paths.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from envenc_ray.config import EnvEncConfig, game_name
from envenc_ray.storage import local_root, synced

SHARED = "_shared"
CONFIG_COPY = "config.yaml"  # RunLayout.config_copy's name; `envenc report RUN_DIR` looks for it before a config exists


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
        return self.run_dir / CONFIG_COPY


def shared_dir(config: EnvEncConfig) -> Path:
    return local_root(config.experiment.run_root) / SHARED


def shared_frames_root(config: EnvEncConfig) -> Path:
    """The run root of advise's recordings of other games: one collect run per game and recipe in it."""
    return shared_dir(config) / "frames"


def shared_advise_dir(config: EnvEncConfig, key: str) -> Path:
    """One finetuned VLM ({vlm/, metrics.json}) per advise settings and data (`key`), found again by any run."""
    return shared_dir(config) / f"advise-{key}"


def shared_vllm_dir(config: EnvEncConfig) -> Path:
    """vLLM checkpoints cut at vlm.layer (vllm_backend.vllm_checkpoint, keyed by weights and layers), Serve's and the bench's."""
    return shared_dir(config) / "vllm"


def synced_run(config: EnvEncConfig):
    """Around a stage on the driver: the run (on a URI run root) down before, what it wrote up after."""
    return synced(config.run_dir, shared_dir(config))
