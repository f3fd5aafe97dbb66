"""Keep masks from scores and compact gather indices (docs/design.md, "Data path", step 4)."""

from __future__ import annotations

import pytest
import torch

from namm_transfer.selection import compact_index, newest_slot, select_tokens

NAN, INF = float("nan"), float("inf")


def slots(n, batch=1, heads=1):
    valid = torch.ones(batch, heads, n, dtype=torch.bool)
    positions = torch.arange(n).expand(batch, heads, n).clone()
    return valid, positions


def test_keep_iff_score_at_least_threshold():
    scores = torch.tensor([[[0.5, -0.1, 0.0, -3.0, 2.0, 1.0]]])
    valid, positions = slots(6)
    keep = select_tokens(scores, valid, positions)
    assert keep.tolist() == [[[True, False, True, False, True, True]]]
    keep = select_tokens(scores, valid, positions, threshold=0.7)
    assert keep.tolist() == [[[False, False, False, False, True, True]]]  # newest (slot 5) forced anyway


def test_ties_under_a_budget_go_to_the_earliest_slots():
    """Equal scores (a read-out of zeros) keep the first slots, in a fresh cache the oldest tokens, and
    the newest (forced): what ``joint_readouts.py text-fitness`` calls "equal scores"."""
    valid, positions = slots(8)
    keep = select_tokens(torch.zeros(1, 1, 8), valid, positions, threshold=None, budget=3)
    assert keep.tolist() == [[[True, True, False, False, False, False, False, True]]]


def test_newest_valid_always_kept():
    scores = torch.full((2, 2, 5), -1e9)
    valid, _ = slots(5, 2, 2)
    positions = torch.tensor([[[4, 0, 1, 2, 3], [0, 1, 2, 3, 4]], [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]])
    valid[1, 0, 4] = False  # newest slot invalid: the newest *valid* one (position 3) is kept
    keep = select_tokens(scores, valid, positions)
    assert keep.sum(-1).tolist() == [[1, 1], [1, 1]]
    assert keep[0, 0, 0] and keep[0, 1, 4] and keep[1, 0, 3] and keep[1, 1, 4]
    assert torch.equal(newest_slot(positions, valid), keep)


def test_invalid_never_kept():
    scores = torch.tensor([[[1e9, INF, NAN, 5.0, -1.0]]])
    valid = torch.tensor([[[False, False, False, True, True]]])
    _, positions = slots(5)
    positions = positions.clone()
    positions[..., :3] = 100  # invalid slots with the largest positions are not "newest" either
    for budget in (None, 1, 10):
        for protect in (None, torch.ones(1, 1, 5, dtype=torch.bool)):
            keep = select_tokens(scores, valid, positions, budget=budget, protect=protect)
            assert not keep[~valid].any()
    assert select_tokens(scores, valid, positions).tolist() == [[[False, False, False, True, True]]]
    all_invalid = torch.zeros(1, 1, 5, dtype=torch.bool)
    assert not select_tokens(scores, all_invalid, positions).any()


def test_nan_scores_are_kept():
    scores = torch.tensor([[[NAN, -1.0, NAN, -2.0, -3.0]]])
    valid, positions = slots(5)
    assert select_tokens(scores, valid, positions).tolist() == [[[True, False, True, False, True]]]
    assert select_tokens(scores, valid, positions, budget=3).tolist() == [[[True, False, True, False, True]]]


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8])
def test_budget_keeps_highest_scores_per_sample_and_head(budget):
    g = torch.Generator().manual_seed(budget)
    scores = torch.randn(2, 3, 8, generator=g)
    valid, positions = slots(8, 2, 3)
    keep = select_tokens(scores, valid, positions, threshold=None, budget=budget)
    assert keep.sum(-1).tolist() == [[budget] * 3] * 2
    for b in range(2):
        for h in range(3):
            s = scores[b, h].clone()
            expected = {7}  # newest first, then the best of the rest
            expected |= set(torch.topk(s[:7], budget - 1).indices.tolist())
            assert set(torch.nonzero(keep[b, h]).flatten().tolist()) == expected


