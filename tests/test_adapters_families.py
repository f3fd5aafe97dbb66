"""The family matrix: attach() on tiny random decoders of many transformers 5.23 families.

For each family: a keep-all NAMM reproduces the bare model; after evictions the next-step logits equal
a cache that physically holds only the kept tokens, sliding-window layers included; stored bytes match
the kept tokens; a left-padded batch equals each sample alone; a prompt shorter than the cadence ends
its prefill at the budget. The kinds that cannot work are refused with their reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _tiny_decoders import CONFIGS, VOCAB, WINDOW, build
from transformers import DynamicCache

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import DECODERS, UnsupportedModelError, attach, plan_attachment
from namm_transfer.policies import H2O, RandomEviction, Recency

FAMILIES = list(CONFIGS)
PROMPT = 30  # longer than the sliding windows (12)
# min_new_tokens: a random model may draw its EOS; the rows then stop at different lengths
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build(request.param)


def prompt(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_descriptor_family_is_in_the_matrix():
    """The README's tested families (the descriptors) are exactly what this matrix runs, plus the DT
    (tests/test_adapters_gpt2.py)."""
    assert {f.model_type for f in DECODERS} == set(FAMILIES) | {"decision_transformer"}
    assert len(FAMILIES) >= 12


def test_detection_finds_every_layer_without_warning(family_model):
    name, model = family_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tested family: no "untested" warning
        plan = plan_attachment(model)
    text = model.config
    assert plan.num_layers == text.num_hidden_layers
    assert [m.layer_idx for m in plan.attention_modules] == list(range(plan.num_layers))
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * plan.num_layers
    expected = [WINDOW if t == "sliding_attention" else None for t in layer_types]
    if getattr(text, "sliding_window", None) and getattr(text, "layer_types", None) is None:
        expected = [WINDOW] * plan.num_layers  # every layer slides (Mistral, Starcoder2)
    assert plan.sliding_windows == expected


@torch.no_grad()
def test_keep_all_namm_equals_bare_model(family_model):
    name, model = family_model
    ids = prompt(PROMPT)
    bare_tokens = model.generate(ids, **GREEDY)
    bare_logits = model(ids).logits
    for chunk in (None, 8):
        with attach(model, NAMM(NAMMConfig(update_every=8)), prefill_chunk=chunk) as handle:
            tokens = model.generate(ids, **GREEDY)
            stats = handle.stats()
            logits = model(ids).logits
        assert stats["updates"] > 0 and stats["evictions"] == 0
        assert torch.equal(tokens, bare_tokens)
        torch.testing.assert_close(logits, bare_logits, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation in ("sdpa", "eager")  # restored on detach


def _kept(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.memory.positions.clone(), layer.memory.valid.clone()) for layer in cache.layers]


def _masks_hooks(model, masks):
    """Forward pre-hooks giving each attention module its own 4-D additive mask."""
    plan = plan_attachment(model)
    hooks = []
    for module, mask in zip(plan.attention_modules, masks, strict=True):
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, a, kw, mask=mask: (a, {**kw, "attention_mask": mask}), with_kwargs=True
            )
        )
    return hooks


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@torch.no_grad()
def test_recency_eviction_equals_physically_removed_tokens(family_model):
    """Every head keeps the same positions (Recency), so a plain cache can hold exactly the kept tokens:
    gather them from a full-cache run and attend to all of them (each layer's own mask), the new token
    at its absolute position. Sliding layers have dropped what left their window before the policy
    chose inside it."""
    name, model = family_model
    ids, next_id = prompt(PROMPT, seed=1), torch.tensor([[5]])
    with attach(model, Recency(budget=8, sink=2, update_every=64)) as handle:
        cache = handle.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        kept = _kept(cache)
        ours = model(next_id, past_key_values=cache, use_cache=True).logits
        windows = handle.sliding_windows
    full = DynamicCache()
    bare_next = model(torch.cat([ids, next_id], 1), past_key_values=full, use_cache=True).logits[:, -1:]
    assert (ours - bare_next).abs().max() > 1e-4, "the evictions should change the next-step logits"
    full = DynamicCache()
    model(ids, past_key_values=full, use_cache=True)
    physical, masks = DynamicCache(), []
    for layer_idx, ((positions, valid), layer) in enumerate(zip(kept, full.layers, strict=True)):
        assert bool(valid.all()) and positions.shape[-1] == 8  # the budget, inside the window too
        if windows[layer_idx] is not None:
            assert int(positions.min()) > PROMPT - windows[layer_idx]
        index = positions[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        physical.update(layer.keys.gather(2, index), layer.values.gather(2, index), layer_idx)
        masks.append(torch.zeros(1, 1, 1, 9))  # the 8 kept tokens and the new one
    hooks = _masks_hooks(model, masks)
    try:
        theirs = model(next_id, past_key_values=physical, position_ids=torch.tensor([[PROMPT]]),
                       use_cache=True).logits
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_head_eviction_equals_masked_full_cache_and_bytes_match(family_model):
    """Random per-head choices: each head keeps different tokens (and sliding layers expire different
    numbers per head). Storage holds the largest kept count; the validity masks must equal a full cache
    attending only to each head's kept tokens."""
    name, model = family_model
    plan = plan_attachment(model)
    ids, next_id = prompt(PROMPT, seed=2), torch.tensor([[7]])
    with attach(model, RandomEviction(budget=9, seed=3, update_every=64)) as handle:
        cache = handle.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        kept = _kept(cache)
        stats = handle.stats()
        ours = model(next_id, past_key_values=cache, use_cache=True).logits
    text = model.config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_attention_heads // plan.n_groups
    widths = [int(valid.sum(-1).max()) for _, valid in kept]
    for (positions, _), width in zip(kept, widths, strict=True):
        assert positions.shape[-1] == width <= 9  # physically shrunk to the largest kept count
    assert stats["stored_kv_bytes"] == sum(2 * kv_heads * w * head_dim * 4 for w in widths)
    assert stats["kept_tokens_per_layer"] == [valid.sum(-1).tolist() for _, valid in kept]
    full = DynamicCache()
    model(ids, past_key_values=full, use_cache=True)
    masks = []
    for positions, valid in kept:
        allowed = torch.zeros(1, positions.shape[1], PROMPT + 1, dtype=torch.bool)
        allowed.scatter_(-1, positions.masked_fill(~valid, PROMPT), valid)
        allowed[..., PROMPT] = True
        masks.append(_additive(allowed.repeat_interleave(plan.n_groups, dim=1)[:, :, None, :]))
    hooks = _masks_hooks(model, masks)
    try:
        theirs = model(next_id, past_key_values=full, position_ids=torch.tensor([[PROMPT]]),
                       use_cache=True).logits
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_each_sample_alone(family_model):
    name, model = family_model
    long_ids, short_ids = prompt(26, seed=4), prompt(17, seed=5)
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 9, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :9] = 0
    policy = H2O(budget=10, update_every=8)
    with attach(model, policy) as handle:
        batched = model.generate(batch, attention_mask=mask, **GREEDY)
        batch_kept = handle.stats()["kept_tokens_per_layer"]
        assert handle.stats()["evictions"] > 0
        for row, ids in enumerate((long_ids, short_ids)):
            alone = model.generate(ids, **GREEDY)
            assert torch.equal(batched[row, -8:], alone[0, -8:])
            alone_kept = handle.stats()["kept_tokens_per_layer"]
            assert [layer[row] for layer in batch_kept] == [layer[0] for layer in alone_kept]


