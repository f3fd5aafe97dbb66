"""LayerMemory bookkeeping (cadence, padding, non-finite attention) and the baseline policies."""

from __future__ import annotations

import warnings

import pytest
import torch

from namm_transfer import H2O, NAMM, FullCache, L2Norm, LayerMemory, NAMMConfig, RandomEviction, Recency
from namm_transfer.policies.base import CacheView, MemoryPolicy, budget_for


class Recorder(MemoryPolicy):
    """Keeps only the newest valid token and records every call to keep()."""

    def __init__(self, update_every):
        super().__init__(update_every)
        self.calls = []

    def keep(self, state, view: CacheView) -> torch.Tensor:
        self.calls.append(view.valid.sum(-1).clone())
        positions = view.positions.masked_fill(~view.valid, -1)
        return view.valid & (positions == positions.amax(-1, keepdim=True))


def softmax_rows(mem: LayerMemory, n_q: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    mask = mem.attention_mask(n_q)
    logits = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed)) * scale
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)


def feed(mem, n_new, batch=2, heads=2, pad=None, seed=0, attention=None, keys=None):
    """append -> mark_padding -> observe -> maybe_evict, as the adapter does."""
    mem.append(batch, heads, n_new, torch.device("cpu"))
    row_valid = None
    if pad is not None:
        row_valid = torch.arange(n_new)[None, :] >= torch.as_tensor(pad)[:, None]
        mem.mark_padding(row_valid)
    if mem.policy.needs_attention or attention is not None:
        mem.observe(softmax_rows(mem, n_new, seed) if attention is None else attention, row_valid)
    return mem.maybe_evict(keys)


