"""SnapKV and TOVA against straightforward re-computations, and the compression_ratio budget option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from namm_transfer import H2O, NAMM, TOVA, L2Norm, LayerMemory, NAMMConfig, RandomEviction, Recency, SnapKV
from namm_transfer.policies.base import CacheView, resolve_budget

CPU = torch.device("cpu")


# An independent model of the cache: per (sample, KV head) the kept arrival positions, and every real
# query's GQA-averaged attention as {key position: weight}. Nothing below reads the policies' state.
class Reference:
    def __init__(self, batch, heads, n_groups, every):
        self.batch, self.heads, self.n_groups, self.every = batch, heads, n_groups, every
        self.kept = [[[] for _ in range(heads)] for _ in range(batch)]
        self.rows = [[[] for _ in range(heads)] for _ in range(batch)]  # real queries' rows, in order
        self.seen = [0] * batch
        self.last_update = [0] * batch
        self.tokens = 0

    def feed(self, mem, attention, row_valid):
        """Record a chunk: new keys (real ones only), then the real queries' rows (by key position)."""
        n_q = attention.shape[-2]
        positions = mem.positions.numpy()
        valid = mem.valid.numpy()
        att = attention.double().numpy()
        for b in range(self.batch):
            for j in range(n_q):
                if not row_valid[b][j]:
                    continue
                pos = self.tokens + j
                for h in range(self.heads):
                    self.kept[b][h].append(pos)
                    group = att[b, h * self.n_groups : (h + 1) * self.n_groups, j]  # [n_groups, S]
                    row = {}
                    for s in range(positions.shape[-1]):
                        if valid[b, h, s]:
                            row[int(positions[b, h, s])] = float(np.mean(group[:, s]))
                    self.rows[b][h].append(row)
            self.seen[b] += int(sum(row_valid[b]))
        self.tokens += n_q

    def due(self, b, cap_fn=None):
        """Cadence crossed, or (the budget guarantee's first fill) never updated and over the cap."""
        if self.seen[b] // self.every > self.last_update[b] // self.every:
            return True
        held = max(len(keys) for keys in self.kept[b])
        return cap_fn is not None and self.last_update[b] == 0 and held > cap_fn(b)

    def evict(self, scores_fn, cap_fn):
        """Apply the selection rule (newest forced, then highest scores) to the due samples."""
        for b in range(self.batch):
            if not self.due(b, cap_fn):
                continue
            self.last_update[b] = self.seen[b]
            for h in range(self.heads):
                keys = sorted(self.kept[b][h])
                if not keys:
                    continue
                scores = scores_fn(b, h, keys)
                newest = keys[-1]
                ranked = sorted(keys, key=lambda p: (p != newest, -scores[p], p))
                cap = cap_fn(b)
                self.kept[b][h] = sorted(set(ranked[:cap]) | {newest})


def snapkv_scores(ref, b, h, keys, window, kernel):
    rows = ref.rows[b][h][-window:]
    mean = {p: (sum(r.get(p, 0.0) for r in rows) / len(rows) if rows else 0.0) for p in keys}
    newest = keys[-1]
    outside = [p for p in keys if newest - p >= window]  # the observation window's keys are kept
    scores = {p: float("inf") for p in keys if newest - p < window}
    half = kernel // 2
    for i, p in enumerate(outside):
        near = outside[max(0, i - half) : i + half + 1]
        scores[p] = sum(mean[q] for q in near) / len(near)
    return scores


def tova_scores(ref, b, h, keys):
    last = ref.rows[b][h][-1] if ref.rows[b][h] else {}
    return {p: last.get(p, 0.0) for p in keys}


def kept_positions(mem):
    return [
        [sorted(mem.positions[b, h][mem.valid[b, h]].tolist()) for h in range(mem.valid.shape[1])]
        for b in range(mem.valid.shape[0])
    ]


