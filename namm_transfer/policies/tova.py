"""TOVA, Token Omission Via Attention (Oren et al. 2024, arXiv 2401.06104)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from namm_transfer.policies.base import Budget, CacheView, ScoredPolicy


class TOVA(ScoredPolicy):
    """Keeps the keys the newest query attended to most.

    A key's score is the attention the newest observed real (non-padding) query of its sample paid
    to it (rows GQA-averaged per KV head by :class:`LayerMemory`). Keys that arrived after that query
    score 0; the newest token is always kept.

    Args:
        budget: tokens kept per layer and KV head (see :class:`ScoredPolicy`).
        update_every: tokens between evictions.
        compression_ratio: instead of ``budget``, the fraction of the tokens seen to remove.

    State per layer: ``last`` ``[B, H, S]``, the latest real attention row of each sample.
    """

    needs_attention = True

    def __init__(
        self, budget: Budget = None, update_every: int = 512, compression_ratio: float | None = None
    ):
        super().__init__(budget, update_every, compression_ratio)

    def new_state(self, layer_idx: int) -> dict[str, torch.Tensor | None]:
        return {"last": None}

    def observe(self, state: dict, attention: torch.Tensor, row_valid: torch.Tensor | None) -> None:
        batch, heads, n_q, n_keys = attention.shape
        last = state["last"]
        if last is None:
            last = torch.zeros(batch, heads, n_keys, device=attention.device)
        elif last.shape[-1] < n_keys:
            last = F.pad(last, (0, n_keys - last.shape[-1]))
        if n_q == 0:
            state["last"] = last
            return
        if row_valid is None:
            state["last"] = attention[..., -1, :].float()
            return
        row_valid = row_valid.to(device=attention.device, dtype=torch.bool)
        newest = n_q - 1 - row_valid.flip(-1).to(torch.int8).argmax(-1)  # [B] last real row
        index = newest[:, None, None, None].expand(-1, heads, 1, n_keys)
        row = attention.float().gather(-2, index)[..., 0, :]
        state["last"] = torch.where(row_valid.any(-1)[:, None, None], row, last)

    def on_select(self, state: dict, index: torch.Tensor) -> None:
        if state["last"] is not None:
            state["last"] = state["last"].gather(-1, index)

    def score(self, state: dict, view: CacheView) -> torch.Tensor:
        last = state["last"]
        n_slots = view.positions.shape[-1]
        if last is None:
            return torch.zeros(view.positions.shape, device=view.positions.device)
        if last.shape[-1] < n_slots:
            last = F.pad(last, (0, n_slots - last.shape[-1]))
        return last

    def state_nbytes(self, state: dict) -> int:
        last = state["last"]
        return 0 if last is None else last.numel() * last.element_size()
