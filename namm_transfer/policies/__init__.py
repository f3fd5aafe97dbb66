"""Memory policies: the NAMM and the baselines it is compared with, behind one interface."""

from namm_transfer.policies.base import (
    Budget,
    CacheView,
    MemoryPolicy,
    ScoredPolicy,
    budget_for,
    check_budget,
    resolve_budget,
)
from namm_transfer.policies.baselines import H2O, FullCache, L2Norm, RandomEviction, Recency
from namm_transfer.policies.registry import (
    BASELINES,
    FULL_CACHE,
    NAMM_NAME,
    build_baseline,
    build_policy,
    policy_names,
)
from namm_transfer.policies.snapkv import SnapKV
from namm_transfer.policies.tova import TOVA

__all__ = [
    "BASELINES",
    "FULL_CACHE",
    "NAMM_NAME",
    "build_baseline",
    "build_policy",
    "policy_names",
    "Budget",
    "CacheView",
    "FullCache",
    "H2O",
    "L2Norm",
    "MemoryPolicy",
    "RandomEviction",
    "Recency",
    "ScoredPolicy",
    "SnapKV",
    "TOVA",
    "budget_for",
    "check_budget",
    "resolve_budget",
]
