"""`rl.overlap: true`: double-buffered sampling, so that env stepping and encoding run at the same time.

A plain EnvRunner alternates: all sub-envs step, then all their frames are encoded in one call, during which
the EnvRunner waits (and while it steps, the encoder waits). `OverlappedEnvRunner` splits its sub-envs into
two groups, each a complete SingleAgentEnvRunner of half the sub-envs (its own vector env, episodes, RLModule
copy and LatentObservations connector), and samples them in two threads:

    group 0:  encode ──▶ forward ── step ──▶ encode ─────────▶ forward ── step ──▶ ...
    group 1:  forward ── step ──▶ encode ──────────▶ forward ── step ──▶ encode ──▶ ...

While one group's frames are with the encoder (a Serve replica in another process, or the in-process VLM,
whose torch kernels release the GIL), the other group runs its RLModule and steps its envs, as SEED RL's and
Sample Factory's double-buffered samplers do. Nothing about encoding changes: each group's connector makes one
encoder call per step for its own episodes, with the same per-episode windows and frame stacks.

Group 1's sub-env i is the plain runner's sub-env k + i (k per group): its seeds follow group 0's, so with the
same actions both runners see the same frames, episode boundaries included (tests/test_rl.py). Exploration
draws from torch's one global RNG in both threads, so sampled actions are not bit-reproducible run to run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger


class OverlappedEnvRunner(SingleAgentEnvRunner):
    """A SingleAgentEnvRunner (itself group 0) plus a second one (group 1) sampled in a worker thread."""

    def __init__(self, *, config, **kwargs):
        group_config = config.copy(copy_frozen=False)
        # each group steps every sub-env as often as the plain runner would: the fragment length is the plain
        # runner's ('auto' would double it for half the sub-envs, and the iteration would sample twice its batch)
        group_config.env_runners(num_envs_per_env_runner=config.num_envs_per_env_runner // 2,
                                 rollout_fragment_length=config.get_rollout_fragment_length(
                                     kwargs.get("worker_index") or 0))
        super().__init__(config=group_config, **kwargs)
        self._other: SingleAgentEnvRunner | None = None
        self._thread: ThreadPoolExecutor | None = None
        if self.env is not None:  # the driver's EnvRunner has no env while remote ones sample: nothing to overlap
            self._other = SingleAgentEnvRunner(config=group_config, **kwargs)
            if self._seed is not None:
                self._other._seed = self._seed + self.num_envs  # sub-envs k..2k-1 of the plain runner
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="envenc-group-1")

    def sample(self, *, num_timesteps=None, num_episodes=None, explore=None, random_actions=False,
               force_reset=False):
        """Both groups sample at once, each half of what was asked; their episodes come back together."""
        if self._other is None:
            return super().sample(num_timesteps=num_timesteps, num_episodes=num_episodes, explore=explore,
                                  random_actions=random_actions, force_reset=force_reset)
        half = {"num_timesteps": None if num_timesteps is None else -(-num_timesteps // 2),
                "num_episodes": None if num_episodes is None else -(-num_episodes // 2),
                "explore": explore, "random_actions": random_actions, "force_reset": force_reset}
        other = self._thread.submit(self._other.sample, **half)
        mine = super().sample(**half)
        return mine + other.result()

    def get_metrics(self):
        """The two groups' metrics merged as those of two parallel EnvRunners (sums add up, means average)."""
        mine = super().get_metrics()
        if self._other is None:
            return mine
        merged = MetricsLogger(stats_cls_lookup=self.config.stats_cls_lookup, root=False)
        merged.aggregate([mine, self._other.get_metrics()])
        return merged.reduce()

    def set_state(self, state) -> None:
        super().set_state(state)
        if self._other is not None:
            self._other.set_state(state)  # the same weights in both groups' RLModules

    def assert_healthy(self):
        super().assert_healthy()
        if self._other is not None:
            self._other.assert_healthy()

    def stop(self):
        super().stop()
        if self._other is not None:
            self._thread.shutdown(wait=True)
            self._other.stop()
