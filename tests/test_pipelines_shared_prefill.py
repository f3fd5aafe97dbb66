"""The shared-prefill engine equals running each policy on its own, and the warm start learns."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import _tiny_decoders
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import attach
from namm_transfer.pipelines.text import evolve_shared
from namm_transfer.pipelines.text.evolve_shared import (
    JointGains,
    PoolEntry,
    calibrate_bias,
    calibrate_joint_bias,
    entry_features,
    evidence_target,
    joint_inputs_of,
    joint_label,
    joint_warm_start,
    listwise_loss,
    topk_loss,
    warm_start,
)
from namm_transfer.pipelines.text.shared_prefill import (
    ReceivedAttention,
    prefill_context,
    split_context,
    teacher_forced,
)
from namm_transfer.policies import H2O, TOVA, FullCache, L2Norm, Recency, SnapKV

CONTEXT, SUFFIX, ANSWER = 48, 6, 3


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


@dataclass
class _Example:
    prompt_ids: list[int]


def _ids(seed: int = 0, vocab: int = 97) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (CONTEXT + SUFFIX + ANSWER,), generator=gen)


def _namm(seed: int = 3) -> NAMM:
    return NAMM.init_random(seed=seed, sigma=0.4, config=NAMMConfig(update_every=16))


@torch.no_grad()
def _alone(model, policy, ids: torch.Tensor, report: list | None = None) -> torch.Tensor:
    """Reference one-shot run of one policy through attach(): the context in one forward with the
    policy due exactly at its end (update_every = context length), then the rest: answer log-probs.
    ``report`` receives the cache's final memory report."""
    if isinstance(policy, NAMM):
        policy = NAMM(
            replace(policy.config, update_every=CONTEXT), policy.params, policy.norm_mean, policy.norm_var
        )
    else:
        policy = policy.with_budget(policy.budget) if hasattr(policy, "with_budget") else policy
        policy.update_every = CONTEXT
    with attach(model, policy) as handle:
        cache = handle.new_cache()
        model(input_ids=ids[None, :CONTEXT], past_key_values=cache)
        out = model(input_ids=ids[None, CONTEXT:], past_key_values=cache)
        if report is not None:
            report.append(cache.memory_report())
    logp = torch.log_softmax(out.logits[0, SUFFIX - 1 : -1].float(), -1)
    return logp.gather(-1, ids[CONTEXT + SUFFIX :, None]).sum()


POLICIES = {
    "full": lambda budget: FullCache(),
    "namm": lambda budget: _namm().with_budget(budget),
    "recency": lambda budget: Recency(budget),
    "h2o": lambda budget: H2O(budget),
    "l2norm": lambda budget: L2Norm(budget),
    "snapkv": lambda budget: SnapKV(budget, window=8),
    "tova": lambda budget: TOVA(budget),
}


def _fork_result(model, policy, ids: torch.Tensor):
    """One shared prefill recording every policy's state, then ``policy``'s fork: teacher-forced result
    and the fork's final memory report."""
    recorded = [_namm(), H2O(), SnapKV(window=8), TOVA(), Recency(), L2Norm()]
    child = next((i for i, p in enumerate(recorded) if type(p) is type(policy)), 0)
    with attach(model, _namm()) as handle:
        prefill = prefill_context(
            model, handle, _Example(ids[: CONTEXT + SUFFIX].tolist()), None, recorded, context_len=CONTEXT
        )
        cache = prefill.fork(child, policy)
        result = teacher_forced(model, prefill, cache, ids[CONTEXT + SUFFIX :])
    return result, cache.memory_report()


@pytest.mark.parametrize("name", list(POLICIES))
def test_fork_equals_the_policy_run_alone(model, name):
    ids = _ids()
    policy = POLICIES[name](20)
    result, _ = _fork_result(model, policy, ids)
    expected = _alone(model, POLICIES[name](20), ids)
    assert result.logprob[0] == pytest.approx(float(expected), abs=1e-4)
    assert result.kept_fraction[0] == pytest.approx(1.0 if isinstance(policy, FullCache) else 20 / CONTEXT)


