"""What every Ray Train job of the project shares: advice finetuning (data/advise.py), the encoder
(encoder/train.py) and the reward model (rl/reward/train.py).

Driver side, `fit`: one TorchTrainer set-up (N workers of fractional CPUs, the run named so that the same
name and storage restore its checkpoints, one kept checkpoint scored by the held-out loss plus the latest) and
a resumable fit. Worker side: `resume_or_start` (the latest checkpoint's weights, optimizer and training
state, or a fresh state), `train_epoch` (one seeded, sharded epoch), `agreed_by_rank0` and `note_epoch`
(early stopping every worker agrees on) and `report_epoch` with `save_checkpoint` (one checkpoint per epoch).
A checkpoint folder holds WEIGHTS_FILE (or the job's own name for it), optimizer.pt and train_state.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from envenc_ray.errors import DataError
from envenc_ray.files import json_safe
from envenc_ray.runtime import tell_user
from envenc_ray.storage import train_storage

logger = logging.getLogger(__name__)

WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "train_state.json"


# ------------------------------------------------------------------------------------------------ driver


def fit(loop: Callable[[dict], None], loop_config: dict, *, what: str, storage: Path, name: str, workers: int,
        cpus_per_worker: float, use_gpu: bool, score: str, poll_s: float, datasets: dict | None = None
        ) -> tuple[dict, object]:
    """Run, or continue, the Ray Train run `name` under `storage` (a local folder, or the local copy of a URI
    run root whose workers upload there): (the latest checkpoint's training state, the checkpoint of the lowest
    `score`). Ray keeps that best checkpoint (what is exported) and always the latest (what a rerun resumes).

    When training fails its checkpoints stay and the error says so: the same call started again resumes.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name,  # same name + storage: Ray Train restores the run's checkpoints after a crash
            **train_storage(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=score,
                                                         checkpoint_score_order="min"),
        ),
        datasets=datasets,
    )
    folder = storage / name
    logger.info("Ray Train run folder: %s", folder)
    with train_report_poll(poll_s):
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError:
            logger.error("%s failed; its checkpoints in %s are kept, so a rerun resumes from the last finished epoch",
                         what, folder)
            raise
    best = result.get_best_checkpoint(metric=score, mode="min")
    if best is None or result.checkpoint is None:
        raise DataError(f"{what} under {folder} left no checkpoint; delete it and rerun")
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    return state, best


def checkpoint_weights(checkpoint, weights_file: str = WEIGHTS_FILE) -> dict:
    """The weights a checkpoint (a Ray `Checkpoint`, e.g. `fit`'s best) holds, for export."""
    from safetensors.torch import load_file

    with checkpoint.as_directory() as directory:
        return load_file(str(Path(directory) / weights_file))


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


# ----------------------------------------------------------------------------- inside a Ray Train worker loop


def fresh_state(best_key: str, **extra) -> dict:
    """A training state before the first epoch: the early-stopping bookkeeping of `note_epoch`, the epochs'
    history, and the job's own `extra` entries."""
    return {"epoch": 0, best_key: math.inf, "best_epoch": 0, "epochs_since_best": 0, "history": [], **extra}


def resume_or_start(what: str, rank: int, load_weights: Callable[[dict], None], optimizer, fresh: dict,
                    best_key: str, weights_file: str = WEIGHTS_FILE) -> dict:
    """The run's latest checkpoint, if Ray Train has one (a rerun after a crash or an interruption): its weights
    through `load_weights`, its optimizer state into `optimizer`, its training state returned. Else `fresh`."""
    import ray.train
    import torch
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return fresh
    with checkpoint.as_directory() as directory:
        load_weights(load_file(str(Path(directory) / weights_file)))
        optimizer.load_state_dict(torch.load(Path(directory) / OPTIMIZER_FILE, weights_only=True))
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    state[best_key] = math.inf if state[best_key] is None else state[best_key]  # json_safe wrote inf as null
    if rank == 0:
        tell_user(f"{what}: resuming after epoch {state['epoch']} from {checkpoint.path}")
    return state


def save_checkpoint(directory: Path, weights: dict, optimizer, state: dict, weights_file: str = WEIGHTS_FILE) -> None:
    """One epoch's checkpoint, what `resume_or_start` reads back: the weights, the optimizer state (tensors and
    numbers only: torch.load's weights_only reads it) and the training state."""
    import torch
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in weights.items()}, str(directory / weights_file))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(json_safe(state)))


def agreed_by_rank0(value: float, world_size: int) -> float:
    """Rank 0's `value` on every worker (torch.distributed broadcast), so that all workers take the same
    early-stopping decision from the evaluation only rank 0 runs."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    if world_size > 1:
        dist.broadcast(tensor, src=0)
    return float(tensor.item())


def train_epoch(loss_of: Callable, optimizer, train_rows, batch_size: int, seed: int, epoch: int, rank: int,
                world_size: int) -> float:
    """One epoch of one worker: its equal share of the epoch's seeded permutation of `train_rows`, one optimizer
    step per batch on `loss_of(rows)`; the mean batch loss over all workers. Every worker takes the same number
    of steps (DDP waits for all of them at each); the rows a whole batch would not fill are left out."""
    import numpy as np
    import torch
    import torch.distributed as dist

    per_worker = len(train_rows) // world_size
    steps = max(1, per_worker // batch_size)
    order = np.random.default_rng(seed * 1_000_003 + epoch).permutation(train_rows)
    mine = order[rank * per_worker:(rank + 1) * per_worker]
    loss_sum = 0.0
    for step in range(steps):
        loss = loss_of(mine[step * batch_size:(step + 1) * batch_size])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item()
    mean_loss = torch.tensor([loss_sum / steps], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(mean_loss)
    return float(mean_loss.item()) / world_size


def note_epoch(state: dict, epoch: int, score: float, best_key: str) -> None:
    """Early-stopping bookkeeping in `state`: the best (lowest) score under `best_key`, its epoch, and the
    epochs since it."""
    if score < state[best_key]:
        state.update({best_key: score, "best_epoch": epoch, "epochs_since_best": 0})
    else:
        state["epochs_since_best"] += 1
    state["epoch"] = epoch


def report_epoch(metrics: dict, epoch: int, rank: int, save: Callable[[Path], None]) -> None:
    """ray.train.report of one epoch: rank 0 with a checkpoint (folder epoch-NNNN, filled by `save`), the
    other ranks with the metrics only (Ray Train waits for every rank's report)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        save(Path(directory))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"epoch-{epoch:04d}")
