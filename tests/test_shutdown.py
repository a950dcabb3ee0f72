"""Clean shutdown (issue #14): Ctrl-C (SIGINT) and SIGTERM stop `envenc serve`, `envenc run` and `envenc train`
within seconds, each started as a new process with a fresh local Ray of its own. Afterwards no process of its
tree (Ray's GCS, raylet, agents, workers, replicas) is left, and the run directory holds no half-written file.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from envenc_ray.files import remove_orphaned_temporaries, replaced_atomically

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [str(ROOT / "configs" / "pong-tiny.yaml"), str(ROOT / "configs" / "debug.yaml")]
STOP_WITHIN_S = 30  # from the signal to the exit of the command and of every process it started
EPISODES = 12  # collected by the interrupted run: more than 2 tasks finish in the seconds before the signal
HALF_WRITTEN = re.compile(r"\.tmp($|-\d+$)")  # what files.replaced_atomically stages under


def test_replaced_atomically_swaps_in_on_success_and_leaves_nothing_on_an_interrupt(tmp_path):
    target = tmp_path / "artifact"
    with replaced_atomically(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("old")
    assert (target / "a").read_text() == "old"
    with pytest.raises(KeyboardInterrupt):
        with replaced_atomically(target) as staging:
            staging.mkdir()
            (staging / "a").write_text("half")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    with replaced_atomically(target) as staging:  # a folder replaces a folder whole
        staging.mkdir()
        (staging / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    with replaced_atomically(tmp_path / "file.txt") as staging:
        staging.write_text("text")
    assert (tmp_path / "file.txt").read_text() == "text" and len(list(tmp_path.iterdir())) == 2


def test_orphaned_temporaries_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path):
    writer = subprocess.Popen(  # a Ray worker killed mid-write: its `finally` never runs
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from envenc_ray.files import "
         "replaced_atomically\nwith replaced_atomically(Path(sys.argv[1])) as tmp:\n    tmp.mkdir(); "
         "(tmp / 'half').write_text('x'); print(tmp, flush=True); time.sleep(60)", str(tmp_path / "shard")],
        stdout=subprocess.PIPE, text=True)
    orphan = Path(writer.stdout.readline().strip())
    writer.kill()
    writer.wait()
    with replaced_atomically(tmp_path / "kept") as live:  # this process still writes it
        live.write_text("y")
        assert orphan.is_dir() and HALF_WRITTEN.search(orphan.name)
        assert remove_orphaned_temporaries(tmp_path, wait_s=0.5) == [orphan]
        assert not orphan.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


class Command:
    """`envenc ARGS` in a new session, its output collected by a thread, its process tree observable."""

    def __init__(self, args: list[str], cwd: Path):
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}  # a fresh Ray
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-m", "envenc_ray.cli", *args], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def printed(self, pattern: str):
        return lambda: any(re.search(pattern, line) for line in self.lines)

    def wait_for(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"not {what} within {timeout_s} s; output:\n" + "\n".join(self.lines))

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def kill(self) -> None:
        """Last resort of a failed test: SIGKILL the whole session, so that nothing outlives it."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self, signum: int) -> tuple[int, float, list[str]]:
        """Send `signum`; return the exit code, the seconds until the command and all of its tree were gone,
        and the processes of the tree still alive after STOP_WITHIN_S."""
        tree = self.tree()
        assert len(tree) > 3, "expected the command's own Ray processes to be running"
        started = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            code = None
        _, alive = psutil.wait_procs(tree, timeout=max(0.0, STOP_WITHIN_S - (time.monotonic() - started)))
        seconds = time.monotonic() - started
        left = [f"{p.pid} {p.name()}" for p in alive if p.is_running()]
        self.kill()
        return code, seconds, left


def half_written(run_root: Path) -> list[str]:
    return [str(p) for p in run_root.rglob("*") if HALF_WRITTEN.search(p.name)]


