"""Where an EnvRunner's latents come from: `EncoderSource` (small, picklable, built inside the EnvRunner) and
`encoder_source(config)`, which resolves it on the driver from the run layout (in-process model + encoder
folders, or the running Serve app).

The encoder itself is built lazily on the first call, i.e. inside the EnvRunner actor: no model is pickled,
and the driver's local EnvRunner (which has no env when remote runners sample) never loads one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from envenc_ray.encoder.served import ServedPair
from envenc_ray.errors import ModelError
from envenc_ray.runtime import inside_ray_actor


@dataclass(frozen=True)
class EncoderSource:
    """How an EnvRunner gets its encoder: small and picklable; `build()` runs inside the EnvRunner.

    `in_process` loads `pair` (the truncated VLM + exported encoder, `encoder/served.ServedPair`); `serve`
    connects an `EncoderClient` to the running Serve app `serve_app`.
    Anything that `build()` returns has `encode(frames_uint8, windows) -> (latents, windows)`,
    `.latent_dim` and `.window`. With stage2.method 'joint' (`pair.joint`, or the Serve app's output 'patches') the
    "latents" are the window of the vision tower's per-patch features (`AdapterFeatures`), `latent_dim` their flat
    width.
    """

    kind: str
    latent_dim: int
    window: int = 1
    # what it delivers are AdapterFeatures' windows of per-patch vision features (stage2.method 'joint'), which only
    # the joint RLModule reads: the one place the algorithm learns which module its observations need
    joint: bool = False
    pair: ServedPair | None = None  # in_process
    serve_app: str | None = None
    serve_options: dict = field(default_factory=dict)
    torch_threads: int | None = 1

    def build(self):
        """The encoder, loaded here. Inside a Ray actor (an EnvRunner) torch threads are pinned to
        `torch_threads`; in the driver (local EnvRunner, evaluate, gym wrapper) vlm.num_threads decides."""
        from envenc_ray.runtime import set_torch_threads

        if self.kind == "in_process":
            vlm = self.pair.vlm
            if inside_ray_actor():
                set_torch_threads(self.torch_threads)
                vlm = vlm.model_copy(update={"num_threads": self.torch_threads})
            encoder = self.pair.load(vlm)
        elif self.kind == "serve":
            from envenc_ray.serve.client import EncoderClient

            if inside_ray_actor():
                set_torch_threads(self.torch_threads)
            encoder = EncoderClient.connect(app_name=self.serve_app, **self.serve_options)
        else:
            raise ModelError(f"unknown encoder source {self.kind!r}; use 'in_process' or 'serve'")
        if encoder.latent_dim != self.latent_dim:
            raise ModelError(f"the {self.kind} encoder gives {encoder.latent_dim}-d latents but the agent was built "
                             f"for {self.latent_dim}-d ones; retrain the agent or point it at the same encoder")
        return encoder


def encoder_source(config) -> EncoderSource | None:
    """Where the agent's latents come from under `config.rl` (None for obs_mode 'pixels' and 'state').

    Runs on the driver: the served pair is resolved and checked here (cheaply, without loading weights), with
    every path absolute, since EnvRunner actors need not share the driver's working directory.
    """
    rl = config.rl
    if not rl.reads_latents:
        return None
    if rl.encoder_source == "serve":
        return serve_encoder_source(config)
    pair = ServedPair.of(config)
    return EncoderSource(kind="in_process", latent_dim=pair.observation_dim, window=pair.window, joint=pair.joint,
                         pair=pair, torch_threads=rl.torch_threads)


def described_source(config) -> EncoderSource | None:
    """What `encoder_source` would say of the observations without resolving anything: for what runs no EnvRunner
    (RLlib's validation, the RLModule spec of a checkpoint). Never built."""
    if not config.rl.reads_latents:
        return None
    return EncoderSource(kind="description-only", latent_dim=1, joint=config.stage2.joint)


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
    return EncoderSource(kind="serve", latent_dim=int(client.latent_dim), window=int(client.window), joint=joint,
                         serve_app=rl.serve_app, serve_options=options, torch_threads=rl.torch_threads)