def test_cadence_every_16_real_tokens():
    policy = Recorder(update_every=16)
    mem = LayerMemory(policy, 0)
    chunks = [5, 10, 1, 15, 1, 40, 3, 13, 16]
    seen, fired = 0, []
    for n in chunks:
        before = seen
        seen += n
        feed(mem, n, batch=1, heads=1)
        fired.append(seen // 16 > before // 16)
    assert len(policy.calls) == sum(fired) == 5  # 32 -> 72 crosses 48 and 64 but runs once
    assert mem.stats.updates == 5
    assert mem.last_update.tolist() == [104] and mem.real_seen.tolist() == [104]


def test_cadence_is_per_sample_with_left_padding():
    policy = Recorder(update_every=16)
    mem = LayerMemory(policy, 0)
    index = feed(mem, 16, batch=2, heads=1, pad=[3, 0])  # sample 0: 13 real tokens, not due
    assert mem.real_seen.tolist() == [13, 16] and len(policy.calls) == 1
    assert index is not None
    assert mem.kept_tokens().tolist() == [[13], [1]]  # only the due sample was evicted
    assert mem.valid[0].sum() == 13 and mem.positions[1, 0, 0] == 15
    feed(mem, 2, batch=2, heads=1)  # sample 0 reaches 15: still not due
    assert len(policy.calls) == 1
    feed(mem, 1, batch=2, heads=1)  # sample 0 reaches 16
    assert len(policy.calls) == 2
    assert mem.kept_tokens().tolist() == [[1], [4]] and mem.last_update.tolist() == [16, 16]


def test_attention_mask_from_absolute_positions():
    mem = LayerMemory(FullCache(), 0)
    mem.append(1, 1, 4, torch.device("cpu"))
    mem.mark_padding(torch.tensor([[False, True, True, True]]))
    mask = mem.attention_mask(4)[0, 0]
    assert mask.tolist() == [
        [True, False, False, False],  # padding query sees only itself
        [False, True, False, False],
        [False, True, True, False],
        [False, True, True, True],
    ]


def test_nonfinite_attention_keeps_affected_keys():
    mem = LayerMemory(Recency(budget=2, sink=1, update_every=8), 0)
    mem.append(2, 2, 8, torch.device("cpu"))
    attention = softmax_rows(mem, 8)
    attention[0, 1, 5, :] = float("nan")  # a whole NaN row: every key it sees is affected
    attention[1, 0, 7, 3] = float("inf")  # a single bad entry: only key 3
    with pytest.warns(RuntimeWarning, match="non-finite attention to 9 cached tokens"):
        mem.observe(attention)
    assert mem.stats.nonfinite == 9
    mem.maybe_evict()
    kept = [[sorted(mem.positions[b, h][mem.valid[b, h]].tolist()) for h in range(2)] for b in range(2)]
    # protected keys and the newest count first within the budget of 2; the sink goes
    assert kept == [[[0, 7], list(range(8))], [[3, 7], [0, 7]]]
    assert mem.protect is None


def test_nonfinite_attention_with_namm_never_crashes():
    namm = NAMM.init_random(seed=0, sigma=0.5, config=NAMMConfig(update_every=16))
    mem = LayerMemory(namm, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        feed(mem, 10, batch=1, heads=2, seed=1)
        mem.append(1, 2, 6, torch.device("cpu"))
        attention = softmax_rows(mem, 6, seed=2)
        attention[0, 0, 2, :13] = float("nan")  # query 12 sees keys 0..12
        mem.observe(attention)
        mem.maybe_evict()
    assert [w.category for w in caught] == [RuntimeWarning]
    assert mem.stats.nonfinite == 13  # keys 0..12 exist when query 12 attends
    assert torch.isfinite(mem.state.ema).all()
    assert mem.kept_tokens()[0, 0] >= 13  # head 0: every affected key kept
    assert mem.valid[0, 0, :13].all() and mem.positions[0, 0, :13].tolist() == list(range(13))


def test_external_select_keeps_protection_aligned():
    mem = LayerMemory(Recency(budget=2, sink=1, update_every=16), 0)
    mem.append(1, 1, 8, torch.device("cpu"))
    attention = softmax_rows(mem, 8)
    attention[0, 0, 7, 2] = float("nan")
    with pytest.warns(RuntimeWarning):
        mem.observe(attention)
    mem.select(torch.tensor([[[0, 2, 7]]]), torch.ones(1, 1, 3, dtype=torch.bool))
    assert mem.protect.tolist() == [[[False, True, False]]]
    feed(mem, 8, batch=1, heads=1, seed=1)  # 16 tokens: due
    assert mem.positions[0, 0][mem.valid[0, 0]].tolist() == [2, 15]  # protected + newest fill the budget


def test_protection_survives_an_eviction_of_another_sample():
    mem = LayerMemory(Recency(budget=2, sink=1, update_every=16), 0)
    mem.append(2, 1, 16, torch.device("cpu"))
    row_valid = torch.arange(16)[None, :] >= torch.tensor([4, 0])[:, None]  # sample 0: 12 real tokens
    mem.mark_padding(row_valid)
    attention = softmax_rows(mem, 16)
    attention[0, 0, 10, 8] = float("nan")  # sample 0's key at position 8
    with pytest.warns(RuntimeWarning):
        mem.observe(attention, row_valid)
    mem.maybe_evict()  # only sample 1 is due
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feed(mem, 4, batch=2, heads=1, seed=1)  # sample 0 reaches 16: its first eviction
    assert mem.positions[0, 0][mem.valid[0, 0]].tolist() == [8, 19]  # protected + newest fill the budget


def test_recency_budget_not_exceeded_when_sinks_fill_it():
    mem = LayerMemory(Recency(budget=3, sink=4, update_every=8), 0)
    feed(mem, 8, batch=1, heads=1)
    assert mem.kept_tokens().tolist() == [[3]]


def test_gqa_attention_is_averaged_over_groups():
    mem = LayerMemory(H2O(budget=3, recent=1, update_every=1000), 0, n_groups=2)
    mem.append(1, 2, 4, torch.device("cpu"))
    attention = torch.rand(1, 4, 4, 4)
    mem.observe(attention)
    expected = attention.view(1, 2, 2, 4, 4).mean(2).sum(-2)
    torch.testing.assert_close(mem.state["acc"], expected)


POLICIES = [
    lambda b: Recency(budget=b, sink=2, update_every=16),
    lambda b: H2O(budget=b, update_every=16),
    lambda b: L2Norm(budget=b, update_every=16),
    lambda b: RandomEviction(budget=b, seed=3, update_every=16),
]


@pytest.mark.parametrize("make", POLICIES, ids=["recency", "h2o", "l2norm", "random"])
@pytest.mark.parametrize("budget", [3, 5, 16])
def test_budget_keeps_min_budget_valid(make, budget):
    policy = make(budget)
    mem = LayerMemory(policy, 0)
    keys = torch.randn(3, 2, 16, 4, generator=torch.Generator().manual_seed(0))
    mem.append(3, 2, 16, torch.device("cpu"))
    pad = torch.tensor([12, 0, 7])  # real tokens: 4, 16, 9 -> due for sample 1 at 16 (cadence), and
    mem.mark_padding(torch.arange(16)[None, :] >= pad[:, None])  # for the others if over the budget
    mem.observe(softmax_rows(mem, 16), torch.arange(16)[None, :] >= pad[:, None])  # (first fill)
    mem.maybe_evict(keys)
    first = [min(4, budget), budget, min(9, budget)]
    assert mem.kept_tokens().tolist() == [[k, k] for k in first]
    # once every sample is due, each head keeps min(budget, valid) tokens
    mem.append(3, 2, 16, torch.device("cpu"))
    mem.observe(softmax_rows(mem, 16, seed=1))
    keys = torch.randn(3, 2, mem.n_slots, 4, generator=torch.Generator().manual_seed(1))
    mem.maybe_evict(keys)
    valid_before = torch.tensor([[k + 16, k + 16] for k in first])
    assert mem.kept_tokens().tolist() == torch.clamp(valid_before, max=budget).tolist()


def test_recency_keeps_sinks_and_most_recent():
    mem = LayerMemory(Recency(budget=7, sink=3, update_every=32), 0)
    mem.append(2, 1, 32, torch.device("cpu"))
    mem.mark_padding(torch.arange(32)[None, :] >= torch.tensor([0, 5])[:, None])
    feed(mem, 5, batch=2, heads=1)  # sample 1 crosses 32 real tokens now, sample 0 already did
    kept0 = mem.positions[0, 0][mem.valid[0, 0]].tolist()
    kept1 = mem.positions[1, 0][mem.valid[1, 0]].tolist()
    assert kept0 == [0, 1, 2, 33, 34, 35, 36]
    assert kept1 == [5, 6, 7, 33, 34, 35, 36]  # sinks are the first *real* tokens


@pytest.mark.parametrize(("field", "always"), [
    ("sink_tokens", lambda first: {first, first + 1, first + 2}),  # each sample's first 3 real tokens
    ("recent_tokens", lambda first: {29, 30, 31}),  # its 3 newest (H2O's window)
])
def test_namm_always_kept_tokens_fit_the_budget_and_change_nothing_else(field, always):
    """sink_tokens=3 / recent_tokens=3: those 3 tokens of each sample survive a budget of 7 whatever their
    scores; the other 4 kept are among the NAMM's without them (same scores); a negative count is refused."""
    namm = NAMM.init_random(3, config=NAMMConfig(update_every=32, budget=7, threshold=None))
    kept = {}
    for count in (0, 3):
        mem = LayerMemory(namm.replace(**{field: count}), 0)
        mem.append(2, 1, 32, torch.device("cpu"))
        mem.mark_padding(torch.arange(32)[None, :] >= torch.tensor([0, 5])[:, None])
        mem.observe(softmax_rows(mem, 32), torch.arange(32)[None, :] >= torch.tensor([0, 5])[:, None])
        mem.maybe_evict()
        kept[count] = [mem.positions[b, 0][mem.valid[b, 0]].tolist() for b in range(2)]
    for b, first in enumerate((0, 5)):
        protected = always(first)
        assert protected <= set(kept[3][b]) and len(kept[3][b]) == 7
        # the other 4 are the best of the rest: inside the plain top 7 (which holds >= 4 of the rest)
        others = set(kept[3][b]) - protected
        assert len(others) == 4 and others <= set(kept[0][b]) - protected
    assert kept[0] != kept[3]  # they changed what was kept: the checks above are not vacuous
    with pytest.raises(ValueError, match=field):
        NAMMConfig(**{field: -1})


def _kept_after_one_update(namm: NAMM) -> list[list[int]]:
    mem = LayerMemory(namm, 0)
    mem.append(2, 1, 32, torch.device("cpu"))
    mem.observe(softmax_rows(mem, 32))
    mem.maybe_evict()
    return [sorted(mem.positions[b, 0][mem.valid[b, 0]].tolist()) for b in range(2)]


def test_namm_min_tokens_is_a_floor_on_its_threshold_mode():
    """min_tokens=5: a threshold that keeps (almost) nothing keeps the 5 best instead, the same tokens as
    the same NAMM ranking under a budget of 5; a threshold that keeps more than 5 is unchanged; under a
    cap of 3 the floor is the cap."""
    namm = NAMM.init_random(3, config=NAMMConfig(update_every=32))
    top5 = _kept_after_one_update(namm.replace(threshold=None, budget=5))
    harsh = namm.replace(threshold=1e9)
    assert [len(k) for k in _kept_after_one_update(harsh)] == [1, 1]  # only the newest token, forced
    assert _kept_after_one_update(harsh.replace(min_tokens=5)) == top5
    lenient = namm.replace(threshold=-1e9)
    assert _kept_after_one_update(lenient.replace(min_tokens=5)) == _kept_after_one_update(lenient)
    assert [len(k) for k in _kept_after_one_update(harsh.replace(min_tokens=5, budget=3))] == [3, 3]
    with pytest.raises(ValueError, match="min_tokens"):
        NAMMConfig(min_tokens=-1)


def test_namm_ranking_under_its_cap_keeps_everything_without_scoring(monkeypatch):
    """A pure ranking (threshold None) whose cap no head exceeds keeps every valid slot, as selection
    would, and skips the scorer; with a threshold, or over the cap, the scorer runs."""
    import namm_transfer.namm as namm_module

    calls = []
    real = namm_module.score_tokens
    monkeypatch.setattr(namm_module, "score_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = torch.softmax(torch.randn(2, 1, 10, 10), -1)
    view = CacheView(0, torch.arange(10).expand(2, 1, 10), torch.ones(2, 1, 10, dtype=torch.bool))
    state = NAMM().new_state(0)
    state.observe(rows)
    ranked = NAMM.init_random(4, config=NAMMConfig(threshold=None))
    for budget, scored in ((10, False), (12, False), (9, True)):
        keep = ranked.with_budget(budget, keep_threshold=False).keep(state, view)
        assert len(calls) == int(scored) and int(keep.sum(-1).max()) == min(budget, 10)
        calls.clear()
    ratio = ranked.with_compression_ratio(0.0, keep_threshold=False)  # cap = seen = 10 per sample
    view.seen = torch.tensor([10, 10])
    assert bool(ratio.keep(state, view).all()) and not calls
    thresholded = NAMM.init_random(4, config=NAMMConfig(budget=12))
    thresholded.keep(state, view)
    assert calls


def test_h2o_keeps_recent_window_and_heavy_hitters():
    policy = H2O(budget=6, recent=2, update_every=10)
    mem = LayerMemory(policy, 0)
    mem.append(1, 1, 10, torch.device("cpu"))
    received = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 4.0, 0.3, 0.9, 0.0, 0.0])
    attention = torch.zeros(1, 1, 10, 10)
    attention[0, 0, 9] = received  # one query row carries all the mass; accumulation is a sum
    attention[0, 0, 8, 7] = 1.5
    mem.observe(attention)
    torch.testing.assert_close(
        policy.score(mem.state, CacheView(0, mem.positions, mem.valid))[0, 0, :8],
        received[:8] + torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.5]),
    )
    mem.maybe_evict()
    # recent window (ages 0, 1 -> positions 9, 8) + the 4 highest accumulated: 1, 5, 3, 7 (2.4)
    assert mem.positions[0, 0][mem.valid[0, 0]].tolist() == [1, 3, 5, 7, 8, 9]
    assert mem.state["acc"].shape == (1, 1, 6)  # accumulated attention follows the compaction
    torch.testing.assert_close(mem.state["acc"][0, 0, :4], torch.tensor([5.0, 3.0, 4.0, 2.4]))


