"""Process-level set-up shared by every stage: Ray start-up and torch threads."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Join the Ray cluster that RAY_ADDRESS names, or start a local one, unless already connected.

    The dashboard stays off on a laptop: it costs a core's worth of start-up on a 2-core machine.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
    else:
        ray.init(include_dashboard=False, configure_logging=False)
    logger.info("Ray resources: %s", ray.cluster_resources())


def set_torch_threads(num_threads: int | None) -> None:
    """Pin torch's intra-op threads; Ray actors set 1 so that N actors don't fight over N cores."""
    if num_threads is None:
        return
    import torch

    torch.set_num_threads(num_threads)


@contextmanager
def train_report_poll(seconds: float):
    """Make Ray Train's controller collect worker reports every `seconds` inside the block.

    Workers wait for the controller to take each report, so Ray's default of 2 s would make every small
    epoch last 2 s. The driver hands this variable to the controller (ray.train.v2 ENV_VARS_TO_PROPAGATE).
    """
    name = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    previous = os.environ.get(name)
    os.environ[name] = str(seconds)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name)
        else:
            os.environ[name] = previous
