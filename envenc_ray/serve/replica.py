"""What one encoder replica does, as plain Python (no Serve): `ReplicaSpec` (what it loads, resolved on the
driver), `EncoderCore` (load, validate a call once at the service's entry, run a batch of calls through the
hidden-state cache, the VLM and the encoder, count) and `runtime_settings` (what a running replica takes
live). `deployment.py` puts it behind Ray Serve; tests and the benchmarks use it directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from envenc_ray.config import EnvEncConfig, ServeConfig
from envenc_ray.encoder.served import ServedPair
from envenc_ray.errors import ConfigError, InputError, ModelError

logger = logging.getLogger(__name__)

# The hidden-state cache holds at most this many bytes whatever serve.cache_size says: a frame's per-token
# states (vlm.pooling 'tokens') are T times a pooled one, megabytes on a real VLM.
CACHE_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica loads at start; changing any of it restarts the replicas."""

    pair: ServedPair  # the truncated VLM + encoder, resolved and checked on the driver (encoder/served.py)
    num_threads: int  # torch intra-op threads per replica
    vllm_checkpoint: str | None = None  # serve.backend 'vllm': the checkpoint vLLM loads (vlm/vllm_backend.py)
    # which deploy made this spec (`replica_spec` draws a new one each time): `deployment.run_app` returns only once
    # every running replica reports it, so no replica of an earlier deploy answers for this one
    deploy_id: str = ""

    @property
    def joint(self) -> bool:
        """stage2.method 'joint': the replica serves the window of per-patch vision features (AdapterFeatures)."""
        return self.pair.joint


def runtime_settings(serve_config: ServeConfig) -> dict[str, Any]:
    """Serve's `user_config`: the knobs a running replica picks up without a restart."""
    return {
        "max_batch_calls": serve_config.max_batch_calls,
        "batch_wait_timeout_s": serve_config.batch_wait_timeout_s,
        "cache_size": serve_config.cache_size,
        "max_frames_per_call": serve_config.max_frames_per_call,
        "max_frame_pixels": serve_config.max_frame_pixels,
        "max_body_bytes": serve_config.max_body_bytes,
    }


def replica_threads(config: EnvEncConfig) -> int:
    """vlm.num_threads if set, else one thread per whole CPU reserved (at least 1: 0.5 CPU -> 1 thread)."""
    return config.vlm.num_threads or max(1, int(config.serve.num_cpus))


def replica_spec(config: EnvEncConfig, model_path: str | Path | None = None,
                 encoder_dir: str | Path | None = None) -> ReplicaSpec:
    """The run's served pair (or the given directories), checked here, in the driver, not in a replica that Serve
    would restart; with serve.backend 'vllm' its checkpoint made once here, so replicas never race to write it."""
    from envenc_ray.layout import shared_vllm_dir

    pair = ServedPair.of(config, model_path, encoder_dir)
    if config.vlm.device.startswith("cuda") and config.serve.num_gpus == 0:
        raise ConfigError(f"vlm.device={config.vlm.device!r} but serve.num_gpus=0: replicas would see no GPU; "
                          "set serve.num_gpus=1 (or vlm.device=cpu)")
    checkpoint = None
    if config.serve.backend == "vllm":
        from envenc_ray.vlm.vllm_backend import vllm_checkpoint

        checkpoint = str(vllm_checkpoint(config.vlm, pair.model_path, shared_vllm_dir(config)))
    return ReplicaSpec(pair=pair, num_threads=replica_threads(config), vllm_checkpoint=checkpoint,
                       deploy_id=uuid.uuid4().hex)


@dataclass
class EncodeRequest:
    """One validated call: frames (N, H, W, 3) uint8; windows None or one (k-1, *hidden_shape) array | None
    per frame."""

    frames: np.ndarray
    windows: list[np.ndarray | None] | None
    resized: bool  # frames are already at the model's input size (resized client-side)
    want: str  # "latents" or "hidden"


