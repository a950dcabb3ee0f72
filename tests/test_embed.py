"""`envenc embed`: Ray Data + TruncatedVLM actors over recorded frames."""


import numpy as np
import pytest

from envenc_ray.data.collect import collect, read_frame_shape
from envenc_ray.data.embed import DTYPE_R2_TOLERANCE, embed
from envenc_ray.data.schema import frames_to_array, hidden_to_array, read_table
from envenc_ray.errors import ConfigError, DataError
from envenc_ray.files import read_json
from envenc_ray.vlm.backbone import TruncatedVLM

@pytest.mark.slow
def test_embed_matches_in_process_vlm_and_skips_when_done(ray_session, tmp_path, debug_config):
    config = debug_config("collect.max_steps_per_episode=20", "vlm.layer=2")
    collect(config)
    summary = embed(config)
    assert summary.frames == 40 and summary.hidden_size == 2 * 128 and not summary.skipped  # spatial: x, y

    hidden = read_table(config.run_dir / "hidden", "hidden", required=("episode_id", "step", "hidden", "objects"))
    frames = read_table(config.run_dir / "frames", "frames", required=("frame",))
    hidden = hidden.sort_by([("episode_id", "ascending"), ("step", "ascending")])
    frames = frames.sort_by([("episode_id", "ascending"), ("step", "ascending")])
    assert hidden["objects"].to_pylist() == frames["objects"].to_pylist()

    vlm = TruncatedVLM.from_config(config.vlm, model_path=str(config.run_dir / "vlm"), game="pong")
    expected = vlm.embed(frames_to_array(frames["frame"], read_frame_shape(config.run_dir / "frames"))).numpy()
    np.testing.assert_allclose(hidden_to_array(hidden["hidden"]), expected, atol=1e-4)

    assert embed(config).skipped
    assert read_json(config.run_dir / "hidden" / "_embed.json")["vlm_dtype"] == "float32"  # as set
    # a different VLM read-out is a different output; vlm.dtype 'auto' is decided by the bfloat16 check, on record
    changed = embed(config.model_copy(update={"vlm": config.vlm.model_copy(update={"layer": 1, "dtype": "auto"})}))
    assert not changed.skipped
    meta = read_json(config.run_dir / "hidden" / "_embed.json")
    check = meta["dtype_check"]
    if "probe_r2_float32" in check:  # native bfloat16 and an annotated game state to probe
        moved = abs(check["probe_r2_bfloat16"] - check["probe_r2_float32"])
        assert meta["vlm_dtype"] == ("bfloat16" if moved <= DTYPE_R2_TOLERANCE else "float32"), check
    else:
        assert meta["vlm_dtype"] == "float32" and check["reason"], check


def test_embed_errors_before_work(ray_session, tmp_path, debug_config):
    with pytest.raises(DataError, match="envenc collect"):
        embed(debug_config("collect.max_steps_per_episode=20"))
    with pytest.raises(ConfigError, match="pooling"):
        embed(debug_config("collect.max_steps_per_episode=20", "vlm.pooling=tokens"))
