"""The attention function (and its mask function) registered with transformers for evicting caches.

Masks are built from each slot's absolute arrival index and per-(sample, KV head) validity, so heads
may keep different tokens and a masked slot is exactly a removed one. When the policy reads attention,
the softmax rows of *this forward's* queries are computed once, used for the output (eager, equal to
SDPA) and handed to the policy; otherwise plain SDPA runs. After the output is computed, the layer
asks the policy whether to evict: a chunk's own attention is part of the evidence, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from namm_transfer.adapters.cache import EvictingLayer

ATTENTION_NAME = "namm_sdpa"


def passthrough_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function for :data:`ATTENTION_NAME`: hand the 2-D padding mask ``[B, seen + q]`` through.

    Registering it matters: without a mask function for a custom attention name, transformers passes
    no mask at all and chunked calls silently attend to the future.
    """
    return attention_mask


def _plain_causal(query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """``[B, 1, q, kv]`` causal (+ padding) mask for calls without an evicting cache."""
    n_q, n_kv = query.shape[2], key.shape[2]
    q_pos = torch.arange(n_kv - n_q, n_kv, device=query.device)[:, None]
    k_pos = torch.arange(n_kv, device=query.device)
    mask = (k_pos <= q_pos)[None, None]
    if padding is not None:  # a query always sees itself, so padding rows are never empty
        mask = (mask & padding[:, None, None, -n_kv:].bool()) | (k_pos == q_pos)
    return mask


def _evicting_layer(module: torch.nn.Module) -> EvictingLayer | None:
    handle = getattr(module, "_namm_handle", None)
    cache = None if handle is None else handle.cache
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or layer_idx is None or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    return layer if isinstance(layer, EvictingLayer) else None


def namm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[B, H_q, q, D]`` over the stored ``key``/``value`` ``[B, H_kv, S, D]``.

    Returns the output ``[B, q, H_q, D]`` (the layout transformers' attention functions return).
    """
    batch, q_heads, n_q, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    padding = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    if getattr(module, "_namm_handle", None) is None:
        # not a managed layer (e.g. a vision tower whose config was switched to this function by a
        # plain-string set_attn_implementation): plain SDPA with the module's own causality
        return _unmanaged(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    layer = _evicting_layer(module)
    exact = bool(getattr(getattr(module, "_namm_handle", None), "exact_output", False))

    if layer is None:  # no evicting cache (use_cache=False): ordinary causal attention
        if attention_mask is not None and attention_mask.ndim == 4:
            mask = attention_mask
        else:
            mask = _plain_causal(query, key, padding)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    memory = layer.memory
    new_valid = None
    if padding is not None:
        new_valid = padding[:, -n_q:].bool()
        memory.mark_padding(new_valid)
    out = None
    if exact or not memory.policy.needs_attention:
        out = _sdpa_output(query, key, value, memory, scaling)
    if memory.policy.needs_attention:
        # Fold each KV head's query group into the query axis: one batched matmul per KV head.
        grouped = query.reshape(batch, kv_heads, groups * n_q, dim)
        scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scaling)
        scores = scores.view(batch, kv_heads, groups, n_q, n_keys)
        if bool(memory.valid.all()):  # only the new tokens' own causal triangle needs masking
            future = torch.ones(n_q, n_q, dtype=torch.bool, device=query.device).triu(1)
            scores[..., n_keys - n_q :].masked_fill_(future, float("-inf"))
        else:
            scores.masked_fill_(~memory.attention_mask(n_q)[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, H_kv, G, q, S]
        if out is None:
            out = torch.matmul(probs.view(batch, kv_heads, groups * n_q, n_keys).to(value.dtype), value)
            out = out.view(batch, q_heads, n_q, dim)
        memory.observe(probs.view(batch, q_heads, n_q, n_keys), new_valid)

    layer.apply_eviction()
    return out.transpose(1, 2).contiguous(), None


def _unmanaged(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' SDPA attention for a module no policy manages (bidirectional or causal)."""
    if attention_mask is not None and attention_mask.ndim == 2:
        if getattr(module, "is_causal", False):
            attention_mask = _plain_causal(query, key, attention_mask)
        else:  # key padding only
            attention_mask = attention_mask[:, None, None, -key.shape[2] :].bool()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _sdpa_output(query, key, value, memory, scaling: float) -> torch.Tensor:
    """The layer output ``[B, H_q, q, D]`` with the fused SDPA kernel and the memory's mask."""
    batch, q_heads, n_q, _ = query.shape
    n_keys = key.shape[2]
    if bool(memory.valid.all()):  # one causal mask shared by every sample and head
        q_pos = torch.arange(n_keys - n_q, n_keys, device=query.device)[:, None]
        mask = torch.arange(n_keys, device=query.device) <= q_pos
    else:
        allowed = memory.attention_mask(n_q)  # [B, H_kv, q, S]
        groups = q_heads // key.shape[1]
        mask = allowed[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, q_heads, n_q, n_keys)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)


def register() -> str:
    """Register the attention and mask functions under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, namm_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, passthrough_mask)
    return ATTENTION_NAME
