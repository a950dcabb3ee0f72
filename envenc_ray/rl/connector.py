"""Latents into RLlib episodes: an env-to-module ConnectorV2 that turns each sub-env's newest RGB frame into
the agent's observation, for all sub-envs of an EnvRunner in ONE encoder call per vector step.

The connector rewrites the last observation of every episode in place (`set_observations(at_indices=-1)`),
so everything downstream of the EnvRunner -- the RLModule's forward pass, the learner batch, replay
buffers, checkpointed episodes -- holds latents (and/or the 84x84 grayscale stack), never 210x160 RGB.

State lives with the episode, not in the encoder: a windowed encoder's window of hidden states ((k-1, D)
pooled, (k-1, T, D) per-token for the tokens encoder: the observer keeps whatever the encoder returns)
and the pixel frame stack are kept per episode id on the EnvRunner side, start fresh at an episode's
reset, and are dropped when an episode ends (or disappears from the EnvRunner), so a long run does not
leak them.

The encoder itself is built lazily on the first call, i.e. inside the EnvRunner actor, from paths or a
Serve app name (`EncoderSource`): no model is pickled, and the driver's local EnvRunner (which has no env
when remote runners sample) never loads one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

import gymnasium as gym
import numpy as np
from ray.rllib.connectors.connector_v2 import ConnectorV2

from envenc_ray.errors import InputError, ModelError

OBS_MODES = ("latent", "latent+pixels", "pixels")
LATENT_KEY, PIXELS_KEY = "latent", "pixels"


# ----------------------------------------------------------------------------- where latents come from


@dataclass(frozen=True)
class EncoderSource:
    """How an EnvRunner gets its encoder: small and picklable; `build()` runs inside the EnvRunner.

    `in_process` loads the truncated VLM (`vlm_model_path` + `vlm_config`) and the exported encoder
    (`encoder_dir`); `serve` connects an `EncoderClient` to the running Serve app `serve_app`.
    Anything that `build()` returns has `encode(frames_uint8, windows) -> (latents, windows)`,
    `.latent_dim` and `.window`.
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
            from envenc_ray.encoder.environment import EnvironmentEncoder
            from envenc_ray.encoder.export import load_encoder
            from envenc_ray.vlm.backbone import TruncatedVLM

            vlm = TruncatedVLM.from_config(VLMConfig(**vlm_settings), model_path=self.vlm_model_path, game=self.game)
            encoder = EnvironmentEncoder(vlm, load_encoder(self.encoder_dir))
        elif self.kind == "serve":
            from envenc_ray.serve.client import EncoderClient

            encoder = EncoderClient.connect(app_name=self.serve_app, **self.serve_options)
        else:
            raise ModelError(f"unknown encoder source {self.kind!r}; use 'in_process' or 'serve'")
        if encoder.latent_dim != self.latent_dim:
            raise ModelError(f"the {self.kind} encoder gives {encoder.latent_dim}-d latents but the agent was built "
                             f"for {self.latent_dim}-d ones; retrain the agent or point it at the same encoder")
        return encoder


def inside_ray_actor() -> bool:
    """True in a Ray actor (a remote EnvRunner), False in the driver process."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def read_encoder_description(encoder_dir: str | Path) -> dict:
    """config.json of an exported encoder (latent_dim, window, kind) without loading any weights."""
    config_path = Path(encoder_dir) / "config.json"
    if not config_path.is_file() or not (Path(encoder_dir) / "model.safetensors").is_file():
        raise ModelError(f"no exported encoder in {encoder_dir} (needs config.json and model.safetensors): run "
                         "`envenc train-encoder` first, set rl.encoder_dir, or use rl.obs_mode=pixels")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{config_path} is not valid JSON ({error}); rerun `envenc train-encoder`") from None


# ----------------------------------------------------------------------------- spaces and pixels


def observation_space(obs_mode: str, latent_dim: int | None, frame_stack: int = 4, pixel_size: int = 84) -> gym.Space:
    """The agent's observation space: Box(latent_dim,) float32, Box(84, 84, k) uint8, or a Dict of both."""
    if obs_mode not in OBS_MODES:
        raise InputError(f"unknown observation mode {obs_mode!r}; use one of {', '.join(OBS_MODES)}")
    pixels = gym.spaces.Box(0, 255, (pixel_size, pixel_size, frame_stack), np.uint8)
    if obs_mode == "pixels":
        return pixels
    latent = gym.spaces.Box(-np.inf, np.inf, (int(latent_dim),), np.float32)
    if obs_mode == "latent":
        return latent
    return gym.spaces.Dict({LATENT_KEY: latent, PIXELS_KEY: pixels})


