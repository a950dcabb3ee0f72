"""The `envenc` command: one subcommand per stage of the registry (`pipeline.STAGES`), plus run, tune,
experiment, bench, model and config.

Every `EnvEncError` becomes one line on stderr and exit code 2.
Ctrl-C (SIGINT) and SIGTERM stop any command cleanly (runtime.stop_on_signals): exit code 130 / 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

# gRPC (inside Ray) logs INFO lines about fork() to the console unless told otherwise before it loads.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import yaml  # noqa: E402

from envenc_ray.bench.autoscale import bench_autoscale  # noqa: E402
from envenc_ray.bench.backends import bench_backends  # noqa: E402  (imports vLLM only when it runs)
from envenc_ray.bench.encoder import bench_encoder  # noqa: E402
from envenc_ray.bench.learner import bench_learner  # noqa: E402
from envenc_ray.bench.readouts import bench_readouts  # noqa: E402
from envenc_ray.bench.rollout import MODES as ROLLOUT_MODES  # noqa: E402
from envenc_ray.bench.rollout import bench_rollout  # noqa: E402
from envenc_ray.config import EnvEncConfig, load_config  # noqa: E402
from envenc_ray.errors import ConfigError, EnvEncError  # noqa: E402
from envenc_ray.files import remove_orphaned_temporaries  # noqa: E402
from envenc_ray.layout import CONFIG_COPY, RunLayout, shared_dir, synced_run  # noqa: E402
from envenc_ray.pipeline import STAGES, Stage  # noqa: E402
from envenc_ray.pipeline import run as run_pipeline  # noqa: E402
from envenc_ray.pipeline.experiment import experiment, experiment_status  # noqa: E402
from envenc_ray.pipeline.tune import tune as tune_sweep  # noqa: E402
from envenc_ray.runtime import configure_console, received_signal, shutdown_ray, stop_on_signals  # noqa: E402
from envenc_ray.storage import is_uri, local_root, pull  # noqa: E402
from envenc_ray.vlm.tiny import build_tiny_vlm  # noqa: E402

def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        with stop_on_signals():
            args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (runtime.Stopped): the stage's `finally`s have run
        signum = received_signal() or signal.SIGINT
        print(f"envenc: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        shutdown_ray()
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except EnvEncError as error:
        print(f"envenc: error: {error}", file=sys.stderr)
        return 2
    return 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="envenc",
        description="Environment Encoder on Ray: a frozen, truncated VLM + autoencoder as an RL agent's state.",
        epilog="Configs are YAML presets composed left to right, e.g. "
        "`envenc collect configs/pong-tiny.yaml --set collect.episodes=8`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show Ray's and the libraries' logs and every Ray worker's output (always kept in "
                        "<run>/logs/)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    where = RunLayout(run_dir=Path("<run>"), game="", agent_encoder=Path("rl.encoder_dir or <run>/encoder"))
    for stage in STAGES:
        reads = ", ".join(str(getattr(where, name)) for name in stage.reads) or "nothing"
        epilog = f"reads {reads}; writes {getattr(where, stage.writes) if stage.writes else 'nothing'}"
        sub = commands.add_parser(stage.name, help=stage.help, description=stage.help, epilog=epilog)
        _add_config_arguments(sub)
        if stage.add_arguments:
            stage.add_arguments(sub)
        sub.set_defaults(handler=_stage_handler(stage))
    run = commands.add_parser("run", help="run every stage in order (skipping current ones)",
                              description="Run every stage of the config in order on one Ray session; a stage "
                              "whose output already matches the config and its inputs is skipped and says why. "
                              "Writes <run>/manifest.json (what each stage did and how long it took).")
    _add_config_arguments(run)
    run.set_defaults(handler=_on_config(lambda config, args: run_pipeline(config)))
    tune = commands.add_parser("tune", help="run a Ray Tune sweep over config keys",
                               description="Ray Tune sweep over dotted config keys (grid/choice/uniform/...), "
                               "optionally with ASHA; writes <run>/tune/ and best.yaml.")
    _add_config_arguments(tune)
    tune.add_argument(
        "--sweep", required=True, metavar="SWEEP.yaml",
        help="sweep file: metric, mode, num_samples, scheduler and params (dotted keys -> grid/choice/uniform/...); "
        "see configs/sweeps/ppo-lr.yaml",
    )
    tune.set_defaults(handler=_on_config(lambda config, args: tune_sweep(config, sweep_path=args.sweep)))
    experiment = commands.add_parser(
        "experiment",
        help="compare arms (named config overrides) over seeds at an equal env-step budget, as Ray Tune trials",
        description="Every (arm, seed) trains exactly --steps env steps as one Ray Tune trial (in turn or a few at "
        "once here, in parallel on a cluster), with a checkpoint and greedy full-length episodes at every evaluation "
        "point (the arms file's eval_every, and the end). Frames, VLMs, hidden states "
        "and encoders are built once, before the trials, and shared by the arms that need them. A rerun resumes: "
        "finished trials and current artifacts are skipped, unfinished trials continue from their last "
        "evaluation point. Writes <run>/experiments/<arms file stem>/results.json "
        "and plots (mean return vs env steps with a 95% bootstrap band over seeds, final evaluation returns).",
        epilog="e.g. envenc experiment configs/pong-tiny.yaml --arms configs/experiments/obs-mode.yaml --seeds 3 "
        "--steps 51200",
    )
    _add_config_arguments(experiment)
    experiment.add_argument("--arms", required=True, metavar="ARMS.yaml",
                            help="arms file: question, arms (name -> dotted overrides), optional common, steps, "
                            "seeds; see configs/experiments/")
    experiment.add_argument("--seeds", type=int, help="seeds per arm, 0..S-1 (default: the arms file's seeds)")
    experiment.add_argument("--steps", type=int,
                            help="env steps per trial, a whole number of iterations (default: the arms file's steps)")
    experiment.add_argument("--concurrent", type=int,
                            help="trials at once (default: as many as fit the Ray cluster)")
    experiment.add_argument("--status", action="store_true",
                            help="print each trial's progress (env steps, evaluations, last evaluation return, done / "
                            "partial / not started) from the files on disk, without starting Ray, and exit")
    experiment.set_defaults(handler=_on_config(_experiment))
    bench = commands.add_parser(
        "bench",
        help="benchmarks, results as JSON (encoder, rollout, autoscale, learner)",
        description="encoder: naive HF path vs our batched path vs Ray Serve (frames/s, p50/p99, FLOPs, "
        "matmul peak, batch sweep plot). rollout: RLlib sampling env-steps/s per observation mode, plain and "
        "double-buffered (rl.overlap). autoscale: Serve scaling the encoder up under EnvRunner load and back "
        "down when it stops (set serve.max_replicas above serve.min_replicas). learner: seconds per PPO learner "
        "update on precomputed latents vs stage2.method joint.",
    )
    bench.add_argument("target", choices=["encoder", "rollout", "autoscale", "learner"], help="what to benchmark")
    bench.add_argument("--json", metavar="OUT", help="write the results to this JSON file (plot next to it)")
    bench.add_argument("--callers", type=int, default=2, help="encoder: concurrent Serve callers C (default 2)")
    bench.add_argument("--frames-per-call", type=int, default=16, help="encoder: frames per call N (default 16)")
    bench.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                       help="encoder: 'vllm' times the transformers and vLLM backends side by side in one run "
                       "(needs envenc-ray[vllm]; JSON default <run>/bench/encoder-vllm.json)")
    bench.add_argument("--readouts", action="store_true",
                       help="encoder: ms/frame and held-out probe R^2 of the built-in tiny VLM's read-outs (patch size, "
                       "vlm.layer, vlm.pooling) on the run's collected frames, the config's own read-out first "
                       "(JSON default <run>/bench/readouts.json)")
    bench.add_argument("--seconds", type=float, default=4.0, help="encoder: measuring time of each phase (default 4)")
    bench.add_argument("--iterations", type=int, default=3,
                       help="rollout: measured rounds per mode; learner: measured updates per mode (default 3)")
    bench.add_argument("--modes", default=",".join(ROLLOUT_MODES),
                       help=f"rollout: comma-separated modes to run (default all: {','.join(ROLLOUT_MODES)}; the "
                       "ratios need all)")
    _add_config_arguments(bench)
    bench.set_defaults(handler=_on_config(_bench))

    model = commands.add_parser("model", help="manage VLMs (build the built-in tiny VLM)")
    model_commands = model.add_subparsers(title="model commands", metavar="ACTION", required=True)
    init_tiny = model_commands.add_parser(
        "init-tiny",
        help="build the built-in tiny Llava-architecture VLM with a locally trained tokenizer",
        description="Build the built-in tiny VLM (random weights, deterministic per seed) in Hugging Face "
        "format, loadable offline by AutoModelForImageTextToText / AutoProcessor and TruncatedVLM.",
    )
    init_tiny.add_argument("--out", required=True, help="directory to write the model to")
    init_tiny.add_argument("--seed", type=int, default=0, help="seed of weights and tokenizer (default 0)")
    init_tiny.set_defaults(handler=_init_tiny)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(title="config commands", metavar="ACTION", required=True)
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    _add_config_arguments(show)
    show.set_defaults(handler=_config_show)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "configs", nargs="+" if required else "*", metavar="CONFIG", help="YAML presets, composed left to right"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set encoder.latent_dim=32 (repeatable)",
    )


def _on_config(command: Callable[[EnvEncConfig, argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """The handler that runs command(config, args) on the resolved config, with the console
    routed to its run's logs/ (runtime.configure_console) and a run on a URI run root synced around it."""

    def handler(args: argparse.Namespace) -> Any:
        config = _resolve_config(args)
        with synced_run(config):
            configure_console(RunLayout.of(config).logs, verbose=args.verbose)
            try:
                return command(config, args)
            except KeyboardInterrupt:  # Ray's workers end with Ray; those killed mid-write left temporaries
                shutdown_ray()
                for folder in (config.run_dir, shared_dir(config)):
                    remove_orphaned_temporaries(folder)
                raise

    return handler


