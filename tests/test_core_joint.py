"""The joint NAMM scorer (``scorer="joint"``): one score per token from every layer-head, the same tokens
kept in every layer and KV head, all layers evicted together by the cache."""

from __future__ import annotations

from dataclasses import dataclass

import _tiny_decoders
import pytest
import torch

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import attach
from namm_transfer.adapters.cache import EvictingCache
from namm_transfer.features import age_embedding
from namm_transfer.joint import head_mixed, held_and_fresh, joint_scores, relative_to_fresh
from namm_transfer.pipelines.joint_probe import JointProbe, ScoredKeep, cache_joint_scores
from namm_transfer.pipelines.text.shared_prefill import prefill_context

LAYERS, KV_HEADS, BINS, AGE = 2, 2, 17, 8
ROWS = LAYERS * KV_HEADS


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _tiny_decoders.build("llama", num_hidden_layers=LAYERS, num_key_value_heads=KV_HEADS)


@dataclass
class _Example:
    prompt_ids: list[int]


def _joint(params: torch.Tensor | None = None, **changes) -> NAMM:
    config = NAMMConfig(**{"scorer": "joint", "joint_rows": ROWS, "update_every": 16, "threshold": None,
                           **changes})
    if params is None:
        params = torch.randn(config.n_params, generator=torch.Generator().manual_seed(5))
    return NAMM(config, params)


