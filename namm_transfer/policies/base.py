"""The memory-policy interface: what a policy sees of one layer's cache and what it returns.

Two levels, as in kvpress: :class:`MemoryPolicy` is the plumbing every policy shares (cadence,
per-layer state, the keep decision); :class:`ScoredPolicy` turns a ``score()`` into a budgeted keep
mask, so a new heuristic only writes ``score()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from namm_transfer.selection import select_tokens


@dataclass
class CacheView:
    """What a policy sees of one layer's cache at an update.

    Attributes:
        layer_idx: the layer.
        positions: ``[B, H, S]`` arrival index of each slot (0 = first token fed, padding included).
        valid: ``[B, H, S]`` bool, True for real cached tokens.
        keys: ``[B, H, S, D]`` cached keys (after RoPE where the model uses it), or None.
        protect: ``[B, H, S]`` bool slots that must be kept (non-finite attention), or None.
    """

    layer_idx: int
    positions: torch.Tensor
    valid: torch.Tensor
    keys: torch.Tensor | None = None
    protect: torch.Tensor | None = None

    @property
    def age(self) -> torch.Tensor:
        """``[B, H, S]`` token age: 0 for the newest valid token of each sample."""
        newest = self.positions.masked_fill(~self.valid, -1).amax(dim=(-1, -2), keepdim=True)
        return (newest - self.positions).clamp(min=0)


class MemoryPolicy:
    """Decides, every ``update_every`` tokens, which cached tokens of a layer to keep.

    Subclasses set ``needs_attention`` if they read attention (the adapter then captures it) and
    implement :meth:`keep`. Per-layer state (running statistics) lives in the object returned by
    :meth:`new_state`, so one policy instance can manage every layer of a model.
    """

    needs_attention: bool = False
    needs_keys: bool = False

    def __init__(self, update_every: int = 512):
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.update_every = update_every

    def new_state(self, layer_idx: int) -> Any:
        """Fresh per-layer state for a new sequence."""
        return None

    def observe(self, state: Any, attention: torch.Tensor, row_valid: torch.Tensor | None) -> None:
        """Consume ``attention`` ``[B, H_kv, q, S]`` of the latest queries (GQA groups averaged)."""

    def on_select(self, state: Any, index: torch.Tensor) -> None:
        """Slots were compacted to ``index`` ``[B, H, K]``: gather per-slot state accordingly."""

    def keep(self, state: Any, view: CacheView) -> torch.Tensor:
        """``[B, H, S]`` bool keep mask for the layer (invalid slots are dropped regardless)."""
        raise NotImplementedError

    def state_nbytes(self, state: Any) -> int:
        """Bytes of per-layer bookkeeping held between forwards."""
        return 0


Budget = int | Sequence[int] | None


def budget_for(budget: Budget, layer_idx: int) -> int | None:
    """The token budget of one layer: an int for all layers, or one entry per layer."""
    if budget is None or isinstance(budget, int):
        return budget
    if layer_idx >= len(budget):
        raise ValueError(f"budget has {len(budget)} per-layer entries but layer {layer_idx} was asked for")
    return int(budget[layer_idx])


class ScoredPolicy(MemoryPolicy):
    """A policy that scores tokens and keeps the ``budget`` best per (sample, KV head).

    Args:
        budget: tokens kept per layer and KV head, an int or one int per layer. None keeps all.
        update_every: tokens between evictions (the NAMM cadence by default, for matched comparisons).
    """

    def __init__(self, budget: Budget = None, update_every: int = 512):
        super().__init__(update_every=update_every)
        if budget is not None and min([budget] if isinstance(budget, int) else list(budget)) < 1:
            raise ValueError(f"budget must be >= 1 token per layer and head, got {budget}")
        self.budget = budget

    def score(self, state: Any, view: CacheView) -> torch.Tensor:
        """``[B, H, S]`` scores, higher = keep first."""
        raise NotImplementedError

    def keep(self, state: Any, view: CacheView) -> torch.Tensor:
        cap = budget_for(self.budget, view.layer_idx)
        if cap is None:
            return view.valid.clone()
        scores = self.score(state, view)
        return select_tokens(scores, view.valid, view.positions, None, cap, view.protect)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
