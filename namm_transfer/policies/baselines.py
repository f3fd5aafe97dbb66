"""Baseline KV-cache policies at an explicit token budget (docs/design.md, "Baselines")."""

from __future__ import annotations

from typing import Any

import torch

from namm_transfer.policies.base import (
    Budget,
    CacheView,
    MemoryPolicy,
    ScoredPolicy,
    per_sample,
    recent_slots,
    sink_slots,
)


class FullCache(MemoryPolicy):
    """Keeps every token: the reference every comparison is normalised by."""

    def __init__(self) -> None:
        super().__init__(update_every=1 << 62)

    def keep(self, state: Any, view: CacheView) -> torch.Tensor:
        return view.valid.clone()

    def __repr__(self) -> str:
        return "FullCache()"


class Recency(ScoredPolicy):
    """StreamingLLM (Xiao et al. 2023): ``sink`` first tokens plus the most recent ones."""

    def __init__(
        self,
        budget: Budget = None,
        sink: int = 4,
        update_every: int = 512,
        compression_ratio: float | None = None,
    ):
        super().__init__(budget, update_every, compression_ratio)
        self.sink = sink

    def score(self, state: Any, view: CacheView) -> torch.Tensor:
        return view.positions.float().masked_fill(sink_slots(view, self.sink), float("inf"))


class H2O(ScoredPolicy):
    """Heavy-Hitter Oracle (Zhang et al. 2023): accumulated received attention plus a recent window.

    Args:
        recent: tokens of the recent window always kept (default: half the budget; with a
            ``compression_ratio``, half of each sample's cap at the update).
    """

    needs_attention = True

    def __init__(
        self,
        budget: Budget = None,
        recent: int | None = None,
        update_every: int = 512,
        compression_ratio: float | None = None,
    ):
        super().__init__(budget, update_every, compression_ratio)
        self.recent = recent

    def new_state(self, layer_idx: int) -> dict[str, torch.Tensor | None]:
        return {"acc": None}

    def observe(self, state: dict, attention: torch.Tensor, row_valid: torch.Tensor | None) -> None:
        if row_valid is not None:
            attention = attention * row_valid[:, None, :, None]
        received = attention.float().sum(dim=-2)  # [B, H, S]
        acc = state["acc"]
        if acc is not None and acc.shape[-1] < received.shape[-1]:
            acc = torch.nn.functional.pad(acc, (0, received.shape[-1] - acc.shape[-1]))
        state["acc"] = received if acc is None else acc + received

    def on_select(self, state: dict, index: torch.Tensor) -> None:
        if state["acc"] is not None:
            state["acc"] = state["acc"].gather(-1, index)

    def score(self, state: dict, view: CacheView) -> torch.Tensor:
        acc = state["acc"]
        if acc is None or acc.shape != view.positions.shape:
            acc = torch.zeros(view.positions.shape, device=view.positions.device)
        if self.recent is not None:
            recent = self.recent
        else:
            cap = self.cap(view)
            recent = 0 if cap is None else per_sample(cap // 2, view.positions)  # [B, 1, 1] for a ratio
        in_window = recent_slots(view, recent)
        return acc.masked_fill(in_window, float("inf"))

    def state_nbytes(self, state: dict) -> int:
        acc = state["acc"]
        return 0 if acc is None else acc.numel() * acc.element_size()


class L2Norm(ScoredPolicy):
    """Keep the keys of lowest L2 norm (Devoto et al. 2024)."""

    needs_keys = True

    def score(self, state: Any, view: CacheView) -> torch.Tensor:
        if view.keys is None:
            raise ValueError("L2Norm needs the cached keys; the adapter passed none")
        return -view.keys.float().norm(dim=-1)


class RandomEviction(ScoredPolicy):
    """Keeps a uniformly random subset of ``budget`` tokens (seeded, reproducible)."""

    def __init__(
        self,
        budget: Budget = None,
        seed: int = 0,
        update_every: int = 512,
        compression_ratio: float | None = None,
    ):
        super().__init__(budget, update_every, compression_ratio)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def __copy__(self) -> RandomEviction:
        """A copy (e.g. from :meth:`with_budget`) draws from its own generator, restarted at ``seed``."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._generator = torch.Generator().manual_seed(self.seed)
        return new

    def score(self, state: Any, view: CacheView) -> torch.Tensor:
        scores = torch.rand(view.positions.shape, generator=self._generator)
        return scores.to(view.positions.device)
