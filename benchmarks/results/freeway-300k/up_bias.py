"""How often a policy that presses UP with probability p scores in Freeway (ALE v5: frameskip 4, sticky actions
0.25, the minimal action set NOOP/UP/DOWN, the game's own end at 2,048 agent steps): the sanity gate's diagnosis.

    python benchmarks/results/freeway-300k/up_bias.py
"""

import ale_py
import gymnasium as gym
import numpy as np

gym.register_envs(ale_py)
for p_up in (1 / 3, 0.4, 0.5):  # 1/3: the uniform policy PPO starts from
    scores = []
    for episode in range(6):
        env = gym.make("ALE/Freeway-v5", repeat_action_probability=0.25, frameskip=4)
        env.reset(seed=episode)
        rng, total, done = np.random.default_rng(episode), 0.0, False
        while not done:
            action = 1 if rng.random() < p_up else int(rng.choice([0, 2]))
            _, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
        scores.append(total)
    print(f"P(UP) = {p_up:.2f}: scores of 6 episodes {scores}")