def view_of(mem):
    return CacheView(mem.layer_idx, mem.positions, mem.valid, None, mem.protect, mem.real_seen)


def drive(policy, chunks, batch=2, heads=2, n_groups=1, cap_fn=None, scores_fn=None, seed=0):
    """Feed chunks ``(n_new, pads per sample)`` through a LayerMemory and the reference; after each
    chunk compare the policy's scores of the valid slots and the kept sets."""
    mem = LayerMemory(policy, 0, n_groups=n_groups)
    ref = Reference(batch, heads, n_groups, policy.update_every)
    gen = torch.Generator().manual_seed(seed)
    for n_new, pads in chunks:
        mem.append(batch, heads, n_new, CPU)
        row_valid = torch.arange(n_new)[None, :] >= torch.tensor(pads)[:, None]
        mem.mark_padding(row_valid)
        mask = mem.attention_mask(n_new).repeat_interleave(n_groups, dim=1)
        logits = torch.randn(mask.shape, generator=gen) * 2
        attention = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        ref.feed(mem, attention, row_valid.tolist())
        mem.observe(attention, row_valid)
        if any(ref.due(b, cap_fn) for b in range(batch)):
            scores = policy.score(mem.state, view_of(mem))
            for b in range(batch):
                for h in range(heads):
                    keys = sorted(ref.kept[b][h])
                    expected = scores_fn(ref, b, h, keys)
                    slots = {
                        int(p): s for s, p in enumerate(mem.positions[b, h].tolist()) if mem.valid[b, h, s]
                    }
                    got = [float(scores[b, h, slots[p]]) for p in keys]
                    np.testing.assert_allclose(got, [expected[p] for p in keys], rtol=1e-5, atol=1e-7)
        ref.evict(lambda b, h, keys: scores_fn(ref, b, h, keys), cap_fn)
        mem.maybe_evict()
        assert kept_positions(mem) == ref.kept
    return mem, ref


# left padding in the first chunk (sample 1 entirely padding there), cadences crossed unevenly, and
# evictions of one sample while the other keeps growing (compaction leaves invalid filler slots)
CHUNKS = [(4, [0, 4]), (6, [0, 0]), (3, [0, 0]), (9, [0, 0]), (1, [0, 0]), (7, [0, 0]), (12, [0, 0])]


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("window,kernel", [(3, 3), (2, 5), (4, 1)])
def test_snapkv_matches_reference(n_groups, window, kernel):
    budget = 7
    policy = SnapKV(budget=budget, window=window, kernel=kernel, update_every=8)
    mem, ref = drive(
        policy,
        CHUNKS,
        n_groups=n_groups,
        cap_fn=lambda b: budget,
        scores_fn=lambda ref, b, h, keys: snapkv_scores(ref, b, h, keys, window, kernel),
    )
    assert mem.stats.updates >= 4 and mem.stats.evictions > 0
    assert policy.state_nbytes(mem.state) > 0
    rows = mem.state["rows"]
    assert rows.shape == (2, 2, window, mem.n_slots)  # the buffer follows the compaction
    assert mem.state["count"].tolist() == [window, window]


def test_snapkv_padding_rows_stay_out_of_the_window():
    """Sample 1 is due after its first chunk with fewer real rows than the window holds."""
    policy = SnapKV(budget=3, window=6, kernel=3, update_every=4)
    mem, _ = drive(
        policy,
        [(8, [0, 3]), (2, [0, 0]), (4, [0, 0])],
        n_groups=2,
        cap_fn=lambda b: 3,
        scores_fn=lambda ref, b, h, keys: snapkv_scores(ref, b, h, keys, 6, 3),
    )
    assert mem.state["count"].tolist() == [6, 6]