def test_budget_and_threshold_combine():
    scores = torch.tensor([[[3.0, -1.0, 2.0, 1.0, -2.0, 0.5]]])
    valid, positions = slots(6)
    keep = select_tokens(scores, valid, positions, threshold=0.0, budget=3)
    assert keep.tolist() == [[[True, False, True, False, False, True]]]  # newest + two best above 0
    keep = select_tokens(scores, valid, positions, threshold=0.0, budget=10)
    assert keep.tolist() == [[[True, False, True, True, False, True]]]


def test_budget_per_sample_and_per_head_tensor():
    scores = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(0))
    valid, positions = slots(6, 2, 2)
    keep = select_tokens(scores, valid, positions, None, budget=torch.tensor([2, 4]))
    assert keep.sum(-1).tolist() == [[2, 2], [4, 4]]
    keep = select_tokens(scores, valid, positions, None, budget=torch.tensor([[1, 2], [3, 6]]))
    assert keep.sum(-1).tolist() == [[1, 2], [3, 6]]


def test_budget_counts_only_valid_tokens():
    scores = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(1))
    valid, positions = slots(6, 1, 2)
    valid[0, 1, :4] = False
    keep = select_tokens(scores, valid, positions, None, budget=4)
    assert keep.sum(-1).tolist() == [[4, 2]]  # min(budget, valid)


def test_protect_forces_keeps():
    scores = torch.tensor([[[5.0, -4.0, 3.0, -1.0, -2.0, -5.0]]])
    valid, positions = slots(6)
    protect = torch.tensor([[[False, True, False, False, True, False]]])
    keep = select_tokens(scores, valid, positions, protect=protect)
    assert keep.tolist() == [[[True, True, True, False, True, True]]]
    keep = select_tokens(scores, valid, positions, threshold=None, budget=3, protect=protect)
    assert keep.tolist() == [[[False, True, False, False, True, True]]]  # forced fill the budget first
    keep = select_tokens(scores, valid, positions, threshold=None, budget=4, protect=protect)
    assert keep.tolist() == [[[True, True, False, False, True, True]]]
    keep = select_tokens(scores, valid, positions, threshold=None, budget=1, protect=protect)
    assert keep.tolist() == [[[False, True, False, False, True, True]]]  # forced beat the budget


def test_forced_newest_counted_first_even_against_infinite_scores():
    scores = torch.tensor([[[NAN, NAN, NAN, 1.0, 2.0, -5.0]]])
    valid, positions = slots(6)
    assert select_tokens(scores, valid, positions, None, budget=2).sum() == 2


def test_compact_index_packs_in_order():
    keep = torch.tensor(
        [
            [[True, False, True, False, True], [False, False, False, False, True]],
            [[False, True, True, True, True], [True, False, False, False, False]],
        ]
    )
    index, valid = compact_index(keep)
    assert index.shape == valid.shape == (2, 2, 4)  # width = max kept count
    assert index.tolist() == [[[0, 2, 4, 0], [4, 0, 0, 0]], [[1, 2, 3, 4], [0, 0, 0, 0]]]
    assert valid.tolist() == [
        [[True, True, True, False], [True, False, False, False]],
        [[True, True, True, True], [True, False, False, False]],
    ]


def test_compact_index_random_roundtrip():
    keep = torch.rand(3, 4, 11, generator=torch.Generator().manual_seed(2)) > 0.6
    index, valid = compact_index(keep)
    assert index.shape[-1] == max(int(keep.sum(-1).max()), 1)
    assert torch.equal(valid.sum(-1), keep.sum(-1))
    assert torch.all(index[~valid] == 0)
    for b in range(3):
        for h in range(4):
            kept = torch.nonzero(keep[b, h]).flatten()
            assert torch.equal(index[b, h][valid[b, h]], kept)


def test_compact_index_nothing_kept_has_width_one():
    index, valid = compact_index(torch.zeros(2, 1, 3, dtype=torch.bool))
    assert index.shape == (2, 1, 1) and not valid.any() and torch.all(index == 0)
