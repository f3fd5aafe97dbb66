"""KV-cached incremental Decision Transformer rollouts on a tiny random DT, with and without a policy."""

from __future__ import annotations

import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel, DynamicCache

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import EvictingCache, attach
from namm_transfer.envs.dt_rollout import (
    ACTION,
    RETURN,
    STATE,
    CachedDTRollout,
    WindowedDTRollout,
    token_kind_and_step,
)
from namm_transfer.policies import FullCache, Recency

STATE_DIM, ACT_DIM = 5, 3


@pytest.fixture(scope="module")
def dt() -> DecisionTransformerModel:
    torch.manual_seed(0)
    config = DecisionTransformerConfig(
        state_dim=STATE_DIM, act_dim=ACT_DIM, hidden_size=32, n_layer=2, n_head=2, n_inner=64,
        max_ep_len=64, bos_token_id=None, eos_token_id=None,
    )
    return DecisionTransformerModel(config).eval()


def episode(batch: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, steps, STATE_DIM, generator=g)
    actions = torch.randn(batch, steps, ACT_DIM, generator=g).tanh()
    returns = torch.randn(batch, steps, 1, generator=g)
    timesteps = torch.arange(steps).expand(batch, steps) + torch.arange(batch)[:, None]  # per-episode offsets
    return states, actions, returns, timesteps


def teacher_forced(rollout, states, actions, returns, timesteps) -> torch.Tensor:
    predictions = []
    for t in range(states.shape[1]):
        predictions.append(rollout.act(states[:, t], returns[:, t], timesteps[:, t]))
        rollout.record_action(actions[:, t])
    return torch.stack(predictions, dim=1)


def closed_loop(rollout, batch: int, steps: int, only: slice | None = None, after_step=None) -> torch.Tensor:
    """A toy deterministic environment fed the DT's own actions: s' = tanh(W s + U a), reward = |s| / 10.

    ``only`` runs a subset of the ``batch`` episodes (same initial states)."""
    g = torch.Generator().manual_seed(2)
    w, u = torch.randn(STATE_DIM, STATE_DIM, generator=g) / 2, torch.randn(ACT_DIM, STATE_DIM, generator=g)
    state = torch.randn(batch, STATE_DIM, generator=g)[only or slice(None)]
    rtg = torch.full((state.shape[0],), 3.0)
    actions = []
    for t in range(steps):
        action = rollout.act(state, rtg, torch.full((state.shape[0],), t))
        actions.append(action)
        state = torch.tanh(state @ w + action @ u)
        rtg = rtg - state.norm(dim=-1) / 10
        if after_step is not None:
            after_step(t)
    return torch.stack(actions, dim=1)