@pytest.fixture
def serve_command(tmp_path, tiny_vlm_dir):
    from test_serve import HIDDEN_SIZE, save_untrained_encoder

    from envenc_ray.config import EncoderConfig, load_config
    from envenc_ray.vlm.pooling import pooled_width

    # an encoder of the width the presets' read-out gives the tiny VLM (the embedded default's spatial: 2 x 128)
    width = pooled_width(load_config(PRESETS).vlm.pooling, HIDDEN_SIZE)
    encoder_dir = save_untrained_encoder(EncoderConfig(kind="mlp", latent_dim=8, hidden_dims=[16]),
                                         tmp_path / "encoder", hidden_size=width)
    return ["serve", *PRESETS, "--set", f"experiment.run_root={tmp_path / 'runs'}", "--set",
            f"vlm.model={tiny_vlm_dir}", "--set", f"rl.encoder_dir={encoder_dir}", "--set", "serve.num_cpus=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_on_a_signal_and_leaves_no_ray_process(tmp_path, serve_command, signum):
    command = Command(serve_command, tmp_path)
    command.wait_for(command.printed("serve: Ctrl-C stops"), "serving", timeout_s=240)
    code, seconds, left = command.stop(signum)
    print(f"serve: stopped {seconds:.1f} s after {signum.name}")
    assert code == 128 + signum, "\n".join(command.lines)
    assert not left, f"still running {seconds:.0f} s after {signum.name}: {left}"
    assert any("serve: stopping" in line for line in command.lines) or any(
        f"stopped by {signum.name}" in line for line in command.lines), command.lines


@pytest.mark.slow
def test_run_stops_on_sigint_mid_collect_and_leaves_no_half_written_shard(tmp_path):
    runs = tmp_path / "runs"
    collect = ["--set", f"experiment.run_root={runs}", "--set", f"collect.episodes={EPISODES}", "--set",
               "collect.max_steps_per_episode=500"]  # shorter than random Pong: the rerun plays fewer steps
    command = Command(["run", *PRESETS, *collect], tmp_path)
    command.wait_for(lambda: any(runs.rglob("frames/*.parquet")), "past the first shard", timeout_s=240)
    code, seconds, left = command.stop(signal.SIGINT)
    assert code == 130, "\n".join(command.lines)
    assert not left, f"still running {seconds:.0f} s after SIGINT: {left}"
    assert not half_written(runs)
    frames = next(runs.rglob("frames"))
    kept = len(list(frames.glob("*.parquet")))
    assert kept < EPISODES, "collect finished before the signal: nothing was interrupted"
    # the rerun plays only the episodes whose shard is missing, and then all of them are there
    rerun = subprocess.run([sys.executable, "-m", "envenc_ray.cli", "collect", *PRESETS, *collect], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list(frames.glob("*.parquet"))) == EPISODES, rerun.stdout
    assert f"{EPISODES - kept} episodes played" in rerun.stdout, rerun.stdout
    print(f"run: stopped {seconds:.1f} s after SIGINT with {kept} of {EPISODES} shards; the rerun played "
          f"{EPISODES - kept}")


@pytest.mark.slow
def test_train_stops_on_sigterm_mid_iteration_and_leaves_no_half_written_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    command = Command(["train", *PRESETS, "--set", f"experiment.run_root={runs}", "--set", "rl.obs_mode=pixels",
                       "--set", "rl.iterations=200"], tmp_path)
    command.wait_for(lambda: any(runs.rglob("checkpoint_000001")), "past iteration 1", timeout_s=300)
    code, seconds, left = command.stop(signal.SIGTERM)
    print(f"train: stopped {seconds:.1f} s after SIGTERM")
    assert code == 143, "\n".join(command.lines)
    assert not left, f"still running {seconds:.0f} s after SIGTERM: {left}"
    assert not half_written(runs)
    agent = next(runs.rglob("agent"))
    for checkpoint in agent.glob("checkpoint_*"):
        assert (checkpoint / "policy.safetensors").is_file() and (checkpoint / "policy.json").is_file()


@pytest.mark.slow
def test_embed_stops_on_sigint_mid_write_and_its_rerun_embeds_every_frame(tmp_path):
    import pyarrow.dataset as pads

    runs = tmp_path / "runs"
    settings = ["--set", f"experiment.run_root={runs}", "--set", "collect.episodes=4", "--set",
                "collect.max_steps_per_episode=400"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    subprocess.run([sys.executable, "-m", "envenc_ray.cli", "collect", *PRESETS, *settings], cwd=tmp_path,
                   check=True, capture_output=True, timeout=300, env=env)
    command = Command(["embed", *PRESETS, *settings], tmp_path)
    command.wait_for(lambda: any(runs.rglob(".hidden.tmp-*/*.parquet")), "writing hidden states", timeout_s=240)
    code, seconds, left = command.stop(signal.SIGINT)
    assert code == 130, "\n".join(command.lines)
    assert not left, f"still running {seconds:.0f} s after SIGINT: {left}"
    assert not half_written(runs) and not any(runs.rglob("hidden")), "a half-written hidden/ was left"
    rerun = subprocess.run([sys.executable, "-m", "envenc_ray.cli", "embed", *PRESETS, *settings], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    frames = pads.dataset(str(next(runs.rglob("frames"))), format="parquet").count_rows()
    assert pads.dataset(str(next(runs.rglob("hidden"))), format="parquet").count_rows() == frames
    print(f"embed: stopped {seconds:.1f} s after SIGINT mid-write; the rerun embedded all {frames} frames")
