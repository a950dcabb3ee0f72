"""Errors from remote EnvRunners: RLlib ends an EnvRunner on any exception and the driver only learns "actor
died". The connector stores the real error in Ray's internal KV store under a key of the training run;
the driver re-raises it (as our own error class when it is one of ours, so the CLI prints one line).
"""

from __future__ import annotations

import json

from envenc_ray.runtime import inside_ray_actor

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
