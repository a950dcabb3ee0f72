"""Run storage on a filesystem URI (storage.py), through pyarrow's file:// filesystem: what goes up, what comes
down, which version wins. The whole pipeline on a file:// run root, under `ray job submit`, is in test_jobs.py."""

from __future__ import annotations

import json
import os

import pytest

from envenc_ray import storage
from envenc_ray.errors import ConfigError
from envenc_ray.files import replaced_atomically, write_json_atomic
from envenc_ray.layout import shared_dir


@pytest.fixture
def uri_root(tmp_path, monkeypatch):
    """(URI run root, the folder behind it, this process's local copy of it)."""
    monkeypatch.setenv(storage.LOCAL_RUNS_VAR, str(tmp_path / "local"))
    monkeypatch.delenv(storage.MAPPING_VAR, raising=False)
    behind = tmp_path / "bucket" / "runs"
    behind.mkdir(parents=True)
    uri = behind.as_uri()  # file:///...
    return uri, behind, storage.local_root(uri)


def test_a_folder_run_root_is_used_as_it_is(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.MAPPING_VAR, raising=False)
    assert storage.local_root(str(tmp_path)) == tmp_path
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert storage.remote(tmp_path / "a.json") is None and storage.ray_env_vars() == {}
    assert storage.train_storage(tmp_path / "t") == {"storage_path": str((tmp_path / "t").resolve())}


def test_the_local_copy_is_one_per_uri_and_reaches_ray_workers(uri_root, tmp_path):
    uri, _, local = uri_root
    assert local.parent == (tmp_path / "local").resolve()
    assert storage.local_root(uri) == local  # computed once, then looked up
    assert json.loads(storage.ray_env_vars()[storage.MAPPING_VAR]) == {str(local): uri}


def test_artifacts_written_locally_are_published_with_the_uris_time(uri_root):
    uri, behind, local = uri_root
    write_json_atomic(local / "run" / "agent" / "eval.json", {"return": 3})
    assert json.loads((behind / "run" / "agent" / "eval.json").read_text()) == {"return": 3}
    assert (local / "run/agent/eval.json").stat().st_mtime_ns == (behind / "run/agent/eval.json").stat().st_mtime_ns

    with replaced_atomically(local / "run" / "encoder") as tmp:  # a folder artifact
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        (tmp / "old.bin").write_bytes(b"old")
    with replaced_atomically(local / "run" / "encoder") as tmp:  # replaced whole: old.bin goes there too
        tmp.mkdir()
        (tmp / "config.json").write_text('{"v": 2}')
        (tmp / "model.safetensors").write_bytes(b"weights")
    assert sorted(p.name for p in (behind / "run" / "encoder").iterdir()) == ["config.json", "model.safetensors"]
    assert (behind / "run" / "encoder" / "config.json").read_text() == '{"v": 2}'
    assert not [p for p in behind.rglob("*") if ".tmp-" in p.name], "a temporary name reached the URI"


def test_a_stage_interrupted_mid_write_publishes_nothing(uri_root):
    _, behind, local = uri_root
    with pytest.raises(RuntimeError):
        with replaced_atomically(local / "run" / "hidden") as tmp:
            tmp.mkdir()
            (tmp / "part.parquet").write_bytes(b"half")
            storage.publish(tmp / "part.parquet")  # a file inside a temporary folder never goes up
            raise RuntimeError("killed")
    assert not (behind / "run").exists()


def test_pull_brings_the_newest_version_down_and_keeps_a_newer_local_one(uri_root):
    _, behind, local = uri_root
    (behind / "run" / "vlm").mkdir(parents=True)
    (behind / "run" / "vlm" / "config.json").write_text('{"layers": 4}')
    (behind / "run" / "vlm" / ".weights.tmp-77").write_text("being written")
    pulled = storage.pull(local / "run" / "vlm")
    assert (pulled / "config.json").read_text() == '{"layers": 4}'
    assert not (pulled / ".weights.tmp-77").exists()

    (local / "run" / "vlm" / "stale.json").write_text("{}")  # the URI's folder lacks it: pruned
    remote_file = behind / "run" / "vlm" / "config.json"
    remote_file.write_text('{"layers": 2}')  # same size, newer: a retrained model of the same shapes
    os.utime(remote_file, ns=(remote_file.stat().st_mtime_ns + 10**9,) * 2)
    storage.pull(local / "run" / "vlm")
    assert (local / "run" / "vlm" / "config.json").read_text() == '{"layers": 2}'
    assert not (local / "run" / "vlm" / "stale.json").exists()

    here = local / "run" / "vlm" / "config.json"
    here.write_text('{"layers": 9}')  # written here after the URI's version (not yet up): kept
    os.utime(here, ns=(remote_file.stat().st_mtime_ns + 10**9,) * 2)
    storage.pull(local / "run" / "vlm")
    assert here.read_text() == '{"layers": 9}'