@pytest.mark.parametrize("n_groups", [1, 2])
def test_tova_matches_reference(n_groups):
    budget = 5
    policy = TOVA(budget=budget, update_every=8)
    mem, ref = drive(
        policy, CHUNKS, n_groups=n_groups, cap_fn=lambda b: budget, scores_fn=tova_scores, seed=1
    )
    assert mem.stats.evictions > 0 and mem.state["last"].shape == (2, 2, mem.n_slots)


def test_snapkv_pooling_by_hand():
    """One sample, one head, 8 keys: window 2 keeps keys 6, 7; keys 0..5 are pooled with kernel 3."""
    policy = SnapKV(budget=4, window=2, kernel=3, update_every=8)
    mem = LayerMemory(policy, 0)
    mem.append(1, 1, 8, CPU)
    attention = torch.zeros(1, 1, 8, 8)
    attention[0, 0, 6, :7] = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.0, 0.2, 0.1])
    attention[0, 0, 7, :8] = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.0, 0.2, 0.0, 0.5])
    attention[0, 0, 5, 0] = 1.0  # outside the observation window: ignored
    mem.observe(attention)
    # mean over queries 6, 7 of keys 0..5: [0, 0.2, 0, 0.3, 0, 0.2]; the edges average 2 values
    pooled = torch.tensor([0.1, 0.2 / 3, 0.5 / 3, 0.1, 0.5 / 3, 0.1])
    scores = policy.score(mem.state, view_of(mem))[0, 0]
    torch.testing.assert_close(scores[:6], pooled)
    assert torch.isinf(scores[6:]).all()
    mem.maybe_evict()
    assert mem.positions[0, 0][mem.valid[0, 0]].tolist() == [2, 4, 6, 7]  # window + 2 best pooled


def test_tova_uses_only_the_newest_real_query():
    policy = TOVA(budget=3, update_every=6)
    mem = LayerMemory(policy, 0)
    mem.append(2, 1, 6, CPU)
    row_valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    mem.mark_padding(row_valid)
    attention = torch.zeros(2, 1, 6, 6)
    attention[:, 0, 4] = torch.tensor([0.0, 0.0, 0.9, 0.1, 0.0, 0.0])  # older query: ignored
    attention[:, 0, 5] = torch.tensor([0.5, 0.0, 0.1, 0.3, 0.1, 0.0])
    mem.observe(attention, row_valid)
    torch.testing.assert_close(policy.score(mem.state, view_of(mem))[:, 0], attention[:, 0, 5])
    mem.maybe_evict()  # sample 1 has 4 real tokens: no cadence, but over the budget (first fill)
    assert kept_positions(mem) == [[[0, 3, 5]], [[2, 3, 5]]]  # 2 and 4 tie: the older wins


def test_snapkv_state_keeps_the_last_window_real_rows():
    policy = SnapKV(budget=2, window=3)
    state = policy.new_state(0)
    first = torch.rand(2, 2, 4, 5)
    policy.observe(state, first, torch.tensor([[False, True, True, True], [False, False, False, True]]))
    assert state["count"].tolist() == [3, 1]
    torch.testing.assert_close(state["rows"][0], first[0, :, 1:])
    torch.testing.assert_close(state["rows"][1], torch.cat([torch.zeros(2, 2, 5), first[1, :, 3:]], dim=1))
    later = torch.rand(2, 2, 3, 6)
    policy.observe(state, later, torch.tensor([[True, False, True], [True, True, False]]))
    assert state["count"].tolist() == [3, 3]
    grown = torch.nn.functional.pad(first, (0, 1))
    torch.testing.assert_close(
        state["rows"][0], torch.stack([grown[0, :, 3], later[0, :, 0], later[0, :, 2]], 1)
    )
    torch.testing.assert_close(
        state["rows"][1], torch.stack([grown[1, :, 3], later[1, :, 0], later[1, :, 1]], 1)
    )
    view = CacheView(0, torch.arange(6).expand(2, 2, 6), torch.ones(2, 2, 6, dtype=torch.bool))
    policy.kernel = 1
    expected = state["rows"].mean(-2).masked_fill(torch.arange(6) >= 3, float("inf"))
    torch.testing.assert_close(policy.score(state, view), expected)


