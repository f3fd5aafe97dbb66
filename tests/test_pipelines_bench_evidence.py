"""bench evidence: ROC AUC with ties, evidence recall of a top-k ranking, and the probes."""

import itertools

import pytest
import torch

from namm_transfer.pipelines.bench.evidence import (
    EvidenceConfig,
    _Rows,
    across_heads,
    evidence_recall,
    roc_auc,
)
from namm_transfer.pipelines.joint_probe import JointProbe, fit_probe


def _pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_the_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=gen).float()  # many ties
    labels = torch.rand(60, generator=gen) < 0.3
    assert roc_auc(scores, labels) == pytest.approx(_pairwise_auc(scores.tolist(), labels.tolist()))
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([False, True])) == 0.0
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool))


def test_evidence_recall_counts_labelled_valid_slots_in_each_rows_top_k():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 9.0]])
    labels = torch.tensor([[True, False, False, True, False], [True, False, False, True, True]])
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False  # its label and its best score do not count
    # row 0 keeps slots 0, 1: 1 of 2 facts; row 1 keeps 3, 2: 1 of 2 valid facts
    assert evidence_recall(scores, labels, valid, k=2) == pytest.approx(2 / 4)
    assert evidence_recall(scores, labels, valid, k=5) == 1.0


def test_probes_learn_a_separable_rule_and_stay_at_chance_on_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 5, generator=gen)
    y = x[:, 0] + 0.5 * x[:, 1] > 1.0
    for hidden in (0, 16):
        net = fit_probe(x, y, hidden, steps=150, seed=0)
        with torch.no_grad():
            assert roc_auc(net(x)[:, 0], y) > 0.97
    noise = torch.rand(4000, generator=gen) < 0.2
    x_test = torch.randn(4000, 5, generator=gen)
    with torch.no_grad():
        auc = roc_auc(fit_probe(x, noise, 0, 150, 0)(x_test)[:, 0], torch.rand(4000, generator=gen) < 0.2)
    assert abs(auc - 0.5) < 0.05


def test_config_checks():
    with pytest.raises(ValueError, match="kept fractions"):
        EvidenceConfig(budgets=[1.5])
    with pytest.raises(ValueError, match="at least 1"):
        EvidenceConfig(val_n=0)


def _keep_all_rows(gen, rows=6, tokens=40, dim=5, age_dim=2):
    feats = torch.randn(rows, tokens, dim, generator=gen)
    feats[:, :, :age_dim] = torch.randn(tokens, age_dim, generator=gen)  # age: the same in every row
    valid = torch.ones(rows, tokens, dtype=torch.bool)
    valid[:, :4] = False  # sinks left out
    labels = (torch.rand(tokens, generator=gen) < 0.2).expand(rows, tokens) & valid
    positions = torch.arange(tokens).expand(rows, tokens)
    return _Rows("kv", feats, valid, labels, positions, torch.zeros(rows, tokens), tokens)


def test_across_heads_puts_every_rows_spectral_bins_side_by_side_then_the_age():
    r = _keep_all_rows(torch.Generator().manual_seed(0))
    x, y = across_heads([r], age_dim=2)
    assert x.shape == (36, 6 * 3 + 2) and torch.equal(y, r.labels[0, 4:])
    token = 10  # the 7th non-sink token
    expected = torch.cat([r.feats[row, token, 2:] for row in range(6)] + [r.feats[0, token, :2]])
    assert torch.equal(x[token - 4], expected)
    r.valid[2, 20] = False  # one row evicted a token: not a keep-everything cache
    with pytest.raises(ValueError, match="keep-everything"):
        across_heads([r], age_dim=2)


def test_joint_probe_scores_are_its_logistic_regression_and_survive_a_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    r = _keep_all_rows(gen)
    x, y = across_heads([r], age_dim=2)
    probe = JointProbe.fit(x, y, age_dim=2, steps=20, seed=0)
    expected = ((x - probe.mean) / probe.std) @ probe.weight + probe.bias
    assert torch.allclose(probe.scores(r.feats[:, 4:]), expected, atol=1e-5)
    probe.save(tmp_path / "p.pt")
    again = JointProbe.load(tmp_path / "p.pt")
    assert torch.equal(again.scores(r.feats), probe.scores(r.feats))
    with pytest.raises(ValueError, match="reads 20 features"):
        probe.scores(r.feats[:5])
