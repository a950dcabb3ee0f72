"""Where an EnvRunner's latents come from: `EncoderSource` (small, picklable, built inside the EnvRunner) and
`encoder_source(config)`, which resolves it on the driver from the run layout (in-process model + encoder
folders, or the running Serve app).

The encoder itself is built lazily on the first call, i.e. inside the EnvRunner actor: no model is pickled,
and the driver's local EnvRunner (which has no env when remote runners sample) never loads one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from envenc_ray.errors import ModelError
from envenc_ray.files import read_export_config
from envenc_ray.runtime import inside_ray_actor


@dataclass(frozen=True)
class EncoderSource:
    """How an EnvRunner gets its encoder: small and picklable; `build()` runs inside the EnvRunner.

    `in_process` loads the truncated VLM (`vlm_model_path` + `vlm_config`) and the exported encoder
    (`encoder_dir`); `serve` connects an `EncoderClient` to the running Serve app `serve_app`.
    Anything that `build()` returns has `encode(frames_uint8, windows) -> (latents, windows)`,
    `.latent_dim` and `.window`. With `joint` (stage2.method 'joint') the "latents" are the window of the
    vision tower's per-patch features (`AdapterFeatures`), `latent_dim` their flat width.
    """

    kind: str
    latent_dim: int
    window: int = 1
    encoder_dir: str | None = None
    vlm_model_path: str | None = None
    vlm_config: dict = field(default_factory=dict)
    game: str = "pong"
    serve_app: str | None = None
    serve_options: dict = field(default_factory=dict)
    torch_threads: int | None = 1
    joint: bool = False

    def build(self):
        """The encoder, loaded here. Inside a Ray actor (an EnvRunner) torch threads are pinned to
        `torch_threads`; in the driver (local EnvRunner, evaluate, gym wrapper) vlm.num_threads decides."""
        from envenc_ray.runtime import set_torch_threads

        vlm_settings = dict(self.vlm_config)
        if inside_ray_actor():
            set_torch_threads(self.torch_threads)
            vlm_settings["num_threads"] = self.torch_threads
        if self.kind == "in_process":
            from envenc_ray.config import VLMConfig
            from envenc_ray.encoder.environment import load_environment_encoder

            encoder = load_environment_encoder(VLMConfig(**vlm_settings), self.vlm_model_path, self.encoder_dir,
                                               self.game, joint=self.joint)
        elif self.kind == "serve":
            from envenc_ray.serve.client import EncoderClient

            encoder = EncoderClient.connect(app_name=self.serve_app, **self.serve_options)
        else:
            raise ModelError(f"unknown encoder source {self.kind!r}; use 'in_process' or 'serve'")
        if encoder.latent_dim != self.latent_dim:
            raise ModelError(f"the {self.kind} encoder gives {encoder.latent_dim}-d latents but the agent was built "
                             f"for {self.latent_dim}-d ones; retrain the agent or point it at the same encoder")
        return encoder


def read_encoder_description(encoder_dir: str | Path) -> dict:
    """config.json of an exported encoder (latent_dim, window, kind) without loading any weights."""
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION

    return read_export_config(
        Path(encoder_dir), FORMAT, FORMAT_VERSION, rerun="rerun `envenc train-encoder`",
        missing=f"no exported encoder in {encoder_dir} (needs config.json and model.safetensors): run `envenc "
        "train-encoder` first, set rl.encoder_dir, or use rl.obs_mode=pixels")


def encoder_source(config) -> EncoderSource | None:
    """Where the agent's latents come from under `config.rl` (None for obs_mode 'pixels' and 'state').

    Runs on the driver: checks that the encoder exists (cheaply, without loading weights) and resolves
    every path to an absolute one, since EnvRunner actors need not share the driver's working directory.
    """
    rl = config.rl
    if not rl.reads_latents:
        return None
    if rl.encoder_source == "serve":
        return serve_encoder_source(config)
    from envenc_ray.config import check_pooling
    from envenc_ray.layout import RunLayout
    from envenc_ray.vlm.paths import resolve_model_path

    layout = RunLayout.of(config)
    encoder_dir = layout.agent_encoder
    description = read_encoder_description(encoder_dir)
    check_pooling(description["kind"], config.vlm.pooling)  # on the driver, not in every EnvRunner
    model_path, window = resolve_model_path(config), int(description.get("window", 1))
    latent_dim, joint = int(description["latent_dim"]), config.stage2.joint
    if joint:  # the observation is the window of per-patch vision features the RLModule's projector reads
        from envenc_ray.vlm.backbone import patch_shape_of

        patches, width = patch_shape_of(model_path, config.vlm.trust_remote_code)
        latent_dim = window * patches * width
    return EncoderSource(
        kind="in_process",
        latent_dim=latent_dim,
        window=window,
        encoder_dir=str(encoder_dir.resolve()),
        vlm_model_path=model_path,
        vlm_config=config.vlm.model_dump(mode="json"),
        game=layout.game,
        torch_threads=rl.torch_threads,
        joint=joint,
    )


def serve_encoder_source(config) -> EncoderSource:
    """Connect to the running Serve app once on the driver to learn latent_dim and window.

    Timeouts and retries are the client's (rl.encoder_timeout_s, rl.encoder_retries); when they are used
    up it raises EncoderServiceError, which the connector lets through to the user.
    """
    from envenc_ray.serve.client import EncoderClient

    rl = config.rl
    options = {"timeout_s": rl.encoder_timeout_s, "retries": rl.encoder_retries}
    client = EncoderClient.connect(app_name=rl.serve_app, **options)
    joint = config.stage2.joint
    if (client.info.get("output") == "patches") != joint:
        served = "vision features for stage2.method 'joint'" if not joint else "latents, not vision features"
        raise ModelError(f"the Serve app {rl.serve_app!r} serves {served}, but this config's stage2.method is "
                         f"{config.stage2.method!r}; redeploy it with this config (`envenc serve CONFIG`)")
    return EncoderSource(kind="serve", latent_dim=int(client.latent_dim), window=int(client.window),
                         serve_app=rl.serve_app, serve_options=options, torch_threads=rl.torch_threads, joint=joint)
