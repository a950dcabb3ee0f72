"""`envenc embed`: Ray Data + TruncatedVLM actors over recorded frames."""

from pathlib import Path

import numpy as np
import pytest

from envenc_ray.config import load_config
from envenc_ray.data.collect import collect, read_frame_shape
from envenc_ray.data.embed import embed
from envenc_ray.data.schema import frames_to_array, hidden_to_array, read_table
from envenc_ray.errors import ConfigError, DataError
from envenc_ray.vlm.backbone import TruncatedVLM

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(run_root: Path, *overrides: str):
    return load_config(
        [CONFIGS / "pong-tiny.yaml", CONFIGS / "debug.yaml"],
        [f"experiment.run_root={run_root}", "collect.max_steps_per_episode=20", *overrides],
    )


@pytest.mark.slow
def test_embed_matches_in_process_vlm_and_skips_when_done(ray_session, tmp_path):
    config = tiny_config(tmp_path, "vlm.layer=2")
    collect(config)
    summary = embed(config)
    assert summary.frames == 40 and summary.hidden_size == 128 and not summary.skipped

    hidden = read_table(config.run_dir / "hidden", "hidden", required=("episode_id", "step", "hidden", "objects"))
    frames = read_table(config.run_dir / "frames", "frames", required=("frame",))
    hidden = hidden.sort_by([("episode_id", "ascending"), ("step", "ascending")])
    frames = frames.sort_by([("episode_id", "ascending"), ("step", "ascending")])
    assert hidden["objects"].to_pylist() == frames["objects"].to_pylist()

    vlm = TruncatedVLM.from_config(config.vlm, model_path=str(config.run_dir / "vlm"), game="pong")
    expected = vlm.embed(frames_to_array(frames["frame"], read_frame_shape(config.run_dir / "frames"))).numpy()
    np.testing.assert_allclose(hidden_to_array(hidden["hidden"]), expected, atol=1e-4)

    assert embed(config).skipped
    changed = embed(config.model_copy(update={"vlm": config.vlm.model_copy(update={"layer": 1})}))
    assert not changed.skipped  # a different VLM layer is a different output


def test_embed_errors_before_work(ray_session, tmp_path):
    with pytest.raises(DataError, match="envenc collect"):
        embed(tiny_config(tmp_path))
    with pytest.raises(ConfigError, match="pooling"):
        embed(tiny_config(tmp_path, "vlm.pooling=tokens"))