class HiddenStateCache:
    """LRU map from a frame's content hash to its hidden state (identical frames are embedded once)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @staticmethod
    def key(frame: np.ndarray, resized: bool) -> bytes:
        # SHA-1 runs on the CPU's SHA extensions (~0.06 ms per 210x160 frame, ~1% of its forward);
        # the shape and the resized flag are part of the key: different pixels, different entries.
        digest = hashlib.sha1(f"{frame.shape}{resized}".encode(), usedforsecurity=False)
        digest.update(np.ascontiguousarray(frame).data)
        return digest.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        row = self.entries.get(key)
        if row is not None:
            self.entries.move_to_end(key)
        return row

    def put(self, key: bytes, row: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self.entries[key] = row
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        while len(self.entries) > max(capacity, 0):
            self.entries.popitem(last=False)


class EncoderCore:
    """Everything a replica does, as plain Python (no Serve): load, validate, run a batch, count."""

    def __init__(self, spec: ReplicaSpec, settings: dict[str, Any] | None = None):
        from envenc_ray.runtime import set_torch_threads
        from envenc_ray.vlm.preprocess import FramePreprocessor

        set_torch_threads(spec.num_threads)
        self.spec = spec
        self.encoder = spec.pair.load(vllm_checkpoint=spec.vllm_checkpoint)
        self.identity = spec.pair.identity()  # what agents record and check (rl/checkpoints.latents_identity)
        self.vlm = self.encoder.vlm
        # Frames resized client-side skip the resize (and crop); the rest of the preprocessing is unchanged.
        # Families preprocessed by their own HF processor (Idefics3's tiling) take raw frames only.
        self.preprocessor_after_resize = (
            dataclasses.replace(self.vlm.preprocessor, resize_to=None, shortest_edge=None, crop_to=None)
            if isinstance(self.vlm.preprocessor, FramePreprocessor)
            else None
        )
        self.settings = runtime_settings(ServeConfig())
        self.cache = HiddenStateCache(0)
        self.lock = threading.Lock()  # counters and cache: written by the forward thread, read by stats()
        self.counters = {"calls": 0, "frames": 0, "batches": 0, "forwards": 0, "frames_computed": 0,
                         "cache_hits": 0, "duplicate_hits": 0, "cache_misses": 0, "busy_s": 0.0,
                         "largest_batch_calls": 0, "largest_forward_frames": 0}
        self.errors: dict[str, int] = {}
        self.started = time.time()
        self.configure(settings or self.settings)

    def configure(self, settings: dict[str, Any]) -> None:
        unknown = set(settings) - set(self.settings)
        if unknown:
            raise ConfigError(f"unknown live settings {sorted(unknown)}; known: {sorted(self.settings)}")
        self.settings = {**self.settings, **settings}
        row_bytes = 4 * int(np.prod(self.encoder.hidden_shape))
        capacity = min(int(self.settings["cache_size"]), CACHE_MAX_BYTES // row_bytes)
        if capacity < int(self.settings["cache_size"]):
            logger.info("hidden-state cache: %d entries of %s states (%d MiB), not serve.cache_size=%s", capacity,
                        self.encoder.hidden_shape, capacity * row_bytes >> 20, self.settings["cache_size"])
        with self.lock:
            self.cache.resize(capacity)

    # ------------------------------------------------------------------ facts the client needs

    def info(self) -> dict[str, Any]:
        encoder = self.encoder.encoder
        return {
            "kind": encoder.kind,
            "latent_dim": self.encoder.latent_dim,
            "window": self.encoder.window,
            "hidden_size": self.vlm.hidden_size,
            "hidden_shape": self.encoder.hidden_shape,
            "output": self.vlm.output,  # 'patches': latents are AdapterFeatures' (stage2 joint)
            "image_size": tuple(self.vlm.image_size),
            "preprocessor": (  # None: the client must send raw frames (no client-side resize)
                dataclasses.asdict(self.vlm.preprocessor) if self.preprocessor_after_resize is not None else None
            ),
            "dtype": str(self.vlm.dtype).removeprefix("torch."),  # vlm.dtype 'auto' resolved on this replica
            **self.identity,  # model_path, encoder_dir and their weights' sha256
            "deploy_id": self.spec.deploy_id,
            "num_threads": self.spec.num_threads,
            **self.settings,
        }

    # ------------------------------------------------------------------ validation (before batching)

    def check(self, frames_uint8: Any, windows: Any, resized: bool, want: str) -> EncodeRequest:
        """Validate one call, raising InputError that says what is wrong and how to fix it."""
        from envenc_ray.encoder.environment import check_windows
        from envenc_ray.vlm.preprocess import as_frame_batch

        if want not in ("latents", "hidden"):
            raise InputError(f"unknown output {want!r}: ask for 'latents' or 'hidden'")
        # the pixel bound is checked before anything is copied (a zero-strided view can describe terabytes)
        frames = as_frame_batch(frames_uint8, int(self.settings["max_frame_pixels"])).numpy()
        limit = int(self.settings["max_frames_per_call"])
        if len(frames) > limit:
            raise InputError(f"{len(frames)} frames in one call, more than serve.max_frames_per_call={limit}: "
                             "split the batch (EncoderClient does) or raise the limit")
        if resized and self.preprocessor_after_resize is None:
            raise InputError("this model's frames are preprocessed by its own processor on the replica: send the "
                             "raw frames with resized=False")
        if resized and tuple(frames.shape[1:3]) != tuple(self.vlm.image_size):
            height, width = self.vlm.image_size
            raise InputError(f"resized=True but the frames are {frames.shape[1]}x{frames.shape[2]}, not the model's "
                             f"input size {height}x{width}: send the raw frames with resized=False")
        checked = (check_windows(windows, len(frames), self.encoder.window, self.encoder.hidden_shape)
                   if want == "latents" else None)
        return EncodeRequest(frames, checked, bool(resized), want)

    # ------------------------------------------------------------------ the batch

    def run_batch(self, requests: list[EncodeRequest]) -> list[Any]:
        """One merged batch -> one result per call: latents/(latents, windows), hidden, or an exception."""
        start = time.perf_counter()
        hidden = self._hidden_states(requests)
        results: list[Any] = [None] * len(requests)
        to_encode = []
        for i, (request, states) in enumerate(zip(requests, hidden)):
            bad = ~np.isfinite(states.reshape(len(states), -1)).all(axis=1)
            if bad.any():
                results[i] = ModelError(
                    f"the VLM produced non-finite hidden states for frames {np.flatnonzero(bad)[:8].tolist()} of "
                    f"this call (dtype {self.vlm.dtype}): the model weights may be corrupt, or bfloat16 "
                    "overflowed (try vlm.dtype=float32)")
            elif request.want == "hidden":
                results[i] = states
            else:
                to_encode.append(i)
        if to_encode:
            self._encode(requests, hidden, to_encode, results)
        with self.lock:
            counters = self.counters
            counters["calls"] += len(requests)
            counters["frames"] += sum(len(r.frames) for r in requests)
            counters["batches"] += 1
            counters["largest_batch_calls"] = max(counters["largest_batch_calls"], len(requests))
            counters["busy_s"] += time.perf_counter() - start
        for result in results:
            if isinstance(result, Exception):
                self.count_error(type(result).__name__)
        return results

    def _encode(self, requests, hidden, indices, results) -> None:
        """One encoder forward over the frames of every call in `indices`; each call gets its slice back."""
        states = np.concatenate([hidden[i] for i in indices])
        windows = None
        if self.encoder.window > 1:
            windows = []
            for i in indices:
                windows.extend(requests[i].windows or [None] * len(requests[i].frames))
        latents, new_windows = self.encoder.encode_hidden(states, windows)
        offset = 0
        for i in indices:
            n = len(requests[i].frames)
            rows = latents[offset : offset + n]
            call_windows = new_windows[offset : offset + n] if new_windows is not None else None
            offset += n
            bad = ~np.isfinite(rows).all(axis=1)
            if bad.any():
                results[i] = ModelError(
                    f"the encoder produced non-finite latents for frames {np.flatnonzero(bad)[:8].tolist()} of this "
                    "call from finite inputs: its weights are corrupt or the window states hold extreme values; "
                    "start those episodes fresh (window None) or re-export the encoder")
            else:
                results[i] = (rows, call_windows)

    def _hidden_states(self, requests: list[EncodeRequest]) -> list[np.ndarray]:
        """Hidden states (n_i, D) per call: cached rows, plus one forward per frame size over the misses."""
        outputs = [np.empty((len(r.frames), *self.encoder.hidden_shape), np.float32) for r in requests]
        groups: dict[tuple, dict[Any, tuple[np.ndarray, list[tuple[int, int]]]]] = {}
        hits = duplicates = 0
        use_cache = self.cache.capacity > 0
        for i, request in enumerate(requests):
            group = groups.setdefault((request.frames.shape[1:], request.resized), {})
            for j, frame in enumerate(request.frames):
                if not use_cache:
                    group[(i, j)] = (frame, [(i, j)])
                    continue
                key = HiddenStateCache.key(frame, request.resized)
                with self.lock:
                    row = self.cache.get(key)
                if row is not None:
                    outputs[i][j] = row
                    hits += 1
                elif key in group:
                    group[key][1].append((i, j))
                    duplicates += 1
                else:
                    group[key] = (frame, [(i, j)])
        computed = 0
        for (_, resized), entries in groups.items():
            if not entries:
                continue
            frames = np.stack([frame for frame, _ in entries.values()])
            states = self._embed(frames, resized)
            computed += len(frames)
            fresh = []
            for (key, (_, targets)), row in zip(entries.items(), states):
                for i, j in targets:
                    outputs[i][j] = row
                if use_cache and np.isfinite(row).all():
                    fresh.append((key, row.copy()))  # a view would pin the whole batch's array in the cache
            with self.lock:
                for key, row in fresh:
                    self.cache.put(key, row)
                self.counters["forwards"] += 1
                self.counters["largest_forward_frames"] = max(self.counters["largest_forward_frames"], len(frames))
        with self.lock:
            self.counters["frames_computed"] += computed
            if use_cache:
                self.counters["cache_hits"] += hits
                self.counters["duplicate_hits"] += duplicates
                self.counters["cache_misses"] += computed
        return outputs

    def _embed(self, frames: np.ndarray, resized: bool) -> np.ndarray:
        import torch

        tensor = torch.from_numpy(frames)  # validated once, in `check`, at the service's entry
        if not resized:
            return self.vlm.embed_frames(tensor).cpu().numpy()
        vision_inputs = self.vlm.family.vision_inputs(self.preprocessor_after_resize, tensor, self.vlm.device)
        return self.vlm.embed_vision_inputs(vision_inputs).cpu().numpy()

    # ------------------------------------------------------------------ metrics

    def count_error(self, name: str) -> None:
        with self.lock:
            self.errors[name] = self.errors.get(name, 0) + 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            counters = dict(self.counters)
            errors = dict(self.errors)
            cached = len(self.cache.entries)
        looked_up = counters["cache_hits"] + counters["duplicate_hits"] + counters["cache_misses"]
        served_without_forward = counters["cache_hits"] + counters["duplicate_hits"]
        batches = max(counters["batches"], 1)
        return {
            **counters,
            "errors": errors,
            "cache_entries": cached,
            "cache_hit_rate": served_without_forward / looked_up if looked_up else 0.0,
            "mean_calls_per_batch": counters["calls"] / batches,
            "mean_frames_per_forward": counters["frames_computed"] / max(counters["forwards"], 1),
            "busy_frames_per_s": counters["frames"] / counters["busy_s"] if counters["busy_s"] else 0.0,
            "uptime_s": time.time() - self.started,
        }