def grayscale_resize(frame_uint8: np.ndarray, size: int) -> np.ndarray:
    """RGB (H, W, 3) -> (size, size) uint8, as RLlib's Atari wrappers do it (cv2 gray, area resize)."""
    import cv2

    gray = cv2.cvtColor(frame_uint8, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- per-episode observation state


def check_obs_mode(obs_mode: str, encoder, what: str) -> None:
    """A known observation mode, with the encoder (or its source) every mode but 'pixels' needs."""
    if obs_mode not in OBS_MODES:
        raise InputError(f"unknown observation mode {obs_mode!r}; use one of {', '.join(OBS_MODES)}")
    if obs_mode != "pixels" and encoder is None:
        raise ModelError(f"observation mode {obs_mode!r} needs {what}; none was given")


class EpisodeObserver:
    """Turns the newest RGB frame of many episodes into their observations, with one encoder call for all.

    Keys name episodes (RLlib episode ids, or sub-env indices in the gym wrapper). `fresh[i]` says frame i
    is its episode's first (reset) frame: its temporal window and frame stack start over.
    """

    def __init__(self, obs_mode: str, encoder=None, frame_stack: int = 4, pixel_size: int = 84):
        check_obs_mode(obs_mode, encoder, "an encoder")
        self.obs_mode, self.encoder = obs_mode, encoder
        self.frame_stack, self.pixel_size = frame_stack, pixel_size
        self.windows: dict[Hashable, Any] = {}  # episode -> a windowed encoder's state (None: fresh)
        self.stacks: dict[Hashable, np.ndarray] = {}  # episode -> (size, size, k) uint8 grayscale stack
        self.encode_calls = 0
        self.frames_encoded = 0
        self.encode_seconds = 0.0
        self.last_call_seconds = 0.0

    @property
    def uses_encoder(self) -> bool:
        return self.obs_mode != "pixels"

    def observe(self, keys: list[Hashable], frames: list[np.ndarray], fresh: list[bool]) -> list[Any]:
        if not keys:
            return []
        latents = self._latents(keys, frames, fresh) if self.uses_encoder else None
        stacks = self._stacks(keys, frames, fresh) if self.obs_mode != "latent" else None
        if self.obs_mode == "latent":
            return list(latents)
        if self.obs_mode == "pixels":
            return stacks
        return [{LATENT_KEY: latent, PIXELS_KEY: stack} for latent, stack in zip(latents, stacks)]

    def _latents(self, keys, frames, fresh) -> np.ndarray:
        frames_uint8 = np.stack(frames)
        windows = [None if is_fresh else self.windows.get(key) for key, is_fresh in zip(keys, fresh)]
        started = time.perf_counter()
        latents, new_windows = self.encoder.encode(frames_uint8, windows)
        self.last_call_seconds = time.perf_counter() - started
        self.encode_seconds += self.last_call_seconds
        self.encode_calls += 1
        self.frames_encoded += len(keys)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != (len(keys), self.encoder.latent_dim):
            raise ModelError(f"the encoder returned latents of shape {latents.shape} for {len(keys)} frames; "
                             f"expected ({len(keys)}, {self.encoder.latent_dim})")
        for i, key in enumerate(keys):
            self.windows[key] = None if new_windows is None else new_windows[i]
        return latents

    def _stacks(self, keys, frames, fresh) -> list[np.ndarray]:
        stacks = []
        for key, frame, is_fresh in zip(keys, frames, fresh):
            small = grayscale_resize(frame, self.pixel_size)
            previous = None if is_fresh else self.stacks.get(key)
            if previous is None:  # a fresh episode: its first frame fills the stack, as the encoder's window does
                stack = np.repeat(small[:, :, None], self.frame_stack, axis=2)
            else:
                stack = np.concatenate([previous[:, :, 1:], small[:, :, None]], axis=2)
            self.stacks[key] = stack
            stacks.append(stack)
        return stacks

    def drop(self, key: Hashable) -> None:
        self.windows.pop(key, None)
        self.stacks.pop(key, None)

    def retain(self, keys) -> None:
        """Forget every episode not in `keys` (ended, or abandoned by an env reset)."""
        keys = set(keys)
        for table in (self.windows, self.stacks):
            for key in [k for k in table if k not in keys]:
                del table[key]

    @property
    def num_tracked(self) -> int:
        return len(set(self.windows) | set(self.stacks))


# ----------------------------------------------------------------------------- the RLlib connector


class LatentObservations(ConnectorV2):
    """Env-to-module ConnectorV2: newest RGB frame of every sub-env episode -> latent / pixel stack / both.

    One encoder call per vector step for all of this EnvRunner's episodes; the results are written back into
    the episodes (so the learner trains on them) and the output observation space is the agent's.
    Counters (`num_calls`, `observer.encode_calls`, ...) and the EnvRunner metrics `envenc_encode_calls`,
    `envenc_encode_ms`, `envenc_frames_encoded` (sums per iteration) make the batching checkable. Encoder
    errors (a Serve timeout after the client's retries, a bad encoder file) are not caught here.
    """

    def __init__(
        self,
        input_observation_space: gym.Space | None = None,
        input_action_space: gym.Space | None = None,
        *,
        obs_mode: str = "latent",
        source: EncoderSource | None = None,
        frame_stack: int = 4,
        pixel_size: int = 84,
        error_key: str | None = None,
        **kwargs,
    ):
        check_obs_mode(obs_mode, source, "an encoder source")  # on the driver, before any EnvRunner starts
        self.obs_mode, self.source = obs_mode, source
        self.frame_stack, self.pixel_size = frame_stack, pixel_size
        self.error_key = error_key
        self._observer: EpisodeObserver | None = None
        self.num_calls = 0  # calls that had at least one new frame, i.e. vector steps (and resets)
        super().__init__(input_observation_space, input_action_space, **kwargs)

    def recompute_output_observation_space(self, input_observation_space, input_action_space) -> gym.Space:
        latent_dim = self.source.latent_dim if self.source is not None else None
        return observation_space(self.obs_mode, latent_dim, self.frame_stack, self.pixel_size)

    @property
    def observer(self) -> EpisodeObserver:
        if self._observer is None:  # first call: we are inside the EnvRunner now
            encoder = self.source.build() if self.obs_mode != "pixels" else None
            self._observer = EpisodeObserver(self.obs_mode, encoder, self.frame_stack, self.pixel_size)
        return self._observer

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, metrics=None, **kwargs):
        all_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        pending = [episode for episode in all_episodes if self._is_raw(episode.get_observations(-1))]
        if pending:
            try:
                observer = self.observer
                calls_before, seconds_before = observer.encode_calls, observer.encode_seconds
                observations = observer.observe(
                    keys=[episode.id_ for episode in pending],
                    frames=[episode.get_observations(-1) for episode in pending],
                    fresh=[episode.t == 0 for episode in pending],
                )
            except Exception as error:
                # RLlib ends a remote EnvRunner on any exception and the driver only learns "actor died":
                # leave the real message where train() looks for it, then fail as usual.
                report_runner_error(self.error_key, error)
                raise
            for episode, observation in zip(pending, observations):
                episode.set_observations(at_indices=-1, new_data=observation)
                # Like RLlib's ObservationPreprocessor: the episode's space becomes ours, so later
                # fills/validation of the rewritten observations use the right space.
                episode.observation_space = self.observation_space
            # Ended episodes, and those an env reset abandoned, leave the EnvRunner: so do their windows.
            observer.retain(episode.id_ for episode in all_episodes if not episode.is_done)
            self.num_calls += 1
            if metrics is not None and observer.uses_encoder:
                calls = observer.encode_calls - calls_before
                metrics.log_value("envenc_encode_calls", calls, reduce="sum")
                metrics.log_value("envenc_frames_encoded", len(pending), reduce="sum")
                metrics.log_value("envenc_encode_ms", 1000 * (observer.encode_seconds - seconds_before), reduce="sum")
                metrics.log_value("envenc_connector_calls", 1, reduce="sum")
        return batch

    def _is_raw(self, observation) -> bool:
        """A frame the env returned (not yet rewritten): calling twice on a step must not encode twice."""
        raw_space = self.input_observation_space
        return (isinstance(observation, np.ndarray) and observation.dtype == np.uint8
                and (raw_space is None or observation.shape == raw_space.shape)
                and observation.ndim == 3 and observation.shape[-1] == 3)

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict:
        return {}  # per-episode windows are rollout state, not agent state: a restored agent starts fresh

    def set_state(self, state: dict) -> None:
        pass


