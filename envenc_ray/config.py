"""Typed configuration: one pydantic model per stage, grouped under `EnvEncConfig`.

A config is built from YAML presets composed left to right (later files override earlier ones, nested
mappings merge key by key), then `--set a.b=c` overrides. Every key must be known: a typo is an error
that names the key, the file it came from and what was expected. Every field carries a default, a unit
where it has one, and a sentence of why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from envenc_ray.errors import ConfigError
from envenc_ray.storage import is_uri


def _absolute_unless_uri(path: str) -> str:
    """A local path made absolute against the working directory of the process that loads the config. Ray
    tasks, actors, Train workers and Serve replicas run elsewhere, so a relative path handed to them would name
    another folder (or none); URIs (s3://...) are left as they are."""
    return path if is_uri(path) else str(Path(path).expanduser().absolute())


def _absolute_if_local(name: str) -> str:
    """A model named by an existing local folder becomes absolute (as `_absolute_unless_uri`); a hub name, the
    built-in model or a URI stays as given."""
    return _absolute_unless_uri(name) if not is_uri(name) and Path(name).expanduser().exists() else name


# a folder or file of the user's: absolute from the moment the config is loaded
LocalPath = Annotated[str, AfterValidator(_absolute_unless_uri)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # fields that change how fast or where a stage runs, not its output: left out of `EnvEncConfig.section_hash`
    RUNTIME_ONLY: ClassVar[set[str]] = set()


class ExperimentConfig(Section):
    # where the runs live is not what they compute: the same run under `runs` and under `$PWD/runs` is one run
    RUNTIME_ONLY: ClassVar[set[str]] = {"run_root"}

    name: str = Field("pong-tiny", description="Run name; artifacts go to <run_root>/<name>/.")
    run_root: LocalPath = Field("runs", validate_default=True,
                                description="Folder that holds one run directory per experiment name (a relative "
                                "folder is taken from the working directory and made absolute on load), or a "
                                "filesystem URI (s3://bucket/runs, gs://..., file:///mnt/runs) that every node "
                                "reaches; each process then works in a local copy (see docs/architecture.md, run "
                                "storage).")
    seed: int = Field(0, description="Seed of every random choice (envs, model init, data splits).")


class EnvConfig(Section):
    game: str = Field("pong", description="ALE game, e.g. 'pong' or 'ALE/Pong-v5'.")
    repeat_action_probability: float = Field(
        0.25, ge=0.0, le=1.0, description="Sticky actions (Machado et al. 2018): ALE v5's default 0.25."
    )
    frameskip: int = Field(4, ge=1, description="Emulator frames per env step (ALE v5 default 4).")
    full_action_space: bool = Field(False, description="Use all 18 actions instead of the game's minimal set.")
    max_episode_steps: int | None = Field(
        None, ge=1, description="Truncate episodes after this many env steps (None: the game's own end)."
    )
    fire_on_life_start: bool = Field(
        False, description="Press FIRE after each reset and each lost life, for games that wait for it to serve "
        "(Breakout): a greedy policy that never presses it stands still until ALE's 27,000-step cap. No effect in "
        "games without FIRE. The FireResetEnv of the standard Atari wrappers, also after lost lives."
    )


BUILTIN_TINY = "builtin:tiny"  # vlm.model's name for the tiny VLM built into <run>/vlm (vlm/paths.py, vlm/tiny.py)


class VLMConfig(Section):
    # compiled layers compute the eager states (tests/test_vlm.py); threads change only the order of float sums
    RUNTIME_ONLY: ClassVar[set[str]] = {"compile", "num_threads"}

    model: Annotated[str, AfterValidator(_absolute_if_local)] = Field(
        BUILTIN_TINY,
        description="'builtin:tiny' (created locally in <run>/vlm), a local HF model directory (made absolute on "
        "load) or a hub name.",
    )
    layer: int = Field(
        -1,
        description="Decoder layer whose output is read; layers above it are dropped. -1: the last layer.",
    )
    pooling: Literal["last", "mean", "image_mean", "spatial", "tokens"] = Field(
        "image_mean",
        description="How token states become one vector: last token, mean of all, mean of image tokens, 'spatial' "
        "(per channel, the expected column and row of a softmax over the image tokens' patch grid: 2 x D features "
        "that keep where things are; Llava-family models), or 'tokens' for the per-token (N, T, D) states.",
    )
    prompt: str = Field(
        "a game of {game}. describe the state.",
        description="Text after the image; '{game}' is filled with the game name.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Compute dtype of the VLM; bfloat16 halves memory and is faster on AMX/GPUs. 'auto': "
        "bfloat16 where the device computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX) and the embed "
        "stage found that it reads the game state as float32 does (probe R^2 within 0.01), else float32."
    )
    final_norm: bool = Field(
        False,
        description="Also apply the decoder's final norm when vlm.layer is not the last (HF applies it only after "
        "the last layer; vLLM's pooler always does, so serve.backend 'vllm' with a truncated decoder needs true).",
    )
    compile: bool = Field(
        False,
        description="torch.compile each kept decoder and vision layer: ~1.3x frames/s for the tiny VLM on a CPU, after "
        "a warm-up of ~10 s on the first batch and ~10 s more on the first other batch size, in every process that "
        "loads the VLM (Serve replicas, in-process EnvRunners, embed actors). Needs a C++ compiler on CPUs.",
    )
    device: str = Field("cpu", description="torch device: 'cpu', 'cuda', 'cuda:1', ...")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (None: leave torch's default). Set 1 in Ray actors."
    )
    trust_remote_code: bool = Field(False, description="Allow a hub model's own Python code; off unless asked.")
    crop: Literal["model", "none"] = Field(
        "model",
        description="'model': the processor's own center crop (CLIP-style ones cut off the score rows of a 210x160 "
        "frame); 'none': the whole frame resized to the crop size (no effect for processors that do not crop).",
    )
    tiny_seed: int = Field(0, description="Seed of the built-in tiny VLM's random weights and tokenizer.")
    tiny_patch_size: Literal[8, 16] = Field(
        16, description="Patch size of the built-in tiny VLM: 16 gives 8x8 image tokens, 8 gives 16x16, which place "
        "Pong's ball better under vlm.pooling 'spatial' (benchmarks/bench_encoder_spatial.json) at ~4x the vision cost.",
    )


class CollectConfig(Section):
    policy: Literal["random", "heuristic", "mixed"] = Field(
        "mixed", description="Who plays while frames are recorded; 'mixed' is heuristic with epsilon-random."
    )
    epsilon: float = Field(0.25, ge=0.0, le=1.0, description="Random-action probability of the 'mixed' policy.")
    episodes: int = Field(4, ge=1, description="Episodes to record.")
    max_steps_per_episode: int = Field(
        500, ge=1, description="Cap per recorded episode (env steps) so tiny runs stay tiny."
    )
    num_tasks: int = Field(2, ge=1, description="Parallel Ray tasks playing episodes.")


class Stage2Config(Section):
    """Which VLM the encoder reads: the model as given, one finetuned on game text first (`envenc advise`), or
    one whose projector the RL loss trains alongside the agent."""

    method: Literal["pretrained", "finetuned", "joint"] = Field(
        "pretrained",
        description="'pretrained': vlm.model as is (the built-in tiny VLM has random weights); 'finetuned': "
        "`advise` first finetunes it on (frame, text) pairs from the RAM annotations, and every later stage "
        "reads the finetuned VLM; 'joint': the agent's RLModule holds the VLM's multimodal projector as trainable "
        "weights (then the frozen truncated decoder and the encoder), so PPO's loss trains it (Llava-family "
        "models, rl.algo ppo, rl.obs_mode latent).",
    )
    joint_from: Literal["pretrained", "finetuned"] = Field(
        "pretrained",
        description="stage2.method 'joint': the VLM the adapter starts from (and embed and train-encoder read): "
        "vlm.model as is, or the one `advise` finetunes first.",
    )
    train_encoder: bool = Field(
        False,
        description="stage2.method 'joint': the RL loss also trains the encoder (pretrained by train-encoder); "
        "false keeps it frozen and trains the projector alone.",
    )

    @property
    def joint(self) -> bool:
        """Whether the agent's RLModule holds (and PPO trains) the projector: the module, not Serve, makes latents."""
        return self.method == "joint"

    @property
    def reads_finetuned_vlm(self) -> bool:
        """Whether the run reads the VLM `advise` makes (and so runs advise first)."""
        return self.method == "finetuned" or (self.joint and self.joint_from == "finetuned")


class AdviseConfig(Section):
    """Stage `advise`: finetune the VLM on (frame, text) pairs with the causal-LM loss on the answer tokens."""

    method: Literal["full", "lora"] = Field(
        "full", description="'full' trains every weight (small models); 'lora' trains peft LoRA adapters, merged on export."
    )
    train: Literal["above_readout", "all"] = Field(
        "above_readout",
        description="Which weights learn: 'above_readout' only those the read-out cannot see (the decoder layers "
        "above vlm.layer, the final norm where the read-out skips it, the LM head), so embed reads the same hidden "
        "states from the finetuned VLM as from its base and advice cannot lower the latent (training every weight "
        "lowered the spatial read-out's ball_x R^2 from 0.84 to 0.56; README, 'Stage 2 does no harm'); 'all' every "
        "weight (or every LoRA adapter), vision tower included.",
    )
    text: Literal["advice", "describe", "both"] = Field(
        "both",
        description="Answer text: the seed's advice sentence, a description of where things are (grid cells, "
        "ball side, lives, score), or the description followed by the advice.",
    )
    games: list[str] = Field(
        [],
        description="Annotated games whose frames train the VLM; [] means env.game only. Games other than env.game "
        "are recorded with the collect settings into a shared folder under experiment.run_root.",
    )
    data: LocalPath | None = Field(
        None,
        description="A Parquet or JSONL file of (image, text) rows to train on instead of recorded frames (made "
        "absolute on load); `image` is a path (relative to the file) or encoded bytes.",
    )
    question: str = Field(
        "", description="Text asked after the image; '' uses vlm.prompt (so the embed read-out sees the same prompt)."
    )
    epochs: int = Field(8, ge=1, description="Maximum training epochs.")
    batch_size: int = Field(32, ge=1, description="(frame, text) pairs per gradient step (per worker).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (full finetuning of the tiny VLM; use ~1e-4 for LoRA).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    patience: int = Field(2, ge=1, description="Early stopping: epochs without held-out loss improvement.")
    max_pairs_per_game: int | None = Field(
        None, ge=1, description="Cap on training pairs per game (a seeded subsample); None uses every frame."
    )
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names (of the decoder) that get LoRA adapters."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Train worker; fractions on small machines.")
    use_gpu: bool = Field(False, description="One GPU per Train worker (a GPU cluster).")
    eval_pairs: int = Field(
        200, ge=1, description="Held-out frames whose greedy generation is parsed for the advised move (accuracy)."
    )
    report_poll_s: float = Field(0.2, gt=0, description="How often Ray Train collects epoch reports (s).")


class EmbedConfig(Section):
    batch_size: int = Field(32, ge=1, description="Frames per VLM forward pass.")
    concurrency: int = Field(1, ge=1, description="TruncatedVLM actors in the Ray Data actor pool.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor (fractions are fine).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (1 on a GPU cluster).")
    hidden_dtype: Literal["float16", "float32"] = Field(
        "float32",
        description="Storage dtype of pooled hidden states in hidden/*.parquet; per-token states (vlm.pooling "
        "'tokens', T times larger) are always stored float16.",
    )


class EncoderConfig(Section):
    inputs: Literal["llm", "vision", "both"] = Field(
        "llm",
        description="What the autoencoder reads of each frame: the LLM's hidden state at vlm.layer ('llm'), the "
        "vision tower's output before the multimodal projector, averaged over patches ('vision': the decoder does "
        "not run), or both concatenated ([llm, vision]: the 'holistic' embedding). Llava-family models for "
        "vision and both.",
    )
    kind: Literal["mlp", "temporal", "vq", "linear", "tokens"] = Field(
        "temporal",
        description="Autoencoder over hidden states: per-frame MLP, temporal window, VQ, linear, or 'tokens' "
        "(attention pooling over a window of per-token states; needs vlm.pooling 'tokens').",
    )
    latent_dim: int = Field(64, ge=1, description="Size of the latent the agent sees.")
    hidden_dims: list[int] = Field([256], description="Widths of the encoder MLP (mirrored by the decoder).")
    window: int = Field(4, ge=1, description="Consecutive frames per latent (temporal and tokens encoders).")
    token_queries: int = Field(
        4, ge=1, description="Learned queries of the tokens encoder's attention pooling: summaries kept per frame."
    )
    codebook_size: int = Field(256, ge=2, description="Codes of the VQ encoder.")
    epochs: int = Field(20, ge=1, description="Maximum training epochs.")
    batch_size: int = Field(128, ge=1, description="Samples per gradient step (per worker).")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    val_fraction: float = Field(
        0.25, gt=0, lt=1, description="Fraction of episodes held out for validation (and from advice finetuning, so "
        "probes are measured on episodes no stage trained on)."
    )
    patience: int = Field(5, ge=1, description="Early stopping: epochs without validation improvement.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per Train worker; fractions on small machines.")
    report_poll_s: float = Field(
        0.2,
        gt=0,
        description="How often Ray Train's controller collects epoch reports (s). Workers wait for it, so "
        "Ray's default of 2 s would make every small epoch last 2 s.",
    )


class ServeConfig(Section):
    """The EnvironmentEncoder Ray Serve deployment (truncated VLM + encoder)."""

    backend: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What runs the truncated VLM in a replica: 'transformers' (TruncatedVLM), or 'vllm' (vLLM's "
        "pooling runner; needs the envenc-ray[vllm] extra, Llava-family models, vlm.dtype and vlm.pooling as set).",
    )
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica; fractions leave room for EnvRunners here.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 on a GPU cluster).")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Autoscaling target of in-flight calls per replica."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="Autoscaling: how long the load must stay above target before a replica is added."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Autoscaling: how long the load must stay below target before a replica is removed."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Autoscaling: the window over which in-flight calls are averaged (replicas and "
        "callers push their counts every half window, or every 10 s when that is shorter)."
    )
    max_batch_calls: int = Field(
        8, ge=1, description="@serve.batch size: concurrent calls (each of many frames) merged into one forward."
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="How long a batch waits to fill up once a call arrives at an idle replica (seconds). 0: calls that "
        "arrive while a forward runs are batched anyway, and an idle replica starts at once: EnvRunners wait for "
        "their call, so a wait delays every step (docs/performance.md: 5 ms -> 0 took one EnvRunner from 137 to 166 "
        "env steps/s).")
    max_ongoing_requests: int = Field(
        16, ge=1, description="Calls a replica accepts at once; must be >= max_batch_calls or batches stay small."
    )
    max_frames_per_call: int = Field(512, ge=1, description="Larger calls are refused: split them client-side.")
    max_frame_pixels: int = Field(
        1_000_000, ge=1, description="Largest frame accepted (height x width); bigger ones are refused, not resized."
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="Calls waiting for a replica beyond max_ongoing_requests; more are rejected at once "
        "with a back-pressure error (HTTP 503). -1: no bound."
    )
    max_body_bytes: int = Field(
        64 * 2**20, ge=1, description="Largest HTTP body (and decompressed .npz content) accepted; bigger: HTTP 413."
    )
    cache_size: int = Field(
        4096, ge=0, description="Content-hash cache of hidden states for identical frames (entries; 0: off)."
    )
    deploy_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a (re)deploy may take until every replica runs this deploy's VLM and "
        "encoder (checked through each replica's info); past it the deploy fails instead of serving old weights.")
    http: bool = Field(False, description="Also serve POST /encode (.npy in, .npy out); off: handle calls only.")
    http_host: str = Field("127.0.0.1", description="HTTP bind address; loopback unless you mean to expose it.")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_calls:
            raise ValueError(
                f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be >= serve.max_batch_calls "
                f"({self.max_batch_calls}), otherwise Serve never fills a batch"
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.min_replicas ({self.min_replicas}) > serve.max_replicas ({self.max_replicas})")
        return self


LATENT_OBS_MODES = ("latent", "latent+pixels")  # the rl.obs_mode values whose observation the encoder makes


class RLConfig(Section):
    """RLlib agent training (stage `train`) and evaluation on latents, pixels or both."""

    algo: Literal["ppo", "dreamerv3"] = Field(
        "ppo", description="RLlib algorithm: PPO (on-policy, every obs mode) or DreamerV3 (model-based, latents only)."
    )
    obs_mode: Literal["latent", "latent+pixels", "pixels", "state"] = Field(
        "latent",
        description="What the agent sees: encoder latents, latents plus an 84x84 grayscale frame stack (Dict), "
        "the frame stack alone (the baseline without the encoder), or 'state': the game's objects read from the "
        "RAM (rl/state.py; annotated games only), an upper reference for what a perfect encoder could give, not "
        "a feature of the method.",
    )
    encoder_source: Literal["in_process", "serve"] = Field(
        "in_process",
        description="Where latents come from: an EnvironmentEncoder loaded inside each EnvRunner (tests, tiny "
        "runs) or the Ray Serve deployment shared by all EnvRunners (envenc serve).",
    )
    encoder_dir: LocalPath | None = Field(None, description="Exported encoder to load (made absolute on load); "
                                          "None: <run>/encoder.")
    serve_app: str = Field("envenc-encoder", description="Serve app the EnvRunners call (encoder_source=serve).")
    encoder_timeout_s: float = Field(
        60.0, gt=0, description="Serve client: seconds one encode call may take before it is retried."
    )
    encoder_retries: int = Field(
        3, ge=0, description="Serve client: retries of a failed call (backoff doubles) before training stops."
    )
    num_env_runners: int = Field(1, ge=0, description="Remote EnvRunner actors (0: sample in the driver process).")
    num_envs_per_env_runner: int = Field(
        4, ge=1, description="Vectorised sub-envs per EnvRunner; their newest frames share one encoder call per step."
    )
    overlap: bool = Field(
        False,
        description="Double-buffered sampling: each EnvRunner samples its sub-envs as two groups in two threads, so "
        "one group steps while the other's frames are encoded (rl/overlap.py). Needs an even "
        "num_envs_per_env_runner; PPO only.",
    )
    cpus_per_env_runner: float = Field(
        0.5, gt=0, description="CPUs reserved per EnvRunner; fractions on small machines."
    )
    torch_threads: int = Field(
        1, ge=1, description="torch intra-op threads in each EnvRunner, so N actors don't fight over N cores."
    )
    num_learners: int = Field(0, ge=0, description="Remote Learner actors (0: learn in the driver process).")
    num_gpus_per_learner: float = Field(0.0, ge=0, description="GPUs per Learner (1 on a GPU cluster).")
    rollout_fragment_length: int | None = Field(
        None, ge=1, description="Env steps per sub-env per sample call; None: PPO derives it from train_batch_size."
    )
    train_batch_size: int = Field(512, ge=1, description="PPO: env steps per training iteration, over all runners.")
    minibatch_size: int = Field(128, ge=1, description="PPO: samples per SGD step.")
    num_epochs: int = Field(4, ge=1, description="PPO: passes over each train batch.")
    lr: float = Field(2.5e-4, gt=0, description="PPO: Adam learning rate (the Atari PPO default).")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount per env step.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    entropy_coeff: float = Field(0.01, ge=0, description="PPO: entropy bonus weight (the Atari PPO default).")
    lr_anneal_steps: int | None = Field(
        None, ge=1, description="PPO: anneal rl.lr linearly to 0 over this many env steps (CleanRL's anneal_lr, "
        "over the whole budget); None: a constant learning rate.")
    clip_param: float = Field(0.3, gt=0, description="PPO: clip range of the policy ratio (RLlib's 0.3; the Atari "
                              "PPO of CleanRL and Schulman et al. 2017 uses 0.1).")
    vf_loss_coeff: float = Field(1.0, ge=0, description="PPO: weight of the value loss (RLlib's 1.0; CleanRL 0.5).")
    grad_clip: float | None = Field(None, gt=0, description="PPO: clip the gradients' global norm at this value "
                                    "(None: no clipping, RLlib's default; CleanRL 0.5).")
    fcnet_hiddens: list[int] = Field(
        [256, 256], description="MLP widths over latents (latent mode; the latent branch of latent+pixels)."
    )
    frame_stack: int = Field(4, ge=1, description="Grayscale frames stacked in the pixels observation (DQN's 4).")
    pixel_size: int = Field(
        84, ge=36, description="Side of the square grayscale pixels observation (DQN's 84; >= 36 for its CNN)."
    )
    iterations: int = Field(100, ge=1, description="Training iterations; a rerun with more resumes from the last.")
    checkpoint_every: int = Field(
        10, ge=1, description="Checkpoint into <run>/agent/ every N iterations (and after the last)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk; older ones are deleted.")
    env_runner_restarts: int = Field(
        3, ge=0, description="Times RLlib recreates an EnvRunner that died (killed, out of memory, node lost); an "
        "encoder error in one is raised at once instead."
    )
    dreamer_model_size: Literal["nano", "micro", "mini", "XXS", "XS", "S"] = Field(
        "XS", description="DreamerV3 model size (RLlib's names; XS is the paper's smallest)."
    )
    dreamer_training_ratio: float = Field(
        64.0, gt=0, description="DreamerV3: replayed steps trained per env step sampled (the paper uses 64-1024)."
    )
    dreamer_batch_size_B: int = Field(16, ge=1, description="DreamerV3: sequences per train batch.")
    dreamer_batch_length_T: int = Field(64, ge=1, description="DreamerV3: steps per sequence.")
    dreamer_horizon_H: int = Field(15, ge=1, description="DreamerV3: imagined steps for actor/critic learning.")
    eval_episodes: int = Field(5, ge=1, description="Greedy episodes `envenc evaluate` plays.")
    eval_max_steps: int | None = Field(
        None, ge=1, description="Cap per evaluation episode (env steps; None: play to the game's end)."
    )
    # --- the reward the agent trains on (stage `reward-model` makes the model)
    reward: Literal["env", "model", "env+model"] = Field(
        "env",
        description="What an EnvRunner writes as each step's reward: the game's, the preference-trained reward "
        "model's (<run>/reward_model, `envenc reward-model`), or their sum. Evaluation always reports the game's.",
    )
    reward_model_scale: float = Field(
        1.0, gt=0, description="Weight of the reward model's output (Bradley-Terry log-odds, centred on its training "
        "triples) in 'model' and 'env+model'; Pong's env rewards are +-1 per point."
    )

    @property
    def reads_latents(self) -> bool:
        """Whether the agent's observation comes from the VLM + encoder (not pixels or the RAM state alone)."""
        return self.obs_mode in LATENT_OBS_MODES

    @model_validator(mode="after")
    def _check_combination(self) -> "RLConfig":
        if self.overlap and (self.num_envs_per_env_runner < 2 or self.num_envs_per_env_runner % 2):
            raise ValueError(f"rl.overlap splits each EnvRunner's sub-envs into two equal groups: set "
                             f"rl.num_envs_per_env_runner to an even number >= 2 (got {self.num_envs_per_env_runner})")
        if self.overlap and self.algo != "ppo":
            raise ValueError(f"rl.overlap works with rl.algo 'ppo' (got {self.algo!r}); set rl.overlap to false")
        if self.reward != "env" and self.obs_mode == "state":
            raise ValueError("rl.reward model and env+model read frames or latents, which rl.obs_mode 'state' does "
                             "not make; set rl.reward=env for the state reference")
        if self.algo == "dreamerv3" and self.obs_mode != "latent":
            raise ValueError(f"rl.algo 'dreamerv3' trains on 1-D latents only; set rl.obs_mode to 'latent' "
                             f"(got {self.obs_mode!r}) or use rl.algo 'ppo' for pixels")
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(f"rl.minibatch_size ({self.minibatch_size}) > rl.train_batch_size "
                             f"({self.train_batch_size}); lower it")
        return self


class RewardModelConfig(Section):
    """Stage `reward-model`: preference triples made from the emulator, and a small transformer trained on them
    with a Bradley-Terry loss (a Ray Train job) as a reward model over (frame t-1, frame t). rl.reward uses it."""

    representation: Literal["latent", "pixels"] = Field(
        "latent",
        description="What the model sees of a frame: the agent's encoder latent (rl.encoder_dir, else <run>/encoder; "
        "needs rl.obs_mode latent or latent+pixels) or the grayscale frame (pixel_size x pixel_size).",
    )
    pixel_size: int = Field(84, ge=8, description="Side of the grayscale frame of representation 'pixels'.")
    episodes: int = Field(8, ge=2, description="Rollouts whose states are branched; the last val_fraction of them "
                          "are held out whole.")
    max_steps_per_episode: int = Field(3000, ge=1, description="Cap per rollout (env steps).")
    epsilon: float = Field(
        0.25, ge=0.0, le=1.0, description="Random-action probability of the RAM heuristic that plays the rollouts."
    )
    horizon: int = Field(
        8, ge=1, description="k: env steps per branch (its own first action, then the RAM heuristic); the branch with "
        "the higher return over them wins. 8 steps (32 frames) is long enough for a missed Pong ball to score."
    )
    reach_steps: float = Field(
        2.0, gt=0, description="Games with a ball: branch only where it reaches the agent's paddle within this many "
        "env steps (at its current velocity), where one move decides the point; elsewhere nearly every branch ties."
    )
    d_model: int = Field(64, ge=8, description="Width of the transformer's tokens.")
    layers: int = Field(2, ge=1, description="Transformer encoder layers.")
    heads: int = Field(4, ge=1, description="Attention heads; must divide d_model.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout inside the transformer (few triples: it overfits).")
    epochs: int = Field(30, ge=1, description="Maximum training epochs.")
    batch_size: int = Field(32, ge=1, description="Triples per gradient step (per worker).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    patience: int = Field(5, ge=1, description="Early stopping: epochs without held-out loss improvement.")
    val_fraction: float = Field(0.25, gt=0, lt=1, description="Fraction of rollouts held out for the accuracy.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs per Train worker; fractions on small machines.")
    report_poll_s: float = Field(0.2, gt=0, description="How often Ray Train collects epoch reports (s).")

    @model_validator(mode="after")
    def _check_heads(self) -> "RewardModelConfig":
        if self.d_model % self.heads:
            raise ValueError(f"reward_model.heads ({self.heads}) must divide reward_model.d_model ({self.d_model})")
        return self


class EnvEncConfig(Section):
    """The whole pipeline's configuration, one section per stage."""

    experiment: ExperimentConfig = ExperimentConfig()
    env: EnvConfig = EnvConfig()
    vlm: VLMConfig = VLMConfig()
    collect: CollectConfig = CollectConfig()
    stage2: Stage2Config = Stage2Config()
    advise: AdviseConfig = AdviseConfig()
    embed: EmbedConfig = EmbedConfig()
    encoder: EncoderConfig = EncoderConfig()
    serve: ServeConfig = ServeConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    rl: RLConfig = RLConfig()

    # ------------------------------------------------ encoder.inputs and stage2.method 'joint': what cannot work

    @model_validator(mode="after")
    def _check_views_and_joint(self) -> "EnvEncConfig":
        inputs, stage2 = self.encoder.inputs, self.stage2
        if inputs != "llm" and self.vlm.pooling == "tokens":
            raise ValueError(f"encoder.inputs {inputs!r} reads one pooled vector per frame, but vlm.pooling 'tokens' "
                             "keeps per-token states; set vlm.pooling to last, mean, image_mean or spatial, or "
                             "encoder.inputs=llm")
        if self.rl.encoder_dir is None:  # the encoder this config trains reads the states its vlm.pooling gives
            try:
                check_pooling(self.encoder.kind, self.vlm.pooling)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        if inputs != "llm" and self.serve.backend == "vllm":
            raise ValueError(f"serve.backend 'vllm' returns the LLM's hidden state only, not encoder.inputs {inputs!r}; "
                             "set serve.backend=transformers or encoder.inputs=llm")
        if not stage2.joint:
            return self
        refusals = [
            (self.rl.algo != "ppo", f"rl.algo {self.rl.algo!r}: joint training is built on PPO's RLModule; set rl.algo=ppo"),
            (self.rl.obs_mode != "latent", f"rl.obs_mode {self.rl.obs_mode!r}: set rl.obs_mode=latent"),
            (self.vlm.pooling == "tokens",
             "vlm.pooling 'tokens': set vlm.pooling to last, mean, image_mean or spatial"),
            (inputs == "vision", "encoder.inputs 'vision' never reads the projector it would train; set encoder.inputs "
             "to llm or both"),
            (self.serve.backend == "vllm", "serve.backend 'vllm' cannot return the vision tower's output; set "
             "serve.backend=transformers"),
            (self.rl.reward != "env" and self.reward_model.representation == "latent",
             f"rl.reward {self.rl.reward!r} on latent representations: the agent's latents move as the projector "
             "trains, so a reward model trained on the frozen ones reads other numbers; set "
             "reward_model.representation=pixels or rl.reward=env"),
        ]
        for refused, why in refusals:
            if refused:
                raise ValueError(f"stage2.method 'joint' does not work with {why}")
        return self

    @property
    def run_dir(self) -> Path:
        """Where this process reads and writes the run: <run_root>/<name>, or its local copy for a URI run root
        (storage.local_root)."""
        from envenc_ray.storage import local_root

        return local_root(self.experiment.run_root) / self.experiment.name

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections: a stage's output matches its config when equal. Settings
        that change how fast, not what, a stage computes (a section's RUNTIME_ONLY) are left out."""
        payload = {name: getattr(self, name).model_dump(mode="json", exclude=getattr(self, name).RUNTIME_ONLY)
                   for name in sections}
        return content_hash(payload)


# encoder.kind against the hidden states it reads: EnvEncConfig's validator checks the settings (unless
# rl.encoder_dir names an exported encoder, whose own kind ServedPair checks), train-encoder the states on disk.
def check_hidden_kind(kind: str, per_token: bool, what: str) -> None:
    """Per-token hidden states (vlm.pooling 'tokens') go to encoder.kind 'tokens' only, and it reads nothing
    else. `what` names the hidden states' source in the message, e.g. "vlm.pooling 'tokens' gives"."""
    if kind == "tokens" and not per_token:
        raise ConfigError(f"encoder.kind 'tokens' reads per-token hidden states (T, D), but {what} one pooled "
                          "vector per frame; set vlm.pooling=tokens (and rerun `envenc embed`), or choose another "
                          "encoder.kind")
    if kind != "tokens" and per_token:
        raise ConfigError(f"encoder.kind {kind!r} reads one pooled hidden state per frame, but {what} per-token "
                          "states (T, D); set encoder.kind=tokens, or vlm.pooling to last, mean, image_mean or spatial")


def check_pooling(kind: str, pooling: str) -> None:
    """`check_hidden_kind` for the settings: encoder.kind against vlm.pooling, when the config is validated."""
    check_hidden_kind(kind, pooling == "tokens", f"vlm.pooling {pooling!r} gives")


def game_name(game: str) -> str:
    """The short lower-case name used by annotations and advice: 'ALE/Pong-v5' -> 'pong'."""
    if game.startswith("ALE/"):
        game = game[len("ALE/"):].rsplit("-v", 1)[0]
        return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(game))
    return game.lower()


def content_hash(payload: Any) -> str:
    """The short stable hash of a JSON-able payload (keys sorted) that every artifact records to say what made it."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# vlm settings that change what the VLM computes for a frame before any layer is cut: what advice
# finetuning depends on (layer, pooling, dtype, device and threads only change how it is read out).
ADVISE_VLM_KEYS = ("model", "prompt", "trust_remote_code", "tiny_seed", "tiny_patch_size", "crop")
# advise settings that change where and how fast it runs, not what it learns.
ADVISE_PLACEMENT_KEYS = ("num_workers", "cpus_per_worker", "use_gpu", "report_poll_s")


def advise_settings_hash(config: EnvEncConfig) -> str:
    """A short hash of every setting the finetuned VLM depends on (its data is hashed separately)."""
    vlm = config.vlm.model_dump(mode="json")
    # Which weights train under 'above_readout' depends on where the read-out is.
    vlm_keys = ADVISE_VLM_KEYS + (("layer", "final_norm") if config.advise.train == "above_readout" else ())
    payload = {
        "vlm": {key: vlm[key] for key in vlm if key in vlm_keys},
        "advise": config.advise.model_dump(mode="json", exclude=set(ADVISE_PLACEMENT_KEYS)),
        "val_fraction": config.encoder.val_fraction,  # advise holds out the episodes the encoder's probes test on
        "seed": config.experiment.seed,
        "env": config.env.model_dump(mode="json", exclude={"game"}),
        "collect": config.collect.model_dump(mode="json"),
        "game": config.env.game,
    }
    return content_hash(payload)


def load_config(paths: str | Path | list[str | Path] = (), overrides: list[str] = ()) -> EnvEncConfig:
    """Compose YAML presets left to right, apply `key.path=value` overrides, validate.

    Errors name the offending key and the file (or `--set`) that supplied it.
    """
    if isinstance(paths, (str, Path)):  # one file: load_config("configs/pong-tiny.yaml") reads it, not its letters
        paths = [paths]
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> where its value came from
    for path in paths:
        data = _read_yaml(Path(path))
        _merge(merged, data, sources, origin=str(path))
    for override in overrides:
        key, value = _parse_override(override)
        _merge(merged, _nest(key, value), sources, origin=f"--set {override!r}")
    try:
        return EnvEncConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(explain_validation_error(error, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(path, "config file", "pass a YAML file such as configs/pong-tiny.yaml")


def read_yaml_mapping(path: Path, what: str, example: str) -> dict[str, Any]:
    """The mapping in the YAML file `path` ({} when empty), or a one-line ConfigError naming `what` file is
    wrong, where, and (for a missing file) `example` of what to pass instead."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {example}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of keys (got {type(data).__name__})")
    return data


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. encoder.latent_dim=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string and let validation judge it
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _merge(into: dict, new: dict, sources: dict[str, str], origin: str, prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, sources, origin, prefix=dotted + ".")
        else:
            into[key] = value
            _record(value, dotted, sources, origin)


def _record(value: Any, dotted: str, sources: dict[str, str], origin: str) -> None:
    sources[dotted] = origin
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(inner, f"{dotted}.{key}", sources, origin)


def explain_validation_error(error: ValidationError, sources: dict[str, str]) -> str:
    """One message for all of a validation's errors, each naming the dotted key and where it came from."""
    lines = []
    for item in error.errors():
        dotted = ".".join(str(part) for part in item["loc"])
        origin = next(
            (sources[k] for k in _prefixes(dotted) if k in sources), "the defaults"
        )
        if not item["loc"]:  # a check across sections (EnvEncConfig's validators): its message names the keys
            lines.append(item["msg"].removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in item["loc"][:-1])
            known = _known_keys(section)
            lines.append(f"unknown key '{dotted}' in {origin}; known keys here: {', '.join(known)}")
        else:
            lines.append(f"bad value for '{dotted}' in {origin}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = EnvEncConfig
    for part in filter(None, section.split(".")):
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)
