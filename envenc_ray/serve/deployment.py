"""The EnvironmentEncoder Ray Serve app: truncated VLM + encoder behind a batched, autoscaling deployment.

    app = build_app(config)                      # an Application: `serve.run(app)` or `envenc serve CONFIG`
    handle.encode.remote(frames_uint8, windows)  # -> (latents (N, L) float32, new windows | None)
    handle.hidden.remote(frames_uint8)           # -> hidden states (N, D) float32 ((N, T, D) per token)
    handle.stats.remote()                        # -> this replica's counters (batches, cache hit rate, ...)

Use `client.EncoderClient` rather than the raw handle: it resizes frames client-side, splits oversized calls,
retries service errors and times out.

How a call flows through a replica:
(`replica.py` holds that logic as plain Python, `http.py` the wire format of the HTTP route.)
1. `encode`/`hidden` validate the call in the replica's event loop (shape, dtype, frame count, window
   states), so a bad call fails alone and never poisons a batch shared with other callers.
2. `@serve.batch` merges up to `max_batch_calls` concurrent calls (each of many frames, from different
   EnvRunners) into one list; the forward runs in a one-thread executor so the event loop keeps queueing
   the next batch meanwhile.
3. `EncoderCore.run_batch` looks every frame up in a content-hash cache of hidden states (identical frames,
   e.g. every env right after reset, are embedded once), runs one VLM forward per frame size over the
   misses, one encoder forward over all calls' frames, and hands each call its own slice, or its own
   error (non-finite output) so the other calls of the batch still succeed.

Replicas are stateless (DESIGN §3): a windowed encoder's per-episode window travels with the call and comes
back updated. What is fixed at start (model, encoder, threads) is in the init args; the knobs a running
replica can take (batch size, wait, cache size, frame limit) are Serve's `user_config`, handled by
`reconfigure`. Serve applies a changed user_config without restarting replicas only for config-file
deploys (`serve deploy` with a `deployments:` section, same import path and args); a Python `serve.run`
of a rebuilt app restarts them (seen on Ray 2.60: imperative deploys get a fresh code version).
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve as ray_serve
from ray.serve.config import DEFAULT_METRICS_INTERVAL_S

from envenc_ray.config import EnvEncConfig, ServeConfig, load_config
from envenc_ray.errors import ConfigError, EnvEncError, InputError, ModelError
from envenc_ray.serve.http import BodyTooLargeError, jsonable, npy_bytes, npz_bytes, read_body, read_http_batch
from envenc_ray.serve.replica import EncodeRequest, EncoderCore, ReplicaSpec, replica_spec, runtime_settings

logger = logging.getLogger(__name__)

APP_NAME = "envenc-encoder"
DEPLOYMENT_NAME = "EnvironmentEncoder"


def deployment_options(serve_config: ServeConfig) -> dict[str, Any]:
    """`Deployment.options(...)` from the config: resources, autoscaling, in-flight limit, live settings."""
    return {
        "ray_actor_options": {"num_cpus": serve_config.num_cpus, "num_gpus": serve_config.num_gpus},
        "autoscaling_config": {
            "min_replicas": serve_config.min_replicas,
            # a scale-to-zero deployment still starts with one replica, so that deploying it can be checked
            "initial_replicas": max(serve_config.min_replicas, 1),
            "max_replicas": serve_config.max_replicas,
            "target_ongoing_requests": serve_config.target_ongoing_requests,
            "upscale_delay_s": serve_config.upscale_delay_s,
            "downscale_delay_s": serve_config.downscale_delay_s,
            "look_back_period_s": serve_config.look_back_period_s,
            "metrics_interval_s": metrics_interval_s(serve_config.look_back_period_s),
        },
        # ServeConfig validates max_ongoing_requests >= max_batch_calls: Serve would otherwise never let
        # enough calls into a replica to fill a batch (it silently caps at max_ongoing_requests).
        "max_ongoing_requests": serve_config.max_ongoing_requests,
        # bounded queue per caller's router: the excess is rejected at once (BackPressureError / HTTP 503)
        # rather than waiting without end while memory grows
        "max_queued_requests": serve_config.max_queued_requests,
        "user_config": runtime_settings(serve_config),
        # one log line per request costs ~0.1 ms of a busy replica's event loop; errors are still logged
        "logging_config": {"enable_access_log": False},
    }


def metrics_interval_s(look_back_period_s: float) -> float:
    """How often replicas and callers push their in-flight counts to Serve's controller: Ray's 10 s, or half the
    look-back window when that is shorter. Ray 2.60 pushes at this interval (the environment variables said to
    replace it are not read yet), and a window shorter than it averages a single stale push: it warns, will refuse,
    and here scaled up 27 s into the load with a 10 s upscale delay."""
    return min(DEFAULT_METRICS_INTERVAL_S, look_back_period_s / 2)


def build_app(config: EnvEncConfig, *, model_path: str | Path | None = None,
              encoder_dir: str | Path | None = None):
    """The Serve Application of `config`'s run (or of the given model and encoder directories)."""
    return configured_deployment(config.serve).bind(replica_spec(config, model_path, encoder_dir))


