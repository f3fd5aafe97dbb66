"""The memory-policy interface: what a policy sees of one layer's cache and what it returns.

Two levels, as in kvpress: :class:`MemoryPolicy` is the plumbing every policy shares (cadence,
per-layer state, the keep decision); :class:`ScoredPolicy` turns a ``score()`` into a budgeted keep
mask, so a new heuristic only writes ``score()``.

Budget guarantee (every policy with a cap: a ``budget`` or a ``compression_ratio``). An update runs
for a sample when its token count crosses a multiple of ``update_every`` (the cadence) and also, before
its first update, at the end of any forward that leaves it holding more than its cap. So after any
forward no layer holds more than ``cap + update_every - 1`` tokens per KV head, and a prompt shorter
than the cadence ends its prefill at no more than ``cap`` (``attach(model, Recency(budget=96))`` on a
400-token prompt keeps 96, not 400). A layer with its own sliding window never holds more than its
window either. Exceptions: the newest token and slots with non-finite attention are always kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

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
        seen: ``[B]`` long real (non-padding) tokens each sample has fed so far, or None; what a
            ``compression_ratio`` is a fraction of.
        fresh_from: ``[B]`` long arrival index of the first token fed since the policy's last update of
            that sample (before its first update: its first real token), or None (every token is fresh).
    """

    layer_idx: int
    positions: torch.Tensor
    valid: torch.Tensor
    keys: torch.Tensor | None = None
    protect: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    fresh_from: torch.Tensor | None = None

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
    # True when an update reads every layer's state (a joint NAMM): the cache then evicts all layers
    # together after the last layer's attention, never one layer on its own cadence
    joint: bool = False
    # True when observe() keeps no reference to the attention tensor it is given (only copies or
    # reductions of it): the adapter may then write the next layer's rows into the same memory.
    rows_transient: bool = False

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

    def token_cap(self, view: CacheView) -> int | torch.Tensor | None:
        """The most tokens per (sample, KV head) an update would keep now (an int or a ``[B]`` tensor),
        or None for a policy without a cap. The memory runs a policy's first update as soon as a sample
        holds more than this (see the module docstring's budget guarantee)."""
        return None

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


def check_budget(budget: Budget, compression_ratio: float | None, owner: str = "budget") -> None:
    """Raise ValueError unless ``budget`` (>= 1 per layer) and ``compression_ratio`` (in [0, 1)) are
    valid and at most one of them is given."""
    if budget is not None and min([budget] if isinstance(budget, int) else list(budget)) < 1:
        raise ValueError(f"{owner} must be >= 1 token per layer and head, got {budget}")
    if compression_ratio is not None:
        if budget is not None:
            raise ValueError(
                f"give a token budget or a compression_ratio, not both (got budget={budget}, "
                f"compression_ratio={compression_ratio})"
            )
        if not 0.0 <= float(compression_ratio) < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {compression_ratio}")


def resolve_budget(
    budget: Budget, compression_ratio: float | None, view: CacheView
) -> int | torch.Tensor | None:
    """The cap on kept tokens per (sample, KV head) at this update.

    With a ``compression_ratio`` (the fraction of the tokens seen so far to remove, as in kvpress) it
    is the ``[B]`` long tensor ``max(1, round((1 - ratio) * seen))``, ``seen`` being each sample's real
    tokens fed so far (``view.seen``); otherwise this layer's entry of ``budget`` (None: no cap).
    """
    if compression_ratio is None:
        return budget_for(budget, view.layer_idx)
    if budget is not None:
        raise ValueError("give a token budget or a compression_ratio, not both")
    if view.seen is None:
        raise ValueError("a compression_ratio needs CacheView.seen (the real tokens each sample has fed)")
    seen = view.seen.to(device=view.positions.device, dtype=torch.float64)
    return torch.round((1.0 - float(compression_ratio)) * seen).long().clamp(min=1)


def per_sample(cap: int | torch.Tensor, like: torch.Tensor) -> int | torch.Tensor:
    """``cap`` broadcastable against ``like`` ``[B, H, S]``: an int as is, a ``[B]`` tensor as
    ``[B, 1, 1]``."""
    if isinstance(cap, torch.Tensor):
        cap = cap.to(like.device)
        while cap.ndim < 3:
            cap = cap[..., None]
    return cap


def within_cap(valid: torch.Tensor, cap: int | torch.Tensor) -> bool:
    """True when no (sample, KV head) of ``valid`` ``[B, H, S]`` holds more than ``cap`` tokens (an int
    or a ``[B]`` tensor): a capped ranking then keeps every valid slot, so it need not be computed."""
    return bool((valid.sum(-1, keepdim=True) <= per_sample(cap, valid)).all())


