"""Minari datasets by id: loading (local root, or download where the servers are reachable), episodes
as plain arrays, and the reference scores stored with a dataset.

Minari looks datasets up under ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``);
every function here takes an optional ``root`` that overrides it for the call (:func:`minari_root`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SERVERS_UNREACHABLE = (
    "the Minari servers are unreachable from this machine: generate local datasets with "
    "`namm-transfer make-rl-datasets` (ids namm/<env>/<expert|medium|replay>-v0) or copy the dataset "
    "directory into the Minari root"
)


@contextlib.contextmanager
def minari_root(root: str | os.PathLike | None) -> Iterator[Path]:
    """Point Minari at ``root`` for the duration (sets ``MINARI_DATASETS_PATH``; None keeps the current
    root). Yields the root in effect."""
    import minari.storage.datasets_root_dir as roots

    if root is None:
        yield roots.get_dataset_path()
        return
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root).expanduser().resolve())
    try:
        yield roots.get_dataset_path()
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous


def dataset_path(dataset_id: str, root: str | os.PathLike | None = None) -> Path:
    """Where Minari keeps (or would keep) ``dataset_id`` under ``root``."""
    import minari.storage.datasets_root_dir as roots

    with minari_root(root):
        return roots.get_dataset_path(dataset_id)


def dataset_exists(dataset_id: str, root: str | os.PathLike | None = None) -> bool:
    """Whether ``dataset_id`` is stored locally (its ``data`` folder exists)."""
    return (dataset_path(dataset_id, root) / "data").is_dir()


def local_dataset_ids(root: str | os.PathLike | None = None) -> list[str]:
    """Ids of the datasets stored under ``root``."""
    import minari

    with minari_root(root):
        return sorted(minari.list_local_datasets())


def load_dataset(dataset_id: str, root: str | os.PathLike | None = None, download: bool = False):
    """``minari.load_dataset(dataset_id)`` from ``root`` (default: ``$MINARI_DATASETS_PATH``).

    Raises:
        FileNotFoundError: the dataset is not stored locally (``download=False``) or the download
            failed; the message names the id, the root, the local ids and how to make local data.
    """
    import minari

    with minari_root(root) as where:
        if dataset_exists(dataset_id):
            return minari.load_dataset(dataset_id)
        local = local_dataset_ids()
        listing = ", ".join(local) if local else "none"
        if not download:
            raise FileNotFoundError(
                f"Minari dataset {dataset_id!r} is not stored under {where} (local datasets: {listing}); "
                f"download=False, and {SERVERS_UNREACHABLE}"
            )
        try:
            return minari.load_dataset(dataset_id, download=True)
        except Exception as err:  # network errors come in many types (requests, gcs, hf_hub)
            raise FileNotFoundError(
                f"could not download Minari dataset {dataset_id!r} into {where} ({type(err).__name__}: "
                f"{err}); {SERVERS_UNREACHABLE}"
            ) from err


def dataset_ref_scores(dataset) -> tuple[float, float] | None:
    """``(ref_min_score, ref_max_score)`` when the dataset stores both, else None."""
    meta = dataset.storage.metadata
    low, high = meta.get("ref_min_score"), meta.get("ref_max_score")
    if low is None or high is None:
        return None
    return float(low), float(high)


@dataclass
class Episode:
    """One episode as arrays: ``observations[t]`` is the state the action ``actions[t]`` was taken in
    (Minari's final observation dropped), ``rewards[t]`` what it earned."""

    observations: np.ndarray  # [T, obs_dim] float32
    actions: np.ndarray  # [T, act_dim] float32
    rewards: np.ndarray  # [T] float32
    terminated: bool
    truncated: bool

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())


def episodes(dataset) -> list[Episode]:
    """All episodes of a Minari dataset with a flat Box observation and action space, as arrays.

    Raises:
        ValueError: dict/tuple/discrete spaces (a Decision Transformer needs flat vectors).
    """
    import gymnasium as gym

    for name, space in (("observation", dataset.observation_space), ("action", dataset.action_space)):
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            raise ValueError(
                f"dataset {dataset.spec.dataset_id!r} has a {name} space {space}; only flat Box spaces "
                f"are supported"
            )
    out = []
    for ep in dataset.iterate_episodes():
        steps = len(ep.rewards)
        out.append(
            Episode(
                observations=np.asarray(ep.observations, dtype=np.float32)[:steps],
                actions=np.asarray(ep.actions, dtype=np.float32).reshape(steps, -1),
                rewards=np.asarray(ep.rewards, dtype=np.float32).reshape(steps),
                terminated=bool(np.asarray(ep.terminations)[-1]) if steps else False,
                truncated=bool(np.asarray(ep.truncations)[-1]) if steps else False,
            )
        )
    return out


def episode_returns(dataset) -> np.ndarray:
    """Undiscounted return of every episode."""
    return np.array([float(np.sum(ep.rewards)) for ep in dataset.iterate_episodes()])