def _resolve_config(args: argparse.Namespace):
    """A single run directory argument (a folder, or a URI such as s3://bucket/runs/pong-tiny) stands for the
    config its run recorded."""
    argument = args.configs[0] if len(args.configs) == 1 else ""
    if is_uri(argument) and not argument.endswith((".yaml", ".yml")):
        run_root, name = argument.rstrip("/").rsplit("/", 1)
        recorded = pull(local_root(run_root) / name / CONFIG_COPY)
    elif argument and Path(argument).is_dir():
        run_dir = Path(argument).resolve()  # wherever the folder is now, not where it was made
        run_root, name, recorded = str(run_dir.parent), run_dir.name, run_dir / CONFIG_COPY
    else:
        return load_config(args.configs, args.overrides)
    if not recorded.is_file():
        raise ConfigError(f"{argument} holds no config.yaml: pass a run directory made by `envenc run`, or the YAML "
                          "config files of the run")
    return load_config([recorded], [f"experiment.run_root={run_root}", f"experiment.name={name}", *args.overrides])


def _config_show(args: argparse.Namespace) -> None:
    config = _resolve_config(args)  # no run directory is touched
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")


def _init_tiny(args: argparse.Namespace) -> None:
    build_tiny_vlm(args.out, seed=args.seed)


