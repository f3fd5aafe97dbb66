"""attach() on a tiny random Llama: equivalence with the bare model and with physical removal."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import EvictingCache, attach
from namm_transfer.capacity import max_spare
from namm_transfer.policies import L2Norm, MemoryPolicy, RandomEviction, Recency
from namm_transfer.selection import newest_slot


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def evicting_namm(model, update_every: int = 16, seed: int = 3) -> NAMM:
    """An untrained NAMM noisy enough to evict a sizeable, head-dependent share of tokens, with
    normalisation statistics collected on a keep-everything calibration run (the reference recipe)."""
    namm = NAMM.init_random(seed=seed, sigma=0.4, config=NAMMConfig(update_every=update_every))
    with namm.collecting_statistics(), attach(model, namm):
        model(prompt(96, seed=99))
    return namm


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_keep_all_namm_equals_bare_model(model):
    ids = prompt(70)
    bare_tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
    bare_logits = model(ids).logits
    for chunk in (None, 16):
        with attach(model, NAMM(NAMMConfig(update_every=16)), prefill_chunk=chunk) as handle:
            tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
            assert handle.stats()["evictions"] == 0
            assert handle.stats()["updates"] > 0  # the NAMM did run, and kept everything
            logits = model(ids).logits
        assert torch.equal(tokens, bare_tokens)
        torch.testing.assert_close(logits, bare_logits, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # detach restored the default


@torch.no_grad()
def _full_cache_kv(model, ids):
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
@pytest.mark.parametrize(
    "policy", [RandomEviction(budget=23, seed=1, update_every=64), L2Norm(budget=30, update_every=64)]
)
def test_eviction_equals_physical_removal(model, policy):
    """Equal kept counts per head (a budget): rebuild a DynamicCache holding only the kept tokens of a
    full-cache run, feed the next token at its explicit position, compare logits. The prompt is one
    forward so the eviction (at its end) cannot change the prompt's own keys and values."""
    ids, next_id = prompt(64, seed=1), torch.tensor([[5]])
    handle = attach(model, policy)
    try:
        cache = handle.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        kept_positions = [cache.memory(i).positions.clone() for i in range(len(cache.layers))]
        assert all(bool(cache.memory(i).valid.all()) for i in range(len(cache.layers)))
        assert kept_positions[0].shape[-1] < 64
        ours = model(next_id, past_key_values=cache, use_cache=True).logits
    finally:
        handle.detach()
    # heads really keep different tokens with a random policy
    if isinstance(policy, RandomEviction):
        assert not torch.equal(kept_positions[0][0, 0], kept_positions[0][0, 1])
    reference = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(_full_cache_kv(model, ids)):
        index = kept_positions[layer_idx][..., None].expand(-1, -1, -1, keys.shape[-1])
        reference.update(keys.gather(2, index), values.gather(2, index), layer_idx)
    n_kept = kept_positions[0].shape[-1]
    theirs = model(
        next_id,
        past_key_values=reference,
        position_ids=torch.tensor([[64]]),
        attention_mask=torch.ones(1, n_kept + 1, dtype=torch.long),
        use_cache=True,
    ).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("kv_layout", ["packed", "padded"])