def make_env_to_module(obs_mode: str, source: EncoderSource | None, frame_stack: int = 4, pixel_size: int = 84,
                       error_key: str | None = None):
    """The `env_to_module_connector` callable for `AlgorithmConfig.env_runners` (called in every EnvRunner)."""

    def build(env=None, spaces=None, device=None):
        return LatentObservations(obs_mode=obs_mode, source=source, frame_stack=frame_stack, pixel_size=pixel_size,
                                  error_key=error_key)

    return build


# ----------------------------------------------------------------------------- errors from remote EnvRunners

_ERROR_NAMESPACE = "envenc-rl"


def new_error_key() -> str:
    """A key under which this training run's EnvRunners report their first error (see raise_runner_error)."""
    import uuid

    return f"runner-error-{uuid.uuid4().hex}"


def report_runner_error(key: str | None, error: BaseException) -> None:
    """Store `error` (type and message, as JSON) in Ray's internal KV store; never raises itself."""
    if key is None or not inside_ray_actor():
        return
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        payload = {"module": type(error).__module__, "type": type(error).__name__, "message": str(error)}
        _internal_kv_put(key, json.dumps(payload), overwrite=False, namespace=_ERROR_NAMESPACE)
    except Exception:  # reporting must never hide the error being reported
        pass


