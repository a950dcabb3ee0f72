"""`envenc collect` on real ALE through Ray tasks: content, determinism, resume, config mismatch."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from envenc_ray.data.collect import collect, read_frame_shape
from envenc_ray.data.schema import frames_to_array, read_table
from envenc_ray.errors import DataError, UnsupportedGameError

@pytest.mark.slow
def test_collect_writes_annotated_frames_and_resumes(ray_session, tmp_path, debug_config):
    config = debug_config("collect.max_steps_per_episode=40")
    summary = collect(config)
    frames_dir = config.run_dir / "frames"
    assert summary.episodes == 2 and summary.episodes_played == 2 and summary.frames == 80

    table = read_table(frames_dir, "frames", required=("frame", "objects", "advice"))
    frames = frames_to_array(table["frame"], read_frame_shape(frames_dir))
    assert frames.shape == (80, 210, 160, 3) and frames.dtype == np.uint8
    assert sorted(set(table["episode_id"].to_pylist())) == [0, 1]
    first = table.filter(table["episode_id"].to_numpy() == 0)
    assert first["step"].to_pylist() == list(range(40))
    assert first["truncated"].to_pylist()[-1] is True  # the step cap ends the episode as a truncation
    objects = json.loads(first["objects"][0].as_py())
    assert {"player_y", "ball_x", "player_score"} <= set(objects)
    assert first["advice"][0].as_py().startswith("a game of pong, the score is 0-0")
    assert summary.bytes_on_disk * 10 < summary.raw_bytes  # compact storage

    # Resume: only the missing episode is played again, and it comes back identical (seeded per episode).
    shard = frames_dir / "episode-00001.parquet"
    before = pq.read_table(shard)
    shard.unlink()
    again = collect(config)
    assert again.episodes_played == 1
    assert pq.read_table(shard).equals(before)
    assert not list(frames_dir.glob(".*tmp*"))  # no half-written shard left behind


@pytest.mark.slow
def test_collect_is_deterministic_per_seed(ray_session, tmp_path, debug_config):
    tables = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config = debug_config("collect.max_steps_per_episode=40", f"experiment.name={name}",
                              f"experiment.seed={seed}", "collect.episodes=1")
        collect(config)
        tables.append(pq.read_table(config.run_dir / "frames" / "episode-00000.parquet"))
    assert tables[0].equals(tables[1])
    assert tables[0]["action"].to_pylist() != tables[2]["action"].to_pylist()


def test_collect_refuses_to_mix_configs(ray_session, tmp_path, debug_config):
    collect(debug_config("collect.episodes=1", "collect.max_steps_per_episode=5"))
    with pytest.raises(DataError, match="another env/collect config"):
        collect(debug_config("collect.episodes=1", "collect.max_steps_per_episode=6"))


def test_heuristic_policy_needs_an_annotated_game(ray_session, tmp_path, debug_config):
    config = debug_config("env.game=space_invaders", "collect.episodes=1", "collect.policy=heuristic")
    with pytest.raises(UnsupportedGameError, match="space_invaders"):
        collect(config)
