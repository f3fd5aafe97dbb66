"""The packed KV layout: what an eviction kept is stored without per-head padding, and the model sees
exactly what the padded layout gives it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import attach
from namm_transfer.adapters.cache import PackedSlots


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, head_dim=32,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def threshold_namm(model) -> NAMM:
    """An untrained NAMM in threshold mode whose heads keep clearly different numbers of tokens."""
    namm = NAMM.init_random(seed=3, sigma=0.4, config=NAMMConfig(update_every=16))
    with namm.collecting_statistics(), attach(model, namm):
        model(torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(99)))
    return namm


def test_pack_unpack_round_trip_with_tail():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 4, generator=gen), torch.randn(2, 3, 5, 6, generator=gen)
    valid = torch.rand(2, 3, 5, generator=gen) > 0.4
    packed = PackedSlots.pack(keys, values, valid)
    assert packed.keys.shape == (int(valid.sum()), 4) and packed.rows.dtype == torch.int32
    tail = torch.randn(2, 3, 2, 4, generator=gen)
    view = packed.unpack(packed.keys, (2, 3), tail)
    assert view.shape == (2, 3, 7, 4)
    torch.testing.assert_close(view[:, :, :5][valid], keys[valid], rtol=0, atol=0)
    assert bool((view[:, :, :5][~valid] == 0).all())  # padding is zeros (masked, never NaN)
    torch.testing.assert_close(view[:, :, 5:], tail, rtol=0, atol=0)
    unpacked_values = packed.unpack(packed.values, (2, 3), None)
    torch.testing.assert_close(unpacked_values[valid], values[valid], rtol=0, atol=0)


@pytest.mark.parametrize("with_tail", [False, True])
def test_unpack_by_segments_equals_the_indexed_copy(with_tail):
    """Valid slots first in each (sample, head), as an eviction leaves them: unpacking copies one slice
    per pair, with the same result as the indexed copy of every row."""
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 6, 4, generator=gen), torch.randn(2, 3, 6, 4, generator=gen)
    counts = torch.tensor([[6, 0, 2], [3, 5, 1]])
    valid = torch.arange(6) < counts[..., None]
    packed = PackedSlots.pack(keys, values, valid)
    assert packed.segments == (6, 0, 2, 3, 5, 1)
    tail = torch.randn(2, 3, 2, 4, generator=gen) if with_tail else None
    indexed = PackedSlots(packed.keys, packed.values, packed.rows, packed.width)  # no segments
    for stored in (packed.keys, packed.values):
        torch.testing.assert_close(packed.unpack(stored, (2, 3), tail), indexed.unpack(stored, (2, 3), tail),
                                   rtol=0, atol=0)
    holes = valid.clone()
    holes[0, 0, 2] = False  # a hole before a valid slot: the indexed copy
    assert PackedSlots.pack(keys, values, holes).segments is None


@torch.no_grad()
def test_packed_equals_padded_through_evictions_and_generation(model):
    """Left-padded batch, chunked prefill, several evictions and greedy decoding: same tokens, same
    logits, same slot tables; the packed cache stores the kept rows (+ a 4-byte index each)."""
    namm = threshold_namm(model)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 120), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: invalid slots besides the evicted ones
    results = {}
    for layout in ("padded", "packed"):
        with attach(model, namm, prefill_chunk=32, kv_layout=layout) as handle:
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                output_scores=True, return_dict_in_generate=True,
            )
            stats = handle.stats()
            cache = handle.cache
            valid = [layer.memory.valid.clone() for layer in cache.layers]
            views = [layer.keys[layer.memory.valid] for layer in cache.layers]
        results[layout] = out, stats, valid, views
    out_a, stats_a, valid_a, views_a = results["padded"]
    out_b, stats_b, valid_b, views_b = results["packed"]
    assert stats_a["evictions"] > 0 and stats_a["evictions"] == stats_b["evictions"]
    assert torch.equal(out_a.sequences, out_b.sequences)
    for a, b in zip(out_a.scores, out_b.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b, ka, kb in zip(valid_a, valid_b, views_a, views_b, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(ka, kb, rtol=0, atol=0)
    assert stats_a["kept_kv_bytes"] == stats_b["kept_kv_bytes"]
    assert stats_a["stored_to_kept"] > 1.05  # the heads differ: padding is real here
    assert stats_b["stored_kv_bytes"] < stats_a["stored_kv_bytes"]
    # packed: kept bytes + one int32 index per packed row, nothing else
    slot = 2 * 32 * 4
    index_bytes = stats_b["stored_kv_bytes"] - stats_b["kept_kv_bytes"]
    assert 0 <= index_bytes and index_bytes % 4 == 0 and index_bytes < stats_b["kept_kv_bytes"] * 4 / slot + 1


def test_unknown_layout_is_refused(model):
    with pytest.raises(ValueError, match="kv_layout must be one of"):
        attach(model, NAMM(NAMMConfig()), kv_layout="ragged")


@torch.no_grad()
def test_decoding_appends_in_place_into_bounded_spare_room(model):
    """A decoding step writes its token into the dense storage's spare slots (no copy of the cache) and
    the model sees exactly the stored tokens: the greedy continuation and the keys equal a plain
    transformers cache's; the spare room stays within max(MIN_SPARE, an eighth of the slots)."""
    from transformers import DynamicCache

    from namm_transfer import FullCache
    from namm_transfer.capacity import max_spare

    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(8))
    plain = DynamicCache(config=model.config)
    expected = model.generate(ids, past_key_values=plain, max_new_tokens=12, do_sample=False)
    with attach(model, FullCache()) as handle:
        out = model(ids, use_cache=True)
        layer = handle.cache.layers[0]
        token = out.logits[:, -1:].argmax(-1)
        model(token, past_key_values=out.past_key_values, use_cache=True)
        buffer = layer._dense[0]
        assert buffer.shape[-2] > layer.stored_slots()  # room was taken when the cache started growing
        model(token, past_key_values=out.past_key_values, use_cache=True)
        assert layer._dense[0] is buffer and layer.stored_slots() == 42  # appended in place
        stats = handle.stats()
        assert stats["stored_kv_bytes"] == stats["kept_kv_bytes"]
        spare_slots = max_spare(42)
        assert 0 < stats["spare_kv_bytes"] <= 8 * spare_slots * layer.slot_bytes()  # layers x samples x heads
    with attach(model, FullCache()) as handle:
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, expected)
        for mine, theirs in zip(handle.cache.layers, plain.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys[..., : mine.keys.shape[-2], :], rtol=0, atol=0)


