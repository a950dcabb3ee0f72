"""Process-level set-up shared by every stage: the console, Ray start-up and torch threads.

The console of an `envenc` command shows our stage headers, tqdm bars and one-line summaries. Everything
else -- Ray's and the libraries' log records in the driver, and every line Ray workers print -- goes to
<run>/logs/ (envenc.log, workers.log, and `ray`, a link to Ray's own session logs), and to the console
too with `--verbose`. Errors of any logger still reach the console. A worker line meant for the user (an
epoch of a Ray Train job) is printed with `tell_user`, which marks it so the driver shows it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

USER_LINE = "[envenc] "  # marks a worker's line for the driver's console
LIBRARY_LOGGERS = ("ray", "ray.serve", "ray.data", "ray.tune", "ray.train", "ray.rllib", "transformers")
_console: dict = {"verbose": True, "logs": None}  # what configure_console decided (unset: show everything)
_signals: dict = {"handler": None, "received": None}  # stop_on_signals' handler while it is on, its last signal


def tell_user(text: str) -> None:
    """Print a progress line from inside a Ray worker so that the driver's console shows it."""
    print(USER_LINE + text, flush=True)


def configure_console(logs_dir: Path, verbose: bool) -> None:
    """Route every log record to logs_dir/envenc.log; the console gets ours (warnings and up), everyone's
    errors, and with `verbose` everything from INFO up."""
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    _console.update(verbose=verbose, logs=logs_dir)
    log_file = logging.FileHandler(logs_dir / "envenc.log")
    log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.addFilter(lambda record: record.name.startswith("envenc_ray") or record.levelno >= logging.ERROR)
    root = logging.getLogger()
    root.handlers = [log_file, console]
    root.setLevel(logging.INFO)
    # Ray, Serve, Ray Data, RLlib and transformers install console handlers of their own at import time (and
    # ray.init clears Ray's): imported first, then without handlers and propagating, their records reach ours.
    import ray.data  # noqa: F401
    import ray.rllib  # noqa: F401
    import ray.serve  # noqa: F401
    import transformers  # noqa: F401

    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers = []
        library.propagate = True
    logging.captureWarnings(True)  # deprecation and other Python warnings: records like any other
    if not verbose:
        from ray.data import DataContext
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" bars
        context = DataContext.get_current()
        context.enable_operator_progress_bars = False  # one bar per Dataset on a terminal, no per-operator bars
        context.print_on_execution_start = False


class Stopped(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM, raised in the main thread like Ctrl-C, so that every `finally` runs: temporary
    files are removed, the Serve app is deleted and Ray is shut down (see `stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


@contextmanager
def stop_on_signals():
    """Inside the block, SIGINT and SIGTERM raise `Stopped` in the main thread; the handlers before it come back
    after it (`envenc.cli.main` also runs inside tests).

    Without this, SIGTERM kills the driver at once and leaves the Ray processes it started (raylet, agents,
    workers) running, and a command started in the background by a shell ignores SIGINT (the shell sets it to
    SIG_IGN, and Python keeps an inherited SIG_IGN). A second signal ends the process at once.
    """
    names = (signal.SIGINT, signal.SIGTERM)
    previous = {name: signal.getsignal(name) for name in names}

    def stop(signum: int, frame) -> None:
        for name in names:
            signal.signal(name, signal.SIG_DFL)
        _signals["received"] = signum
        raise Stopped(signum)

    for name in names:
        signal.signal(name, stop)
    _signals.update(handler=stop, received=None)
    try:
        yield
    finally:
        _signals["handler"] = None
        for name, handler in previous.items():
            signal.signal(name, handler)


def received_signal() -> int | None:
    """The signal that stopped the last `stop_on_signals` block (libraries may turn `Stopped` into a plain
    KeyboardInterrupt on its way up), or None."""
    return _signals["received"]


def shutdown_ray() -> None:
    """Disconnect from Ray; a local Ray that this process started stops with all its processes."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def ensure_ray() -> None:
    """Join the Ray cluster that RAY_ADDRESS names, or start a local one, unless already connected.

    The dashboard stays off on a laptop: it costs a core's worth of start-up on a 2-core machine.
    """
    import ray

    from envenc_ray.storage import ray_env_vars

    if ray.is_initialized():
        return
    # Workers on every node map local paths of a URI run root as the driver does (merged into a job's env vars).
    runtime_env = {"env_vars": ray_env_vars()} if ray_env_vars() else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, configure_logging=False, runtime_env=runtime_env)
    if _signals["handler"] is not None:
        signal.signal(signal.SIGTERM, _signals["handler"])  # ray.init sets its own (a bare sys.exit): ours again
    if _console["logs"] is not None:
        _route_worker_lines(_console["logs"], _console["verbose"])
    logger.info("Ray resources: %s", ray.cluster_resources())


def _route_worker_lines(logs_dir: Path, verbose: bool) -> None:
    """Every line a Ray worker prints goes to logs_dir/workers.log; the console shows all of them with
    `verbose`, else only the lines `tell_user` marked (Ray's printer is swapped for ours, in this driver)."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    node = getattr(ray_worker, "_global_node", None)
    link = logs_dir / "ray"
    if node is not None and not link.exists():
        try:
            link.symlink_to(node.get_logs_dir_path(), target_is_directory=True)
        except OSError:
            pass  # a filesystem without links: Ray's logs stay in its session folder
    if verbose:
        return
    lock, shown = threading.Lock(), []
    out = open(logs_dir / "workers.log", "a", buffering=1)

    def handle(data: dict) -> None:
        source = data.get("actor_name") or data.get("task_name") or "worker"
        with lock:
            for line in data.get("lines", []):
                out.write(f"({source} pid={data.get('pid')}) {line}\n")
                if line.startswith(USER_LINE) and line not in shown[-8:]:  # Ray Train echoes some lines twice
                    shown.append(line)
                    print(line[len(USER_LINE):], flush=True)

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("envenc_worker_lines", handle)


def inside_ray_actor() -> bool:
    """True in a Ray actor (a remote EnvRunner, a Serve replica), False in the driver process."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


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


def fit_resumable(trainer, poll_s: float, what: str, storage: Path, score: str) -> tuple[dict, object]:
    """`trainer.fit()` of a job whose workers save train_state.json in every checkpoint (`report_epoch`), with the
    report poll at `poll_s`: (the latest checkpoint's train_state.json, the checkpoint of the lowest `score`).

    When training fails its checkpoints stay in `storage` and the error says so: the same job started again resumes.
    """
    import json

    import ray.train

    from envenc_ray.errors import DataError

    with train_report_poll(poll_s):
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError:
            logger.error("%s failed; its checkpoints in %s are kept, so a rerun resumes", what, storage)
            raise
    best = result.get_best_checkpoint(metric=score, mode="min")
    if best is None or result.checkpoint is None:
        raise DataError(f"{what} under {storage} left no checkpoint; delete it and rerun")
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / "train_state.json").read_text())
    return state, best


# ----------------------------------------------------------------------------- inside a Ray Train worker loop


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
