"""bench oracle: the fixed-score top-k policy keeps exactly the best-scored valid slots of each layer
and KV head."""

import pytest
import torch

from namm_transfer.pipelines.bench.oracle import OracleConfig, evidence_scores
from namm_transfer.pipelines.joint_probe import FixedScoreTopK
from namm_transfer.policies.base import CacheView


def test_fixed_score_top_k_keeps_the_best_valid_slots_per_layer_and_head():
    torch.manual_seed(0)
    scores = torch.rand(2, 3, 10)  # layers, KV heads, slots
    valid = torch.ones(1, 3, 10, dtype=torch.bool)
    valid[0, 1, 7:] = False  # head 1 holds 7 tokens
    scores[1, 1, 8] = 99.0  # the best score sits on an invalid slot: never kept
    policy = FixedScoreTopK(scores, budget=4)
    for layer in range(2):
        view = CacheView(layer, torch.arange(10).expand(1, 3, 10), valid)
        keep = policy.keep(None, view)
        for head in range(3):
            n = int(valid[0, head].sum())
            expected = set(scores[layer, head, :n].argsort(descending=True)[:4].tolist())
            assert set(torch.nonzero(keep[0, head]).flatten().tolist()) == expected
    everything = FixedScoreTopK(scores, budget=None).keep(None, CacheView(0, torch.zeros(1, 3, 10), valid))
    assert torch.equal(everything, valid)


def test_budgets_are_fractions():
    with pytest.raises(ValueError, match="kept fractions"):
        OracleConfig(budgets=[0.0])


def test_evidence_scores_keep_sinks_then_facts_then_the_most_recent():
    mask = [False] * 20
    mask[9] = mask[10] = True
    scores = evidence_scores(mask, 20)
    order = scores.argsort(descending=True).tolist()
    assert order[:7] == [3, 2, 1, 0, 10, 9, 19]  # sinks, facts, then newest first
    assert order[-1] == 4
