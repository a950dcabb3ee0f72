"""What the base VLM knew before any stage trained it: the reference every probe number is read against.

`base_probe_r2(config)` embeds the run's frames with the VLM as given (for the built-in tiny VLM: its random
weights), pooled as `vlm.pooling` says, and fits the same ridge probes on the same rows as train-encoder
does (its seeded held-out episodes, its probe subsample), so `probe_r2.untrained` is comparable with
`probe_r2.hidden` (the VLM the run reads) and `probe_r2.latent` (the encoder's output) variable by variable.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from envenc_ray.config import EnvEncConfig
from envenc_ray.data.collect import read_frame_shape
from envenc_ray.data.schema import frames_to_array, objects_to_table, read_table
from envenc_ray.encoder.metrics import probe_targets, ridge_probe_r2, with_velocities
from envenc_ray.encoder.train import probe_subsample, split_by_episode
from envenc_ray.layout import RunLayout, base_model_path


def base_probe_r2(config: EnvEncConfig) -> dict[str, float]:
    """Held-out ridge-probe R² per annotated variable of the base VLM's hidden states of <run>/frames/."""
    import torch

    from envenc_ray.vlm.backbone import TruncatedVLM

    layout = RunLayout.of(config)
    frames_dir = layout.frames
    table = read_table(frames_dir, "frames (envenc collect)", ("episode_id", "step", "frame", "objects"))
    episode_ids = table["episode_id"].to_numpy().astype(np.int64)
    order = np.lexsort((table["step"].to_numpy(), episode_ids))  # the row order train-encoder probes in
    table, episode_ids = table.take(order), episode_ids[order]
    vlm = TruncatedVLM.from_config(config.vlm, model_path=base_model_path(config), game=layout.game)
    frame_shape, batch = read_frame_shape(frames_dir), config.embed.batch_size
    hidden = []
    with torch.inference_mode():
        for start in tqdm(range(0, table.num_rows, batch), desc="probe the untrained VLM", unit="batch", leave=False):
            frames = frames_to_array(table["frame"][start:start + batch], frame_shape)
            hidden.append(vlm.embed(frames).numpy())
    features = np.concatenate(hidden)  # (N, D), or (N, T, D) for tokens pooling: the probe flattens it
    train_rows, val_rows = split_by_episode(episode_ids, config.encoder.val_fraction, config.experiment.seed)
    objects = objects_to_table([text or "{}" for text in table["objects"].to_pylist()])
    targets = probe_targets(with_velocities(objects, episode_ids, table["step"].to_numpy()), train_rows, val_rows)
    probe_rows = probe_subsample(train_rows, features.shape[1:], config.experiment.seed)
    return ridge_probe_r2(features, targets, probe_rows, val_rows)


__all__ = ["base_probe_r2"]