@pytest.fixture(scope="module", params=["gemma3_text", "mistral"])
def sliding_model(request):
    """A tiny random decoder with sliding-window layers (window 12, shorter than the 48-token context):
    Gemma3 mixes sliding and full layers and has one KV head, Mistral slides on every layer."""
    model = _tiny_decoders.build(request.param)
    with torch.no_grad():  # Gemma3's k-norm at its init gives every key the same L2 norm: L2Norm's
        for name, p in model.named_parameters():  # ranking would be float noise; make the norms differ
            if "k_norm" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.mark.parametrize("name", list(POLICIES))
def test_fork_equals_the_policy_run_alone_on_sliding_layers(sliding_model, name):
    """The layer's own window drops tokens during the shared prefill; the Tee compacts every recorded
    state with them, so a fork keeps the same tokens and gives the same answer log-probability as its
    policy run alone (budget 8: the policies evict inside the window too)."""
    ids = _ids(4, vocab=_tiny_decoders.VOCAB)
    windows = attach(sliding_model, FullCache())
    assert _tiny_decoders.WINDOW in windows.sliding_windows
    windows.detach()
    result, fork_report = _fork_result(sliding_model, POLICIES[name](8), ids)
    alone_report: list = []
    expected = _alone(sliding_model, POLICIES[name](8), ids, alone_report)
    assert result.logprob[0] == pytest.approx(float(expected), abs=1e-4)
    alone = alone_report[0]
    for layer, (valid, pos) in enumerate(zip(alone.valid, alone.positions, strict=True)):
        for h in range(valid.shape[1]):  # the same tokens kept, per layer and KV head
            kept = fork_report.positions[layer][0, h][fork_report.valid[layer][0, h]]
            assert kept.tolist() == pos[0, h][valid[0, h]].tolist()


def test_a_batch_of_members_equals_each_member_alone(model):
    ids = _ids(1)
    members = torch.stack([_namm(seed).params[0] for seed in range(4)])
    cfg = replace(_namm().config, budget=16)
    with attach(model, _namm()) as handle:
        prefill = prefill_context(
            model, handle, _Example(ids[: CONTEXT + SUFFIX].tolist()), None, [_namm()], context_len=CONTEXT
        )
        together = teacher_forced(
            model, prefill, prefill.fork(0, NAMM(cfg, members), batch=4), ids[CONTEXT + SUFFIX :]
        )
        alone = [
            teacher_forced(model, prefill, prefill.fork(0, NAMM(cfg, m)), ids[CONTEXT + SUFFIX :])
            for m in members
        ]
    np.testing.assert_allclose(together.logprob, [a.logprob[0] for a in alone], atol=1e-4)
    assert list(together.exact) == [a.exact[0] for a in alone]
    assert len(set(together.logprob.round(4))) > 1  # the members differ, so the test can fail


def test_forks_leave_the_shared_prefill_untouched(model):
    ids = _ids(2)
    with attach(model, _namm()) as handle:
        prefill = prefill_context(
            model, handle, _Example(ids[: CONTEXT + SUFFIX].tolist()), None, [_namm()], context_len=CONTEXT
        )
        first = teacher_forced(model, prefill, prefill.fork(0, FullCache()), ids[CONTEXT + SUFFIX :])
        teacher_forced(
            model, prefill, prefill.fork(0, _namm().with_budget(8), batch=3), ids[CONTEXT + SUFFIX :]
        )
        again = teacher_forced(model, prefill, prefill.fork(0, FullCache()), ids[CONTEXT + SUFFIX :])
    assert prefill.cache.layers[0].keys.shape[2] == CONTEXT
    assert first.logprob[0] == pytest.approx(again.logprob[0], abs=1e-6)


def test_teacher_forced_exact_match_is_greedy_decoding(model):
    ids = _ids(3)[: CONTEXT + SUFFIX]
    with torch.no_grad():
        greedy = model.generate(ids[None], max_new_tokens=ANSWER, do_sample=False)[0, -ANSWER:]
    wrong = (greedy + 1) % 97
    with attach(model, _namm()) as handle:
        prefill = prefill_context(model, handle, _Example(ids.tolist()), None, [_namm()], context_len=CONTEXT)
        right = teacher_forced(model, prefill, prefill.fork(0, FullCache()), greedy)
        bad = teacher_forced(model, prefill, prefill.fork(0, FullCache()), wrong)
    assert right.exact[0] and not bad.exact[0]