def sink_slots(view: CacheView, sink: int) -> torch.Tensor:
    """``[B, H, S]`` bool: the valid slots holding each sample's first ``sink`` tokens (StreamingLLM's
    attention sinks; positions count from the sample's first real token, padding aside)."""
    first = view.positions.masked_fill(~view.valid, 1 << 62).amin(dim=-1, keepdim=True)
    return view.valid & (view.positions < first + sink)


def recent_slots(view: CacheView, recent: int | torch.Tensor) -> torch.Tensor:
    """``[B, H, S]`` bool: the valid slots holding each sample's newest ``recent`` tokens (a recent window;
    an int or a per-sample ``[B, 1, 1]`` tensor)."""
    return view.valid & (view.age < recent)


def pool_over_slots(scores: torch.Tensor, mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """``scores`` ``[B, H, S]`` with each ``mask`` slot's score replaced by the mean over the ``kernel``
    (odd) nearest ``mask`` slots in slot (= arrival) order, itself included: SnapKV's 1-D average pool
    (stride 1, same size, slots outside ``mask`` count as padding, padding not counted). Slots outside
    ``mask`` keep their score. ``kernel = 1``: unchanged.
    """
    if kernel == 1:
        return scores
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the pool's kernel must be an odd size >= 1, got {kernel}")
    # Pack the pooled slots to the front (slot order is arrival order), pool, scatter back.
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    packed_mask = mask.gather(-1, order)
    packed = scores.gather(-1, order)
    weights = packed_mask.to(scores.dtype)
    values = torch.where(packed_mask, packed, torch.zeros_like(packed))  # +-inf outside the mask stays out
    lead, n_slots, pad = packed.shape[:-1], packed.shape[-1], kernel // 2
    # Pool the masked sum and the mask count alike (zero padding): their ratio is the mean over the
    # pooled slots in each window, i.e. count_include_pad=False with masked slots as padding.
    total = F.avg_pool1d(values.reshape(-1, 1, n_slots), kernel, 1, pad)
    counts = F.avg_pool1d(weights.reshape(-1, 1, n_slots), kernel, 1, pad)
    pooled = (total / counts.clamp(min=1e-12)).reshape(*lead, n_slots)
    pooled = torch.where(packed_mask, pooled, packed)
    return torch.empty_like(pooled).scatter_(-1, order, pooled)


class ScoredPolicy(MemoryPolicy):
    """A policy that scores tokens and keeps the ``budget`` best per (sample, KV head).

    Budget guarantee: after any forward, each layer holds at most ``budget + update_every - 1`` tokens
    per KV head, and a sample holds at most ``budget`` until its first update, which runs at the end of
    the first forward that takes it over the budget (a short prompt is compressed at the end of its
    prefill, not only once ``update_every`` tokens have arrived). Likewise with ``compression_ratio``,
    the cap being ``(1 - ratio)`` of the tokens seen at the update.

    Args:
        budget: tokens kept per layer and KV head, an int or one int per layer. None keeps all.
        update_every: tokens between evictions (the NAMM cadence by default, for matched comparisons).
        compression_ratio: instead of ``budget``, the fraction of the tokens seen so far to remove at
            each update (kvpress's convention): each sample keeps ``max(1, round((1 - ratio) * seen))``
            tokens per KV head. In [0, 1); giving both is a ValueError.
    """

    def __init__(
        self, budget: Budget = None, update_every: int = 512, compression_ratio: float | None = None
    ):
        super().__init__(update_every=update_every)
        check_budget(budget, compression_ratio)
        self.budget = budget
        self.compression_ratio = compression_ratio

    def score(self, state: Any, view: CacheView) -> torch.Tensor:
        """``[B, H, S]`` scores, higher = keep first."""
        raise NotImplementedError

    def cap(self, view: CacheView) -> int | torch.Tensor | None:
        """This update's cap on kept tokens per (sample, KV head): see :func:`resolve_budget`."""
        return resolve_budget(self.budget, self.compression_ratio, view)

    def token_cap(self, view: CacheView) -> int | torch.Tensor | None:
        return self.cap(view)

    def keep(self, state: Any, view: CacheView) -> torch.Tensor:
        cap = self.cap(view)
        if cap is None:
            return view.valid.clone()
        scores = self.score(state, view)
        return select_tokens(scores, view.valid, view.positions, None, cap, view.protect)

    def with_budget(self, budget: Budget) -> ScoredPolicy:
        """A copy of this policy keeping ``budget`` tokens per layer and KV head (no compression ratio)."""
        check_budget(budget, None)
        new = copy.copy(self)
        new.budget, new.compression_ratio = budget, None
        return new

    def with_compression_ratio(self, compression_ratio: float) -> ScoredPolicy:
        """A copy of this policy removing ``compression_ratio`` of the tokens seen (no fixed budget)."""
        check_budget(None, compression_ratio)
        new = copy.copy(self)
        new.budget, new.compression_ratio = None, compression_ratio
        return new

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
