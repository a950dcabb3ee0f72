"""What the base VLM knew before any stage trained it: the reference every probe number is read against.

`base_probe_r2(config)` embeds the run's frames with the VLM as given (for the built-in tiny VLM: its random
weights), pooled as `vlm.pooling` says, and fits the same ridge probes on the same rows as train-encoder
does (its seeded held-out episodes, its probe subsample), so `probe_r2.untrained` is comparable with
`probe_r2.hidden` (the VLM the run reads) and `probe_r2.latent` (the encoder's output) variable by variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from envenc_ray.config import EnvEncConfig
from envenc_ray.data.collect import read_frame_shape
from envenc_ray.data.schema import frames_to_array, objects_to_table, read_table
from envenc_ray.data.probes import probe_targets, ridge_probe_r2, split_by_episode
from envenc_ray.encoder.metrics import with_velocities
from envenc_ray.encoder.train import probe_subsample
from envenc_ray.layout import RunLayout
from envenc_ray.vlm.paths import base_model_path


def base_probe_r2(config: EnvEncConfig) -> dict[str, float]:
    """Held-out ridge-probe R² per annotated variable of the base VLM's hidden states of <run>/frames/."""
    from envenc_ray.vlm.backbone import TruncatedVLM

    frames = AnnotatedFrames.of(config)
    vlm = TruncatedVLM.from_config(config.vlm, model_path=base_model_path(config), game=RunLayout.of(config).game)
    return frames.probe_r2(frames.embed(vlm, config.embed.batch_size, "probe the untrained VLM"), config)


@dataclass(frozen=True)
class AnnotatedFrames:
    """<run>/frames/ (envenc collect) in the row order train-encoder probes in: by episode, then step."""

    table: Any  # pyarrow Table: episode_id, step, frame, objects
    episode_ids: np.ndarray
    frame_shape: tuple[int, int, int]

    @classmethod
    def of(cls, config: EnvEncConfig) -> AnnotatedFrames:
        frames_dir = RunLayout.of(config).frames
        table = read_table(frames_dir, "frames (envenc collect)", ("episode_id", "step", "frame", "objects"))
        episode_ids = table["episode_id"].to_numpy().astype(np.int64)
        order = np.lexsort((table["step"].to_numpy(), episode_ids))
        return cls(table.take(order), episode_ids[order], read_frame_shape(frames_dir))

    def frames(self, start: int, stop: int) -> np.ndarray:
        """uint8 (stop - start, H, W, 3) frames of rows start..stop-1."""
        return frames_to_array(self.table["frame"][start:stop], self.frame_shape)

    def embed(self, vlm: Any, batch: int, description: str) -> np.ndarray:
        """`vlm.embed` of every frame, in batches: (N, D), or (N, T, D) for tokens pooling."""
        rows = self.table.num_rows
        batches = tqdm(range(0, rows, batch), desc=description, unit="batch", leave=False)
        return np.concatenate([vlm.embed(self.frames(start, start + batch)).numpy() for start in batches])

    def probe_r2(self, features: np.ndarray, config: EnvEncConfig) -> dict[str, float]:
        """Held-out ridge-probe R² per annotated variable that varies, on train-encoder's episode split and probe
        rows (the same rows for any two features of one rank, so read-outs compare on equal data)."""
        train_rows, val_rows = split_by_episode(self.episode_ids, config.encoder.val_fraction, config.experiment.seed)
        objects = objects_to_table([text or "{}" for text in self.table["objects"].to_pylist()])
        targets = probe_targets(with_velocities(objects, self.episode_ids, self.table["step"].to_numpy()), train_rows,
                                val_rows)
        probe_rows = probe_subsample(train_rows, features.shape[1:], config.experiment.seed)
        return ridge_probe_r2(features, targets, probe_rows, val_rows)


__all__ = ["AnnotatedFrames", "base_probe_r2"]