def test_tova_state_skips_padding_rows_and_follows_compaction():
    policy = TOVA(budget=2)
    state = policy.new_state(0)
    attention = torch.rand(2, 3, 4, 5)
    row_valid = torch.tensor([[True, True, True, False], [False, False, False, False]])
    policy.observe(state, attention, row_valid)
    torch.testing.assert_close(state["last"][0], attention[0, :, 2])  # the newest *real* query
    assert not state["last"][1].any()  # no real query yet: no attention
    later = torch.rand(2, 3, 2, 7)
    policy.observe(state, later, torch.tensor([[False, False], [True, False]]))
    torch.testing.assert_close(state["last"][0], torch.nn.functional.pad(attention[0, :, 2], (0, 2)))
    torch.testing.assert_close(state["last"][1], later[1, :, 0])
    before = state["last"].clone()
    index = torch.tensor([[0, 3, 6], [1, 2, 0]])[:, None, :].expand(2, 3, 3)
    policy.on_select(state, index)
    torch.testing.assert_close(state["last"], before.gather(-1, index))


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"kernel": 4}, {"kernel": 0}])
def test_snapkv_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="SnapKV"):
        SnapKV(budget=4, **kwargs)


# compression_ratio ------------------------------------------------------------------------------------
RATIO_POLICIES = {
    "recency": lambda r: Recency(sink=2, update_every=8, compression_ratio=r),
    "h2o": lambda r: H2O(update_every=8, compression_ratio=r),
    "l2norm": lambda r: L2Norm(update_every=8, compression_ratio=r),
    "random": lambda r: RandomEviction(seed=1, update_every=8, compression_ratio=r),
    "snapkv": lambda r: SnapKV(window=2, kernel=3, update_every=8, compression_ratio=r),
    "tova": lambda r: TOVA(update_every=8, compression_ratio=r),
    "namm": lambda r: NAMM(NAMMConfig(update_every=8, n_fft=4, hop=2, compression_ratio=r)),
}


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("name", list(RATIO_POLICIES))
def test_compression_ratio_keeps_a_fraction_of_the_tokens_seen(name, ratio):
    policy = RATIO_POLICIES[name](ratio)
    mem = LayerMemory(policy, 0, n_groups=2)
    gen = torch.Generator().manual_seed(0)
    seen = np.zeros(3, dtype=int)
    for step, (n_new, pads) in enumerate(
        [(13, [0, 5, 13]), (3, [0, 0, 0]), (10, [0, 0, 0]), (21, [0, 0, 0])]
    ):
        mem.append(3, 2, n_new, CPU)
        row_valid = torch.arange(n_new)[None, :] >= torch.tensor(pads)[:, None]
        mem.mark_padding(row_valid)
        mask = mem.attention_mask(n_new).repeat_interleave(2, dim=1)
        mem.observe(
            torch.randn(mask.shape, generator=gen).masked_fill(~mask, float("-inf")).softmax(-1), row_valid
        )
        seen += row_valid.sum(-1).numpy()
        due = mem.due().numpy()
        before = mem.kept_tokens().numpy()
        keys = torch.randn(3, 2, mem.n_slots, 4, generator=gen)
        mem.maybe_evict(keys)
        after = mem.kept_tokens().numpy()
        for b in range(3):
            cap = max(1, round((1 - ratio) * int(seen[b])))  # Python's round, as documented
            expected = np.minimum(before[b], cap) if due[b] else before[b]
            assert after[b].tolist() == expected.tolist(), (step, b, int(seen[b]))
            if name == "h2o" and due[b]:  # the recent window is half of this sample's cap
                for h in range(2):
                    kept = set(mem.positions[b, h][mem.valid[b, h]].tolist())
                    newest = mem.tokens_seen - 1
                    assert set(range(newest - cap // 2 + 1, newest + 1)) <= kept
    assert mem.last_update.tolist() == seen.tolist()


def test_resolve_budget():
    positions = torch.zeros(2, 1, 3, dtype=torch.long)
    view = CacheView(1, positions, positions >= 0, seen=torch.tensor([13, 1]))
    assert resolve_budget([4, 9], None, view) == 9
    assert resolve_budget(None, None, view) is None
    assert resolve_budget(None, 0.5, view).tolist() == [6, 1]  # round(6.5) = 6, max(1, round(0.5))
    assert resolve_budget(None, 0.25, view).tolist() == [10, 1]
    with pytest.raises(ValueError, match="needs CacheView.seen"):
        resolve_budget(None, 0.5, CacheView(0, positions, positions >= 0))


@pytest.mark.parametrize("cls", [Recency, H2O, L2Norm, RandomEviction, SnapKV, TOVA])
def test_budget_and_ratio_validation(cls):
    with pytest.raises(ValueError, match="not both"):
        cls(budget=4, compression_ratio=0.5)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
            cls(compression_ratio=bad)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        cls(budget=0)


def test_namm_config_validation():
    with pytest.raises(ValueError, match="not both"):
        NAMMConfig(budget=4, compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        NAMMConfig(compression_ratio=1.0)
    with pytest.raises(ValueError, match="NAMMConfig.budget must be >= 1"):
        NAMMConfig(budget=0)


@pytest.mark.parametrize("make", [lambda: SnapKV(budget=5, window=4), lambda: H2O(budget=5, recent=2), TOVA])
def test_with_budget_and_with_compression_ratio_copy(make):
    policy = make()
    original = dict(vars(policy))
    by_ratio = policy.with_compression_ratio(0.6)
    assert type(by_ratio) is type(policy) and by_ratio is not policy
    assert by_ratio.budget is None and by_ratio.compression_ratio == 0.6
    assert vars(policy) == original  # the original is untouched
    by_budget = by_ratio.with_budget([3, 4])
    assert by_budget.budget == [3, 4] and by_budget.compression_ratio is None
    assert by_ratio.compression_ratio == 0.6
    others = {k: v for k, v in vars(policy).items() if k not in ("budget", "compression_ratio")}
    assert {k: v for k, v in vars(by_budget).items() if k in others} == others
    with pytest.raises(ValueError, match="compression_ratio must be"):
        policy.with_compression_ratio(1.0)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        policy.with_budget(0)


def test_random_eviction_copy_restarts_its_seed():
    def kept(policy):
        mem = LayerMemory(policy, 0)
        for _ in range(2):
            mem.append(1, 2, 16, CPU)
            mem.maybe_evict()
        return kept_positions(mem)

    used = RandomEviction(budget=3, seed=4, update_every=16)
    kept(used)
    assert kept(used.with_budget(5)) == kept(RandomEviction(budget=5, seed=4, update_every=16))
    by_ratio = used.with_compression_ratio(0.5)
    assert kept(by_ratio) == kept(RandomEviction(seed=4, update_every=16, compression_ratio=0.5))


def test_namm_with_budget_and_ratio(tmp_path):
    namm = NAMM.init_random(seed=0, config=NAMMConfig(update_every=8, budget=6))
    by_ratio = namm.with_compression_ratio(0.5)
    assert by_ratio.config.budget is None and by_ratio.compression_ratio == 0.5
    assert torch.equal(by_ratio.params, namm.params) and namm.budget == 6
    assert "compression_ratio=0.5" in repr(by_ratio)
    back = by_ratio.with_budget(4)
    assert back.budget == 4 and back.compression_ratio is None and torch.equal(back.params, namm.params)
    loaded = NAMM.from_pretrained(by_ratio.save_pretrained(tmp_path / "namm"))
    assert loaded.config == by_ratio.config