@torch.no_grad()
def test_short_prompt_is_brought_to_its_budget_at_the_end_of_prefill(family_model):
    """Budget guarantee: a 20-token prompt under a 64-token cadence ends its prefill at the cap (6, or
    half of it with a compression ratio), and decoding never exceeds cap + update_every - 1."""
    name, model = family_model
    ids = prompt(20, seed=6)
    kv_heads = None
    for policy in (Recency(budget=6, update_every=64), Recency(compression_ratio=0.5, update_every=4)):
        with attach(model, policy) as handle:
            cache = handle.new_cache()
            model(ids, past_key_values=cache, use_cache=True)
            kept = handle.stats()["kept_tokens_per_layer"]
            kv_heads = len(kept[0][0])
            cap = 6 if policy.budget else 10
            assert kept == [[[cap] * kv_heads]] * len(kept)
            for _ in range(12):
                model(torch.tensor([[9]]), past_key_values=cache, use_cache=True)
                held = max(max(row) for layer in handle.stats()["kept_tokens_per_layer"] for row in layer)
                cap = 6 if policy.budget else round(0.5 * cache.get_seq_length())
                assert held <= cap + policy.update_every - 1


_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
REFUSED_CASES = {
    "t5": ("seq2seq", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4),
           "encoder-decoder"),
    "bart": ("seq2seq", dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                             decoder_ffn_dim=48), "encoder-decoder"),
    "mamba": ("causal", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4),
              "state-space or hybrid layers"),
    "jamba": ("causal", dict(_SMALL, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                             num_experts=2), "state-space or hybrid layers"),
    "falcon_h1": ("causal", dict(_SMALL, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4,
                                 mamba_n_groups=1), "state-space or hybrid layers"),
    "lfm2": ("causal", dict(_SMALL, full_attn_idxs=[1]), "state-space or hybrid layers"),
    "falcon": ("causal", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
               "attention outside the AttentionInterface"),
    "gpt_neo": ("causal", dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                               attention_types=[[["global", "local"], 1]]),
                "attention outside the AttentionInterface"),
    "bloom": ("causal", dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
              "attention outside the AttentionInterface"),
    "llama4_text": ("causal", dict(_SMALL, head_dim=8, num_local_experts=2, intermediate_size_mlp=48,
                                   attention_chunk_size=8), "chunked attention"),
    "gpt_oss": ("causal", dict(_SMALL, head_dim=8, num_local_experts=2, sliding_window=8),
                "attention sinks or position bias"),
    "gpt2": ("causal", dict(n_layer=1, n_head=2, n_embd=16, vocab_size=64, add_cross_attention=True),
             "cross-attention"),
}


