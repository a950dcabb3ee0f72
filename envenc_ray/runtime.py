"""Process-level set-up shared by every stage: Ray start-up and torch threads."""

from __future__ import annotations

import logging
import os

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
