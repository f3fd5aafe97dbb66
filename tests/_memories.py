"""A NAMM's layer memory fed one block of random causal attention (shared by the selection tests)."""

from __future__ import annotations

import torch

from namm_transfer import NAMM, LayerMemory
from namm_transfer.policies.base import CacheView
from namm_transfer.scorers import score_tokens


def observed_memory(namm: NAMM, tokens: int = 40, heads: int = 2,
                    seed: int = 0) -> tuple[LayerMemory, CacheView, torch.Tensor]:
    """``(memory, view, raw scores)``: a :class:`LayerMemory` of ``namm`` (one sample, ``heads`` KV heads)
    holding ``tokens`` tokens that observed one causal softmax of random logits (s.d. 3, ``seed``), not yet
    evicted; its view, and ``namm``'s scores of it before any pool, sink or window."""
    mem = LayerMemory(namm, 0)
    mem.append(1, heads, tokens, torch.device("cpu"))
    mask = mem.attention_mask(tokens)
    logits = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed)) * 3
    mem.observe(torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1))
    view = mem.view()
    raw = score_tokens(namm.params, namm.features(mem.state, view), view.valid, view.positions,
                       namm.config.shapes)
    return mem, view, raw