def test_per_head_variable_lengths_equal_masked_full_cache(model, kv_layout):
    """A NAMM keeps different numbers of tokens per head; the attention sees a view as wide as the
    largest count, and the per-head validity mask must equal attending only to each head's kept tokens
    of a full-cache run. Padded storage holds that view; packed storage only the kept rows (+ their
    int32 slot indices) and the token added since."""
    ids, next_id = prompt(64, seed=2), torch.tensor([[7]])
    with attach(model, evicting_namm(model, update_every=64), kv_layout=kv_layout) as handle:
        cache = handle.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        ours = model(next_id, past_key_values=cache, use_cache=True).logits
        memories = [cache.memory(i) for i in range(len(cache.layers))]
        counts = torch.stack([m.kept_tokens() for m in memories])  # [L, B, H]
        assert counts.unique().numel() > 1, "expected head-dependent kept counts"
        for i, layer in enumerate(cache.layers):  # physically shrunk to the largest kept count (+1 new token)
            assert layer.keys.shape[2] == int(counts[i].max()) == layer.stored_slots()
            padded = 2 * layer.keys.numel() * 4
            if kv_layout == "padded":
                assert layer.stored_bytes() == padded
            elif counts[i].unique().numel() > 1:
                packed_rows = int(memories[i].valid.sum()) - counts.shape[2]  # all but the new token
                assert layer.stored_bytes() == layer.kept_bytes() + 4 * packed_rows
        kept = [(m.positions, m.valid) for m in memories]
    # reference: a full cache + 4-D per-head mask of the kept positions (positions < 64) plus the new token
    full = DynamicCache(config=model.config)
    for layer_idx, (keys, values) in enumerate(_full_cache_kv(model, ids)):
        full.update(keys, values, layer_idx)
    n_groups = model.config.num_attention_heads // model.config.num_key_value_heads
    outputs = []
    for layer_idx in range(len(kept)):
        positions, valid = kept[layer_idx]
        mask = torch.zeros(1, positions.shape[1], 65, dtype=torch.bool)
        mask.scatter_(-1, positions.masked_fill(~valid, 64), valid)
        mask[..., 64] = True
        outputs.append(mask.repeat_interleave(n_groups, dim=1)[:, :, None, :])
    # one mask per layer: run layer by layer through a hook that swaps the mask
    masks = iter(outputs)
    hooks = [
        attn.register_forward_pre_hook(
            lambda m, a, kw: (a, {**kw, "attention_mask": next(masks)}), with_kwargs=True
        )
        for attn in (layer.self_attn for layer in model.model.layers)
    ]
    try:
        theirs = model(
            next_id, past_key_values=full, position_ids=torch.tensor([[64]]), use_cache=True
        ).logits
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_each_sample_alone(model):
    long_ids, short_ids = prompt(53, seed=4), prompt(37, seed=5)
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 16, dtype=torch.long), short_ids], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :16] = 0
    with attach(model, evicting_namm(model, update_every=8)) as handle:
        batched = model.generate(batch, attention_mask=mask, max_new_tokens=20, do_sample=False)
        batch_kept = handle.stats()["kept_tokens_per_layer"]
        assert handle.stats()["evictions"] > 0
        alone = []
        for ids in (long_ids, short_ids):
            alone.append(model.generate(ids, max_new_tokens=20, do_sample=False)[0, -20:])
            alone_kept = handle.stats()["kept_tokens_per_layer"]
            row = 0 if ids is long_ids else 1
            assert [layer[row] for layer in batch_kept] == [layer[0] for layer in alone_kept]
    assert torch.equal(batched[0, -20:], alone[0])
    assert torch.equal(batched[1, -20:], alone[1])


@torch.no_grad()
def test_recency_budget_and_stats(model):
    ids = prompt(70)
    with attach(model, Recency(budget=20, sink=4, update_every=16), prefill_chunk=16) as handle:
        model.generate(ids, max_new_tokens=9, do_sample=False)
        stats = handle.stats()
        cache = handle.cache
    # 79 tokens seen; last eviction at 64 kept 20, then 15 more arrived
    assert stats["tokens_seen"] == 79 - 1  # the last generated token is never fed back
    for layer_idx, layer in enumerate(stats["kept_tokens_per_layer"]):
        assert layer == [[20 + 14, 20 + 14]]
        positions = cache.memory(layer_idx).positions[0, 0]
        assert positions[:4].tolist() == [0, 1, 2, 3]  # sink tokens survive
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    per_token = 2 * model.config.num_key_value_heads * head_dim * 4
    assert stats["stored_kv_bytes"] == 2 * 34 * per_token
    assert stats["full_kv_bytes"] == 2 * 78 * per_token
    assert stats["kept_kv_bytes"] == stats["stored_kv_bytes"]  # every head keeps the same count
    assert stats["stored_to_kept"] == 1.0
    assert isinstance(cache, EvictingCache)


class _HeadZeroKeepsHalf(MemoryPolicy):
    """KV head 0 keeps its newer half, the other heads keep everything: unequal head lengths."""

    def keep(self, state, view):
        keep = view.valid.clone()
        half = view.valid.shape[-1] // 2
        keep[:, 0, :half] = False
        return keep | newest_slot(view.positions, view.valid)


@torch.no_grad()
def test_stats_kept_bytes_count_only_kept_tokens(model):
    """Heads of unequal length are stored padded to the longest: stats report both and their ratio."""
    with attach(model, _HeadZeroKeepsHalf(update_every=32), prefill_chunk=32) as handle:
        model(prompt(64), use_cache=True)
        stats = handle.stats()
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    per_head_token = 2 * head_dim * 4
    kept = sum(sum(head) for layer in stats["kept_tokens_per_layer"] for head in layer)
    assert stats["kept_kv_bytes"] == kept * per_head_token
    assert stats["kept_kv_bytes"] < stats["stored_kv_bytes"]
    assert stats["stored_to_kept"] == pytest.approx(stats["stored_kv_bytes"] / stats["kept_kv_bytes"])


