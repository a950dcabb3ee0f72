"""EncoderClient: the EnvironmentEncoder service with the same call as the in-process EnvironmentEncoder.

    client = deploy_encoder(config)                  # or EncoderClient.connect(app_name="envenc-encoder")
    latents, windows = client.encode(frames_uint8, windows)   # (N, H, W, 3) uint8 -> (N, latent_dim) float32
    client.hidden(frames_uint8)                      # (N, D) float32 hidden states ((N, T, D) per token)
    client.stats()                                   # one dict per replica (batches, cache hit rate, errors)

It is synchronous (call it from an RLlib EnvRunner actor, a plain Ray actor or a script) and picklable (build
it in the driver, ship it to the EnvRunners). Each call:
- validates the frames locally (the same InputError the replica would raise, without the round trip);
- resizes them to the model's input size here (`resize=True`): the replica then skips its resize, and the
  object store carries 128x128 instead of 210x160 frames (about half the bytes) for the tiny VLM;
- splits batches larger than the service's `max_frames_per_call` into several calls;
- times out after `timeout_s` and retries service errors (replica died, back-pressure, timeout) up to
  `retries` times with exponential backoff, then raises EncoderServiceError. Errors caused by the call
  itself (InputError, ModelError) are raised at once, unchanged: retrying them cannot help.

Per-episode window state (temporal and tokens encoders) is sent with each call and returned; the service
keeps none.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from envenc_ray.config import EnvEncConfig
from envenc_ray.errors import EnvEncError, InputError
from envenc_ray.serve.deployment import APP_NAME, run_app, shutdown_app

logger = logging.getLogger(__name__)


class EncoderServiceError(EnvEncError):
    """The encoder service did not answer (no such app, replicas dead or overloaded, timeouts) after retries."""


class EncoderClient:
    """A synchronous client of the EnvironmentEncoder Serve app. Build it with `connect` or `from_handle`."""

    def __init__(self, handle, *, app_name: str = APP_NAME, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.25, resize: bool = True):
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise InputError(f"timeout_s must be > 0, retries and backoff_s >= 0; got {timeout_s}, {retries}, "
                             f"{backoff_s}")
        self.handle = handle
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.resize = resize
        self._info: dict[str, Any] | None = None
        self._preprocessor = None

    @classmethod
    def connect(cls, app_name: str = APP_NAME, **options: Any) -> EncoderClient:
        """A client of the running app `app_name` on the current Ray cluster (see `__init__` for options)."""
        from ray import serve as ray_serve
        from ray.serve.exceptions import RayServeException

        try:
            handle = ray_serve.get_app_handle(app_name)
        except RayServeException as error:
            raise EncoderServiceError(f"cannot reach the Serve app {app_name!r}: {error}; start it with "
                                      "`envenc serve CONFIG` and run this with RAY_ADDRESS=auto (same Ray "
                                      "cluster), or set rl.encoder_source=in_process") from None
        return cls.from_handle(handle, app_name=app_name, **options)

    @classmethod
    def from_handle(cls, handle, **options: Any) -> EncoderClient:
        """A client of a deployment handle (e.g. the one `serve.run(build_app(config))` returns)."""
        return cls(handle, **options)

    # ------------------------------------------------------------------ what the service holds

    @property
    def info(self) -> dict[str, Any]:
        """The service's model facts and live settings (fetched once, on first use)."""
        if self._info is None:
            self._info = self._call("info")
        return self._info

    @property
    def latent_dim(self) -> int:
        return int(self.info["latent_dim"])

    @property
    def window(self) -> int:
        """Frames per latent: k for the windowed encoders, 1 otherwise (then no window state exists)."""
        return int(self.info["window"])

    @property
    def hidden_size(self) -> int:
        return int(self.info["hidden_size"])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.info["image_size"])

    # ------------------------------------------------------------------ calls

    def encode(self, frames_uint8: np.ndarray, windows: list[np.ndarray | None] | None = None
               ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Latents (N, latent_dim) float32 of N frames, each from its own episode, and the new window states.

        Same contract as EnvironmentEncoder.encode: `windows[i]` is frame i's episode state (None at a
        fresh episode start; `windows=None`: all fresh); per-frame encoders return None for the windows.
        """
        frames, resized = self._prepare(frames_uint8)
        if windows is not None and len(windows) != len(frames):
            raise InputError(f"got {len(frames)} frames but {len(windows)} window states; pass one per frame "
                             "(None for a fresh episode)")
        latents, new_windows = [], []
        for start, stop in self._chunks(len(frames)):
            chunk_windows = None if windows is None else list(windows[start:stop])
            rows, returned = self._call("encode", frames[start:stop], chunk_windows, resized)
            latents.append(rows)
            if returned is not None:
                new_windows.extend(returned)
        stacked = np.concatenate(latents) if len(latents) > 1 else latents[0]
        return stacked, (new_windows if self.window > 1 else None)

    def hidden(self, frames_uint8: np.ndarray) -> np.ndarray:
        """The VLM's hidden states (N, D) float32, (N, T, D) with 'tokens' pooling, of frames (N, H, W, 3) uint8."""
        frames, resized = self._prepare(frames_uint8)
        parts = [self._call("hidden", frames[start:stop], resized) for start, stop in self._chunks(len(frames))]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def stats(self) -> list[dict[str, Any]]:
        """Each live replica's counters: calls, frames, batches, cache hit rate, errors, busy time."""
        return self.handle.broadcast("stats").results(timeout_s=self.timeout_s)

    def shutdown(self) -> None:
        """Delete the app this client talks to (and Serve, when no other app is left)."""
        shutdown(self.app_name)

    # ------------------------------------------------------------------ helpers

    def _prepare(self, frames_uint8: Any) -> tuple[np.ndarray, bool]:
        """Validate locally; resize to the model's input size when asked. Returns (frames, resized)."""
        from envenc_ray.vlm.preprocess import as_frame_batch

        frames = as_frame_batch(frames_uint8)
        if not self.resize or self.info["preprocessor"] is None:
            return frames.numpy(), False
        if tuple(frames.shape[1:3]) == self.image_size:
            return frames.numpy(), True
        preprocessor = self._client_preprocessor()
        # the uint8 resize (+ crop) of FramePreprocessor, i.e. exactly the replica's first step
        images = preprocessor._resize(frames.permute(0, 3, 1, 2))
        if preprocessor.crop_to is not None:
            from envenc_ray.vlm.preprocess import _center_crop

            images = _center_crop(images, preprocessor.crop_to)
        return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy()), True

    def _client_preprocessor(self):
        if self._preprocessor is None:
            from envenc_ray.vlm.preprocess import FramePreprocessor

            self._preprocessor = FramePreprocessor(**self.info["preprocessor"])
        return self._preprocessor

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        limit = int(self.info["max_frames_per_call"])
        return [(start, min(start + limit, n)) for start in range(0, n, limit)]

    def _call(self, method: str, *args: Any) -> Any:
        """One handle call with a timeout; service errors are retried with exponential backoff."""
        from ray.exceptions import RayError, RayTaskError
        from ray.serve.exceptions import BackPressureError, RayServeException

        last_error: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            response = getattr(self.handle, method).remote(*args)
            try:
                return response.result(timeout_s=self.timeout_s)
            except RayTaskError as error:  # the replica's method raised
                if isinstance(error.cause, EnvEncError):
                    raise error.cause from None  # the call's own fault: the same error, no retry
                last_error = error
            except BackPressureError as error:  # rejected before it was queued: nothing to cancel
                last_error = error
            except (TimeoutError, RayServeException, RayError) as error:  # no answer: replica, router, network
                response.cancel()
                last_error = error
            logger.warning("encoder service: %s failed (attempt %d of %d): %s", method, attempt + 1,
                           self.retries + 1, _first_line(last_error))
        if isinstance(last_error, BackPressureError):
            raise EncoderServiceError(
                f"the encoder service (Serve app {self.app_name!r}) is overloaded: {method} was rejected "
                f"{self.retries + 1} times with back-pressure ({last_error}) over "
                f"{self.backoff_s * (2 ** self.retries - 1):.2f} s of backoff; allow more replicas "
                "(serve.max_replicas), fewer callers (rl.num_env_runners), or a longer queue (serve.max_queued_requests)"
            ) from None
        raise EncoderServiceError(
            f"the encoder service (Serve app {self.app_name!r}) did not answer {method} after {self.retries + 1} "
            f"attempts ({self.timeout_s:g} s timeout each): {type(last_error).__name__}: {_first_line(last_error)}. "
            "Check `serve status` / client.stats(); raise timeout_s if calls are only slow"
        ) from None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_preprocessor"] = None  # rebuilt from info on first use
        return state


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


def deploy_encoder(config: EnvEncConfig, *, app_name: str = APP_NAME, http: bool = False,
                   model_path: str | None = None, encoder_dir: str | None = None, **client_options: Any
                   ) -> EncoderClient:
    """Start (or update) the EnvironmentEncoder app on the current Ray (ensure_ray) and return a client.

    The model and encoder are the run's (<run>/vlm or vlm.model, <run>/encoder) unless given.
    """
    handle = run_app(config, http=http, app_name=app_name, model_path=model_path, encoder_dir=encoder_dir)
    return EncoderClient.from_handle(handle, app_name=app_name, **client_options)


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the EnvironmentEncoder app; Serve itself goes too when no other app is left."""
    shutdown_app(app_name)
