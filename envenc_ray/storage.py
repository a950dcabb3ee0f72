"""Run storage: the run root on a folder, or on any filesystem URI pyarrow opens, seen alike from every node.

    experiment.run_root: runs                    a folder: a local disk, or a mount every node has at one path
    experiment.run_root: s3://bucket/runs        a URI (s3://, gs://, hdfs://, file:///mnt/runs)

With a URI, every process (the driver, a collect task, an embed actor, a Ray Train worker, a Serve replica)
works in a local copy of the run root, `local_root(uri)` = $ENVENC_LOCAL_RUNS (default ~/.cache/envenc/runs)
/<hash of the URI>/, and the URI is what they share:

    publish(path)   an artifact just written into the local copy goes up, whole (files.replaced_atomically
                    calls it, so every artifact of every stage does, on whichever node wrote it)
    pull(path)      an artifact about to be read comes down where the local copy lacks it or holds an older one
    synced(...)     the driver around one stage: the run directory comes down before, whatever the stage wrote
                    outside `replaced_atomically` (plots, progress CSVs) goes up after
    remote(path)    where a local path lives on the URI, for the readers and writers that go there themselves
                    (Ray Data, Ray Train and Tune storage)

Which local folder stands for which URI reaches every Ray worker in ENVENC_STORAGE (`ray_env_vars`, put into the
job's runtime_env by `runtime.ensure_ray`); a plain folder involves none of this. Versions are told apart by
modification time: a file pulled or published gets the URI's time, so newest wins in both directions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from envenc_ray.errors import ConfigError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

MAPPING_VAR = "ENVENC_STORAGE"  # JSON {local root: URI}, for this process and every Ray worker it starts
LOCAL_RUNS_VAR = "ENVENC_LOCAL_RUNS"
TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")  # files.replaced_atomically's and _upload's names while writing (pid)
CHUNK = 1 << 20


def is_uri(root: str) -> bool:
    return "://" in str(root)


def local_root(root: str) -> Path:
    """The folder this process reads and writes for run root `root`: the folder itself, or for a URI its local copy
    (recorded in ENVENC_STORAGE, so that Ray workers started after this use the same one)."""
    if not is_uri(root):
        return Path(root)
    mapping = _mapping()
    for local, uri in mapping.items():
        if uri == root:
            return Path(local)
    _filesystem(root)  # a URI pyarrow cannot open is a config error now, not a stage's failure later
    base = Path(os.environ.get(LOCAL_RUNS_VAR) or "~/.cache/envenc/runs").expanduser().resolve()
    local = base / hashlib.sha256(root.encode()).hexdigest()[:12]
    mapping[str(local)] = root
    os.environ[MAPPING_VAR] = json.dumps(mapping)
    return local


def ray_env_vars() -> dict[str, str]:
    """The variables every Ray worker needs to find the URI behind a local path (empty for plain folders)."""
    return {MAPPING_VAR: os.environ[MAPPING_VAR]} if _mapping() else {}


def remote(path: str | Path) -> tuple[FileSystem, str] | None:
    """(filesystem, path on it) of a local path under a URI run root's local copy; None for any other path."""
    path = Path(path).absolute()
    for local, uri in _mapping().items():
        if path.is_relative_to(local):
            filesystem, base = _filesystem(uri)
            relative = path.relative_to(local).as_posix()
            return filesystem, base if relative == "." else f"{base.rstrip('/')}/{relative}"
    return None


def publish(path: str | Path) -> None:
    """Upload a just-written file or folder to the URI (a folder replaces the one there: extra files go)."""
    located = remote(path)
    if located is not None and Path(path).exists() and not any(TEMPORARY.match(p) for p in Path(path).parts):
        _upload(Path(path), *located, prune=True, only_newer=False)


def pull(path: str | Path, prune: bool = True) -> Path:
    """Download the URI's copy of a file or folder where the local one is missing or older; with `prune`, local
    files the URI's folder lacks go (an artifact is replaced whole). Returns `path`."""
    path = Path(path)
    located = remote(path)
    if located is not None:
        _download(*located, path, prune=prune)
    return path


def remove(path: str | Path) -> None:
    """Delete a file or folder on the URI too (the local one is the caller's to delete)."""
    located = remote(path)
    if located is None:
        return
    from pyarrow.fs import FileType

    filesystem, target = located
    kind = filesystem.get_file_info(target).type
    if kind == FileType.Directory:
        filesystem.delete_dir(target)
    elif kind == FileType.File:
        filesystem.delete_file(target)


@contextmanager
def synced(run_dir: Path, shared: Path) -> Iterator[None]:
    """Around one stage on the driver: the run directory comes down first, as the URI has it (artifacts are replaced
    whole there, so a local file the URI lacks is stale; the open logs/ are kept); afterwards (also after a failure,
    so that checkpoints and logs survive the machine) what the driver wrote there or in the shared folder and the
    URI lacks goes up."""
    located = remote(run_dir)
    if located is None:
        yield
        return
    _download(*located, run_dir, prune=True, keep=("logs",))
    try:
        yield
    finally:
        for folder in (run_dir, shared):
            if folder.is_dir():
                _upload(folder, *remote(folder), prune=False, only_newer=True)


@contextmanager
def remote_staging(local_dir: Path) -> Iterator[tuple[str, FileSystem | None]]:
    """(path, filesystem) for a Ray Data writer that fills `local_dir` from any node: the folder itself, or for a
    URI run root a staging folder on the URI that is downloaded into `local_dir` when the block ends."""
    located = remote(local_dir)
    if located is None:
        yield str(local_dir), None
        return
    filesystem, target = located
    parent, name = target.rstrip("/").rsplit("/", 1)
    staging = f"{parent}/.{name}-staging.tmp-{os.getpid()}"  # a temporary name: no pull takes it
    try:
        yield staging, filesystem
        _download(filesystem, staging, Path(local_dir), prune=False)
    finally:
        if _exists(filesystem, staging):
            filesystem.delete_dir(staging)