@torch.no_grad()
def test_non_empty_foreign_cache_is_rejected(model):
    ids = prompt(10)
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    with attach(model, NAMM()), pytest.raises(ValueError, match="EvictingCache"):
        model(ids, past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_bookkeeping_holds_one_stft_window_of_rows(model):
    ids = prompt(200, seed=6)
    with attach(model, evicting_namm(model, update_every=64), prefill_chunk=48) as handle:
        model.generate(ids, max_new_tokens=5, do_sample=False)
        stats = handle.stats()
        memories = [handle.cache.memory(i) for i in range(len(handle.cache.layers))]
    assert stats["max_rows_buffered"] == 32  # n_fft rows per layer, whatever the chunk or update cadence
    stored = [m.n_slots for m in memories]
    expected = sum(m.bookkeeping_nbytes() for m in memories)
    assert stats["bookkeeping_bytes"] == expected
    # window (32 rows) + spectrum (17 bins) per stored slot (and their spare room while decoding),
    # float32, plus the slot tables
    tables = sum(2 * s * 9 for s in stored)
    per_slot = 2 * 1 * (32 + 17) * 4
    spare = sum(per_slot * (s + max_spare(s)) for s in stored)
    assert sum(per_slot * s for s in stored) <= expected - tables <= spare


@torch.no_grad()
def test_forward_without_cache_is_plain_causal_attention(model):
    ids = torch.cat([prompt(20, seed=8), prompt(20, seed=9)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    bare = model(ids, attention_mask=mask, use_cache=False).logits
    with attach(model, NAMM()) as handle:
        ours = model(ids, attention_mask=mask, use_cache=False).logits
        assert handle.cache is None
    torch.testing.assert_close(ours[0], bare[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1, 5:], bare[1, 5:], atol=1e-5, rtol=1e-5)  # real tokens


def test_attaching_twice_is_refused_until_detached(model):
    handle = attach(model, NAMM())
    try:
        with pytest.raises(RuntimeError, match="already attached"):
            attach(model, Recency(budget=4))
    finally:
        handle.detach()
    attach(model, Recency(budget=4)).detach()  # fine once detached


@torch.no_grad()
def test_generate_continues_a_cache_with_new_tokens_and_a_full_mask(model):
    """Multi-turn: the second generate() gets only the new tokens and a 2-D mask over every token seen."""
    ids, more = prompt(50, seed=10), prompt(7, seed=11)
    full_mask = torch.ones(1, 50 + 5 + 7, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
    bare = model.generate(
        more, attention_mask=full_mask, past_key_values=cache, max_new_tokens=5, do_sample=False
    )
    for policy in (NAMM(NAMMConfig(update_every=16)), Recency(budget=10, update_every=16)):
        with attach(model, policy) as handle:
            ours_cache = handle.new_cache()
            model.generate(ids, past_key_values=ours_cache, max_new_tokens=5, do_sample=False)
            ours = model.generate(
                more, attention_mask=full_mask, past_key_values=ours_cache, max_new_tokens=5, do_sample=False
            )
            stats = handle.stats()
        assert stats["tokens_seen"] == 50 + 4 + 7 + 4
        if isinstance(policy, NAMM):
            assert torch.equal(ours, bare)
        else:  # evicted down to the budget at 64 tokens, then one more token arrived
            assert stats["kept_tokens_per_layer"] == [[[11, 11]], [[11, 11]]]
            assert ours.shape == bare.shape


@torch.no_grad()
def test_namm_rows_share_one_buffer_across_layers(model):
    """A NAMM keeps no reference to the attention rows, so every layer writes them into one shared
    scratch buffer; the evicting NAMM's decisions are those of a run with fresh rows per layer."""
    namm, ids = evicting_namm(model), prompt(64, seed=7)
    kept = {}
    for transient in (True, False):
        type(namm).rows_transient = transient
        try:
            with attach(model, namm, prefill_chunk=16) as handle:
                model(ids, use_cache=True)
                kept[transient] = [handle.cache.memory(i).positions.clone() for i in range(2)]
                buffers = {id(layer._rows) for layer in handle.cache.layers}
                used = handle.cache.layers[0]._rows.memory is not None
        finally:
            type(namm).rows_transient = True
        assert len(buffers) == 1 and used == transient
    assert all(torch.equal(a, b) for a, b in zip(kept[True], kept[False], strict=True))
