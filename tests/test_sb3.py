"""Stable-Baselines3 adapter: SB3's VecEnv contract on real ALE Pong with the tiny VLM and a small untrained
encoder (same-step auto-reset, the real terminal observation, one encoder call per step), and SB3 PPO
learning through it. No Ray: the encoder runs in-process.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")

from test_rl import LATENT_DIM, environment_encoder, make_config  # noqa: E402,F401  (a module fixture)

EPISODE_STEPS = 3


def test_vec_env_auto_resets_like_sb3_with_one_encode_per_step(environment_encoder, tmp_path, tiny_vlm_dir):
    from stable_baselines3.common.vec_env import VecCheckNan, VecEnv, VecMonitor

    from envenc_ray.rl.gym_wrapper import EnvEncVectorEnv
    from envenc_ray.rl.sb3 import EnvEncSB3VecEnv

    encoder, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="latent")
    config.env.max_episode_steps = EPISODE_STEPS
    raw = EnvEncSB3VecEnv(config, num_envs=3, encoder=encoder)
    env = VecMonitor(VecCheckNan(raw, raise_exception=True))  # SB3's own wrappers drive the VecEnv API
    assert isinstance(raw, VecEnv) and raw.observation_space.shape == (LATENT_DIM,)
    assert raw.get_attr("render_mode") == [None] * 3 and raw.env_is_wrapped(VecMonitor) == [False] * 3
    # the gymnasium vector env, NEXT_STEP autoreset, same seeds and actions: the reference observations
    reference = EnvEncVectorEnv(config, num_envs=3, encoder=encoder)
    expected, _ = reference.reset(seed=0)

    env.seed(0)
    observations = env.reset()
    np.testing.assert_allclose(observations, expected, rtol=1e-5, atol=1e-5)
    assert observations.shape == (3, LATENT_DIM) and observations.dtype == np.float32
    for step in range(1, EPISODE_STEPS + 2):
        actions = np.array([env.action_space.sample() for _ in range(3)])
        calls, frames = raw.observer.encode_calls, raw.observer.frames_encoded
        observations, rewards, dones, infos = env.step(actions)
        assert raw.observer.encode_calls == calls + 1  # one call for all sub-envs, resets included
        assert observations.shape == (3, LATENT_DIM) and rewards.shape == dones.shape == (3,)
        assert all(raw.observation_space.contains(o) for o in observations)
        expected, *_ = reference.step(actions)
        if step != EPISODE_STEPS:
            assert not dones.any() and all("terminal_observation" not in info for info in infos)
            np.testing.assert_allclose(observations, expected, rtol=1e-5, atol=1e-5)
            continue
        # the episodes end here: SB3 gets the last observation in the info and the next episode's first
        assert dones.all() and all(info["TimeLimit.truncated"] for info in infos)
        assert raw.observer.frames_encoded == frames + 6  # in that one call: 3 final frames + 3 reset frames
        np.testing.assert_allclose(np.stack([info["terminal_observation"] for info in infos]), expected,
                                   rtol=1e-5, atol=1e-5)  # the latent of the final frame, its window continued
        assert all(info["episode"]["l"] == EPISODE_STEPS for info in infos)  # VecMonitor saw the episodes end
        expected, *_ = reference.step(actions)  # the reference resets one step later
        np.testing.assert_allclose(observations, expected, rtol=1e-5, atol=1e-5)
    env.close()
    reference.close()


def test_sb3_ppo_learns_through_the_adapter_on_latents(environment_encoder, tmp_path, tiny_vlm_dir,
                                                       one_torch_thread):
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    from envenc_ray.rl.sb3 import EnvEncSB3VecEnv

    encoder, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="latent")
    config.env.max_episode_steps = 40  # truncations: PPO bootstraps from the terminal observations
    env = EnvEncSB3VecEnv(config, num_envs=2, encoder=encoder)
    model = PPO("MlpPolicy", VecMonitor(env), n_steps=32, batch_size=32, n_epochs=2, policy_kwargs={"net_arch": [32]},
                device="cpu", seed=0)
    before = {name: value.clone() for name, value in model.policy.state_dict().items()}
    calls = env.observer.encode_calls
    model.learn(total_timesteps=256)
    assert model.num_timesteps == 256 and len(model.ep_info_buffer) == 2 * (128 // 40)
    assert env.observer.encode_calls == calls + 1 + 256 // 2  # PPO's reset, then one call per vector step
    assert model.policy.observation_space.shape == (LATENT_DIM,)
    changed = [name for name, value in model.policy.state_dict().items() if not torch.equal(value, before[name])]
    assert changed and any(name.startswith("mlp_extractor.policy_net") for name in changed)
    env.close()


def test_dict_observations_with_multi_input_policy(environment_encoder, tmp_path, tiny_vlm_dir, one_torch_thread):
    """latent+pixels: a Dict observation; the final frame continues its frame stack, the reset one fills it."""
    from stable_baselines3 import PPO

    from envenc_ray.rl.sb3 import EnvEncSB3VecEnv

    encoder, encoder_dir = environment_encoder
    config = make_config(tmp_path, tiny_vlm_dir, encoder_dir, obs_mode="latent+pixels")
    config.env.max_episode_steps = EPISODE_STEPS
    env = EnvEncSB3VecEnv(config, num_envs=2, encoder=encoder)
    observations = env.reset()
    assert observations["latent"].shape == (2, LATENT_DIM) and observations["pixels"].shape == (2, 84, 84, 4)
    for _ in range(EPISODE_STEPS):
        previous = observations
        observations, _, dones, infos = env.step(np.zeros(2, dtype=np.int64))
    assert dones.all()
    for i, info in enumerate(infos):
        last = info["terminal_observation"]
        assert env.observation_space.contains(last)
        np.testing.assert_array_equal(last["pixels"][..., :3], previous["pixels"][i][..., 1:])
        first = observations["pixels"][i]
        assert all((first[..., k] == first[..., 0]).all() for k in range(4))  # a fresh stack
    PPO("MultiInputPolicy", env, n_steps=8, batch_size=16, n_epochs=1, device="cpu", seed=0).learn(16)
    env.close()
