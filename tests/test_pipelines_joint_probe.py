"""The joint ranking: one ranking for every layer-head, one-shot from a shared prefill and progressive
after every chunk; with room for everything it answers like the full cache."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import attach
from namm_transfer.pipelines.joint_probe import (
    JointProbe,
    ScoredKeep,
    cache_joint_scores,
    progressive_joint_answer,
)
from namm_transfer.pipelines.text.evolve_shared import cache_features
from namm_transfer.pipelines.text.shared_prefill import prefill_context
from namm_transfer.policies import FullCache

LAYERS, KV_HEADS, BINS, AGE = 2, 2, 17, 8


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


class _Tokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


@dataclass
class _Example:
    prompt_ids: list[int]


def _probe(seed: int = 0) -> JointProbe:
    dim = LAYERS * KV_HEADS * BINS + AGE
    gen = torch.Generator().manual_seed(seed)
    return JointProbe(torch.randn(dim, generator=gen), 0.1, torch.zeros(dim), torch.ones(dim), AGE)


def _namm() -> NAMM:
    return NAMM.init_random(seed=3, sigma=0.4, config=NAMMConfig(update_every=16))


def _prompt(n: int = 50) -> list[int]:
    return torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(1)).tolist()


def test_prefill_joint_scores_rank_sinks_first_then_the_probe_in_every_layer_head(model):
    namm, probe, ids = _namm(), _probe(), _prompt()
    with attach(model, namm) as handle:
        prefill = prefill_context(model, handle, _Example(ids), None, [namm], context_len=40)
        scores = cache_joint_scores(prefill.cache, namm, probe, 0)
        feats, _, _ = cache_features(prefill.cache, namm, 0)
    assert scores.shape == (LAYERS, KV_HEADS, 40)
    assert torch.equal(scores, scores[:1, :1].expand_as(scores))  # one ranking everywhere
    expected = probe.scores(feats).sigmoid()
    expected[:4] += 2.0  # the sinks
    assert torch.allclose(scores[0, 0], expected)


def test_progressive_joint_holds_the_budget_with_the_same_tokens_everywhere(model):
    namm, probe, ids = _namm(), _probe(), _prompt()
    with attach(model, namm) as handle:
        text, kept = progressive_joint_answer(model, _Tokenizer(), handle, ids, namm, probe, budget=20,
                                              chunk=16, max_new_tokens=3)
    assert len(text.split()) == 3
    # after the last compression: 20 kept of 49; then the last prompt token and 2 answer tokens fed
    assert kept == pytest.approx((20 + 3) / 52)


def test_progressive_joint_with_room_for_everything_answers_like_the_full_cache(model):
    namm, probe, ids = _namm(), _probe(), _prompt()
    with attach(model, namm) as handle:
        text, kept = progressive_joint_answer(model, _Tokenizer(), handle, ids, namm, probe, budget=1000,
                                              chunk=16, max_new_tokens=4)
    with attach(model, FullCache()):
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=mask, max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert kept == 1.0
    assert text == _Tokenizer().decode(out[0, len(ids):])


def test_joint_scores_refuse_layer_heads_holding_different_tokens(model):
    namm, ids = _namm(), _prompt()
    with attach(model, namm) as handle:
        prefill = prefill_context(model, handle, _Example(ids), None, [namm], context_len=40)
        per_head = ScoredKeep(namm, 10)
        per_head.scores = torch.rand(LAYERS, KV_HEADS, 40, generator=torch.Generator().manual_seed(0))
        cache = prefill.fork(0, per_head)  # each layer-head keeps its own 10 tokens
    with pytest.raises(ValueError, match="same tokens"):
        cache_joint_scores(cache, namm, _probe())
    with pytest.raises(RuntimeError, match="scores are set"):
        ScoredKeep(namm, 4).keep(None, None)


def test_pooled_vector_is_the_same_size_for_any_model_and_ignores_the_layer_head_order():
    from namm_transfer.pipelines.joint_probe import joint_vector

    gen = torch.Generator().manual_seed(0)
    for rows in (4, 90):
        feats = torch.randn(rows, 12, AGE + BINS, generator=gen)
        feats[:, :, :AGE] = feats[0, :, :AGE]  # the age is the same in every row
        x = joint_vector(feats, AGE, pooled=True)
        assert x.shape == (12, 3 * BINS + AGE)
        spectral = feats[..., AGE:]
        assert torch.allclose(x[:, :BINS], spectral.mean(0)) and torch.allclose(x[:, 2 * BINS : 3 * BINS],
                                                                                spectral.amax(0))
        shuffled = feats[torch.randperm(rows, generator=gen)]
        assert torch.allclose(joint_vector(shuffled, AGE, pooled=True), x, atol=1e-6)
    side_by_side = joint_vector(feats, AGE)
    assert side_by_side.shape == (12, 90 * BINS + AGE)
    assert torch.equal(side_by_side[:, :BINS], feats[0, :, AGE:])
