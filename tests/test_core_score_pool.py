"""`pool_over_slots` (SnapKV's average pool, shared) and `NAMMConfig.score_pool`: scores averaged over the
nearest pooled neighbours in arrival order, sinks and the recent window left out of the pool."""

from __future__ import annotations

import pytest
import torch
from _memories import observed_memory

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.policies.base import pool_over_slots, recent_slots, sink_slots

torch.set_num_threads(1)


def reference_pool(scores: torch.Tensor, mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """The pool by loops: each masked slot's score becomes the mean of the masked scores at most
    ``kernel // 2`` masked slots before or after it (in slot order); other slots keep theirs."""
    out = scores.clone()
    n_slots = scores.shape[-1]
    flat_s, flat_m, flat_o = scores.reshape(-1, n_slots), mask.reshape(-1, n_slots), out.view(-1, n_slots)
    for row in range(flat_s.shape[0]):
        slots = flat_m[row].nonzero().flatten().tolist()
        for k, slot in enumerate(slots):
            near = slots[max(0, k - kernel // 2): k + kernel // 2 + 1]
            flat_o[row, slot] = flat_s[row, near].mean()
    return out


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_pool_equals_the_loop_reference_and_ignores_unpooled_slots(kernel):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 17, generator=gen)
    mask = torch.rand(2, 3, 17, generator=gen) > 0.3
    scores = scores.masked_fill(~mask & (torch.rand(2, 3, 17, generator=gen) > 0.5), float("-inf"))
    pooled = pool_over_slots(scores, mask, kernel)
    torch.testing.assert_close(pooled, reference_pool(scores, mask, kernel))
    assert torch.isfinite(pooled[mask]).all()  # -inf outside the pool does not leak into it
    assert torch.equal(pooled[~mask], scores[~mask])


def test_pool_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        pool_over_slots(torch.zeros(1, 1, 4), torch.ones(1, 1, 4, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="score_pool"):
        NAMMConfig(score_pool=2)


def test_namm_score_pool_keeps_the_top_of_its_pooled_scores():
    """A linear NAMM with score_pool=5, 4 sinks and a window of 6, budget 14 of 40 tokens: it keeps the
    sinks, the window and the top 4 of its own scores pooled over the other slots by the reference pool;
    without the pool it keeps another set (the check is not vacuous)."""
    config = NAMMConfig(scorer="linear", update_every=40, budget=14, threshold=None, sink_tokens=4,
                        recent_tokens=6, score_pool=5)
    namm = NAMM.init_random(1, sigma=1.0, config=config)
    kept = {}
    for pool in (1, 5):
        mem, view, raw = observed_memory(namm.replace(score_pool=pool), seed=3)
        protected = sink_slots(view, 4) | recent_slots(view, 6)
        pooled = reference_pool(raw, view.valid & ~protected, pool).masked_fill(protected, float("inf"))
        expected = pooled.topk(14, dim=-1).indices.sort(-1).values
        mem.maybe_evict()
        kept[pool] = [mem.positions[0, h][mem.valid[0, h]].tolist() for h in range(2)]
        assert kept[pool] == expected[0].tolist()
    assert kept[1] != kept[5]
