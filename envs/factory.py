"""gymnasium environment factories: one env, a gymnasium vector env, and an episode-aligned batch.

Short names resolve to gymnasium ids (:data:`ENV_ALIASES`): ``lunarlander`` ->
``LunarLanderContinuous-v3``, ``bipedalwalker`` -> ``BipedalWalker-v3``, and the D4RL locomotion
tasks to their v4 envs (the public D4RL-v2 Decision Transformer checkpoints were trained on v3 envs,
whose v4 ports match them; v4/v5 need ``mujoco``, in the ``rl`` extra), and ``cuecorridor`` to the
memory task of :mod:`.memory`.

:class:`EnvBatch` steps ``N`` episodes together without auto-reset: an episode that ended stays
ended (its observation frozen, its rewards zero) until :meth:`EnvBatch.reset`, which is what a
batched Decision Transformer rollout needs (every row is one episode from its first step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from namm_transfer.envs import memory  # noqa: F401  (registers the cue corridor with gymnasium)
from namm_transfer.envs.scores import D4RL_ENV_IDS

ENV_ALIASES = {
    "lunarlander": "LunarLanderContinuous-v3",
    "lunarlandercontinuous": "LunarLanderContinuous-v3",
    "bipedalwalker": "BipedalWalker-v3",
    "cuecorridor": memory.ENV_ID,
    "noisycorridor": memory.NOISY_ENV_ID,
    **D4RL_ENV_IDS,
}


def resolve_env_id(name: str) -> str:
    """A short name from :data:`ENV_ALIASES` (any case) -> its gymnasium id; other names pass through."""
    return ENV_ALIASES.get(name.lower(), name)


def make_env(env_id: str, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """``gymnasium.make(resolve_env_id(env_id), **kwargs)``; with ``seed``, the first ``reset()`` is
    seeded (observations reproducible) and so is the action space's sampler.

    Raises:
        ValueError: an id gymnasium does not know (the message lists the short names).
        ImportError: the env needs a package that is missing (box2d, mujoco), with the install hint.
    """
    gym_id = resolve_env_id(env_id)
    try:
        env = gym.make(gym_id, **kwargs)
    except gym.error.DependencyNotInstalled as err:
        extra = "gymnasium[mujoco]" if any(k in gym_id.lower() for k in ("hopper", "cheetah", "walker2d")) \
            else "gymnasium[box2d]"
        raise ImportError(f"environment {gym_id!r} needs a missing package ({err}); pip install '{extra}'") \
            from err
    except gym.error.Error as err:  # NameNotFound, VersionNotFound, ...
        raise ValueError(
            f"unknown environment {env_id!r} ({err}); short names: {', '.join(sorted(ENV_ALIASES))}"
        ) from err
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_vector_env(
    env_id: str, num_envs: int, seed: int | None = None, **kwargs: Any
) -> gym.vector.VectorEnv:
    """A ``gymnasium.vector.SyncVectorEnv`` of ``num_envs`` copies (gymnasium's auto-reset semantics);
    with ``seed``, copy ``i`` is reset with ``seed + i``."""
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    gym_id = resolve_env_id(env_id)
    make_env(gym_id, **kwargs).close()  # fail here, with the clear messages, not inside the vector env
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(gym_id, **kwargs) for _ in range(num_envs)])
    if seed is not None:
        envs.reset(seed=[seed + i for i in range(num_envs)])
        envs.action_space.seed(seed)
    return envs


class EnvBatch:
    """``N`` episodes stepped together, no auto-reset.

    >>> batch = EnvBatch("lunarlander", 4)
    >>> obs = batch.reset(seeds=[0, 1, 2, 3])           # [4, obs_dim]
    >>> obs, rewards, done = batch.step(actions)         # actions [4, act_dim]; done stays True

    Attributes:
        returns: undiscounted return of each episode so far.
        lengths: steps taken by each episode.
        done: whether each episode has terminated or been truncated.
        applied_actions: the last step's actions as the envs applied them, where an env reports it in
            ``info["applied_action"]`` (None until one does): what an agent should record as its action.
    """

    def __init__(self, env_id: str, num_envs: int, **kwargs: Any):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.envs = [make_env(env_id, **kwargs) for _ in range(num_envs)]
        self.env_id = self.envs[0].spec.id if self.envs[0].spec else resolve_env_id(env_id)
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self.num_envs = num_envs
        self._obs: np.ndarray | None = None
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.done = np.zeros(num_envs, dtype=bool)
        self.applied_actions: np.ndarray | None = None

    def reset(self, seeds: Sequence[int] | int | None = None) -> np.ndarray:
        """Start new episodes (``seeds``: one per env, or a base seed ``s`` giving ``s + i``)."""
        if isinstance(seeds, int):
            seeds = [seeds + i for i in range(self.num_envs)]
        if seeds is not None and len(seeds) != self.num_envs:
            raise ValueError(f"need {self.num_envs} seeds, got {len(seeds)}")
        started = [env.reset(seed=None if seeds is None else int(seeds[i]))
                   for i, env in enumerate(self.envs)]
        self.reset_infos = [info for _, info in started]  # e.g. the cue corridor's cue_step
        self._obs = np.stack([obs for obs, _ in started]).astype(np.float32)
        self.returns[:] = 0.0
        self.lengths[:] = 0
        self.done[:] = False
        return self._obs.copy()

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step the running episodes; returns (observations, rewards, done), each with ``N`` rows."""
        if self._obs is None:
            raise RuntimeError("step() before reset()")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.num_envs, *self.action_space.shape):
            raise ValueError(
                f"actions must be {[self.num_envs, *self.action_space.shape]}, got {list(actions.shape)}"
            )
        rewards = np.zeros(self.num_envs)
        applied = actions.copy()
        reported = False
        for i, env in enumerate(self.envs):
            if self.done[i]:
                continue
            obs, reward, terminated, truncated, info = env.step(actions[i])
            if "applied_action" in info:
                applied[i], reported = info["applied_action"], True
            self._obs[i] = obs
            rewards[i] = reward
            self.returns[i] += reward
            self.lengths[i] += 1
            self.done[i] = terminated or truncated
        self.applied_actions = applied if reported else None
        return self._obs.copy(), rewards, self.done.copy()

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def close(self) -> None:
        for env in self.envs:
            env.close()