@pytest.mark.parametrize(("holes", "packs"), [(1, False), (3, True)])
def test_auto_layout_packs_only_past_a_tenth_of_padding(holes, packs):
    """``"auto"`` stores an eviction's survivors padded while the padding is at most AUTO_PACK_PADDING of
    the kept slots (no per-forward rebuild) and packed beyond it; ``"packed"`` always packs, ``"padded"``
    never; the view the attention reads is the same in all three."""
    from namm_transfer import FullCache
    from namm_transfer.adapters.cache import AUTO_PACK_PADDING, EvictingLayer
    from namm_transfer.memory import LayerMemory

    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 10, 4, generator=gen), torch.randn(1, 2, 10, 4, generator=gen)
    valid = torch.ones(1, 2, 10, dtype=torch.bool)
    valid[0, 1, 10 - holes :] = False  # head 1 kept fewer: `holes` padding slots over 20 - holes kept
    assert (valid.numel() > (1 + AUTO_PACK_PADDING) * int(valid.sum())) == packs
    views = {}
    for layout in ("auto", "packed", "padded"):
        layer = EvictingLayer(LayerMemory(FullCache(), 0), kv_layout=layout)
        layer.memory.valid = valid
        layer._store(keys, values)
        assert (layer._packed is not None) == (layout == "packed" or (layout == "auto" and packs))
        views[layout] = layer.keys
    for view in views.values():
        torch.testing.assert_close(view[valid], keys[valid], rtol=0, atol=0)