@torch.no_grad()
def test_cached_incremental_equals_full_forward(dt):
    states, actions, returns, timesteps = episode(batch=3, steps=12)
    full = dt(
        states=states, actions=actions, returns_to_go=returns, timesteps=timesteps,
        attention_mask=torch.ones(3, 12, dtype=torch.long),
    ).action_preds
    rollout = CachedDTRollout(dt)
    cached = teacher_forced(rollout, states, actions, returns, timesteps)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert isinstance(rollout.cache, DynamicCache) and rollout.tokens_fed == 3 * 12 - 1
    assert rollout.stored_tokens() == [3 * 12 - 1] * 2
    # the windowed reference with a window covering the episode is the same forward, step by step
    windowed = teacher_forced(WindowedDTRollout(dt, context=12), states, actions, returns, timesteps)
    torch.testing.assert_close(windowed, full, atol=1e-5, rtol=1e-5)
    # a shorter window: the last prediction is the forward of the last 4 steps only
    short = teacher_forced(WindowedDTRollout(dt, context=4), states, actions, returns, timesteps)
    last4 = dt(
        states=states[:, -4:], actions=actions[:, -4:], returns_to_go=returns[:, -4:],
        timesteps=timesteps[:, -4:], attention_mask=torch.ones(3, 4, dtype=torch.long),
    ).action_preds[:, -1]
    torch.testing.assert_close(short[:, -1], last4, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(short[:, -1], full[:, -1], atol=1e-4)
    # reset starts a fresh episode batch
    rollout.reset()
    assert rollout.cache is None and rollout.tokens_fed == 0
    again = teacher_forced(rollout, states[:1], actions[:1], returns[:1], timesteps[:1])
    torch.testing.assert_close(again, full[:1], atol=1e-5, rtol=1e-5)


def test_closed_loop_cached_equals_windowed_within_context_and_batches_are_independent(dt):
    cached = closed_loop(CachedDTRollout(dt), batch=3, steps=8)
    windowed = closed_loop(WindowedDTRollout(dt, context=8), batch=3, steps=8)
    torch.testing.assert_close(cached, windowed, atol=1e-5, rtol=1e-5)
    beyond = closed_loop(WindowedDTRollout(dt, context=3), batch=3, steps=8)
    assert not torch.allclose(cached[:, -1], beyond[:, -1], atol=1e-4)  # beyond K steps the two differ
    # each episode of the batch is the same as run alone
    alone = closed_loop(CachedDTRollout(dt), batch=3, steps=8, only=slice(1, 2))
    torch.testing.assert_close(alone, cached[1:2], atol=1e-5, rtol=1e-5)


def test_keep_all_namm_reproduces_the_full_cache_rollout(dt):
    bare = closed_loop(CachedDTRollout(dt), batch=2, steps=16)
    with attach(dt, NAMM(NAMMConfig(update_every=3))) as handle:
        rollout = CachedDTRollout(dt)
        with_namm = closed_loop(rollout, batch=2, steps=16)
        stats = handle.stats()
        assert isinstance(rollout.cache, EvictingCache) and handle.cache is rollout.cache
    # the NAMM path computes attention eagerly (it reads the rows), SDPA otherwise: equal up to rounding
    torch.testing.assert_close(with_namm, bare, atol=1e-6, rtol=0)
    assert stats["updates"] > 0 and stats["evictions"] == 0  # it ran at every step and kept everything
    assert stats["tokens_seen"] == 3 * 16 - 1 and stats["kept_fraction"] == 1.0
    assert dt.config._attn_implementation == "sdpa" and dt._namm_attached is None  # detached
    with attach(dt, FullCache()):
        full_cache = closed_loop(CachedDTRollout(dt), batch=2, steps=16)
    assert torch.equal(full_cache, bare)
    # exact_output: the output comes from the same fused kernel, the rows are computed for the policy
    with attach(dt, NAMM(NAMMConfig(update_every=3)), exact_output=True) as handle:
        exact = closed_loop(CachedDTRollout(dt), batch=2, steps=16)
        assert handle.stats()["updates"] > 0
    assert torch.equal(exact, bare)
    assert isinstance(CachedDTRollout(dt).act(torch.zeros(1, STATE_DIM), 1.0, 0), torch.Tensor)


def test_recency_budget_bounds_the_physical_cache(dt):
    budget, steps = 7, 12
    with attach(dt, Recency(budget=budget, sink=0, update_every=3)) as handle:
        rollout = CachedDTRollout(dt)
        sizes = []
        closed_loop(rollout, batch=2, steps=steps, after_step=lambda t: sizes.append(rollout.stored_tokens()))
        stats = handle.stats()
        positions = [rollout.cache.memory(i).positions for i in range(2)]
        layers = rollout.cache.layers
    # one update per step from step 1 on (3 tokens a step cross one multiple of update_every)
    assert sizes[0] == [2, 2] and all(max(s) <= budget for s in sizes[1:])
    assert all(layer.keys.shape[2] == budget for layer in layers)
    assert stats["kept_tokens_per_layer"] == [[[budget] * 2] * 2] * 2  # [layer][sample][head]
    seen = 3 * steps - 1
    assert stats["tokens_seen"] == seen and stats["evictions"] == 2 * 2 * 2 * (seen - budget)
    assert stats["stored_kv_bytes"] * seen == stats["full_kv_bytes"] * budget
    for pos in positions:  # recency keeps exactly the newest arrivals
        assert torch.equal(pos, torch.arange(seen - budget, seen).expand(2, 2, budget))
    kind, step = token_kind_and_step(positions[0][0, 0])
    assert kind.tolist() == [STATE, ACTION, RETURN, STATE, ACTION, RETURN, STATE]
    assert step.tolist() == [9, 9, 10, 10, 10, 11, 11]


def test_inputs_are_checked(dt):
    rollout = CachedDTRollout(dt)
    with pytest.raises(ValueError, match="max_ep_len=64"):
        rollout.act(torch.zeros(2, STATE_DIM), [1.0, 1.0], [0, 64])
    with pytest.raises(ValueError, match=r"states must be \[B, 5\]"):
        rollout.act(torch.zeros(2, STATE_DIM + 1), 1.0, 0)
    with pytest.raises(RuntimeError, match="before any act"):
        rollout.record_action(torch.zeros(2, ACT_DIM))
    rollout.act(torch.zeros(2, STATE_DIM), 1.0, 0)
    with pytest.raises(ValueError, match="reset"):
        rollout.act(torch.zeros(3, STATE_DIM), 1.0, 1)
    with pytest.raises(TypeError, match="DecisionTransformerModel"):
        CachedDTRollout(torch.nn.Linear(2, 2))
