"""stage2.method joint: the VLM's projector trained by PPO inside the RLModule, on the tiny Llava and real Pong.

The module starts exactly where the frozen pipeline is (same latents from the same frames), one real PPO
iteration changes the projector and leaves the decoder, the prompt, the vision tower (and the encoder unless
stage2.train_encoder) bit-identical, checkpoints hold the adapter and `evaluate` plays with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from envenc_ray.config import EncoderConfig, EnvEncConfig, load_config
from envenc_ray.errors import ConfigError, ModelError

NUM_ENVS = 2
PPO_TINY = {"train_batch_size": 64, "minibatch_size": 32, "num_epochs": 1, "rollout_fragment_length": 32,
            "fcnet_hiddens": [32], "num_envs_per_env_runner": NUM_ENVS, "lr": 1e-3}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def export_encoder(tiny_vlm_dir, out: Path, inputs: str, kind: str = "temporal") -> Path:
    """An untrained encoder of `inputs` states of the tiny VLM at layer 2 (128 LLM + 128 vision), exported."""
    from envenc_ray.encoder.export import FORMAT, FORMAT_VERSION, save_encoder
    from envenc_ray.encoder.models import build_autoencoder

    settings = EncoderConfig(inputs=inputs, kind=kind, latent_dim=8, hidden_dims=[32], window=2)
    hidden_size = 256 if inputs == "both" else 128
    torch.manual_seed(0)
    encoder = build_autoencoder(settings, hidden_size).encoder_module()
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "hidden_size": hidden_size,
                   "latent_dim": 8, "window": encoder.window, "encoder": settings.model_dump(mode="json")}
    save_encoder(encoder, out, description, metrics={})
    return out


def joint_config(tmp_path: Path, tiny_vlm_dir, encoder_dir, train_encoder: bool = False, **rl) -> EnvEncConfig:
    return EnvEncConfig.model_validate({
        "experiment": {"run_root": str(tmp_path), "name": "joint"},
        "vlm": {"model": str(tiny_vlm_dir), "num_threads": 1, "layer": 2, "pooling": "last"},
        "stage2": {"method": "joint", "train_encoder": train_encoder},
        "encoder": json.loads((Path(encoder_dir) / "config.json").read_text())["encoder"],
        "rl": {"encoder_dir": str(encoder_dir), "cpus_per_env_runner": 0.5, "eval_max_steps": 6, **rl},
    })


def build_module(config: EnvEncConfig, observation_width: int):
    from envenc_ray.rl.joint import joint_module_spec

    spec = joint_module_spec(config)
    spec.observation_space = gym.spaces.Box(-np.inf, np.inf, (observation_width,), np.float32)
    spec.action_space = gym.spaces.Discrete(6)
    return spec.build()


@pytest.mark.parametrize("inputs, kind", [("llm", "temporal"), ("both", "temporal"), ("llm", "vq")])
def test_the_module_starts_where_the_frozen_pipeline_is(tiny_vlm_dir, pong_frames, tmp_path, inputs, kind):
    """Features from AdapterFeatures through the module's adapter and encoder = latents of the frozen VLM +
    encoder (EnvironmentEncoder), over two steps of per-episode windows; its trainable state is the adapter."""
    from envenc_ray.config import VLMConfig
    from envenc_ray.encoder.environment import load_environment_encoder

    encoder_dir = export_encoder(tiny_vlm_dir, tmp_path / "encoder", inputs, kind)
    config = joint_config(tmp_path, tiny_vlm_dir, encoder_dir)
    vlm_config = VLMConfig(**config.vlm.model_dump())
    features = load_environment_encoder(vlm_config, str(tiny_vlm_dir), encoder_dir, "pong", joint=True)
    frozen = load_environment_encoder(vlm_config, str(tiny_vlm_dir), encoder_dir, "pong")
    window = 2 if kind == "temporal" else 1
    assert features.latent_dim == window * 64 * 128 and features.hidden_shape == (64, 128)
    module = build_module(config, features.latent_dim)

    feature_windows = latent_windows = None
    for step in range(2):
        frames = pong_frames[3 * step: 3 * step + 3]
        observations, feature_windows = features.encode(frames, feature_windows)
        expected, latent_windows = frozen.encode(frames, latent_windows)
        with torch.no_grad():
            latents = module.latents(torch.from_numpy(observations)).numpy()
        np.testing.assert_allclose(latents, expected, atol=1e-5)

    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith("adapter.")} == {f"adapter.projector.linear_{i}.{w}" for i in (1, 2)
                                                                for w in ("weight", "bias")}
    assert not any(n.startswith("env_encoder.") for n in trainable)  # stage2.train_encoder is off
    # the decoder slice, the prompt and the vision tower are no part of the module's state
    assert {name.split(".")[0] for name in module.state_dict()} == {"adapter", "env_encoder", "encoder", "pi", "vf"}
    assert not any("language_model" in n or "layers" in n or "vision" in n for n in module.state_dict())


def test_a_replica_serves_the_adapter_features(tiny_vlm_dir, pong_frames, tmp_path):
    """The Serve replica's logic (no Serve needed) in joint mode: the same windows of per-patch features as
    in-process, through its cache and client-resized frames."""
    from envenc_ray.encoder.environment import load_environment_encoder
    from envenc_ray.serve.replica import EncoderCore, replica_spec

    encoder_dir = export_encoder(tiny_vlm_dir, tmp_path / "encoder", "llm")
    config = joint_config(tmp_path, tiny_vlm_dir, encoder_dir)
    spec = replica_spec(config)
    assert spec.joint
    core = EncoderCore(spec)
    expected, windows = load_environment_encoder(config.vlm, str(tiny_vlm_dir), encoder_dir, "pong",
                                                 joint=True).encode(pong_frames[:3])
    served, served_windows = core.run_batch([core.check(pong_frames[:3], None, False, "latents")])[0]
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert core.info()["output"] == "patches" and core.info()["latent_dim"] == 2 * 64 * 128
    assert served_windows[0].shape == windows[0].shape == (1, 64, 128)


@pytest.mark.slow
def test_one_ppo_iteration_trains_the_projector_and_nothing_frozen(ray_session, tiny_vlm_dir, tmp_path):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from safetensors.torch import load_file

    from envenc_ray.rl.algorithm import build_algorithm
    from envenc_ray.rl.checkpoints import latents_identity, load_policy, save_checkpoint
    from envenc_ray.rl.evaluate import evaluate
    from envenc_ray.vlm.backbone import TruncatedVLM

    encoder_dir = export_encoder(tiny_vlm_dir, tmp_path / "encoder", "both")
    config = joint_config(tmp_path, tiny_vlm_dir, encoder_dir, num_env_runners=0, **PPO_TINY)
    pristine = TruncatedVLM.from_config(config.vlm, model_path=str(tiny_vlm_dir))  # straight from disk
    algo = build_algorithm(config)
    try:
        learner_module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]
        before = {name: tensor.clone() for name, tensor in learner_module.state_dict().items()}
        row = algo.train()
        after = learner_module.state_dict()
        learner_frozen = learner_module.adapter.frozen
        runner_vlm = algo.env_runner._env_to_module.connectors[0].observer.encoder.vlm  # the EnvRunner's tower
        runner_projector = algo.env_runner.module.adapter.projector.state_dict()
        checkpoint = save_checkpoint(algo, config, tmp_path / "joint" / "agent", 1, latents_identity(config))
    finally:
        algo.stop()
    assert row["env_runners"]["num_env_steps_sampled"] == 64

    projector = [name for name in before if name.startswith("adapter.projector.")]
    assert len(projector) == 4 and all(not torch.equal(before[name], after[name]) for name in projector)
    for name in before:  # the encoder (stage2.train_encoder off) is as train-encoder left it
        if name.startswith("env_encoder."):
            assert torch.equal(before[name], after[name]), name
    for name, tensor in pristine.decoder.state_dict().items():  # frozen: bit-identical to the VLM on disk
        assert torch.equal(learner_frozen.decoder.state_dict()[name], tensor), name
    assert torch.equal(learner_frozen.prompt_embeddings,
                       pristine.backbone.get_input_embeddings()(pristine.input_ids))
    for name, tensor in pristine.backbone.vision_tower.state_dict().items():
        assert torch.equal(runner_vlm.backbone.vision_tower.state_dict()[name], tensor), name
    for name, tensor in runner_projector.items():  # the EnvRunner acts with the trained projector
        assert torch.equal(tensor, after[f"adapter.projector.{name}"]), name

    # the checkpoint holds the adapter (and the encoder), not the decoder; evaluate plays with it
    saved = load_file(str(checkpoint / "policy.safetensors"))
    assert torch.equal(saved["adapter.projector.linear_1.weight"], after["adapter.projector.linear_1.weight"])
    assert set(saved) == set(after)
    features_width = 2 * 64 * 128
    space = gym.spaces.Box(-np.inf, np.inf, (features_width,), np.float32)
    module = load_policy(config, checkpoint, space, gym.spaces.Discrete(6))
    assert torch.equal(module.adapter.projector.linear_2.bias, after["adapter.projector.linear_2.bias"])
    result = evaluate(config, checkpoint=checkpoint, episodes=2)
    assert result["lengths"] == [6, 6] and result["encoder_call_ms"] > 0


@pytest.mark.slow
def test_train_encoder_also_trains_the_encoder(ray_session, tiny_vlm_dir, tmp_path):
    from ray.rllib.core import DEFAULT_MODULE_ID

    from envenc_ray.rl.algorithm import build_algorithm

    encoder_dir = export_encoder(tiny_vlm_dir, tmp_path / "encoder", "llm")
    config = joint_config(tmp_path, tiny_vlm_dir, encoder_dir, train_encoder=True, num_env_runners=0, **PPO_TINY)
    algo = build_algorithm(config)
    try:
        learner_module = algo.learner_group._learner.module[DEFAULT_MODULE_ID]
        before = {name: tensor.clone() for name, tensor in learner_module.env_encoder.state_dict().items()}
        algo.train()
        after = learner_module.env_encoder.state_dict()
    finally:
        algo.stop()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and changed <= {name for name, _ in learner_module.env_encoder.named_parameters()}
    assert not {"input_mean", "input_std"} & changed  # the normalisation statistics are data, not weights


def test_bad_joint_setups_are_one_line_errors(tiny_vlm_dir, tmp_path, debug_config):
    from envenc_ray.pipeline import stages_of
    from envenc_ray.rl.joint import joint_module_spec

    cases = {
        ("rl.algo=dreamerv3",): "set rl.algo=ppo",
        ("rl.obs_mode=latent+pixels",): "set rl.obs_mode=latent",
        ("vlm.pooling=tokens", "encoder.kind=tokens"): "set vlm.pooling to last",
        ("encoder.inputs=vision",): "never reads the projector",
        ("serve.backend=vllm",): "set serve.backend=transformers",
        ("rl.reward=env+model",): "set reward_model.representation=pixels or rl.reward=env",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message) as error:
            load_config([], ["stage2.method=joint", *overrides])
        assert "\n" not in str(error.value)
    load_config([], ["stage2.method=joint", "rl.reward=model", "reward_model.representation=pixels"])  # fine

    config = joint_config(tmp_path, tiny_vlm_dir, export_encoder(tiny_vlm_dir, tmp_path / "encoder", "llm"))
    vision_encoder = export_encoder(tiny_vlm_dir, tmp_path / "vision-encoder", "vision")
    config.rl.encoder_dir = str(vision_encoder)  # rl.encoder_dir: an encoder trained on vision states
    with pytest.raises(ConfigError, match="reads encoder.inputs 'vision'.*use an encoder of inputs llm or both"):
        joint_module_spec(config)

    # from the finetuned VLM: advise runs first, and without it nothing reads a VLM
    finetuned = debug_config("stage2.method=joint", "stage2.joint_from=finetuned")
    assert [stage.name for stage in stages_of(finetuned)][:3] == ["collect", "advise", "embed"]
    assert "advise" not in [stage.name for stage in stages_of(debug_config("stage2.method=joint"))]
    from envenc_ray.vlm.paths import resolve_model_path

    with pytest.raises(ModelError, match="names none yet: run `envenc advise CONFIG`"):
        resolve_model_path(finetuned)
