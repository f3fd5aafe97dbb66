"""Local offline-RL datasets from gymnasium's heuristic controllers, written as real Minari datasets.

The Minari servers are unreachable here, so D4RL-style quality levels are made locally:

- ``expert``: the heuristic with small Gaussian action noise;
- ``medium``: the heuristic with a share of uniformly random actions, tuned so the mean return sits
  near half-way between the random policy and the expert (normalised score ~50);
- ``replay``: a mix across noise levels, each episode drawing its share of random actions uniformly
  from ``[0, 1]`` (from fully random to expert-like), like a replay buffer over a training run.

Reference scores stored in every dataset of an env (so ``minari.get_normalized_score`` and
:func:`namm_transfer.envs.normalised_score` work): ``ref_min_score`` = mean return of the uniform random
policy, ``ref_max_score`` = mean return of the ``expert`` level, each over ``ref_episodes`` episodes
on their own seeds.

Reproducible: episode ``i`` of (env, level, seed) resets the env with a seed and draws its noise from a
generator that depend only on (seed, env, level, i), so the same seed gives identical arrays and a
larger dataset extends a smaller one.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from namm_transfer.envs.controllers import (
    BipedalWalkerHeuristic,
    Controller,
    LunarLanderHeuristic,
    NoisyController,
    RandomController,
)
from namm_transfer.envs.datasets import dataset_exists, dataset_path, load_dataset, minari_root
from namm_transfer.envs.factory import make_env
from namm_transfer.envs.memory import ENV_ID as CUE_CORRIDOR_ID
from namm_transfer.envs.memory import NOISY_CUE_STEP, NOISY_ENV_ID, CueCorridorExpert

NAMESPACE = "namm"
DATASET_VERSION = 0


@dataclass(frozen=True)
class QualityLevel:
    """Noise of one quality level: Gaussian action noise (fraction of the action half-width) and the
    probability of a uniformly random action per step; each fixed, or drawn per episode uniformly from
    its ``*_range``."""

    name: str
    noise: float = 0.0
    random_prob: float = 0.0
    noise_range: tuple[float, float] | None = None
    random_prob_range: tuple[float, float] | None = None

    def episode_noise(self, rng: np.random.Generator) -> tuple[float, float]:
        """(noise, random_prob) of one episode; always draws twice so streams stay aligned."""
        u_noise, u_prob = rng.random(2)
        noise = self.noise if self.noise_range is None else _lerp(self.noise_range, u_noise)
        prob = self.random_prob if self.random_prob_range is None else _lerp(self.random_prob_range, u_prob)
        return noise, prob

    def describe(self) -> str:
        noise = f"{self.noise}" if self.noise_range is None else f"U{self.noise_range} per episode"
        prob = f"{self.random_prob}"
        if self.random_prob_range is not None:
            prob = f"U{self.random_prob_range} per episode"
        return f"Gaussian action noise {noise} of the half-width, random-action probability {prob}"


def _lerp(bounds: tuple[float, float], u: float) -> float:
    return float(bounds[0] + (bounds[1] - bounds[0]) * u)


@dataclass(frozen=True)
class LocalEnv:
    """A gymnasium task with a heuristic controller and its quality levels."""

    key: str  # short name on the command line
    env_id: str
    dataset_name: str  # the env part of the dataset ids
    controller: Callable[[], Controller]
    levels: dict[str, QualityLevel]

    def dataset_id(self, level: str, version: int = DATASET_VERSION) -> str:
        return f"{NAMESPACE}/{self.dataset_name}/{level}-v{version}"


# Tuned on 100 (lunar) / 12 (bipedal) episodes so `medium` lands near a normalised score of 50; the
# summary written by `namm-transfer make-rl-datasets` reports the measured values. The bipedal
# walker's heuristic runs with speed 0.16 (gymnasium's 0.29 falls in half the episodes) and tolerates
# very little noise: 5% random actions or noise 0.1 fall in every episode, so its levels vary the noise.
LOCAL_ENVS: dict[str, LocalEnv] = {
    "lunarlander": LocalEnv(
        "lunarlander",
        "LunarLanderContinuous-v3",
        "lunarlandercontinuous",
        LunarLanderHeuristic,
        {
            "expert": QualityLevel("expert", noise=0.1),
            "medium": QualityLevel("medium", noise=0.3, random_prob=0.4),
            "replay": QualityLevel("replay", noise=0.3, random_prob_range=(0.0, 1.0)),
        },
    ),
    "bipedalwalker": LocalEnv(
        "bipedalwalker",
        "BipedalWalker-v3",
        "bipedalwalker",
        functools.partial(BipedalWalkerHeuristic, speed=0.16),
        {
            "expert": QualityLevel("expert", noise=0.01),
            "medium": QualityLevel("medium", noise=0.03),
            "replay": QualityLevel("replay", noise_range=(0.0, 0.1)),
        },
    ),
    # The memory task: at the junction a random action picks the right arm half the time, so `medium`
    # (half the steps random) succeeds ~75% of the time and `replay` anywhere from 50% to 100%.
    "cuecorridor": LocalEnv(
        "cuecorridor",
        CUE_CORRIDOR_ID,
        "cuecorridor",
        CueCorridorExpert,
        {
            "expert": QualityLevel("expert", noise=0.1),
            "medium": QualityLevel("medium", noise=0.1, random_prob=0.5),
            "replay": QualityLevel("replay", noise=0.1, random_prob_range=(0.0, 1.0)),
        },
    ),
    "noisycorridor": LocalEnv(
        "noisycorridor",
        NOISY_ENV_ID,
        "noisycorridor",
        functools.partial(CueCorridorExpert, cue_step=NOISY_CUE_STEP),
        {
            "expert": QualityLevel("expert", noise=0.1),
            "medium": QualityLevel("medium", noise=0.1, random_prob=0.5),
            "replay": QualityLevel("replay", noise=0.1, random_prob_range=(0.0, 1.0)),
        },
    ),
}
LEVELS = ("expert", "medium", "replay")


def local_env(name: str) -> LocalEnv:
    """``lunarlander`` / ``bipedalwalker`` (or their gymnasium ids) -> :class:`LocalEnv`."""
    for spec in LOCAL_ENVS.values():
        if name.lower() in (spec.key, spec.dataset_name, spec.env_id.lower()):
            return spec
    raise ValueError(f"no local dataset recipe for {name!r}; choose from {', '.join(LOCAL_ENVS)}")


def _stream(seed: int, *names: str) -> list[int]:
    """Stable integer entropy for (seed, names...) (Python's hash() is salted per process)."""
    return [int(seed)] + [zlib.crc32(n.encode()) for n in names]


@dataclass
class GeneratedEpisodes:
    """Episodes as Minari ``EpisodeBuffer`` objects plus their returns and per-episode noise."""

    buffers: list[Any]
    returns: np.ndarray
    lengths: np.ndarray
    noises: np.ndarray  # per episode: (Gaussian noise, random-action probability)


def run_episodes(
    spec: LocalEnv,
    level: str,
    episodes: int,
    seed: int,
    max_episode_steps: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> GeneratedEpisodes:
    """Run ``episodes`` episodes of ``level`` (a quality level, or ``"random"`` for the uniform
    random policy); ``progress(1)`` is called after each episode."""
    from minari.data_collector import EpisodeBuffer

    kwargs = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    env = make_env(spec.env_id, **kwargs)
    low, high = env.action_space.low, env.action_space.high
    buffers, returns, lengths, noises = [], [], [], []
    for i in range(episodes):
        rng = np.random.default_rng(_stream(seed, spec.key, level, str(i)))
        reset_seed = int(rng.integers(2**31 - 1))
        if level == "random":
            policy: Controller = RandomController(low, high, rng)
            noise, prob = 0.0, 1.0
        else:
            noise, prob = spec.levels[level].episode_noise(rng)
            policy = NoisyController(spec.controller(), low, high, rng, noise, prob)
        policy.reset()
        obs, _ = env.reset(seed=reset_seed)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            action = policy(obs)
            obs, reward, terminated, truncated, info = env.step(action)
            observations.append(obs)
            # what the env applied, where it says (the cue corridor ignores corridor actions)
            actions.append(np.asarray(info.get("applied_action", action), dtype=np.float32))
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated))
            if terminated or truncated:
                break
        buffers.append(
            EpisodeBuffer(
                id=i,
                seed=reset_seed,
                observations=np.stack(observations).astype(np.float32),
                actions=np.stack(actions).astype(np.float32),
                rewards=rewards,
                terminations=terminations,
                truncations=truncations,
                infos={},
            )
        )
        returns.append(sum(rewards))
        lengths.append(len(rewards))
        noises.append((noise, prob))
        if progress is not None:
            progress(1)
    env.close()
    return GeneratedEpisodes(buffers, np.array(returns), np.array(lengths), np.array(noises))


