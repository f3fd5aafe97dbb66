"""One registry of the baseline policies, so every job compares the same set under the same names.

Adding a baseline is one new file (a :class:`~namm_transfer.policies.base.ScoredPolicy` subclass)
plus one line in :data:`BASELINES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from namm_transfer.policies.base import Budget, ScoredPolicy
from namm_transfer.policies.baselines import H2O, L2Norm, RandomEviction, Recency
from namm_transfer.policies.snapkv import SnapKV
from namm_transfer.policies.tova import TOVA

FULL_CACHE = "FullCache"
NAMM_NAME = "NAMM"
BASELINES: dict[str, Callable[..., ScoredPolicy]] = {
    "Recency": Recency,
    "H2O": H2O,
    "L2Norm": L2Norm,
    "RandomEviction": RandomEviction,
    "SnapKV": SnapKV,
    "TOVA": TOVA,
}


def build_baseline(
    name: str,
    budget: Budget = None,
    update_every: int = 512,
    seed: int = 0,
    compression_ratio: float | None = None,
) -> ScoredPolicy:
    """The baseline called ``name`` (a key of :data:`BASELINES`); ``seed`` goes to seeded ones."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
    kwargs = {"budget": budget, "update_every": update_every, "compression_ratio": compression_ratio}
    if "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = seed
    return cls(**kwargs)
