"""RL side: gymnasium env factories, Minari datasets (load real ids; generate local ones), score
normalisation, and Decision Transformer rollouts.

One concept per module: :mod:`.factory` (envs), :mod:`.datasets` (Minari loading, episodes as arrays),
:mod:`.scores` (normalised scores, D4RL constants), :mod:`.controllers` (heuristic controllers and
noise), :mod:`.generate` (local datasets), :mod:`.dt_rollout` (cached / windowed DT action selection).

Names are imported lazily, so ``namm_transfer.envs.dt_rollout`` needs only torch; the rest needs the
``rl`` extra (``pip install 'namm-transfer[rl]'``: gymnasium[box2d], minari[hdf5]).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ENV_ALIASES": "factory",
    "EnvBatch": "factory",
    "make_env": "factory",
    "make_vector_env": "factory",
    "resolve_env_id": "factory",
    "Episode": "datasets",
    "dataset_exists": "datasets",
    "dataset_ref_scores": "datasets",
    "episodes": "datasets",
    "load_dataset": "datasets",
    "local_dataset_ids": "datasets",
    "minari_root": "datasets",
    "D4RL_REF_SCORES": "scores",
    "normalised_score": "scores",
    "reference_scores": "scores",
    "LOCAL_ENVS": "generate",
    "LEVELS": "generate",
    "make_local_dataset": "generate",
    "CachedDTRollout": "dt_rollout",
    "WindowedDTRollout": "dt_rollout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ImportError as err:
        if err.name in ("gymnasium", "minari", "h5py", "Box2D"):
            raise ImportError(
                f"namm_transfer.envs.{name} needs the `rl` extra ({err.name} is missing): "
                f"pip install 'namm-transfer[rl]'"
            ) from err
        raise