def test_h2o_default_window_is_half_budget():
    policy = H2O(budget=4, update_every=8)
    mem = LayerMemory(policy, 0)
    mem.append(1, 1, 8, torch.device("cpu"))
    attention = torch.zeros(1, 1, 8, 8)
    attention[0, 0, 7, :6] = torch.tensor([0.0, 0.0, 9.0, 0.0, 8.0, 0.0])
    mem.observe(attention)
    mem.maybe_evict()
    assert mem.positions[0, 0][mem.valid[0, 0]].tolist() == [2, 4, 6, 7]


def test_l2norm_keeps_lowest_key_norms():
    mem = LayerMemory(L2Norm(budget=4, update_every=8), 0)
    norms = torch.tensor([[3.0, 0.5, 2.0, 0.1, 9.0, 0.2, 4.0, 7.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]])
    direction = torch.nn.functional.normalize(
        torch.randn(2, 8, 6, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    keys = (direction * norms[..., None])[None]
    feed(mem, 8, batch=1, heads=2, keys=keys)
    kept = [mem.positions[0, h][mem.valid[0, h]].tolist() for h in range(2)]
    assert kept == [[1, 3, 5, 7], [0, 1, 2, 7]]  # newest (7) always, then the 3 smallest norms


def test_l2norm_without_keys_raises():
    mem = LayerMemory(L2Norm(budget=2, update_every=4), 0)
    with pytest.raises(ValueError, match="needs the cached keys"):
        feed(mem, 4, batch=1, heads=1)


def test_random_eviction_reproducible_per_seed():
    def kept(seed):
        mem = LayerMemory(RandomEviction(budget=5, seed=seed, update_every=16), 0)
        feed(mem, 16, batch=2, heads=3)
        feed(mem, 16, batch=2, heads=3)
        return mem.positions.masked_fill(~mem.valid, -1)

    assert torch.equal(kept(7), kept(7))
    assert not torch.equal(kept(7), kept(8))
    assert (kept(7) >= 0).sum(-1).eq(5).all()


def test_per_layer_budget_lists():
    for make in (
        lambda: Recency([3, 6, 9], sink=2, update_every=16),
        lambda: H2O([3, 6, 9], update_every=16),
    ):
        policy = make()
        counts = []
        for layer in range(3):
            mem = LayerMemory(policy, layer)
            feed(mem, 16, batch=1, heads=2, seed=layer)
            counts.append(mem.kept_tokens().tolist())
        assert counts == [[[3, 3]], [[6, 6]], [[9, 9]]]
    mem = LayerMemory(NAMM(NAMMConfig(update_every=16, budget=[4, 7])), 1)
    feed(mem, 16, batch=1, heads=2)
    assert mem.kept_tokens().tolist() == [[7, 7]]  # the keep-all NAMM, capped by layer 1's budget
    assert budget_for([4, 7], 0) == 4 and budget_for(None, 5) is None and budget_for(12, 3) == 12
    with pytest.raises(ValueError, match="budget has 2 per-layer entries but layer 2"):
        budget_for([4, 7], 2)


@pytest.mark.parametrize("budget", [0, -1, [4, 0]])
@pytest.mark.parametrize("cls", [Recency, H2O, L2Norm, RandomEviction])
def test_nonpositive_budget_raises(cls, budget):
    with pytest.raises(ValueError, match="budget must be >= 1"):
        cls(budget=budget)


def test_update_every_must_be_positive():
    with pytest.raises(ValueError, match="update_every must be >= 1, got 0"):
        Recency(budget=4, update_every=0)


def test_full_cache_never_evicts():
    mem = LayerMemory(FullCache(), 0)
    for n in (100, 1000, 5):
        assert feed(mem, n, batch=1, heads=1) is None
    assert mem.stats.updates == 0 and mem.valid.all() and mem.n_slots == 1105


def test_right_padding_is_rejected_with_a_clear_error():
    mem = LayerMemory(FullCache(), 0)
    mem.append(2, 1, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="pad on the left"):
        mem.mark_padding(torch.tensor([[True, True, True, False], [True, True, True, True]]))
    mem = LayerMemory(FullCache(), 0)
    mem.append(1, 1, 4, torch.device("cpu"))
    mem.mark_padding(torch.tensor([[False, True, True, True]]))  # left padding is fine
    mem.append(1, 1, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="pad on the left"):
        mem.mark_padding(torch.tensor([[False, True]]))


def _held(mem: LayerMemory) -> torch.Tensor:
    return mem.valid.sum(-1)  # [B, H]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Recency(budget=7, sink=2, update_every=16),
        lambda: H2O(budget=7, update_every=16),
        lambda: RandomEviction(budget=7, seed=1, update_every=16),
        lambda: NAMM.init_random(seed=2, sigma=0.5, config=NAMMConfig(update_every=16, budget=7)),
        lambda: NAMM(NAMMConfig(update_every=16, threshold=None, compression_ratio=0.5)),
        lambda: Recency(compression_ratio=0.75, update_every=16),
    ],
)
def test_budget_guarantee_over_any_chunking(make):
    """After any forward: at most cap + update_every - 1 tokens per (sample, KV head), cap as of the
    latest update; at most cap until the first update; a prompt shorter than the cadence is at its cap
    right after its prefill. Chunks of every size, one sample left-padded."""
    policy = make()
    ratio = getattr(policy, "compression_ratio", None)

    def cap(seen: torch.Tensor) -> torch.Tensor:
        if ratio is None:
            return torch.full_like(seen, 7)
        return torch.round((1 - ratio) * seen.double()).long().clamp(min=1)

    mem = LayerMemory(policy, 0)
    feed(mem, 11, pad=[0, 3], seed=0)  # the prefill: 11 and 8 real tokens, under the 16-token cadence
    first = cap(mem.real_seen)
    expected = torch.tensor([[min(11, int(first[0]))] * 2, [min(8, int(first[1]))] * 2])
    thresholded = getattr(getattr(policy, "config", None), "threshold", None) is not None
    if thresholded:  # a NAMM's threshold may drop more than the cap asks
        assert bool((_held(mem) <= expected).all())
    else:
        assert _held(mem).tolist() == expected.tolist()
    assert mem.stats.updates == (1 if bool((mem.real_seen > first).any()) else 0)
    cap_at_update = torch.where(mem.last_update > 0, cap(mem.last_update), cap(mem.real_seen))
    for step, n in enumerate([1, 1, 5, 2, 30, 1, 1, 1, 9, 16, 3, 1, 17, 1]):
        feed(mem, n, seed=step + 1)
        updated = mem.last_update == mem.real_seen
        cap_at_update = torch.where(updated, cap(mem.real_seen), cap_at_update)
        bound = cap_at_update + policy.update_every - 1
        assert bool((_held(mem) <= bound[:, None]).all()), (step, _held(mem).tolist(), bound.tolist())
        assert bool(((mem.real_seen - mem.last_update) < policy.update_every).all())


