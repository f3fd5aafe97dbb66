"""One registry of the policies, so every job compares the same set under the same names.

Adding a baseline is one new file (a :class:`~namm_transfer.policies.base.ScoredPolicy` subclass)
plus one line in :data:`BASELINES`; text, video and rollout evaluations, and the demo, all build
their policies with :func:`build_policy` and list the baselines from :data:`BASELINES` when they run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from namm_transfer.policies.base import Budget, MemoryPolicy, ScoredPolicy
from namm_transfer.policies.baselines import H2O, FullCache, L2Norm, RandomEviction, Recency
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


def policy_names() -> list[str]:
    """Every name :func:`build_policy` takes: the full cache, the NAMM, then the registered baselines."""
    return [FULL_CACHE, NAMM_NAME, *BASELINES]


def build_policy(
    name: str,
    namm: MemoryPolicy | None = None,
    budget: Budget = None,
    update_every: int = 512,
    seed: int = 0,
) -> MemoryPolicy:
    """The policy called ``name``: :data:`FULL_CACHE`, :data:`NAMM_NAME` (``namm`` itself, with its own
    cadence and budget) or a baseline of :data:`BASELINES` at ``budget`` every ``update_every`` tokens
    (``seed`` goes to the seeded ones: every job passes its own run seed; a baseline without a budget
    ranks tokens but keeps them all until given one with ``with_budget``)."""
    if name == FULL_CACHE:
        return FullCache()
    if name == NAMM_NAME:
        if namm is None:
            raise ValueError(f"{NAMM_NAME} needs a NAMM (e.g. NAMM.from_pretrained('smollm2-text'))")
        return namm
    return build_baseline(name, budget, update_every=update_every, seed=seed)
