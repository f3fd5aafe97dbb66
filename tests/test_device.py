"""Tests that take a device (the ``device`` fixture, ``pytest --device cuda``; cpu by default).

``make gpu-check`` runs this file on CUDA: the attention path, the streaming features and eviction must
give the same results on any device, with no device hard-coded, and a bf16 model's NAMM state stays
float32 (docs/design.md, "The NAMM").
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.adapters import attach, attention
from namm_transfer.features import StreamingSpectrogram, batch_spectrogram_ema


def _tolerance(device: torch.device) -> float:
    return 1e-5 if device.type == "cpu" else 1e-4  # GPU kernels sum in another order


def _model(device: torch.device, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)


def _prompt(length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)


def _causal_rows(batch=2, heads=3, n_rows=96, prefix=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_keys = prefix + n_rows
    logits = torch.randn(batch, heads, n_rows, n_keys, generator=g) * 2
    visible = torch.arange(n_keys)[None, :] <= prefix + torch.arange(n_rows)[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


@pytest.mark.parametrize("chunks", [[96], [48, 48], [7, 41, 48], [5, 11, 1, 30, 17, 32]])
def test_streaming_features_on_device(device, chunks):
    rows, prefix = _causal_rows(), 4
    st = StreamingSpectrogram()
    start = 0
    for size in chunks:
        end = start + size
        st.observe(rows[..., start:end, : prefix + end].contiguous().to(device))
        start = end
    assert st.ema.device.type == device.type and st.ema.dtype == torch.float32
    torch.testing.assert_close(st.ema.cpu(), batch_spectrogram_ema(rows), atol=1e-5, rtol=0)


def test_attention_rows_and_output_on_device(device):
    g = torch.Generator().manual_seed(0)
    query, key, value = torch.randn(2, 6, 40, 8, generator=g), torch.randn(2, 2, 70, 8, generator=g), \
        torch.randn(2, 2, 70, 8, generator=g)
    valid = torch.rand(2, 2, 70, generator=g) > 0.4
    valid[..., -40:] = True
    allowed = (torch.arange(70) <= torch.arange(30, 70)[:, None])[None, None] & valid[:, :, None, :]
    probs = attention._softmax_rows(query, key, allowed, 0.3, None)
    rows, out, _ = attention._rows_and_output(
        query.to(device), key.to(device), value.to(device), allowed.to(device), 0.3, None
    )
    tol = _tolerance(device)
    torch.testing.assert_close(rows.cpu(), probs.mean(2), atol=tol, rtol=tol)
    torch.testing.assert_close(out.cpu(), attention._weighted_values(probs, value), atol=tol, rtol=tol)


@torch.no_grad()
def test_keep_all_namm_equals_bare_model_on_device(device):
    model, ids = _model(device), _prompt(70, device)
    bare = model(ids).logits
    with attach(model, NAMM(NAMMConfig(update_every=16)), prefill_chunk=16) as handle:
        cache = handle.new_cache()
        logits = torch.cat([model(ids[:, i : i + 16], past_key_values=cache, use_cache=True).logits
                            for i in range(0, 70, 16)], dim=1)
        assert handle.stats()["evictions"] == 0 and handle.stats()["updates"] > 0
    tol = _tolerance(device)
    torch.testing.assert_close(logits, bare, atol=tol, rtol=tol)


@torch.no_grad()
def test_budgeted_namm_equals_physical_removal_on_device(device):
    """A NAMM held to a budget (equal counts per head) gives the logits of a cache physically holding
    only the kept tokens."""
    model, ids, next_id = _model(device), _prompt(64, device, seed=1), torch.tensor([[5]], device=device)
    namm = NAMM.init_random(seed=3, sigma=0.4, config=NAMMConfig(update_every=64)).with_budget(
        23, keep_threshold=False
    )
    with attach(model, namm) as handle:
        cache = handle.new_cache()
        model(ids, past_key_values=cache, use_cache=True)
        kept = [cache.memory(i).positions.clone() for i in range(len(cache.layers))]
        ours = model(next_id, past_key_values=cache, use_cache=True).logits
    assert kept[0].shape[-1] == 23
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full, use_cache=True)
    reference = DynamicCache(config=model.config)
    for i, layer in enumerate(full.layers):
        index = kept[i][..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        reference.update(layer.keys.gather(2, index), layer.values.gather(2, index), i)
    theirs = model(next_id, past_key_values=reference, position_ids=torch.tensor([[64]], device=device),
                   attention_mask=torch.ones(1, 24, dtype=torch.long, device=device), use_cache=True).logits
    tol = _tolerance(device)
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)


@torch.no_grad()
def test_bf16_model_keeps_float32_namm_state(device):
    model, ids = _model(device, torch.bfloat16), _prompt(80, device)
    namm = NAMM.init_random(seed=3, sigma=0.4, config=NAMMConfig(update_every=16)).with_compression_ratio(0.5)
    with attach(model, namm, prefill_chunk=16) as handle:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        stats = handle.stats()
        state = handle.cache.memory(0).state
    assert out.shape[-1] == 84 and stats["evictions"] > 0 and stats["nonfinite"] == 0
    assert state.spectrum.dtype == torch.float32 and state.window.dtype == torch.float32