def test_first_fill_runs_once_then_the_cadence():
    """The first update comes as soon as a forward ends over the cap; afterwards only the cadence."""
    policy = Recorder(update_every=16)
    policy.token_cap = lambda view: 3  # a capped policy that keeps only the newest token
    mem = LayerMemory(policy, 0)
    for n in (2, 1):
        feed(mem, n, batch=1, heads=1)
    assert policy.calls == []  # 3 tokens: not over the cap
    feed(mem, 1, batch=1, heads=1)  # 4 > 3: first fill at 4 real tokens
    assert len(policy.calls) == 1 and mem.last_update.tolist() == [4]
    for _ in range(11):  # 5 .. 15: over the cap again, but not the first update and no cadence crossing
        feed(mem, 1, batch=1, heads=1)
    assert len(policy.calls) == 1 and int(_held(mem).max()) == 12
    feed(mem, 1, batch=1, heads=1)  # 16 crosses the cadence
    assert len(policy.calls) == 2 and int(_held(mem).max()) == 1


def test_the_view_says_where_each_samples_fresh_tokens_start():
    """``fresh_from``: the first token fed since the sample's last update; left padding is not counted."""
    mem = LayerMemory(Recency(budget=100, update_every=4), layer_idx=0)
    mem.append(2, 1, 5, torch.device("cpu"))
    mem.mark_padding(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert mem.view().fresh_from.tolist() == [2, 0]  # before any update: each sample's first real token
    mem.maybe_evict(force=True)
    mem.append(2, 1, 3, torch.device("cpu"))
    assert mem.view().fresh_from.tolist() == [5, 5]  # the three tokens fed since