def raise_runner_error(key: str) -> None:
    """Re-raise, in the driver, the error an EnvRunner reported under `key` (our own error class when it is
    one of ours, so the CLI prints it as a user error); returns if nothing was reported."""
    import importlib

    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    from envenc_ray.errors import EnvEncError

    data = _internal_kv_get(key, namespace=_ERROR_NAMESPACE)
    if data is None:
        return
    _internal_kv_del(key, namespace=_ERROR_NAMESPACE)
    info = json.loads(data)
    error_class = None
    if info["module"].startswith("envenc_ray"):
        error_class = getattr(importlib.import_module(info["module"]), info["type"], None)
    if isinstance(error_class, type) and issubclass(error_class, EnvEncError):
        raise error_class(f"in an EnvRunner: {info['message']}")
    raise RuntimeError(f"an EnvRunner failed in the latent connector: {info['type']}: {info['message']}")


# ----------------------------------------------------------------------------- from our config


def encoder_source(config) -> EncoderSource | None:
    """Where the agent's latents come from under `config.rl` (None for obs_mode 'pixels').

    Runs on the driver: checks that the encoder exists (cheaply, without loading weights) and resolves
    every path to an absolute one, since EnvRunner actors need not share the driver's working directory.
    """
    rl = config.rl
    if rl.obs_mode == "pixels":
        return None
    from envenc_ray.envs.atari import game_name

    if rl.encoder_source == "serve":
        return serve_encoder_source(config)
    from envenc_ray.layout import resolve_model_path

    from envenc_ray.encoder.models import check_pooling

    encoder_dir = Path(rl.encoder_dir) if rl.encoder_dir else config.run_dir / "encoder"
    description = read_encoder_description(encoder_dir)
    check_pooling(description["kind"], config.vlm.pooling)  # on the driver, not in every EnvRunner
    model_path = resolve_model_path(config)
    if Path(model_path).exists():
        model_path = str(Path(model_path).resolve())
    return EncoderSource(
        kind="in_process",
        latent_dim=int(description["latent_dim"]),
        window=int(description.get("window", 1)),
        encoder_dir=str(encoder_dir.resolve()),
        vlm_model_path=model_path,
        vlm_config=config.vlm.model_dump(mode="json"),
        game=game_name(config.env.game),
        torch_threads=rl.torch_threads,
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
    return EncoderSource(kind="serve", latent_dim=int(client.latent_dim), window=int(client.window),
                         serve_app=rl.serve_app, serve_options=options, torch_threads=rl.torch_threads)


def env_creator(env_context) -> gym.Env:
    """The env of every RLlib EnvRunner: an ALE v5 env with RGB frames (the connector does the rest).

    Runs inside the EnvRunner before its RLModule is built, so it is also where a remote EnvRunner's torch
    threads are pinned (the driver's, when it samples itself, are left alone).
    """
    from envenc_ray.envs.atari import make_env
    from envenc_ray.runtime import set_torch_threads

    if inside_ray_actor():
        set_torch_threads(env_context.get("torch_threads"))
    return make_env(
        env_context["game"],
        repeat_action_probability=env_context["repeat_action_probability"],
        frameskip=env_context["frameskip"],
        full_action_space=env_context["full_action_space"],
        max_episode_steps=env_context["max_episode_steps"],
    )


ENV_NAME = "envenc-ale"


def register_env() -> str:
    """Register `env_creator` with Ray under ENV_NAME (RLlib takes a registered name, not a function)."""
    from ray.tune.registry import register_env as ray_register_env

    ray_register_env(ENV_NAME, env_creator)
    return ENV_NAME


def env_config(config) -> dict:
    """`env_config` for `env_creator`: the env section plus the EnvRunner's torch threads."""
    return config.env.model_dump(mode="json") | {"torch_threads": config.rl.torch_threads}


def with_common_settings(algo_config, config, env_to_module, rollout_fragment_length):
    """What every algorithm here shares: our ALE env, EnvRunners with the latent connector, learners and
    GPUs from `config.rl`, the experiment seed, and no silent EnvRunner restarts (an encoder error, e.g.
    a missing file or a Serve timeout after the client's retries, must reach the user)."""
    rl = config.rl
    return (
        algo_config.framework("torch")
        .environment(env=register_env(), env_config=env_config(config))
        .env_runners(
            num_env_runners=rl.num_env_runners,
            num_envs_per_env_runner=rl.num_envs_per_env_runner,
            num_cpus_per_env_runner=rl.cpus_per_env_runner,
            rollout_fragment_length=rollout_fragment_length,
            env_to_module_connector=env_to_module,
        )
        .learners(num_learners=rl.num_learners, num_gpus_per_learner=rl.num_gpus_per_learner)
        .debugging(seed=config.experiment.seed)
        .fault_tolerance(restart_failed_env_runners=False)
    )
