"""Normalised scores: ``100 * (R - R_random) / (R_expert - R_random)`` (D4RL's convention, in percent).

Reference scores come, in this order, from: a Minari dataset's own ``ref_min_score`` /
``ref_max_score`` (a dataset object, or an id stored locally that carries them; our generated
``namm/*`` datasets do); else D4RL's published random / expert returns for the locomotion tasks
(:data:`D4RL_REF_SCORES`), found by task name in any id (``Hopper-v4``, ``hopper-medium-v2``,
``mujoco/hopper/medium-v0``, ``edbeeching/decision-transformer-gym-hopper-expert``).

Caveat: Minari's ``mujoco/*`` datasets were collected on v5 envs with SAC/TQC, not D4RL's; when one
is stored locally its own reference scores win, and the D4RL constants are only a fallback.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from namm_transfer.envs.datasets import dataset_exists, dataset_ref_scores, load_dataset

# D4RL (Fu et al. 2020), d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE; identical for every dataset of a task.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}

# Their gymnasium envs: D4RL v2 data was collected on v3 envs, which gymnasium 1.x ports as v4.
D4RL_ENV_IDS: dict[str, str] = {
    "hopper": "Hopper-v4",
    "halfcheetah": "HalfCheetah-v4",
    "walker2d": "Walker2d-v4",
}


def d4rl_task(name: str) -> str | None:
    """The D4RL locomotion task an id refers to (``hopper`` / ``halfcheetah`` / ``walker2d``), or None."""
    found = re.findall(r"halfcheetah|hopper|walker2d", re.sub(r"[^a-z0-9]", "", name.lower()))
    return found[0] if found else None


def reference_scores(env_or_dataset: Any, root: str | os.PathLike | None = None) -> tuple[float, float]:
    """``(random score, expert score)`` for a Minari dataset object or an env / dataset / model id.

    Raises:
        ValueError: no reference scores are known for it (the message says where it looked).
    """
    if not isinstance(env_or_dataset, str):  # a MinariDataset
        refs = dataset_ref_scores(env_or_dataset)
        if refs is not None:
            return refs
        name = env_or_dataset.spec.dataset_id
    else:
        name = env_or_dataset
        if "/" in name and _safe_exists(name, root):
            refs = dataset_ref_scores(load_dataset(name, root))
            if refs is not None:
                return refs
    task = d4rl_task(name)
    if task is not None:
        return D4RL_REF_SCORES[task]
    raise ValueError(
        f"no reference scores for {name!r}: it is not a local Minari dataset storing ref_min_score and "
        f"ref_max_score, nor a D4RL locomotion task ({', '.join(D4RL_REF_SCORES)})"
    )


def normalised_score(env_or_dataset: Any, returns: Any, root: str | os.PathLike | None = None):
    """``100 * (returns - random) / (expert - random)`` with :func:`reference_scores`; a float for a
    scalar ``returns``, else an array of the same shape."""
    low, high = reference_scores(env_or_dataset, root)
    if high == low:
        raise ValueError(f"reference scores of {env_or_dataset!r} are equal ({low}): cannot normalise")
    scores = 100.0 * (np.asarray(returns, dtype=np.float64) - low) / (high - low)
    return float(scores) if scores.ndim == 0 else scores


def _safe_exists(dataset_id: str, root) -> bool:
    try:
        return dataset_exists(dataset_id, root)
    except (OSError, ValueError):
        return False
