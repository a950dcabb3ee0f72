"""Config composition, overrides and the errors a user sees for bad config input."""

from pathlib import Path

import pytest

from envenc_ray.config import EnvEncConfig, load_config
from envenc_ray.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_presets_compose_left_to_right(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("encoder:\n  latent_dim: 16\n  window: 2\ncollect:\n  episodes: 3\n")
    top = tmp_path / "top.yaml"
    top.write_text("encoder:\n  latent_dim: 8\n")
    config = load_config([base, top])
    assert config.encoder.latent_dim == 8  # the later file wins
    assert config.encoder.window == 2  # nested mappings merge key by key
    assert config.collect.episodes == 3
    assert config.embed.batch_size == EnvEncConfig().embed.batch_size  # untouched keys keep defaults
    # one file may be given alone, as a str or a Path: it is read, not taken for a list of one-letter names
    assert load_config(str(top)).encoder.latent_dim == load_config(top).encoder.latent_dim == 8


def test_overrides_are_typed_and_win():
    config = load_config(
        [CONFIGS / "pong-tiny.yaml"],
        ["encoder.latent_dim=7", "vlm.dtype=bfloat16", "encoder.hidden_dims=[32, 16]", "env.max_episode_steps=null"],
    )
    assert config.encoder.latent_dim == 7
    assert config.vlm.dtype == "bfloat16"
    assert config.encoder.hidden_dims == [32, 16]
    assert config.env.max_episode_steps is None


def test_every_preset_validates():
    presets = sorted(CONFIGS.glob("*.yaml"))
    assert presets, "configs/ holds no presets"
    for preset in presets:
        load_config([preset])


def test_unknown_key_names_key_file_and_alternatives(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("encoder:\n  latnt_dim: 8\n")
    with pytest.raises(ConfigError) as error:
        load_config([CONFIGS / "pong-tiny.yaml", bad])
    message = str(error.value)
    assert "encoder.latnt_dim" in message and str(bad) in message and "latent_dim" in message


def test_unknown_section_and_override_typo():
    with pytest.raises(ConfigError, match=r"unknown key 'encodr'.*--set 'encodr.kind=mlp'"):
        load_config([], ["encodr.kind=mlp"])


def test_wrong_type_names_key_origin_and_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("collect:\n  episodes: many\n")
    with pytest.raises(ConfigError, match=r"collect.episodes.*bad.yaml.*'many'"):
        load_config([bad])
    with pytest.raises(ConfigError, match=r"vlm.pooling.*--set 'vlm.pooling=max'"):
        load_config([], ["vlm.pooling=max"])


@pytest.mark.parametrize(
    "text, expected",
    [("encoder: [1, 2\n", "not valid YAML at line"), ("- a\n- b\n", "must hold a mapping")],
)
def test_file_that_does_not_parse(tmp_path, text, expected):
    bad = tmp_path / "broken.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config([bad])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config([], ["encoder.latent_dim"])


def test_section_hash_tracks_only_named_sections():
    a = load_config([], ["encoder.latent_dim=8"])
    b = load_config([], ["encoder.latent_dim=8", "collect.episodes=9"])
    assert a.section_hash("encoder") == b.section_hash("encoder")
    assert a.section_hash("encoder", "collect") != b.section_hash("encoder", "collect")


def test_section_hash_leaves_out_settings_that_change_only_speed():
    plain = load_config([], [])
    faster = load_config([], ["vlm.compile=true", "vlm.num_threads=4"])
    other_layer = load_config([], ["vlm.layer=1"])
    assert plain.section_hash("vlm", "encoder") == faster.section_hash("vlm", "encoder")
    assert plain.section_hash("vlm", "encoder") != other_layer.section_hash("vlm", "encoder")


def test_relative_paths_are_made_absolute_on_load_and_uris_stay(tmp_path, monkeypatch):
    """Ray's workers do not run in the driver's working directory: every path a config names is absolute from the
    moment it is loaded, taken from the directory the user ran envenc in."""
    (tmp_path / "models" / "my-vlm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = load_config([CONFIGS / "pong-tiny.yaml"], ["rl.encoder_dir=encoders/a", "advise.data=pairs.jsonl",
                                                        "vlm.model=models/my-vlm"])
    assert config.experiment.run_root == str(tmp_path / "runs")  # the default, relative 'runs'
    assert config.run_dir == tmp_path / "runs" / "pong-tiny"
    assert config.rl.encoder_dir == str(tmp_path / "encoders" / "a")
    assert config.advise.data == str(tmp_path / "pairs.jsonl")
    assert config.vlm.model == str(tmp_path / "models" / "my-vlm")
    assert load_config([], ["vlm.model=llava-hf/llava-1.5-7b-hf"]).vlm.model == "llava-hf/llava-1.5-7b-hf"  # hub name
    assert load_config([]).vlm.model == "builtin:tiny"
    assert load_config([], ["experiment.run_root=file:///mnt/runs"]).experiment.run_root == "file:///mnt/runs"
    # where the runs live is not what they compute: the same run spelled relative or absolute has one hash
    absolute = load_config([CONFIGS / "pong-tiny.yaml"], [f"experiment.run_root={tmp_path / 'runs'}"])
    elsewhere = load_config([CONFIGS / "pong-tiny.yaml"], ["experiment.run_root=/somewhere/else"])
    assert config.section_hash("experiment", "env") == absolute.section_hash("experiment", "env") \
        == elsewhere.section_hash("experiment", "env")
