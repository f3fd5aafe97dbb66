"""The fused rows + output attention (adapters/attention.py) equals softmax attention computed whole."""

from __future__ import annotations

import pytest
import torch

from namm_transfer.adapters import attention


def _inputs(batch=2, kv_heads=2, groups=3, n_q=40, n_keys=70, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, n_q, dim, generator=g)
    key = torch.randn(batch, kv_heads, n_keys, dim, generator=g)
    value = torch.randn(batch, kv_heads, n_keys, dim, generator=g)
    return query, key, value


def _causal(n_q, n_keys):
    q_pos = torch.arange(n_keys - n_q, n_keys)[:, None]
    return (torch.arange(n_keys) <= q_pos)[None, None]


def _reference(query, key, value, allowed, scaling, softcap):
    probs = attention._softmax_rows(query, key, allowed, scaling, softcap)  # [B, H_kv, G, q, S]
    return probs.mean(2), attention._weighted_values(probs, value)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("tile", [16, 128])
def test_plain_causal_matches_whole_softmax(monkeypatch, groups, softcap, tile):
    monkeypatch.setattr(attention, "QUERY_TILE", tile)
    query, key, value = _inputs(groups=groups)
    rows, out, _ = attention._rows_and_output(query, key, value, None, 0.3, softcap)
    ref_rows, ref_out = _reference(query, key, value, _causal(40, 70), 0.3, softcap)
    torch.testing.assert_close(rows, ref_rows, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tile", [16, 128])
def test_per_head_mask_matches_whole_softmax(monkeypatch, tile):
    """Evicted / padding slots per (sample, KV head): masked exactly as the whole computation masks."""
    monkeypatch.setattr(attention, "QUERY_TILE", tile)
    query, key, value = _inputs()
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(2, 2, 70, generator=g) > 0.4
    valid[..., -40:] = True  # this chunk's own tokens
    allowed = _causal(40, 70) & valid[:, :, None, :]
    rows, out, _ = attention._rows_and_output(query, key, value, allowed, 0.3, None)
    ref_rows, ref_out = _reference(query, key, value, allowed, 0.3, None)
    torch.testing.assert_close(rows, ref_rows, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    assert not rows.masked_select(~allowed.expand_as(rows)).any()


def test_gradient_flows_through_the_output():
    """With autograd on (softmax not in place) the output is differentiable; the rows carry no gradient."""
    query, key, value = _inputs()
    query.requires_grad_(True)
    rows, out, _ = attention._rows_and_output(query, key, value, None, 0.3, None)
    out.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    assert not rows.requires_grad


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "per-head-mask"])
def test_scores_scratch_gives_the_same_rows_and_output(monkeypatch, groups, masked):
    """Score tiles written into reused scratch memory (shared by the layers of a cache): the same rows and
    output as fresh tiles, whatever the scratch held before."""
    from namm_transfer.adapters.cache import RowsBuffer

    monkeypatch.setattr(attention, "QUERY_TILE", 16)
    query, key, value = _inputs(groups=groups)
    allowed = None
    if masked:
        valid = torch.rand(2, 2, 70, generator=torch.Generator().manual_seed(4)) > 0.4
        valid[..., -40:] = True
        allowed = _causal(40, 70) & valid[:, :, None, :]
    scratch = RowsBuffer()
    scratch(10, torch.device("cpu"), name="scores").fill_(float("nan"))  # too small: grown on demand
    buffer = lambda n: scratch(n, torch.device("cpu"), name="scores")  # noqa: E731
    fresh_rows, fresh_out, _ = attention._rows_and_output(query, key, value, allowed, 0.3, None)
    for _ in range(2):  # the second call reuses (and overwrites) the first call's scratch
        rows, out, _ = attention._rows_and_output(query, key, value, allowed, 0.3, None, None, buffer)
        torch.testing.assert_close(rows, fresh_rows, atol=0, rtol=0)
        torch.testing.assert_close(out, fresh_out, atol=0, rtol=0)
    assert scratch.blocks["scores"].numel() >= 2 * 2 * groups * 16 * 70


def test_select_slots_equals_gather():
    """Eviction keeps slots by row copies of the flattened cache: the same as an element-wise gather."""
    from namm_transfer.adapters.cache import _select_slots

    g = torch.Generator().manual_seed(7)
    states = torch.randn(2, 3, 11, 5, generator=g)
    index = torch.stack([torch.randperm(11, generator=g)[:6] for _ in range(6)]).view(2, 3, 6)
    expected = states.gather(2, index[..., None].expand(-1, -1, -1, 5))
    assert torch.equal(_select_slots(states, index), expected)
    strided = states.transpose(-1, -2).contiguous().transpose(-1, -2)  # not contiguous: copied first
    assert torch.equal(_select_slots(strided, index), expected)


def test_base2_softmax_equals_softmax():
    """Logits scaled by log2(e) and exponentiated in base 2: softmax to float32 rounding, masked slots 0."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 17, 40, generator=g) * 6
    logits[..., 25:] = float("-inf")
    expected = torch.softmax(logits, dim=-1)
    got = attention._softmax2_(logits * attention.LOG2E)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not got[..., 25:].any()