def test_synced_pulls_the_run_before_a_stage_and_pushes_what_it_wrote(uri_root):
    _, behind, local = uri_root
    (behind / "run" / "frames").mkdir(parents=True)
    (behind / "run" / "frames" / "_collect.json").write_text('{"frames": 96}')
    run_dir, shared = local / "run", local / "_shared"
    with storage.synced(run_dir, shared):
        assert json.loads((run_dir / "frames" / "_collect.json").read_text()) == {"frames": 96}
        (run_dir / "report").mkdir()
        (run_dir / "report" / "encoder.png").write_bytes(b"png")  # written without replaced_atomically
        shared.mkdir()
        (shared / "note.txt").write_text("shared")
    assert (behind / "run" / "report" / "encoder.png").read_bytes() == b"png"
    assert (behind / "_shared" / "note.txt").read_text() == "shared"


def test_synced_drops_local_files_the_uri_no_longer_has_but_keeps_the_logs(uri_root):
    # hidden/ replaced whole from another machine: the old shard names of this machine's copy are stale
    _, behind, local = uri_root
    (behind / "run" / "hidden").mkdir(parents=True)
    (behind / "run" / "hidden" / "new-shard.parquet").write_bytes(b"new")
    run_dir = local / "run"
    (run_dir / "hidden").mkdir(parents=True)
    (run_dir / "hidden" / "old-shard.parquet").write_bytes(b"old")
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "envenc.log").write_text("this command's open log")
    with storage.synced(run_dir, local / "_shared"):
        assert sorted(p.name for p in (run_dir / "hidden").iterdir()) == ["new-shard.parquet"]
        assert (run_dir / "logs" / "envenc.log").is_file()


def test_remote_staging_downloads_what_a_writer_put_on_the_uri(uri_root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, behind, local = uri_root
    target = local / "run" / ".hidden.tmp-1"
    with storage.remote_staging(target) as (path, filesystem):
        assert filesystem is not None and not path.startswith(str(local))
        filesystem.create_dir(path)
        with filesystem.open_output_stream(f"{path}/0.parquet") as sink:
            pq.write_table(pa.table({"x": [1, 2]}), sink)
    assert pq.read_table(target / "0.parquet")["x"].to_pylist() == [1, 2]
    assert not [p for p in behind.rglob("*") if "staging" in p.name], "the staging folder was left on the URI"


def test_readers_and_ray_train_get_the_uri_paths(uri_root):
    _, behind, local = uri_root
    paths, filesystem = storage.readable([local / "run" / "frames" / "episode-0.parquet"])
    assert paths == [str(behind / "run" / "frames" / "episode-0.parquet")] and filesystem is not None
    kwargs = storage.train_storage(local / "run" / "encoder_train")
    assert kwargs["storage_path"] == str(behind / "run" / "encoder_train") and kwargs["storage_filesystem"]


def test_a_uri_pyarrow_cannot_open_is_a_config_error(monkeypatch):
    monkeypatch.delenv(storage.MAPPING_VAR, raising=False)
    with pytest.raises(ConfigError, match="experiment.run_root 'nosuchscheme://bucket/runs'.*s3://bucket/runs"):
        storage.local_root("nosuchscheme://bucket/runs")


def test_the_config_puts_a_uri_runs_directory_in_its_local_copy(uri_root, debug_config):
    uri, _, local = uri_root
    config = debug_config(run_root=uri)
    assert config.run_dir == local / config.experiment.name
    assert shared_dir(config) == local / "_shared"


def test_the_reward_model_loads_from_the_uri_on_a_node_without_it(uri_root):
    """An EnvRunner on another node loads <run>/reward_model from the URI, as the encoder loaders do."""
    import torch

    from envenc_ray.config import RewardModelConfig
    from envenc_ray.rl.reward.model import build_reward_model, load_reward_model, save_reward_model

    _, behind, local = uri_root
    settings = RewardModelConfig(d_model=16, heads=2, layers=1)
    torch.manual_seed(0)
    model = build_reward_model(settings, 8)
    save_reward_model(model, behind / "run" / "reward_model",  # written by the node that trained it, on the URI
                      {"settings": settings.model_dump(mode="json"), "representation_dim": 8}, metrics={})
    assert not (local / "run" / "reward_model").exists()
    loaded = load_reward_model(local / "run" / "reward_model")
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