def _prompt(n: int = 50) -> list[int]:
    return torch.randint(1, _tiny_decoders.VOCAB, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def test_scores_are_a_linear_read_out_of_every_layer_heads_features_and_the_age():
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(2, ROWS * BINS + AGE + 1, generator=gen)
    for batch in (1, 2):  # distinct samples, and one sample scored by two members
        feats = [torch.randn(batch, KV_HEADS, 6, AGE + BINS, generator=gen) for _ in range(LAYERS)]
        positions = [torch.arange(6).expand(batch, KV_HEADS, 6).clone() for _ in range(LAYERS)]
        valid = [torch.ones(batch, KV_HEADS, 6, dtype=torch.bool) for _ in range(LAYERS)]
        valid[1][:, 1, 2] = False  # layer 1, head 1 does not hold token 2: it reads 0 there
        expand = [x.expand(2, *x.shape[1:]) for x in (*feats, *positions, *valid)]
        out = joint_scores(params, expand[:LAYERS], expand[LAYERS : 2 * LAYERS], expand[2 * LAYERS :], AGE,
                           50_000.0)
        age = age_embedding(5 - torch.arange(6), AGE)
        for member in range(2):
            b = member if batch == 2 else 0
            for t in range(6):
                spectral = torch.cat([feats[layer][b, h, t, AGE:] * valid[layer][b, h, t]
                                      for layer in range(LAYERS) for h in range(KV_HEADS)])
                w = params[member]
                expected = spectral @ w[: ROWS * BINS] + age[t] @ w[ROWS * BINS : -1] + w[-1]
                assert torch.allclose(out[member, t], expected, atol=1e-5)


def test_progressive_eviction_matches_the_joint_probe_path_in_every_layer_head(model):
    """Fed in chunks of the cadence, the cache evicts all layers after each chunk and keeps the same
    tokens as the probe path (features of every layer, one ranking, ScoredKeep) with equal weights."""
    feature_namm = NAMM(NAMMConfig(update_every=16))
    probe = JointProbe(torch.randn(ROWS * BINS + AGE, generator=torch.Generator().manual_seed(2)), 0.0,
                       torch.zeros(ROWS * BINS + AGE), torch.ones(ROWS * BINS + AGE), AGE)
    joint = _joint(torch.cat([probe.weight, torch.zeros(1)]), budget=20, sink_tokens=4)
    ids = torch.tensor([_prompt(64)])
    with attach(model, joint) as handle:
        cache = EvictingCache(joint, handle.num_layers, handle.n_groups)
        reference_policy = ScoredKeep(feature_namm, 20)
        reference = EvictingCache(reference_policy, handle.num_layers, handle.n_groups)
        for start in range(0, 64, 16):
            model(input_ids=ids[:, start : start + 16], past_key_values=cache, use_cache=True)
            model(input_ids=ids[:, start : start + 16], past_key_values=reference, use_cache=True)
            reference_policy.scores = cache_joint_scores(reference, feature_namm, probe)
            for layer in reference.layers:
                layer.apply_eviction(force=True)
    first = cache.layers[0].memory.positions[0, 0].sort().values
    assert first.shape[0] == 20 and first[:4].tolist() == [0, 1, 2, 3]
    for ours, theirs in zip(cache.layers, reference.layers, strict=True):
        for h in range(KV_HEADS):
            assert torch.equal(ours.memory.positions[0, h].sort().values, first)
            assert torch.equal(theirs.memory.positions[0, h].sort().values, first)


def test_one_shot_fork_keeps_each_members_top_k(model):
    params = torch.randn(3, _joint().config.n_params, generator=torch.Generator().manual_seed(7))
    joint = _joint(params, budget=10)
    with attach(model, joint) as handle:
        prefill = prefill_context(model, handle, _Example(_prompt()), None, [joint], context_len=40)
        fork = prefill.fork(0, joint, batch=3)
        layers = prefill.cache.layers
        from namm_transfer.policies.base import CacheView

        views = [CacheView(x.memory.layer_idx, x.memory.positions, x.memory.valid) for x in layers]
        feats = [joint.features(x.memory.state[0], v) for x, v in zip(layers, views, strict=True)]
        scores = joint_scores(params, feats, [v.positions for v in views], [v.valid for v in views], AGE,
                              joint.config.age_base)
    for member in range(3):
        others = scores[member].clone()
        others[39] = -torch.inf  # the newest token is always kept, the budget's other 9 by score
        expected = others.topk(9).indices.tolist() + [39]
        for layer in fork.layers:
            for h in range(KV_HEADS):
                assert sorted(layer.memory.positions[member, h].tolist()) == sorted(set(expected))


def test_a_joint_namm_is_tied_to_its_models_layer_heads(model):
    wrong = NAMM(NAMMConfig(scorer="joint", joint_rows=ROWS + 1, update_every=16, budget=8, threshold=None))
    with pytest.raises(ValueError, match="tied to the model"):
        with attach(model, wrong):
            model(input_ids=torch.tensor([_prompt(40)]))
    with pytest.raises(ValueError, match="joint_rows"):
        NAMMConfig(scorer="joint")


def test_keep_without_the_caches_joint_update_says_how_to_use_it():
    joint = _joint(budget=2)
    from namm_transfer.policies.base import CacheView

    view = CacheView(0, torch.arange(5).expand(1, KV_HEADS, 5), torch.ones(1, KV_HEADS, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="EvictingCache"):
        joint.keep(joint.new_state(0), view)


def test_save_and_load_round_trip(tmp_path):
    joint = _joint(budget=12)
    joint.save_pretrained(tmp_path / "j")
    loaded = NAMM.from_pretrained(tmp_path / "j")
    assert loaded.joint and loaded.config == joint.config and torch.equal(loaded.params, joint.params)


def test_a_discarded_cache_is_freed_without_the_garbage_collector(model):
    """The last layer reaches its cache's joint eviction through a weak reference: no cycle keeps a
    fork's keys and values alive after it is dropped (an evolution scores thousands of forks)."""
    import gc
    import weakref

    joint = _joint(budget=8)
    with attach(model, joint) as handle:
        cache = EvictingCache(joint, handle.num_layers, handle.n_groups)
        model(input_ids=torch.tensor([_prompt(40)]), past_key_values=cache, use_cache=True)
    assert cache.layers[0].memory.valid.sum(-1).max() == 8  # the joint eviction ran
    alive = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert alive() is None
    finally:
        gc.enable()


def test_relative_to_fresh_measures_each_row_from_its_fresh_tokens_median():
    scores = torch.tensor([[5.0, -1.0, 2.0, 7.0, 3.0, 0.5], [1.0, 4.0, -2.0, 6.0, 9.0, 8.0]])
    held = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    fresh = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    bias = torch.tensor([0.25, -1.0])
    out = relative_to_fresh(scores, held, fresh, bias)
    # row 0: median of its fresh scores 2, 7, 3 is 3; row 1 has none fresh: median of 1, 4, -2, 9, 8 is 4
    assert torch.allclose(out[0], scores[0] - 3.0 + 0.25)
    assert torch.allclose(out[1], scores[1] - 4.0 - 1.0)
    positions = torch.tensor([[[0, 2, 3], [0, 1, 3]]])
    valid = torch.tensor([[[1, 1, 1], [1, 0, 1]]], dtype=torch.bool)  # token 1 is not held: slot invalid
    held_, fresh_ = held_and_fresh(positions, valid, torch.tensor([2]), 5)
    assert held_.tolist() == [[True, False, True, True, False]]
    assert fresh_.tolist() == [[False, False, True, True, False]]


def test_the_fresh_median_reference_in_progressive_and_one_shot_eviction(model, monkeypatch):
    """Every chunk of the cadence is one update: the tokens kept are those whose score, less the median
    score of that chunk's tokens plus the bias, is >= the threshold (and the newest); compressed once,
    the whole context is fresh."""
    import namm_transfer.namm as namm_module

    raw = []
    monkeypatch.setattr(namm_module, "joint_scores", lambda *a: raw.append(joint_scores(*a)) or raw[-1])
    joint = _joint(threshold=0.0, joint_reference="fresh-median")
    bias = float(joint.params[0, -1])
    ids = torch.tensor([_prompt(64)])
    with attach(model, joint) as handle:
        cache = EvictingCache(joint, handle.num_layers, handle.n_groups)
        held = set()
        for start in range(0, 64, 16):
            model(input_ids=ids[:, start : start + 16], past_key_values=cache, use_cache=True)
            s = raw[-1][0]
            chunk = set(range(start, start + 16))
            reference = s[sorted(chunk)].median()  # torch's median: the lower middle value, as nanmedian
            held = {t for t in held | chunk if float(s[t] - reference + bias) >= 0} | {start + 15}
            for layer in cache.layers:
                for h in range(KV_HEADS):
                    assert set(layer.memory.positions[0, h].tolist()) == held
        assert len(held) < 64  # it evicted
        raw.clear()
        prefill = prefill_context(model, handle, _Example(_prompt()), None, [joint], context_len=40)
        fork = prefill.fork(0, joint)
    s = raw[-1][0]
    kept = {t for t in range(40) if float(s[t] - s[:40].median() + bias) >= 0} | {39}
    assert set(fork.layers[0].memory.positions[0, 0].tolist()) == kept


def test_under_a_budget_the_reference_changes_nothing(model):
    """Ranking-only (a budget, no threshold): a per-update shift of every score keeps the same top-k, so
    the fixed-budget tables hold for either reference."""
    ids = torch.tensor([_prompt(64)])
    kept = []
    for reference in ("absolute", "fresh-median"):
        joint = _joint(budget=12, joint_reference=reference)
        with attach(model, joint) as handle:
            cache = EvictingCache(joint, handle.num_layers, handle.n_groups)
            for start in range(0, 64, 16):
                model(input_ids=ids[:, start : start + 16], past_key_values=cache, use_cache=True)
        kept.append([layer.memory.positions.sort(-1).values for layer in cache.layers])
    assert all(torch.equal(a, b) for a, b in zip(*kept, strict=True))


def test_head_mixed_is_the_zscored_joint_score_plus_each_layer_heads_own_term():
    gen = torch.Generator().manual_seed(3)
    params = torch.randn(1, ROWS * BINS + AGE + 1, generator=gen)
    feats = [torch.randn(1, KV_HEADS, 6, AGE + BINS, generator=gen) for _ in range(LAYERS)]
    positions = [torch.arange(6).expand(1, KV_HEADS, 6).clone() for _ in range(LAYERS)]
    valid = [torch.ones(1, KV_HEADS, 6, dtype=torch.bool) for _ in range(LAYERS)]
    held = torch.tensor([[True, True, True, True, False, True]])  # token 4: held by no layer
    scores = joint_scores(params, feats, positions, valid, AGE, 50_000.0)
    out = head_mixed(params, scores, feats, positions, valid, held, AGE, 0.5)
    assert out.shape == (1, LAYERS, KV_HEADS, 6)

    def z(x):
        kept = x[held[0]]
        return (x - kept.mean()) / kept.std(unbiased=False)

    w = params[0, : ROWS * BINS].view(ROWS, BINS)
    for layer in range(LAYERS):
        for h in range(KV_HEADS):
            own = feats[layer][0, h, :, AGE:] @ w[layer * KV_HEADS + h]
            expected = z(scores[0]) + 0.5 * z(own)
            assert torch.allclose(out[0, layer, h, held[0]], expected[held[0]], atol=1e-5)
            assert out[0, layer, h, 4] == float("-inf")


def test_head_mix_keeps_each_heads_own_top_k_and_as_many_tokens_as_the_threshold_says(model):
    """One-shot fork under a budget: every layer-head keeps the sinks, the newest token and the best of its
    own ranking (head_mixed); the heads differ. In threshold mode each head keeps as many tokens as
    without head_mix."""
    from namm_transfer.policies.base import CacheView

    params = torch.zeros(ROWS * BINS + AGE + 1)
    # KV head 0 of each layer reads bin 0 upwards, KV head 1 downwards
    params[0 : ROWS * BINS : BINS] = torch.tensor([1.0, -1.0] * LAYERS)
    params[ROWS * BINS : -1] = torch.randn(AGE, generator=torch.Generator().manual_seed(4))
    joint = _joint(params, budget=12, sink_tokens=2, head_mix=1.0)
    with attach(model, joint) as handle:
        prefill = prefill_context(model, handle, _Example(_prompt()), None, [joint], context_len=40)
        fork = prefill.fork(0, joint)
        layers = prefill.cache.layers
        views = [CacheView(x.memory.layer_idx, x.memory.positions, x.memory.valid) for x in layers]
        feats = [joint.features(x.memory.state[0], v) for x, v in zip(layers, views, strict=True)]
        pos, ok = [v.positions for v in views], [v.valid for v in views]
        scores = joint_scores(joint.params, feats, pos, ok, AGE, joint.config.age_base)
        own = head_mixed(joint.params, scores, feats, pos, ok, torch.ones(1, 40, dtype=torch.bool), AGE, 1.0)
        counts = {}
        for mix in (0.0, 1.0):
            thresholded = joint.replace(budget=None, threshold=float(scores[0].median()), head_mix=mix)
            kept = prefill.fork(0, thresholded).layers
            counts[mix] = [layer.memory.valid.sum(-1).tolist() for layer in kept]
    assert counts[0.0] == counts[1.0] and 2 < counts[0.0][0][0][0] < 40
    kept_sets = set()
    for layer_idx, layer in enumerate(fork.layers):
        for h in range(KV_HEADS):
            ranked = own[0, layer_idx, h].clone()
            ranked[[0, 1, 39]] = -torch.inf  # the sinks and the newest token take 3 of the 12
            expected = set(ranked.topk(9).indices.tolist()) | {0, 1, 39}
            got = set(layer.memory.positions[0, h].tolist())
            assert got == expected
            kept_sets.add(frozenset(got))
    assert len(kept_sets) > 1  # the heads keep different tokens


def test_head_mix_is_checked():
    with pytest.raises(ValueError, match="head_mix must be >= 0"):
        _joint(head_mix=-1.0)
    with pytest.raises(ValueError, match="joint NAMM only"):
        NAMMConfig(head_mix=0.5)
