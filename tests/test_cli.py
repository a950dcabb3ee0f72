"""The `envenc` console script as a user runs it."""

import subprocess
import sys
from pathlib import Path

from envenc_ray.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]


def envenc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "envenc_ray.cli", *args], cwd=ROOT, capture_output=True, text=True)


def test_help_lists_every_stage():
    result = envenc("--help")
    assert result.returncode == 0
    for command in [*(stage.name for stage in STAGES), "run", "tune", "experiment", "bench", "model", "config"]:
        assert command in result.stdout


def test_config_show_applies_override():
    result = envenc("config", "show", "configs/pong-tiny.yaml", "--set", "encoder.latent_dim=23")
    assert result.returncode == 0, result.stderr
    assert "latent_dim: 23" in result.stdout


def test_config_typo_is_one_line_error_exit_2():
    result = envenc("config", "show", "configs/pong-tiny.yaml", "--set", "encoder.latnt_dim=23")
    assert result.returncode == 2
    assert result.stderr.startswith("envenc: error: unknown key 'encoder.latnt_dim'")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr