"""`select_tokens_across_heads` and `NAMMConfig.head_budget="shared"`: a sample's KV heads keep H x the
cap between them (AdaKV's allocation), each head's newest and protected slots first."""

from __future__ import annotations

import pytest
import torch
from _memories import observed_memory

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.policies.base import recent_slots, sink_slots
from namm_transfer.selection import newest_slot, select_tokens, select_tokens_across_heads

torch.set_num_threads(1)


def reference_shared(scores, valid, positions, budget, protect):
    """By loops: per sample, every head's newest valid slot and protected slots, then the best-scored
    other valid slots of all heads until ``H x budget`` are kept."""
    b, h, s = scores.shape
    keep = torch.zeros_like(valid)
    forced = newest_slot(positions, valid) | (protect & valid)
    for i in range(b):
        keep[i] = forced[i]
        free = sorted(((float(scores[i, j, k]), j, k) for j in range(h) for k in range(s)
                       if valid[i, j, k] and not forced[i, j, k]), reverse=True)
        for _, j, k in free[: max(0, h * budget - int(forced[i].sum()))]:
            keep[i, j, k] = True
    return keep


def test_shared_budget_equals_the_loop_reference_and_lets_heads_differ():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 20, generator=gen)
    scores[:, 1] += 1.5  # head 1 stands out: it should take more than its share
    valid = torch.rand(2, 3, 20, generator=gen) > 0.2
    positions = torch.arange(20).expand(2, 3, 20)
    protect = torch.rand(2, 3, 20, generator=gen) > 0.9
    keep = select_tokens_across_heads(scores, valid, positions, None, 6, protect)
    assert torch.equal(keep, reference_shared(scores, valid, positions, 6, protect))
    assert keep.sum((1, 2)).tolist() == [18, 18]  # H x budget per sample
    counts = keep.sum(-1)
    assert (counts[:, 1] > 6).all() and (counts[:, [0, 2]] < 6).any()
    # each head kept its newest valid slot and its protected slots
    assert (keep | ~(newest_slot(positions, valid) | (protect & valid))).all()
    # per head, the same budget gives 6 each: the allocation is what changed
    assert select_tokens(scores, valid, positions, None, 6, protect).sum(-1).max() <= 6


def test_shared_budget_per_sample_tensor_and_threshold():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 2, 12, generator=gen)
    valid = torch.ones(2, 2, 12, dtype=torch.bool)
    positions = torch.arange(12).expand(2, 2, 12)
    keep = select_tokens_across_heads(scores, valid, positions, None, torch.tensor([3, 5]))
    assert keep.sum((1, 2)).tolist() == [6, 10]
    # a threshold keeps at most what passes it (plus the newest slots), within the shared cap
    keep = select_tokens_across_heads(scores, valid, positions, 0.0, 12)
    passing = (scores >= 0) | newest_slot(positions, valid)
    assert torch.equal(keep, passing)


def test_head_budget_is_checked():
    with pytest.raises(ValueError, match="head_budget"):
        NAMMConfig(head_budget="pooled")


def test_namm_with_a_shared_budget_keeps_the_top_of_all_heads():
    """A linear NAMM with 4 sinks, a window of 6 and budget 14 of 40 tokens on 2 KV heads: with
    head_budget="shared" it keeps each head's sinks and window and the 2 x 4 best other slots of both
    heads together; per head it keeps another set (the check is not vacuous)."""
    config = NAMMConfig(scorer="linear", update_every=40, budget=14, threshold=None, sink_tokens=4,
                        recent_tokens=6, head_budget="shared")
    namm = NAMM.init_random(1, sigma=1.0, config=config)
    kept = {}
    for head_budget in ("each", "shared"):
        mem, view, raw = observed_memory(namm.replace(head_budget=head_budget), seed=0)
        protected = sink_slots(view, 4) | recent_slots(view, 6)
        mem.maybe_evict()
        kept[head_budget] = [mem.positions[0, h][mem.valid[0, h]].tolist() for h in range(2)]
        if head_budget == "shared":
            expected = reference_shared(raw, view.valid, view.positions, 14, protected)
            assert kept[head_budget] == [view.positions[0, h][expected[0, h]].tolist() for h in range(2)]
            assert sum(len(k) for k in kept[head_budget]) == 28
    assert [len(k) for k in kept["each"]] == [14, 14]
    assert [len(k) for k in kept["shared"]] == [15, 13]  # the first head's scores took a slot
