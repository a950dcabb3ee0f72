"""`ray job submit` against a real head started with `ray start --head`: how a cluster runs every stage.

The head runs on free ports, in a private temp dir, with Ray's token authentication on (as deploy/'s
manifests set it): a submission without the token is refused, one with it runs every stage from an uploaded
working directory on a file:// run root and its artifacts appear there. Only the processes of this head are
stopped (`ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the `ray` and `envenc` of this environment


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def processes_of(temp_dir: str, gcs_port: int) -> list:
    """The processes of the head: they name its temp dir, or (the Ray client server) its GCS address."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part or part.endswith(f":{gcs_port}") for part in process.info["cmdline"] or ()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(temp_dir: str, gcs_port: int) -> list:
    """Terminate this head's processes, then kill what is left after 15 s; returns the survivors (none)."""
    import psutil

    processes = processes_of(temp_dir, gcs_port)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p for p in processes_of(temp_dir, gcs_port) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def token_head():
    """A head on free ports in a private temp dir with token auth, for this module's jobs; yields (dashboard
    address, env with token), once the job API answers."""
    temp_dir = tempfile.mkdtemp(prefix="envenc-job-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # never join another cluster
    env |= {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "HF_HUB_OFFLINE": "1"}
    gcs, dashboard, client, node_manager, object_manager, agent_grpc, agent_http, runtime_env, metrics = free_ports(9)
    start = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={temp_dir}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
             f"--object-manager-port={object_manager}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--dashboard-agent-listen-port={agent_http}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", "--disable-usage-stats"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120  # the dashboard's job API comes up after `ray start` returns
        while True:
            listed = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env,
                                    capture_output=True, text=True, timeout=60)
            if listed.returncode == 0 or time.monotonic() > deadline:
                assert listed.returncode == 0, listed.stderr[-2000:]
                break
            time.sleep(2)
        yield address, env
    finally:
        survivors = stop_head(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert survivors == [], "processes of the test's head survived"


@pytest.mark.slow
def test_a_job_without_the_token_is_refused_and_one_with_it_runs_every_stage_on_a_file_uri(token_head, tmp_path):
    """A submission without the token is refused. One with it runs the pipeline from the uploaded working directory
    as a job on a file:// run root (pyarrow's filesystem, the code path of s3:// and gs://): the local copy is
    deleted between stages, so each stage can only find its inputs on the URI, and `envenc run` then skips the
    three stages done and runs the rest. Every artifact must be on the URI afterwards. (One job for both: each
    job's upload, driver and Ray connection cost tens of seconds on CI's 2 cores.)"""
    address, env = token_head
    submit = [str(BIN / "ray"), "job", "submit", f"--address={address}"]
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    refused = subprocess.run([*submit, "--", "echo", "should not run"], env=no_token, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0 and "should not run" not in refused.stdout
    assert "token" in (refused.stdout + refused.stderr).lower()

    behind, local = tmp_path / "bucket" / "runs", tmp_path / "local-copy"
    behind.mkdir(parents=True)
    args = f"configs/pong-tiny.yaml configs/debug.yaml --set experiment.run_root={behind.as_uri()}"
    wipe = f"rm -rf {local}"
    # a Ray task started by a stage's session finds the URI mapping: ensure_ray merged it into the job's runtime_env
    probe = tmp_path / "worker_mapping.py"
    probe.write_text(
        "import os, sys, ray\n"
        "from envenc_ray.config import load_config\n"
        "from envenc_ray.runtime import ensure_ray\n"
        "load_config([], [f'experiment.run_root={sys.argv[1]}']).run_dir\n"
        "ensure_ray()\n"
        "print('worker mapping:', ray.get(ray.remote(lambda: os.environ.get('ENVENC_STORAGE')).remote()))\n")
    chain = " && ".join([f"envenc collect {args}", wipe, f"envenc embed {args}", wipe, f"envenc train-encoder {args}",
                         wipe, f"envenc run {args}", f"python {probe} {behind.as_uri()}"])
    done = subprocess.run(
        [*submit, f"--working-dir={ROOT}",
         "--runtime-env-json", json.dumps({"env_vars": {"ENVENC_LOCAL_RUNS": str(local)}}), "--", "bash", "-c", chain],
        env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "succeeded" in done.stdout.lower()
    for stage in ("collect", "embed", "train-encoder"):
        assert f"{stage}: skipped" in done.stdout, f"{stage} was not found done on the URI: {done.stdout[-3000:]}"
    assert behind.as_uri() in done.stdout.split("worker mapping:")[-1], done.stdout[-2000:]

    run = behind / "debug"
    for artifact in ("frames/_collect.json", "frames/episode-00000.parquet", "hidden/_embed.json", "vlm/config.json",
                     "vlm/model.safetensors", "encoder/model.safetensors", "agent/train.json", "agent/eval.json",
                     "report/report.md", "report/learning_curve.png", "manifest.json", "config.yaml"):
        assert (run / artifact).is_file(), f"{artifact} is not on the URI"
    assert list((run / "hidden").glob("*.parquet")), "no hidden-state shards on the URI"
    assert list(run.glob("agent/checkpoint_*/policy.safetensors")), "no agent checkpoint on the URI"
    assert list(run.glob("encoder_train/*/epoch-*")), "Ray Train wrote no checkpoint to the URI"
    assert not [p for p in behind.rglob("*") if ".tmp-" in p.name], "a temporary file reached the URI"
    assert json.loads((run / "manifest.json").read_text())["stages"]["report"]["skipped"] is False