def configured_deployment(serve_config: ServeConfig):
    """The deployment with `deployment_options`."""
    with warnings.catch_warnings():  # metrics_interval_s "is deprecated" but still what Ray 2.60 reads
        warnings.filterwarnings("ignore", message=".*metrics_interval_s.*deprecated", category=DeprecationWarning)
        return EnvironmentEncoderDeployment.options(**deployment_options(serve_config))


def app_builder(args: dict[str, Any]):
    """Import target of deploy/serve_encoder.yaml (`serve run` / `serve deploy`).

    args: config (list of YAML presets, relative to the working directory), overrides (list of
    'a.b=c'), and optionally model_dir / encoder_dir (default: the run directory's vlm/ and encoder/).
    """
    known = {"config", "overrides", "model_dir", "encoder_dir"}
    unknown = set(args) - known
    if unknown:
        raise ConfigError(f"unknown args {sorted(unknown)} for envenc_ray.serve.deployment:app_builder; "
                          f"known: {sorted(known)}")
    presets = args.get("config") or []
    presets = [presets] if isinstance(presets, str) else list(presets)
    config = load_config(presets, list(args.get("overrides") or []))
    return build_app(config, model_path=args.get("model_dir"), encoder_dir=args.get("encoder_dir"))


# ------------------------------------------------------------------------------------------ the Serve deployment