def readable(paths: list[Path]) -> tuple[list[str], FileSystem | None]:
    """Paths for a reader on any node (Ray Data): on the URI when the files are under a URI run root's copy."""
    located = [remote(p) for p in paths]
    if not paths or located[0] is None:
        return [str(p) for p in paths], None
    return [target for _, target in located], located[0][0]


def train_storage(local_dir: Path) -> dict:
    """RunConfig(storage_path=..., storage_filesystem=...) keywords for Ray Train and Tune: checkpoints of workers
    on any node go to the URI directly (Ray Train uploads them), or to the local folder."""
    located = remote(local_dir)
    if located is None:
        return {"storage_path": str(Path(local_dir).resolve())}
    filesystem, target = located
    return {"storage_path": target, "storage_filesystem": filesystem}


# ----------------------------------------------------------------------------------------------- transfers


def _mapping() -> dict[str, str]:
    return json.loads(os.environ.get(MAPPING_VAR) or "{}")


@lru_cache(maxsize=None)
def _filesystem(uri: str) -> tuple[FileSystem, str]:
    from pyarrow import ArrowException
    from pyarrow.fs import FileSystem

    try:
        return FileSystem.from_uri(uri)
    except (ArrowException, ValueError, OSError) as error:
        raise ConfigError(f"experiment.run_root {uri!r}: pyarrow cannot open it ({error}); give a folder or a URI "
                          "such as s3://bucket/runs, gs://bucket/runs or file:///mnt/runs (with credentials in the "
                          "environment)") from None


def _exists(filesystem: FileSystem, target: str) -> bool:
    from pyarrow.fs import FileType

    return filesystem.get_file_info(target).type != FileType.NotFound


def _remote_files(filesystem: FileSystem, target: str) -> dict[str, object]:
    """{path relative to target: FileInfo} of the files at or under target ('' for target itself, a file)."""
    from pyarrow.fs import FileSelector, FileType

    info = filesystem.get_file_info(target)
    if info.type == FileType.File:
        return {"": info}
    if info.type != FileType.Directory:
        return {}
    found = filesystem.get_file_info(FileSelector(target, recursive=True))
    prefix = target.rstrip("/") + "/"
    files = {i.path[len(prefix):]: i for i in found if i.type == FileType.File}
    return {rel: i for rel, i in files.items() if not any(TEMPORARY.match(part) for part in rel.split("/"))}


def _local_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {"": path}
    files = {}
    for root, _, names in os.walk(path):  # not into links (logs/ray points at Ray's session folder)
        for name in names:
            local = Path(root, name)
            relative = local.relative_to(path).as_posix()
            if not any(TEMPORARY.match(part) for part in relative.split("/")) and not local.is_symlink():
                files[relative] = local
    return files


def _same(stat: os.stat_result, info) -> bool:
    return stat.st_size == info.size and (info.mtime_ns is None or stat.st_mtime_ns == info.mtime_ns)


def _newer_here(stat: os.stat_result, info) -> bool:
    return info.mtime_ns is not None and stat.st_mtime_ns > info.mtime_ns


def _join(target: str, relative: str) -> str:
    return f"{target.rstrip('/')}/{relative}" if relative else target


def _upload(path: Path, filesystem: FileSystem, target: str, prune: bool, only_newer: bool) -> None:
    there, here = _remote_files(filesystem, target), _local_files(path)
    for relative, local in here.items():
        stat, info = local.stat(), there.get(relative)
        if info is not None and (_same(stat, info) or only_newer and not _newer_here(stat, info)):
            continue
        destination = _join(target, relative)
        parent, name = destination.rsplit("/", 1)
        filesystem.create_dir(parent, recursive=True)
        staging = f"{parent}/.{name}.tmp-{os.getpid()}"  # a reader sees the old file or the new one
        with local.open("rb") as source, filesystem.open_output_stream(staging) as sink:
            shutil.copyfileobj(source, sink, CHUNK)
        filesystem.move(staging, destination)
        uploaded = filesystem.get_file_info(destination).mtime_ns
        if uploaded is not None:
            os.utime(local, ns=(uploaded, uploaded))
    if prune:
        for relative in set(there) - set(here):
            filesystem.delete_file(_join(target, relative))


def _download(filesystem: FileSystem, target: str, path: Path, prune: bool, keep: tuple[str, ...] = ()) -> None:
    """Bring `target` down into `path`; with `prune`, local files the URI lacks go, except under the folders `keep`."""
    there = _remote_files(filesystem, target)
    if not there:
        return  # nothing published there (yet): the local copy stays as it is
    here = _local_files(path) if path.exists() else {}
    for relative, info in there.items():
        if relative in here and (_same(here[relative].stat(), info) or _newer_here(here[relative].stat(), info)):
            continue  # the same version, or one written here after it (it goes up with the next upload)
        local = path / relative if relative else path
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        with filesystem.open_input_stream(_join(target, relative)) as source, staging.open("wb") as sink:
            shutil.copyfileobj(source, sink, CHUNK)
        if info.mtime_ns is not None:
            os.utime(staging, ns=(info.mtime_ns, info.mtime_ns))
        os.replace(staging, local)
    if prune and path.is_dir():
        for relative in set(here) - set(there):
            if relative.split("/", 1)[0] not in keep:
                here[relative].unlink(missing_ok=True)