class _Tok:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_split_context_ends_before_the_question():
    body = "body text " * 10
    text = f"intro\n\n{body}\n\nWhat is it?<|im_end|>\nThe answer is"

    @dataclass
    class Ex:
        text: str
        prompt_ids: list[int]
        task: str = "t"
        seed: int = 0

    ex = Ex(text, [ord(c) for c in text])
    n = split_context(ex, _Tok())
    assert text[:n] == f"intro\n\n{body}"
    with pytest.raises(ValueError, match="no blank line"):
        split_context(Ex("no question", [1, 2]), _Tok())


def _synthetic_entries(n: int = 3, tokens: int = 40) -> tuple[list[PoolEntry], NAMM]:
    """Pool entries whose target attention goes to tokens with a high first spectral feature."""
    namm = NAMM(NAMMConfig(update_every=16))
    entries = []
    for seed in range(n):
        gen = torch.Generator().manual_seed(seed)
        cache_layers = []
        from namm_transfer.adapters.cache import EvictingCache

        cache = EvictingCache(namm, 1, 1)
        mem = cache.layers[0].memory
        mem.append(1, 2, tokens, torch.device("cpu"))
        rows = torch.rand(1, 2, 32, tokens, generator=gen).softmax(-1)
        mem.observe(rows)
        cache_layers.append(mem)
        spectral = mem.state.ema[0]  # [H, S, bins]
        target = spectral[..., 0].exp() ** 8  # what the NAMM can see decides what matters
        mem.state = [mem.state]
        prefill = type("P", (), {"cache": cache, "context_len": tokens})()
        entries.append(PoolEntry("t", seed, prefill, torch.tensor([1]), None, target))
    return entries, namm


def test_warm_start_lowers_its_loss_and_calibration_hits_the_keep_target():
    entries, namm = _synthetic_entries()
    params, losses = warm_start(entries, namm, steps=60, lr=1e-2, seed=0, progress=False)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    calibrated = calibrate_bias(params, entries, namm, keep=0.4)
    probe = NAMM(namm.config, calibrated, namm.norm_mean, namm.norm_var)
    kept = []
    for entry in entries:
        feats, valid, positions = entry_features(entry, probe)
        from namm_transfer.scorers import score_tokens

        scores = score_tokens(probe.params, feats[None], valid[None], positions[None], namm.config.shapes)
        kept.append(float((scores >= 0).float().mean()))
    assert np.mean(kept) == pytest.approx(0.4, abs=0.02)


def test_joint_warm_start_ranks_its_labels_first_and_calibration_hits_the_keep_target():
    entries, namm = _synthetic_entries(n=4, tokens=60)
    params, losses = joint_warm_start(entries, namm, steps=150, lr=3e-2, seed=0, progress=False)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert params.shape == (2 * namm.config.n_bins + namm.config.age_dim + 1,)  # 1 layer x 2 KV heads
    hits = []
    for entry in entries:  # the labelled tokens (the top 10% by attention) land in the scores' top 20%
        x, age = joint_inputs_of(entry, namm)
        scores = torch.cat([x, age], -1) @ params[:-1] + params[-1]
        label = joint_label(entry, torch.arange(60), "topk")
        top = scores[4:].topk(12).indices + 4
        hits.append(float(label[top].sum() / label.sum()))
    assert np.mean(hits) > 0.6  # chance: 0.21
    calibrated = calibrate_joint_bias(params, entries, namm, keep=0.4)
    kept = [float((torch.cat(joint_inputs_of(e, namm), -1)[4:] @ calibrated[:-1] + calibrated[-1] >= 0)
                  .float().mean()) for e in entries]
    assert np.mean(kept) == pytest.approx(0.4, abs=0.02)
    # measured from the median of the fresh tokens (one-shot: all of them), as NAMM.prepare_joint does
    relative = calibrate_joint_bias(params, entries, namm, keep=0.4, reference="fresh-median")
    kept = []
    for e in entries:
        raw = torch.cat(joint_inputs_of(e, namm), -1) @ relative[:-1]
        kept.append(float((raw[4:] - raw.median() + relative[-1] >= 0).float().mean()))
    assert np.mean(kept) == pytest.approx(0.4, abs=0.02)


