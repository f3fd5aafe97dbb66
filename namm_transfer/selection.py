"""Turning per-token scores into keep masks and compact gather indices."""

from __future__ import annotations

import torch


def newest_slot(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]`` bool marking the most recent valid slot of each (sample, head)."""
    masked = positions.masked_fill(~valid, -1)
    newest = masked.max(dim=-1, keepdim=True).values
    return valid & (masked == newest)


def forced_slots(positions: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None) -> torch.Tensor:
    """``[B, H, S]`` bool of the slots every selection keeps: each (sample, head)'s newest valid slot and
    its valid ``protect`` slots."""
    forced = newest_slot(positions, valid)
    return forced if protect is None else forced | (protect & valid)


def select_tokens(
    scores: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    threshold: float | None = 0.0,
    budget: torch.Tensor | int | None = None,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep mask from scores, decided per sample, per KV head.

    Args:
        scores: ``[B, H, S]``, higher = more worth keeping. NaN scores count as "keep" (never evict on
            garbage).
        valid: ``[B, H, S]`` bool; invalid (padding, empty) slots are never kept.
        positions: ``[B, H, S]`` arrival indices; the newest valid token is always kept.
        threshold: keep iff ``score >= threshold`` (None: no threshold, only the budget).
        budget: optional hard cap on kept tokens per (sample, head), an int or ``[B]``/``[B, H]`` tensor.
        protect: optional ``[B, H, S]`` bool of slots that must be kept (counted in the budget first).

    Returns:
        ``[B, H, S]`` bool keep mask.
    """
    forced = forced_slots(positions, valid, protect)
    nan = torch.isnan(scores)
    keep = valid & (nan | forced)
    if threshold is not None:
        keep = keep | (valid & (scores >= threshold))
    else:
        keep = valid.clone()
    if budget is not None:
        # Rank forced slots first, then NaN ("keep"), then by score: two stable sorts.
        rank_key = torch.where(nan, torch.full_like(scores, float("inf")), scores.float())
        rank_key = rank_key.masked_fill(~keep, float("-inf"))
        order = torch.argsort(rank_key, dim=-1, descending=True, stable=True)
        forced_first = torch.argsort((~forced.gather(-1, order)).to(torch.int8), dim=-1, stable=True)
        order = order.gather(-1, forced_first)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        cap = torch.as_tensor(budget, device=scores.device)
        while cap.ndim < 3:
            cap = cap[..., None]
        keep = keep & ((rank < cap) | forced)
    return keep


def select_tokens_across_heads(
    scores: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    threshold: float | None = 0.0,
    budget: torch.Tensor | int | None = None,
    protect: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`select_tokens` with the KV heads of a sample sharing one budget: ``H x budget`` slots
    go to the best-scored tokens of all ``H`` heads together (AdaKV's allocation), so a head whose
    scores stand out keeps more than one whose scores are flat. Each head still keeps its newest token
    and its ``protect`` slots, counted in the shared budget first. Arguments as :func:`select_tokens`;
    a ``[B, H]`` budget is summed over the heads."""
    b, h, s = scores.shape
    forced = forced_slots(positions, valid, protect)
    if budget is not None:
        budget = torch.as_tensor(budget, device=scores.device)
        budget = budget.sum(-1) if budget.ndim == 2 else budget * h

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, 1, h * s)

    keep = select_tokens(flat(scores), flat(valid), flat(positions), threshold, budget, flat(forced))
    return keep.reshape(b, h, s)


def compact_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that pack kept slots to the front, preserving their order.

    Args:
        keep: ``[B, H, S]`` bool.

    Returns:
        ``index`` ``[B, H, K]`` (K = the largest kept count over samples and heads) and ``valid``
        ``[B, H, K]``; slots past a row's kept count point at slot 0 and are invalid.
    """
    counts = keep.sum(-1)
    width = max(int(counts.max()), 1) if keep.numel() else 1
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :width]
    valid = torch.arange(width, device=keep.device) < counts[..., None]
    return order.masked_fill(~valid, 0), valid