def reference_scores(
    spec: LocalEnv,
    episodes: int,
    seed: int,
    max_episode_steps: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """``(random policy's mean return, expert level's mean return)`` over ``episodes`` episodes each,
    on seeds of their own (not those of any dataset)."""
    low = run_episodes(spec, "random", episodes, seed, max_episode_steps, progress).returns.mean()
    ref_seed = int(np.random.default_rng(_stream(seed, "reference")).integers(2**31 - 1))
    high = run_episodes(spec, "expert", episodes, ref_seed, max_episode_steps, progress).returns.mean()
    return float(low), float(high)


def generation_settings(spec: LocalEnv, level: str, episodes: int, seed: int, ref_episodes: int,
                        max_episode_steps: int | None) -> dict[str, Any]:
    """What determines a generated dataset's content (stored in its metadata; compared on reruns)."""
    return {
        "env": spec.key,
        "env_id": spec.env_id,
        "level": asdict(spec.levels[level]),
        "episodes": episodes,
        "seed": seed,
        "ref_episodes": ref_episodes,
        "max_episode_steps": max_episode_steps,
    }


def write_dataset(
    spec: LocalEnv,
    level: str,
    generated: GeneratedEpisodes,
    ref_scores: tuple[float, float],
    settings: dict[str, Any],
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
    extra_metadata: dict[str, Any] | None = None,
):
    """Write ``generated`` as the Minari dataset ``spec.dataset_id(level)`` under ``root``.

    The dataset either appears complete or not at all: a failed write removes its directory.

    Raises:
        FileExistsError: it exists and ``overwrite`` is false.
    """
    import warnings

    import gymnasium as gym
    from minari import create_dataset_from_buffers

    dataset_id = spec.dataset_id(level)
    with minari_root(root):
        path = dataset_path(dataset_id)
        if dataset_exists(dataset_id) or path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"Minari dataset {dataset_id!r} exists at {path}; pass overwrite=True to replace it"
                )
            shutil.rmtree(path)
        max_steps = settings.get("max_episode_steps")
        if max_steps is None:
            env_spec = gym.spec(spec.env_id)
        else:  # the spec records the shorter time limit, so recover_environment() reproduces it
            probe = gym.make(spec.env_id, max_episode_steps=max_steps)
            env_spec = probe.spec
            probe.close()
        quality = spec.levels[level]
        description = (
            f"{level} data for {spec.env_id} from gymnasium's heuristic controller: {quality.describe()}; "
            f"{len(generated.buffers)} episodes, seed {settings['seed']}. ref_min_score: uniform random "
            f"policy, ref_max_score: the expert level, {settings['ref_episodes']} episodes each."
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # no author e-mail / permalink: fine here
                dataset = create_dataset_from_buffers(
                    dataset_id,
                    generated.buffers,
                    env=env_spec,
                    algorithm_name=f"{type(spec.controller()).__name__}+noise({level})",
                    author="namm-transfer",
                    ref_min_score=ref_scores[0],
                    ref_max_score=ref_scores[1],
                    num_episodes_average_score=settings["ref_episodes"],
                    description=description,
                    data_format="hdf5",
                )
            dataset.storage.update_metadata(
                {
                    "namm_generation": {
                        **settings,
                        "mean_return": float(generated.returns.mean()),
                        "std_return": float(generated.returns.std()),
                        **(extra_metadata or {}),
                    }
                }
            )
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    return load_dataset(dataset_id, root)


def make_local_dataset(
    env: str,
    level: str,
    episodes: int,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    ref_episodes: int = 50,
    max_episode_steps: int | None = None,
    overwrite: bool = False,
    ref_scores: tuple[float, float] | None = None,
):
    """Generate and write one local dataset; returns the loaded ``MinariDataset``.

    ``ref_scores`` skips the reference episodes when the caller already measured them for this env.
    """
    spec = local_env(env)
    if level not in spec.levels:
        raise ValueError(f"unknown quality level {level!r}; choose from {', '.join(spec.levels)}")
    if not overwrite and dataset_exists(spec.dataset_id(level), root):
        raise FileExistsError(
            f"Minari dataset {spec.dataset_id(level)!r} exists under {dataset_path('', root)}; pass "
            f"overwrite=True to replace it"
        )
    if ref_scores is None:
        ref_scores = reference_scores(spec, ref_episodes, seed, max_episode_steps)
    started = time.perf_counter()
    generated = run_episodes(spec, level, episodes, seed, max_episode_steps)
    settings = generation_settings(spec, level, episodes, seed, ref_episodes, max_episode_steps)
    return write_dataset(spec, level, generated, ref_scores, settings, root, overwrite,
                         {"seconds": time.perf_counter() - started})
