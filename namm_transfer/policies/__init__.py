"""Memory policies: the NAMM and the baselines it is compared with, behind one interface."""

from namm_transfer.policies.base import Budget, CacheView, MemoryPolicy, ScoredPolicy, budget_for
from namm_transfer.policies.baselines import H2O, FullCache, L2Norm, RandomEviction, Recency

__all__ = [
    "Budget",
    "CacheView",
    "FullCache",
    "H2O",
    "L2Norm",
    "MemoryPolicy",
    "RandomEviction",
    "Recency",
    "ScoredPolicy",
    "budget_for",
]