@ray_serve.deployment(name=DEPLOYMENT_NAME)
class EnvironmentEncoderDeployment:
    """A replica: `EncoderCore` behind `@serve.batch`, plus an optional POST /encode HTTP route."""

    def __init__(self, spec: ReplicaSpec):
        self.core = EncoderCore(spec)
        # torch releases the GIL in its kernels: the forward runs in this thread while the replica's event
        # loop validates and queues the next calls
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="envenc-forward")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's user_config (see `runtime_settings`): applied live, without restarting the replica."""
        self.core.configure(user_config)
        self._forward.set_max_batch_size(int(self.core.settings["max_batch_calls"]))
        self._forward.set_batch_wait_timeout_s(float(self.core.settings["batch_wait_timeout_s"]))

    async def encode(self, frames_uint8: np.ndarray, windows: list | None = None, resized: bool = False
                     ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Latents (N, latent_dim) float32 and the new window states (windowed encoders; else None)."""
        return await self._submit(frames_uint8, windows, resized, "latents")

    async def hidden(self, frames_uint8: np.ndarray, resized: bool = False) -> np.ndarray:
        """The VLM's hidden states (N, D) float32, or (N, T, D) with 'tokens' pooling."""
        return await self._submit(frames_uint8, None, resized, "hidden")

    def info(self) -> dict[str, Any]:
        return self.core.info()

    def stats(self) -> dict[str, Any]:
        return self.core.stats()

    async def _submit(self, frames_uint8, windows, resized, want):
        try:
            request = self.core.check(frames_uint8, windows, resized, want)
        except InputError:
            self.core.count_error("InputError")
            raise
        result = await self._forward(request)
        if isinstance(result, Exception):
            raise result
        return result

    @ray_serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # both set from user_config in reconfigure
    async def _forward(self, requests: list[EncodeRequest]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.core.run_batch, requests)

    async def __call__(self, request):
        """HTTP: POST /encode or /hidden with a .npy (N, H, W, 3) uint8 body -> .npy float32 body.

        A windowed encoder's state travels as .npz: frames, windows (N, k-1, *hidden_shape) float32 and fresh
        (N,) bool (True: start that episode fresh); the answer is .npz with latents and windows.
        Without windows every frame starts a fresh episode. GET /info and /stats return JSON.
        """
        from starlette.responses import JSONResponse, Response

        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        if request.method == "GET" and route in ("info", "stats"):
            return JSONResponse(jsonable(self.info() if route == "info" else self.stats()))
        if request.method != "POST" or route not in ("encode", "hidden"):
            return JSONResponse({"error": "use POST /encode or POST /hidden with a .npy batch of uint8 frames "
                                          "(N, H, W, 3), or GET /info, /stats"}, status_code=404)
        try:
            limit = int(self.core.settings["max_body_bytes"])
            frames, windows, as_npz = read_http_batch(await read_body(request, limit), limit)
            if route == "hidden":
                result = await self.hidden(frames)
                return Response(npy_bytes(result), media_type="application/octet-stream")
            latents, new_windows = await self.encode(frames, windows)
        except EnvEncError as error:
            if isinstance(error, BodyTooLargeError):
                self.core.count_error("BodyTooLargeError")
                status = 413
            else:
                status = 400 if isinstance(error, InputError) else 500
            return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=status)
        if not as_npz:
            return Response(npy_bytes(latents), media_type="application/octet-stream")
        arrays = {"latents": latents} | ({"windows": np.stack(new_windows)} if new_windows is not None else {})
        return Response(npz_bytes(arrays), media_type="application/octet-stream")


# ------------------------------------------------------------------------------------------ running it


def start_serve(serve_config: ServeConfig, http: bool) -> None:
    """Start Serve on the current Ray: HTTP proxy on serve.http_host:http_port only when asked.

    If Serve already runs, its proxy settings stay as they are (Serve cannot change them live).
    """
    if http:
        ray_serve.start(proxy_location="HeadOnly",
                        http_options={"host": serve_config.http_host, "port": serve_config.http_port})
    else:
        ray_serve.start(proxy_location="Disabled")


def run_app(config: EnvEncConfig, *, http: bool = False, app_name: str = APP_NAME,
            model_path: str | Path | None = None, encoder_dir: str | Path | None = None):
    """Deploy (or update) the app on the current Ray and wait until it runs; returns the ingress handle."""
    from envenc_ray.runtime import ensure_ray

    ensure_ray()
    http = http or config.serve.http
    start_serve(config.serve, http)
    spec = replica_spec(config, model_path, encoder_dir)
    app = configured_deployment(config.serve).bind(spec)
    # our app owns "/" (POST /encode); another app beside it (other model, other run) gets /<its name>/
    route_prefix = ("/" if app_name == APP_NAME else f"/{app_name}") if http else None
    handle = ray_serve.run(app, name=app_name, route_prefix=route_prefix)
    wait_for_replicas_of(handle, spec, app_name, config.serve.deploy_timeout_s)
    return handle


