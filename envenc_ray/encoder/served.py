"""`ServedPair`: which truncated VLM + exported encoder a run serves, resolved once on the driver.

Serve replicas (`serve/replica.ReplicaSpec`), in-process EnvRunners (`rl/encoder_source.EncoderSource`), the joint
RLModule (`rl/joint.joint_module_spec`), evaluation and checkpoints (`rl/checkpoints.latents_identity`) and the
benchmarks (`bench/common.model_and_encoder`) take this one frozen, picklable value; `ServedPair.of(config)` is
the only place that reads the encoder's description against the config. Its checks (`checked`) run there, on the driver, so a
mismatch is one line before any actor or replica starts: encoder.kind against vlm.pooling, an encoder of
inputs 'vision' under stage2.method 'joint', a VLM that cannot be split at its projector, and the encoder's input
width against the width the VLM's read-out gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from envenc_ray.config import EnvEncConfig, VLMConfig, check_pooling
from envenc_ray.errors import ConfigError, ModelError
from envenc_ray.files import read_export_config, weights_sha256


@dataclass(frozen=True)
class ServedPair:
    """The truncated VLM (`model_path` read out as `vlm` says, its prompt formatted for `game`) and the exported
    encoder of `encoder_dir` (what its config.json says: kind, widths, window, the VLM states it reads), with
    `joint` (stage2.method 'joint': the window of per-patch vision features is served instead of latents)."""

    model_path: str  # absolute when local (a hub name otherwise)
    encoder_dir: str  # absolute: config.json + model.safetensors
    vlm: VLMConfig
    game: str  # canonical game name the prompt is formatted with (RunLayout.game)
    joint: bool = False
    kind: str = ""  # encoder.kind of the export
    latent_dim: int = 0
    window: int = 1
    inputs: str = "llm"  # encoder.inputs: which VLM states the encoder reads ('llm', 'vision', 'both')
    hidden_size: int = 0  # the encoder's input width
    trained_dtype: str | None = None  # the dtype its training states were computed in (vlm.dtype 'auto')
    patch_shape: tuple[int, int] | None = None  # (P, Dv) when the VLM is split at its projector

    @classmethod
    def of(cls, config: EnvEncConfig, model_path: str | Path | None = None,
           encoder_dir: str | Path | None = None) -> ServedPair:
        """The run's pair (the VLM every stage after advise reads, the agent's encoder), or the given folders,
        checked (`checked`): what everything that loads the pair takes."""
        return cls.resolve(config, model_path, encoder_dir).checked()

    @classmethod
    def resolve(cls, config: EnvEncConfig, model_path: str | Path | None = None,
                encoder_dir: str | Path | None = None) -> ServedPair:
        """`of` without the checks: which weights the pair names, for `identity` (an agent's record of them)."""
        from envenc_ray.layout import RunLayout
        from envenc_ray.vlm.paths import resolve_model_path

        layout = RunLayout.of(config)
        model = str(model_path) if model_path is not None else resolve_model_path(config)
        if Path(model).exists():
            model = str(Path(model).resolve())
        encoder = Path(encoder_dir) if encoder_dir is not None else layout.agent_encoder
        description = read_encoder_description(encoder)
        settings = description.get("encoder")
        inputs = settings.get("inputs", "llm") if isinstance(settings, dict) else "llm"
        pair = cls(model_path=model, encoder_dir=str(encoder.resolve()), vlm=config.vlm, game=layout.game,
                   joint=config.stage2.joint, kind=str(description.get("kind", "")),
                   latent_dim=int(description.get("latent_dim", 0)), window=int(description.get("window", 1)),
                   inputs=inputs, hidden_size=int(description.get("hidden_size", 0)),
                   trained_dtype=description.get("vlm_dtype"))
        return pair

    def checked(self) -> ServedPair:
        """The cross-setting checks, once, on the driver; returns the pair with `patch_shape` filled in."""
        from envenc_ray.vlm.backbone import hidden_size_of, patch_shape_of

        if self.kind:
            check_pooling(self.kind, self.vlm.pooling)
        if self.joint and self.inputs == "vision":
            raise ConfigError(f"the encoder in {self.encoder_dir} reads encoder.inputs 'vision', which never passes "
                              "the projector stage2.method 'joint' trains; use an encoder of inputs llm or both")
        patch_shape = None
        if self.joint or self.inputs != "llm":  # the VLM is split at its projector: a family that has none fails here
            patch_shape = tuple(patch_shape_of(self.model_path, self.vlm.trust_remote_code))
        if self.hidden_size:
            width = hidden_size_of(self.model_path, self.vlm.pooling, self.inputs, self.vlm.trust_remote_code)
            if width != self.hidden_size:
                raise ModelError(
                    f"the encoder in {self.encoder_dir} reads {self.hidden_size}-wide hidden states, but {self.model_path} "
                    f"read out with vlm.pooling={self.vlm.pooling} (encoder.inputs {self.inputs}) gives {width}-wide "
                    "ones; use the vlm settings that embedded its training data, or retrain it (`envenc train-encoder "
                    "CONFIG`) with these")
        return ServedPair(**{**self.__dict__, "patch_shape": patch_shape})

    @property
    def pooling(self) -> str:
        return self.vlm.pooling

    @property
    def prompt(self) -> str:
        """The static prompt the truncated VLM runs with every frame (`PromptPlan` reads it)."""
        return self.vlm.prompt.format(game=self.game)

    @property
    def observation_dim(self) -> int:
        """Width of what an agent observes: the latent, or with `joint` the flat window of per-patch features."""
        if self.joint:
            patches, width = self.patch_shape
            return self.window * patches * width
        return self.latent_dim

    def identity(self) -> dict:
        """The encoder and VLM by the sha256 of their weights: what agents record and check on resume and
        evaluation (`rl/checkpoints.latents_identity`), and what a replica reports."""
        return {"encoder_dir": self.encoder_dir, "encoder_sha256": weights_sha256(Path(self.encoder_dir)),
                "model_path": self.model_path, "vlm_sha256": weights_sha256(Path(self.model_path))}

    def load(self, vlm: VLMConfig | None = None, vllm_checkpoint: str | None = None):
        """The `EnvironmentEncoder` (or `AdapterFeatures` with `joint`) of this pair, loaded here; `vlm` overrides
        the VLM settings that change only how it runs (threads, dtype, compile)."""
        from envenc_ray.encoder.environment import load_environment_encoder

        return load_environment_encoder(vlm or self.vlm, self.model_path, self.encoder_dir, self.game,
                                        vllm_checkpoint=vllm_checkpoint, joint=self.joint)


def read_encoder_description(encoder_dir: str | Path) -> dict:
    """config.json of an exported encoder (latent_dim, window, kind) without loading any weights."""
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION

    return read_export_config(
        Path(encoder_dir), FORMAT, FORMAT_VERSION, rerun="rerun `envenc train-encoder`",
        missing=f"no exported encoder in {encoder_dir} (needs config.json and model.safetensors): run `envenc "
        "train-encoder` first, set rl.encoder_dir, or use rl.obs_mode=pixels")
