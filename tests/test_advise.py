"""`envenc advise` at tiny sizes: real Ray Train, real Pong frames, the built-in tiny VLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import kill_when

from envenc_ray.errors import DataError, ModelError

ADVISE = ("stage2.method=finetuned", "advise.epochs=2", "advise.batch_size=8", "advise.eval_pairs=8",
          "advise.cpus_per_worker=0.5")


@pytest.fixture(scope="module")
def advised(ray_session, tmp_path_factory):
    """One finetuned tiny VLM on the debug preset's Pong frames, shared by the module's checks."""
    from envenc_ray.config import load_config
    from envenc_ray.data.advise import advise
    from envenc_ray.data.collect import collect

    configs = Path(__file__).resolve().parents[1] / "configs"
    root = tmp_path_factory.mktemp("advise")
    config = load_config([configs / "pong-tiny.yaml", configs / "debug.yaml"],
                         [f"experiment.run_root={root}", *ADVISE])
    collect(config)
    return config, advise(config)


@pytest.mark.slow
def test_advice_finetuning_lowers_held_out_loss_and_is_reused(advised, debug_config):
    from envenc_ray.data.advise import advise
    from envenc_ray.data.collect import collect

    config, summary = advised
    assert not summary["skipped"]
    assert summary["val_loss_best"] < summary["val_loss_before"] - 0.5, summary  # random init: ~6.9 nats to start
    metrics = json.loads((Path(summary["vlm"]).parent / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert 0.0 <= metrics["action_accuracy_heldout"] <= 1.0 and 0.0 < metrics["chance_accuracy"] <= 1.0
    assert metrics["eval_pairs"] == 8 and set(metrics["per_game"]) == {"pong"}

    # Same inputs in another run directory: the content-addressed VLM is found, not retrained.
    other = config.model_copy(update={"experiment": config.experiment.model_copy(update={"name": "other"})})
    collect(other)
    again = advise(other)
    assert again["skipped"] and again["vlm"] == summary["vlm"]
    assert json.loads((other.run_dir / "advise.json").read_text())["vlm"] == str(Path(summary["vlm"]).resolve())
    # A setting that changes what is learned makes another one (checked without training it).
    from envenc_ray.config import advise_settings_hash

    assert advise_settings_hash(other.model_copy(update={"advise": other.advise.model_copy(update={"text": "advice"})})) \
        != advise_settings_hash(other)


@pytest.mark.slow
def test_finetuned_vlm_loads_through_hf_auto_classes_and_truncated_vlm(advised, pong_frames):
    import torch
    from transformers import AutoModelForImageTextToText

    from envenc_ray.vlm.paths import base_model_path, resolve_model_path
    from envenc_ray.vlm.backbone import TruncatedVLM

    config, summary = advised
    assert resolve_model_path(config) == str(Path(summary["vlm"]).resolve())
    model = AutoModelForImageTextToText.from_pretrained(summary["vlm"])
    base = AutoModelForImageTextToText.from_pretrained(base_model_path(config))
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    # advise.train 'above_readout' (the default) at the preset's vlm.layer 0: the decoder and LM head learned; what
    # the read-out sees (vision tower, projector, token embeddings) is the base's.
    assert any("language_model.layers" in n for n in changed) and any("lm_head" in n for n in changed)
    assert not [n for n in changed if any(part in n for part in ("vision_tower", "projector", "embed_tokens"))]
    vlm = TruncatedVLM.from_config(config.vlm, model_path=resolve_model_path(config), game="pong")
    hidden = vlm.embed(pong_frames[:4])
    assert hidden.shape == (4, vlm.hidden_size) and torch.isfinite(hidden).all()


@pytest.mark.slow
def test_lora_finetuning_on_two_games_merges_adapters_on_export(advised, tmp_path):
    """LoRA on Pong and Breakout at once: Breakout is recorded into the shared folder, adapters are merged."""
    from safetensors.torch import load_file

    from envenc_ray.data.advise import advise

    config, _ = advised
    lora = config.model_copy(update={"advise": config.advise.model_copy(
        update={"method": "lora", "train": "all", "epochs": 1, "lr": 1e-3, "eval_pairs": 16,
                "games": ["pong", "breakout"]})})
    summary = advise(lora)
    assert not summary["skipped"] and summary["val_loss_best"] < summary["val_loss_before"]
    weights = load_file(str(Path(summary["vlm"]) / "model.safetensors"))
    assert not any("lora" in name for name in weights), "LoRA adapters must be merged into the exported weights"
    metrics = json.loads((Path(summary["vlm"]).parent / "metrics.json").read_text())
    assert set(metrics["per_game"]) == {"pong", "breakout"}
    assert metrics["pairs"]["train"] + metrics["pairs"]["val"] == 2 * 96  # debug preset: 2 x 48 frames per game
    assert len(list(Path(config.experiment.run_root).glob("_shared/frames/breakout-*/frames/episode-*.parquet"))) == 2


@pytest.mark.parametrize("layer", [0, 2])
def test_training_above_the_readout_leaves_what_embed_reads_unchanged(tmp_path, tiny_vlm_dir, pong_frames, layer):
    """advise.train 'above_readout': after a real optimizer step, the finetuned VLM's read-out at vlm.layer is the
    base's, bit for bit, while the top layer's state moved (so something did train)."""
    import torch

    from envenc_ray.config import VLMConfig
    from envenc_ray.vlm.backbone import TruncatedVLM
    from envenc_ray.vlm.finetune import answer_loss, encode_pairs, export_merged, load_trainable

    model, processor, family = load_trainable(str(tiny_vlm_dir), method="full", readout=(layer, False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    below = ("vision_tower", "multi_modal_projector", "embed_tokens", *(f"layers.{i}." for i in range(layer)))
    assert trainable and not [name for name in trainable if any(part in name for part in below)], trainable
    assert {f"layers.{i}." for i in range(layer, 4)} <= {f"layers.{n.split('layers.')[1].split('.')[0]}." for n in
                                                         trainable if "layers." in n}
    frames = pong_frames[:8]
    pairs = encode_pairs(processor, family, "a game of pong. describe the state.", ["the ball is left"] * 8,
                         frames.shape[1:3], context=512, source="test")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    answer_loss(model, family, family.preprocessor(processor.image_processor), frames, pairs.input_ids,
                pairs.labels, torch.device("cpu")).backward()
    optimizer.step()
    finetuned = export_merged(model, processor, tmp_path / "vlm")

    def embed(path, at: int, pooling: str):
        config = VLMConfig(layer=at, pooling=pooling, dtype="float32")
        return TruncatedVLM.from_config(config, model_path=path, game="pong").embed(frames)

    assert torch.equal(embed(finetuned, layer, "spatial"), embed(tiny_vlm_dir, layer, "spatial"))
    assert torch.equal(embed(finetuned, layer, "last"), embed(tiny_vlm_dir, layer, "last"))
    assert not torch.allclose(embed(finetuned, -1, "last"), embed(tiny_vlm_dir, -1, "last"))


def test_stage2_finetuned_without_advise_says_what_to_run(debug_config):
    from envenc_ray.vlm.paths import resolve_model_path

    with pytest.raises(ModelError, match=r"run `envenc advise"):
        resolve_model_path(debug_config("stage2.method=finetuned"))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_user_advice_data_names_the_file_the_row_and_the_fix(tmp_path, tiny_vlm_dir, pong_frames):
    from PIL import Image

    from envenc_ray.data.advise import user_pairs

    Image.fromarray(pong_frames[0]).save(tmp_path / "frame.png")
    cases = {
        "missing.jsonl": (None, r"does not exist"),
        "no_text.jsonl": ([{"image": "frame.png"}], r"lacks column\(s\) text"),
        "empty.jsonl": ([], r"holds no rows"),
        "bad_image.jsonl": ([{"image": "frame.png", "text": "ok"}, {"image": "nowhere.png", "text": "ok"}],
                            r"row 1: image 'nowhere.png' is not readable"),
        "empty_text.jsonl": ([{"image": "frame.png", "text": "  "}], r"row 0: 'text' must be a non-empty string"),
        "data.csv": ([], r"must end in .parquet or .jsonl"),
    }
    for name, (rows, pattern) in cases.items():
        path = tmp_path / name
        if rows is not None:
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(DataError, match=pattern) as error:
            user_pairs(path)
        assert str(path) in _one_line(error)
    (tmp_path / "not_json.jsonl").write_text('{"image": "frame.png", "text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"not_json.jsonl line 2 is not JSON"):
        user_pairs(tmp_path / "not_json.jsonl")

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "frame.png", "text": "a game of pong", "episode": 3}) + "\n")
    data = user_pairs(good)
    assert data.frames.shape == (1, 210, 160, 3) and data.answers == ["a game of pong"]


def test_text_too_long_and_tokenizer_without_image_token_are_one_line_errors(tmp_path, tiny_vlm_dir):
    import shutil

    from envenc_ray.vlm.finetune import encode_pairs, load_processor

    processor, family, context = load_processor(str(tiny_vlm_dir))
    with pytest.raises(DataError, match=r"pairs.jsonl row 1: prompt \+ answer are \d+ tokens, more than the model's "
                                        rf"context of {context}; shorten the text") as error:
        encode_pairs(processor, family, "describe.", ["short", "word " * context], (210, 160), context, "pairs.jsonl")
    _one_line(error)

    broken = tmp_path / "no-image-token"
    shutil.copytree(tiny_vlm_dir, broken)
    for name in ("tokenizer_config.json", "processor_config.json"):  # an image token the vocabulary lacks
        settings = json.loads((broken / name).read_text())
        settings["image_token"] = "<no-such-token>"
        (broken / name).write_text(json.dumps(settings))
    with pytest.raises(ModelError, match=r"has no image token") as error:
        load_processor(str(broken))
    _one_line(error)


RESUME_TOLERANCE = 0.10  # relative difference of the best held-out loss, resumed vs uninterrupted
RESUME_EPOCHS = 3  # killed after the first: the resumed session trains the other two


@pytest.mark.slow
def test_killed_advise_job_resumes_from_its_last_epoch(tmp_path):
    """Kill `envenc advise` (its whole process group, Ray included) after its first epoch's checkpoint."""
    root = Path(__file__).resolve().parents[1]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    args = [sys.executable, "-m", "envenc_ray.cli", "advise", str(root / "configs/pong-tiny.yaml"),
            str(root / "configs/debug.yaml"),
            *[item for setting in (f"experiment.run_root={killed}", f"advise.epochs={RESUME_EPOCHS}", ADVISE[0],
                                   *ADVISE[2:]) for item in ("--set", setting)]]
    env = {**os.environ, "RAY_ADDRESS": ""}
    subprocess.run([sys.executable, "-m", "envenc_ray.cli", "collect", *args[4:]], check=True, env=env,
                   capture_output=True, timeout=300)
    shutil.copytree(killed, straight)  # the uninterrupted job's run root: the same frames (run_root is not hashed)
    kill_when(args, env, tmp_path / "killed-advise.log",
              lambda: list(killed.glob("_shared/advise-*.train/run/epoch-0001")), 240, "its first checkpoint")
    assert not list(killed.glob("_shared/advise-*/metrics.json")), "a killed job must leave no finished artifact"

    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming after epoch" in finished.stdout + finished.stderr
    metrics = json.loads(next(killed.glob("_shared/advise-*/metrics.json")).read_text())
    assert metrics["resumed_from_epoch"] >= 1
    sessions = {e["session"] for e in metrics["epochs"]}
    assert len(sessions) == 2 and [e["epoch"] for e in metrics["epochs"]] == list(range(1, len(metrics["epochs"]) + 1))
    assert np.isfinite(metrics["val_loss_best"])

    # the same job without the kill ends within RESUME_TOLERANCE of the resumed one
    straight_args = [f"experiment.run_root={straight}" if arg == f"experiment.run_root={killed}" else arg
                     for arg in args]
    subprocess.run(straight_args, check=True, env=env, capture_output=True, timeout=400)
    uninterrupted = json.loads(next(straight.glob("_shared/advise-*/metrics.json")).read_text())
    print(f"advise: best held-out loss {metrics['val_loss_best']:.4f} resumed after epoch "
          f"{metrics['resumed_from_epoch']}, {uninterrupted['val_loss_best']:.4f} uninterrupted")
    assert abs(metrics["val_loss_best"] - uninterrupted["val_loss_best"]) <= (
        RESUME_TOLERANCE * uninterrupted["val_loss_best"])
