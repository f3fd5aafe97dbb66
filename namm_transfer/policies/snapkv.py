"""SnapKV (Li et al. 2024, arXiv 2404.14469), as NVIDIA kvpress's ``SnapKVPress`` computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from namm_transfer.policies.base import Budget, CacheView, ScoredPolicy, pool_over_slots, recent_slots


class SnapKV(ScoredPolicy):
    """Keeps the keys the last ``window`` queries before the eviction attended to most.

    Each cached key is scored by the attention it received from the last ``window`` real (non-padding)
    queries observed before the update (rows GQA-averaged per KV head by :class:`LayerMemory`),
    averaged over those rows and smoothed by a 1-D average pool of size ``kernel`` (stride 1, same
    size, padding not counted) along the cached keys in arrival order. As in kvpress, the pool runs
    over the keys outside the observation window only (invalid slots and the window's keys count as
    padding), and the keys of the last ``window`` positions are always kept (score +inf).

    Args:
        budget: tokens kept per layer and KV head (see :class:`ScoredPolicy`).
        window: observation window: the number of latest queries whose attention is averaged, and the
            number of latest keys always kept.
        kernel: odd average-pool size (1: no smoothing).
        update_every: tokens between evictions.
        compression_ratio: instead of ``budget``, the fraction of the tokens seen to remove.

    State per layer: ``rows`` ``[B, H, window, S]``, the last ``window`` observed real rows of each
    sample (oldest first, zero rows before the first ``window`` queries), and ``count`` ``[B]``, how
    many of them are real.
    """

    needs_attention = True

    def __init__(
        self,
        budget: Budget = None,
        window: int = 32,
        kernel: int = 5,
        update_every: int = 512,
        compression_ratio: float | None = None,
    ):
        super().__init__(budget, update_every, compression_ratio)
        if window < 1:
            raise ValueError(f"SnapKV window must be >= 1, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV kernel must be an odd size >= 1, got {kernel}")
        self.window = window
        self.kernel = kernel

    def new_state(self, layer_idx: int) -> dict[str, torch.Tensor | None]:
        return {"rows": None, "count": None}

    def observe(self, state: dict, attention: torch.Tensor, row_valid: torch.Tensor | None) -> None:
        batch, heads, n_q, n_keys = attention.shape
        device = attention.device
        rows, count = state["rows"], state["count"]
        if rows is None:
            rows = torch.zeros(batch, heads, self.window, n_keys, device=device)
            count = torch.zeros(batch, dtype=torch.long, device=device)
        elif rows.shape[-1] < n_keys:
            rows = F.pad(rows, (0, n_keys - rows.shape[-1]))
        if row_valid is None:
            row_valid = torch.ones(batch, n_q, dtype=torch.bool, device=device)
        row_valid = row_valid.to(device=device, dtype=torch.bool)
        # The chunk's last `window` real rows per sample: a stable sort puts padding rows first.
        order = torch.argsort(row_valid.to(torch.int8), dim=-1, stable=True)[:, -self.window :]  # [B, w]
        picked = attention.float().gather(-2, order[:, None, :, None].expand(-1, heads, -1, n_keys))
        picked_real = row_valid.gather(-1, order)
        # Old rows then new, real rows last (stable), keep the last `window`.
        old_real = torch.arange(self.window, device=device) >= (self.window - count)[:, None]
        real = torch.cat([old_real, picked_real], dim=-1)  # [B, window + w]
        order = torch.argsort(real.to(torch.int8), dim=-1, stable=True)[:, -self.window :]
        combined = torch.cat([rows, picked], dim=-2)
        rows = combined.gather(-2, order[:, None, :, None].expand(-1, heads, -1, n_keys))
        real = real.gather(-1, order)
        state["rows"] = rows * real[:, None, :, None]  # non-real rows are zero
        state["count"] = real.sum(-1)

    def on_select(self, state: dict, index: torch.Tensor) -> None:
        if state["rows"] is not None:
            state["rows"] = state["rows"].gather(-1, index[:, :, None, :].expand(-1, -1, self.window, -1))

    def score(self, state: dict, view: CacheView) -> torch.Tensor:
        n_slots = view.positions.shape[-1]
        rows, count = state["rows"], state["count"]
        if rows is None:
            mean = torch.zeros(view.positions.shape, device=view.positions.device)
        else:
            if rows.shape[-1] < n_slots:
                rows = F.pad(rows, (0, n_slots - rows.shape[-1]))
            mean = rows.sum(-2) / count.clamp(min=1)[:, None, None]  # [B, H, S]
        in_window = recent_slots(view, self.window)
        pooled = pool_over_slots(mean, view.valid & ~in_window, self.kernel)
        return pooled.masked_fill(in_window, float("inf"))

    def state_nbytes(self, state: dict) -> int:
        rows, count = state["rows"], state["count"]
        if rows is None:
            return 0
        return rows.numel() * rows.element_size() + count.numel() * count.element_size()
