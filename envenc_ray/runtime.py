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
import threading
from contextlib import contextmanager
from pathlib import Path

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