def test_joint_label_of_some_layer_heads_reads_only_their_attention():
    entries, _ = _synthetic_entries(n=1, tokens=60)
    entry = entries[0]
    positions = torch.arange(60)
    entry.target[0] = 0.0  # layer-head 0 attends to 6 tokens only, layer-head 1 elsewhere
    entry.target[0, 10:16] = torch.arange(6.0, 0.0, -1.0)
    entry.target[1] = torch.linspace(0, 1, 60)
    first = joint_label(entry, positions, "topk", rows=slice(0, 1))
    assert first.nonzero()[:, 0].tolist() == [10, 11, 12, 13, 14]  # 10% of the 56 tokens after the sinks
    second = joint_label(entry, positions, "topk", rows=slice(1, 2))
    assert second.nonzero()[:, 0].tolist() == list(range(55, 60))
    assert torch.equal(joint_label(entry, positions, "topk", rows=slice(0, 2)),
                       joint_label(entry, positions, "topk"))


def test_joint_gains_scale_each_layer_heads_weights_and_start_at_the_warm_start():
    base = np.arange(2 * 3 + 2 + 1, dtype=float)  # 2 layer-heads x 3 bins, 2 age dims, bias
    gains = JointGains(base, rows=2, n_bins=3, age_dim=2)
    assert np.array_equal(gains.decode(gains.start())[0], base)
    out = gains.decode(np.array([[2.0, 0.0, 10.0, 20.0]]))[0]
    assert out.tolist() == [0, 2, 4, 0, 0, 0, 10, 20, 8]


def test_topk_loss_prefers_scores_that_rank_the_top_tokens_first():
    target = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05] * 4])
    valid = torch.ones_like(target, dtype=torch.bool)
    good = torch.log(target)
    bad = -good
    assert topk_loss(good, target, valid, top=0.2) < topk_loss(bad, target, valid, top=0.2)


def test_listwise_loss_is_the_cross_entropy_towards_the_labelled_tokens():
    torch.manual_seed(0)
    scores = torch.randn(3, 6)
    label = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 0] = False
    logp0 = torch.log_softmax(scores[0], -1)
    logp1 = torch.log_softmax(scores[1, 1:], -1)
    expected = (-(logp0[0] + logp0[2]) / 2 - logp1[-1] + 0) / 3  # the unlabelled row counts 0
    assert float(listwise_loss(scores, label, valid)) == pytest.approx(float(expected), rel=1e-6)


def test_evidence_target_marks_facts_by_position_and_the_sinks():
    evidence = torch.zeros(10, dtype=torch.bool)
    evidence[6:8] = True
    positions = torch.tensor([[0, 2, 5, 6, 7, 9, 11]])  # an evicted order; 11 lies past the context
    assert evidence_target(evidence, positions).tolist() == [[True, True, False, True, True, False, False]]


def test_received_attention_sums_only_what_it_observed():
    policy = ReceivedAttention()
    state = policy.new_state(0)
    rows = torch.rand(1, 2, 3, 5).softmax(-1)
    policy.observe(state, rows, None)
    policy.observe(state, torch.rand(1, 2, 1, 6).softmax(-1), None)
    assert state["received"].shape == (1, 2, 6)
    assert float(state["received"].sum()) == pytest.approx(2 * 4)  # 4 rows of 2 heads, each sums to 1


def test_received_attention_follows_compacted_slots():
    """A sliding window's expiry compacts the slots: the sums move with their tokens."""
    policy = ReceivedAttention()
    state = policy.new_state(0)
    policy.observe(state, torch.rand(1, 2, 3, 5).softmax(-1), None)
    before = state["received"].clone()
    index = torch.tensor([[[2, 3, 4], [1, 3, 4]]])
    policy.on_select(state, index)
    assert torch.equal(state["received"], before.gather(-1, index))


def _stub_pool_builders(monkeypatch, prefill=lambda *a, **k: SimpleNamespace(context_len=1)):
    """A PrefillPool's model work replaced by stubs (``prefill``: what ``prefill_context`` does)."""
    monkeypatch.setattr(evolve_shared, "prefill_context", prefill)
    monkeypatch.setattr(evolve_shared, "answer_token_ids", lambda *a: None)
    monkeypatch.setattr(evolve_shared, "answer_attention", lambda *a: (None, None))
    monkeypatch.setattr(evolve_shared, "evidence_mask", lambda *a: [])