@pytest.mark.parametrize("model_type", list(REFUSED_CASES))
def test_unsupported_kinds_are_refused_with_their_reason(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from namm_transfer.adapters.families import refusal

    kind_of_model, kwargs, kind = REFUSED_CASES[model_type]
    auto = AutoModelForSeq2SeqLM if kind_of_model == "seq2seq" else AutoModelForCausalLM
    model = auto.from_config(AutoConfig.for_model(model_type, **kwargs))
    with pytest.raises(UnsupportedModelError) as info:
        attach(model, Recency(budget=4))
    message = str(info.value)
    assert f"model_type={model_type!r}): {kind} (" in message
    assert refusal(kind).reason in message
    assert isinstance(info.value, NotImplementedError)
    assert getattr(model, "_namm_attached", None) is None  # nothing was changed
    assert model.config._attn_implementation != "namm_attention"


def test_unknown_multimodal_wrapper_is_refused():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, image_size=16, patch_size=8)
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    model = Gemma3ForConditionalGeneration(
        Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_index=260)
    )
    with pytest.raises(UnsupportedModelError, match="wrapper without a descriptor.*llava_next_video"):
        attach(model, Recency(budget=4))


@torch.no_grad()
def test_an_untested_family_that_passes_detection_attaches_with_a_warning():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("helium", **_SMALL, head_dim=8)).eval()
    ids = prompt(20)
    bare = model.generate(ids, **GREEDY)
    with pytest.warns(UserWarning, match="'helium' is not among namm-transfer's tested families"):
        handle = attach(model, NAMM(NAMMConfig(update_every=8)))
    with handle:
        assert torch.equal(model.generate(ids, **GREEDY), bare)


@torch.no_grad()
def test_a_cache_layer_updated_twice_without_our_attention_is_an_error():
    """The runtime guard behind detection: a layer whose attention bypassed the registered function
    (so it never evicted or masked) must not silently keep going."""
    from namm_transfer.adapters import EvictingCache

    cache = EvictingCache(Recency(budget=2), num_layers=1)
    kv = torch.zeros(1, 1, 3, 4)
    cache.update(kv, kv, 0)
    with pytest.raises(RuntimeError, match="outside transformers' AttentionInterface"):
        cache.update(kv, kv, 0)