def _stage_handler(stage: Stage):
    return _on_config(lambda config, args: stage.run(config, **stage.options(args)))


def _experiment(config: EnvEncConfig, args: argparse.Namespace) -> None:
    if args.status:
        experiment_status(config, args.arms, seeds=args.seeds, steps=args.steps)
        return
    experiment(config, args.arms, seeds=args.seeds, steps=args.steps, concurrent=args.concurrent,
               command="envenc " + " ".join(sys.argv[1:]))


def _bench(config: EnvEncConfig, args: argparse.Namespace) -> None:
    command = "envenc " + " ".join(sys.argv[1:])
    if args.target == "rollout":
        bench_rollout(config, args.json, iterations=args.iterations, modes=tuple(args.modes.split(",")),
                      command=command)
        return
    if args.target == "autoscale":
        bench_autoscale(config, args.json, command=command)
        return
    if args.target == "learner":
        bench_learner(config, args.json, iterations=args.iterations, command=command)
        return
    if args.backend == "vllm":
        bench_backends(config, args.json, seconds=args.seconds, command=command)
        return
    if args.readouts:
        bench_readouts(config, args.json, command=command)
        return
    bench_encoder(config, args.json, callers=args.callers, frames_per_call=args.frames_per_call,
                  seconds=args.seconds, command=command)


if __name__ == "__main__":
    sys.exit(main())
