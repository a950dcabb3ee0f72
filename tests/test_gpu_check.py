"""benchmarks/gpu_check.sh without a GPU (one line, exit 0), and its model builder at a small size on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envenc_ray.vlm.backbone import TruncatedVLM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
BUILDER = ROOT / "benchmarks" / "build_random_llava.py"
SKIP_LINE = "gpu_check: skipped: torch sees no CUDA GPU (torch.cuda.is_available() is False)"
SMALL = ["--hidden", "64", "--layers", "2", "--vision-hidden", "64", "--vision-layers", "3", "--image-size", "56"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def builder(monkeypatch):
    """benchmarks/build_random_llava.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("build_random_llava", BUILDER)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks its module up while defined
    spec.loader.exec_module(module)
    return module


def _run_script(tmp_path: Path, path: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the skip is what runs even on a GPU machine
    env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_without_a_gpu_the_check_prints_one_line_and_exits_0(tmp_path):
    python_dir = str(Path(sys.executable).parent)  # the interpreter running the tests, with torch
    result = _run_script(tmp_path, f"{python_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [SKIP_LINE]
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


def test_a_python_without_torch_fails_instead_of_skipping(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\necho \"No module named 'torch'\" >&2\nexit 1\n")
    (bin_dir / "python").chmod(0o755)
    result = _run_script(tmp_path, f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "gpu_check: error: python cannot import torch; activate" in result.stderr


def test_random_llava_builder_at_a_small_size(tiny_vlm_dir, pong_frames, tmp_path, builder, capsys):
    # The script's builder, run as the script runs it, at a small size; then the full HF model and TruncatedVLM
    # agree on it, as test_vlm.py checks for the tiny VLM.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "random-llava"
    command = [sys.executable, str(BUILDER), "--tokenizer-from", str(tiny_vlm_dir), "--out", str(out), *SMALL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "envenc_random_llava.json").read_text())
    assert result.stdout.startswith(f"built random Llava at {out}: 0.5M parameters, 56x56 input -> 16 image tokens")
    assert info["image_tokens"] == 16 and 4e5 < info["parameters"] < 6e5

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    vlm = TruncatedVLM.from_pretrained(out, pooling="tokens")
    vision_layers = [m for m in vlm.backbone.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert len(vision_layers) == 2  # of 3: LLaVA-1.5's feature layer -2 leaves the last one unread
    assert (vlm.num_image_tokens, vlm.preprocessor.crop_to) == (16, (56, 56))  # LLaVA-1.5's crop, scaled down

    frames = pong_frames[:3]
    text = vlm.family.prompt_text(processor, vlm.prompt)
    inputs = processor(images=list(frames), text=[text] * len(frames), return_tensors="pt")
    assert torch.equal(inputs["input_ids"][0], vlm.input_ids[0])
    with torch.inference_mode():
        reference = model(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(vlm.embed_vision_inputs({"pixel_values": inputs["pixel_values"]}), reference,
                               atol=1e-5, rtol=1e-4)
    assert TruncatedVLM.from_pretrained(out, crop="none").preprocessor.crop_to is None

    assert builder.main(command[2:]) == 2  # a second build into the same directory is refused
    assert capsys.readouterr().err.splitlines()[-1] == (  # after the loading bars of the models above
        f"build_random_llava: error: {out} exists and is not empty; pass a new --out directory")


def test_random_llava_default_size_is_a_few_hundred_million_parameters(tiny_vlm_dir, builder):
    # Counted on the meta device: the config the GPU check builds, without allocating its 1.2 GB.
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    sizes = builder.RandomLlavaSpec()
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    tokenizer.model_max_length = sizes.image_tokens + builder.PROMPT_ROOM
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(builder.llava_config(sizes, tokenizer))
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    decoder = sum(p.numel() for p in model.model.language_model.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert sizes.image_tokens == 576  # LLaVA-1.5's: 336x336 in 14-pixel patches
    assert 2.5e8 < total < 3.5e8 and 8e7 < vision < 9e7 and 1.9e8 < decoder < 2.1e8  # measured 291M, 86M, 202M
