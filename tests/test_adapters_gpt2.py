"""attach() on GPT-2-style models: a tiny GPT-2 LM and a Decision Transformer's full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DecisionTransformerConfig,
    DecisionTransformerModel,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
)

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import SUPPORTED_MODEL_TYPES, attach
from namm_transfer.policies import H2O, Recency


@pytest.fixture(scope="module")
def lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=61, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_gpt2_keep_all_namm_equals_bare_model(lm):
    prompt = ids(2, 40)
    mask = torch.ones_like(prompt)
    bare = lm.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    bare_logits = lm(prompt).logits
    for chunk in (None, 16):
        with attach(lm, NAMM(NAMMConfig(update_every=16)), prefill_chunk=chunk) as handle:
            out = lm.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
            assert torch.equal(out, bare)
            stats = handle.stats()
            assert stats["updates"] > 0 and stats["evictions"] == 0
            torch.testing.assert_close(lm(prompt).logits, bare_logits, atol=1e-5, rtol=1e-5)
    assert lm.config._attn_implementation == "sdpa"


@torch.no_grad()
@pytest.mark.parametrize(
    "policy", [Recency(budget=20, sink=2, update_every=40), H2O(budget=17, update_every=40)]
)
def test_gpt2_eviction_equals_physical_removal(lm, policy):
    """Absolute learned positions: a kept token's cached key does not depend on its slot, so the
    evicting cache must equal a full-cache run's keys/values gathered at the kept positions."""
    prompt, next_id = ids(2, 40, seed=1), torch.tensor([[5], [9]])
    with attach(lm, policy) as handle:
        cache = handle.new_cache()
        lm(prompt, past_key_values=cache, use_cache=True)
        kept = [cache.memory(i).positions.clone() for i in range(2)]
        ours = lm(next_id, past_key_values=cache, use_cache=True).logits
    assert kept[0].shape[-1] < 40
    full = DynamicCache(config=lm.config)
    lm(prompt, past_key_values=full, use_cache=True)
    reference = DynamicCache(config=lm.config)
    for i, layer in enumerate(full.layers):
        index = kept[i][..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        reference.update(layer.keys.gather(2, index), layer.values.gather(2, index), i)
    theirs = lm(
        next_id, past_key_values=reference, position_ids=torch.full((2, 1), 40),
        attention_mask=torch.ones(2, kept[0].shape[-1] + 1, dtype=torch.long), use_cache=True,
    ).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decision_transformer_full_forward_through_the_encoder_cache():
    torch.manual_seed(0)
    config = DecisionTransformerConfig(
        state_dim=4, act_dim=2, hidden_size=32, n_layer=2, n_head=2, max_ep_len=32,
        bos_token_id=None, eos_token_id=None,
    )
    dt = DecisionTransformerModel(config).eval()
    g = torch.Generator().manual_seed(0)
    batch = dict(
        states=torch.randn(2, 10, 4, generator=g), actions=torch.randn(2, 10, 2, generator=g),
        returns_to_go=torch.randn(2, 10, 1, generator=g), timesteps=torch.arange(10).expand(2, 10),
        attention_mask=torch.ones(2, 10, dtype=torch.long),
    )
    bare = dt(**batch).action_preds
    with attach(dt, NAMM(NAMMConfig(update_every=6))) as handle:
        torch.testing.assert_close(dt(**batch).action_preds, bare, atol=1e-5, rtol=1e-5)
        stats = handle.stats()
        assert stats["tokens_seen"] == 30 and stats["updates"] == 2 and stats["evictions"] == 0
    with pytest.raises(ValueError, match="generate"):
        attach(dt, NAMM(), prefill_chunk=16)
    assert dt._namm_attached is None and dt.config._attn_implementation == "sdpa"  # left untouched


def test_gpt2_with_cross_attention_is_refused():
    assert {"llama", "qwen2", "mistral", "gpt2", "decision_transformer"} <= set(SUPPORTED_MODEL_TYPES)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, add_cross_attention=True)
    cross = GPT2LMHeadModel(config)
    with pytest.raises(NotImplementedError, match="cross-attention"):
        attach(cross, NAMM())