def wait_for_replicas_of(handle, spec: ReplicaSpec, app_name: str, timeout_s: float) -> None:
    """Return once every replica of `app_name` runs `spec` (its `deploy_id`, read back through `info`).

    `serve.run` of an app that already runs can return while the replicas of the earlier deploy still serve:
    Serve may read the app as RUNNING before it has taken the new target, and keeps old replicas until new ones
    start. An agent would then get latents of the previous encoder or VLM without a word.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = deployment_details(app_name)["replicas"]
        running = [r for r in replicas if r["state"] == "RUNNING"]
        if len(running) == len(replicas):  # no replica of an earlier deploy is starting, updating or stopping
            if not running:  # scaled to zero: whatever starts next is of this deploy
                return
            # Serve routes each call to one replica: ask enough times to reach each a few times
            seen = {handle.info.remote().result(timeout_s=60)["deploy_id"] for _ in range(4 * len(running))}
            if seen == {spec.deploy_id}:
                return
        if time.monotonic() > deadline:
            states = ", ".join(sorted(r["state"] for r in replicas)) or "none"
            raise ModelError(f"Serve app {app_name!r}: {timeout_s:.0f} s after deploying it, not every replica runs "
                             f"this deploy's VLM and encoder yet (replica states: {states}): new replicas could not "
                             "start, e.g. for lack of CPUs or GPUs; stop the old app first (`serve shutdown`) or free "
                             "resources, or raise serve.deploy_timeout_s")
        time.sleep(0.5)


def shutdown_app(app_name: str = APP_NAME) -> None:
    """Delete the app; shut Serve down too when no other app is left on the cluster."""
    import ray

    if not ray.is_initialized():
        return
    status = ray_serve.status()
    if app_name in status.applications:
        ray_serve.delete(app_name)
    if not (set(ray_serve.status().applications) - {app_name}):
        ray_serve.shutdown()


def deployment_details(app_name: str = APP_NAME) -> dict[str, Any]:
    """What Serve's controller holds for our deployment (its `serve status` / config view): status,
    replicas, and the applied deployment config (autoscaling, resources, user_config)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())
    if app_name not in details.applications:
        raise ModelError(f"no Serve app {app_name!r} (running: {sorted(details.applications)})")
    deployment = details.applications[app_name].deployments[DEPLOYMENT_NAME]
    return deployment.model_dump(mode="json", warnings=False)


def serve(config: EnvEncConfig, http: bool = False) -> None:
    """`envenc serve CONFIG [--http]`: run the EnvironmentEncoder app in the foreground until Ctrl-C."""
    http = http or config.serve.http
    run_app(config, http=http)
    s = config.serve
    print(f"serve: app {APP_NAME!r} is running ({s.min_replicas}..{s.max_replicas} replicas of "
          f"{s.num_cpus} CPU / {s.num_gpus} GPU, up to {s.max_batch_calls} calls per batch)")
    print("serve: agents in other processes join this Ray cluster with RAY_ADDRESS=auto, e.g.\n"
          "    RAY_ADDRESS=auto envenc train CONFIG --set rl.encoder_source=serve\n"
          "serve: from Python:\n"
          "    import ray; ray.init(address='auto')\n"
          "    from envenc_ray.serve.client import EncoderClient\n"
          f"    client = EncoderClient.connect(app_name={APP_NAME!r})\n"
          "    latents, windows = client.encode(frames_uint8, windows)")
    if http:
        url = f"http://{s.http_host}:{s.http_port}"
        print(f"serve: HTTP on {url}:\n"
              "    python -c \"import numpy as np; np.save('frames.npy', np.zeros((1, 210, 160, 3), np.uint8))\"\n"
              f"    curl -s --data-binary @frames.npy {url}/encode -o latents.npy\n"
              f"    curl -s {url}/stats")
    print("serve: Ctrl-C stops")
    try:
        while True:
            time.sleep(5)
            status = ray_serve.status().applications.get(APP_NAME)
            if status is not None and status.status not in ("RUNNING", "DEPLOYING"):
                logger.warning("serve: app %s is %s: %s", APP_NAME, status.status, status.message)
    finally:  # Ctrl-C or SIGTERM (runtime.Stopped) goes on to the CLI: exit 130 / 143
        print("serve: stopping")
        shutdown_app(APP_NAME)