def test_a_pool_of_several_lengths_draws_each_prompts_length_by_its_seed(monkeypatch):
    asked = []
    def make(tokenizer, seed, n):
        asked.append((seed, n))
        return SimpleNamespace(prompt_ids=[])

    task = SimpleNamespace(make=make)
    _stub_pool_builders(monkeypatch)
    pool = evolve_shared.PrefillPool(None, None, None, {"t": task}, NAMMConfig(), [1024, 1536])
    for seed in (10, 11, 12, 11):
        pool.get("t", seed)
    assert asked == [(10, 1024), (11, 1536), (12, 1024)]  # the same seed, the same prompt (built once)


def test_a_pool_with_the_question_in_its_prefill_cuts_before_the_prompts_last_token(monkeypatch):
    cuts = []
    task = SimpleNamespace(make=lambda tokenizer, seed, n: SimpleNamespace(prompt_ids=list(range(40))))

    def prefill(*args, context_len=None, **kwargs):
        cuts.append(context_len)
        return SimpleNamespace(context_len=context_len)

    _stub_pool_builders(monkeypatch, prefill)
    evolve_shared.PrefillPool(None, None, None, {"t": task}, NAMMConfig(), 1024).get("t", 0)
    evolve_shared.PrefillPool(None, None, None, {"t": task}, NAMMConfig(), 1024,
                              question_in_prefill=True).get("t", 0)
    # the default leaves the cut to prefill_context (before the question); with the question, every
    # prompt token but the last, which the answer's first token is predicted from
    assert cuts == [None, 39]
    with pytest.raises(ValueError, match="choose one"):
        evolve_shared.PrefillPool(None, None, None, {"t": task}, NAMMConfig(), 1024, context_share=0.5,
                                  question_in_prefill=True)


def test_teacher_forced_after_a_prefill_of_all_but_the_prompts_last_token_scores_the_answer(model):
    # the question_in_prefill cut: the suffix is one token, from which the answer's first token is predicted
    ids = _ids(5)
    prompt = CONTEXT + SUFFIX
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0, prompt - 1 : -1].float(), -1)
    expected = logp.gather(-1, ids[prompt:, None]).sum()
    with attach(model, _namm()) as handle:
        prefill = prefill_context(model, handle, _Example(ids[:prompt].tolist()), None, [_namm()],
                                  context_len=prompt - 1)
        result = teacher_forced(model, prefill, prefill.fork(0, FullCache()), ids[prompt:])
    assert prefill.suffix_ids.tolist() == [int(ids[prompt - 1])]
    assert result.logprob[0] == pytest.approx(float(expected), abs=1e-4)


def test_pool_features_and_target_stack_layers_of_different_widths(sliding_model):
    """On sliding-window layers (fewer slots than the global ones) the pool's features, validity,
    positions and answer-attention target are padded to the widest layer: each layer's rows begin with
    its own slots unchanged, and its padding is invalid with zero target."""
    ids = _ids(5, vocab=_tiny_decoders.VOCAB)
    namm = NAMM(NAMMConfig(update_every=16))
    with attach(sliding_model, namm) as handle:
        prefill = prefill_context(sliding_model, handle, _Example(ids[: CONTEXT + SUFFIX].tolist()), None,
                                  [namm], context_len=CONTEXT)
        _, target = evolve_shared.answer_attention(sliding_model, prefill, ids[CONTEXT + SUFFIX:])
        feats, valid, positions = evolve_shared.cache_features(prefill.cache, namm, 0)
    memories = [layer.memory for layer in prefill.cache.layers]
    widths = [m.valid.shape[-1] for m in memories]
    assert min(widths) < max(widths) or sliding_model.config.model_type != "gemma3_text"
    heads = memories[0].valid.shape[1]
    assert feats.shape[:2] == valid.shape == positions.shape == target.shape == (len(memories) * heads,
                                                                                 max(widths))
    for layer, (mem, width) in enumerate(zip(memories, widths, strict=True)):
        rows = slice(layer * heads, (layer + 1) * heads)
        assert torch.equal(valid[rows, :width], mem.valid[0])
        assert torch.equal(positions[rows, :width], mem.positions[0])
        assert not valid[rows, width:].any() and (positions[rows, width:] == -1).all()
        assert (target[rows, width:] == 0).all() and (feats[rows, width:] == 0).all()
