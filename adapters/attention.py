"""The attention function (and its mask function) registered with transformers for evicting caches.

Masks are built from each slot's absolute arrival index and per-(sample, KV head) validity, so heads
may keep different tokens and a masked slot is exactly a removed one. The layer's own sliding window
(the ``sliding_window`` its attention module passes) and attention-logit soft-capping (``softcap``,
Gemma2) are applied as transformers' eager attention applies them; the module's ``scaling`` is used
as given. When the policy reads attention, the softmax rows of *this forward's* queries are computed
once, used for the output (eager, equal to SDPA) and handed to the policy; otherwise plain SDPA runs
(eager when soft-capping, which SDPA cannot do). After the output is computed, the layer asks the policy
whether to evict: a chunk's own attention is part of the evidence, as in the reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from namm_transfer.adapters.cache import EvictingLayer

ATTENTION_NAME = "namm_attention"  # no "sdpa" in it: transformers then checks SDPA support (Gemma2 has none)
# keyword arguments some attention modules pass that change the attention itself: refused, not ignored
UNSUPPORTED_KWARGS = {
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "indices": "sparse attention indices",
    "block_indices": "block-sparse attention indices",
}


def passthrough_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """Mask function for :data:`ATTENTION_NAME`: hand the 2-D padding mask ``[B, seen + q]`` through.

    Registering it matters: without a mask function for a custom attention name, transformers passes
    no mask at all and chunked calls silently attend to the future.
    """
    return attention_mask


def _plain_causal(
    query: torch.Tensor, key: torch.Tensor, padding: torch.Tensor | None, window: int | None = None
) -> torch.Tensor:
    """``[B, 1, q, kv]`` causal (+ sliding window, + padding) mask for calls without an evicting cache."""
    n_q, n_kv = query.shape[2], key.shape[2]
    q_pos = torch.arange(n_kv - n_q, n_kv, device=query.device)[:, None]
    k_pos = torch.arange(n_kv, device=query.device)
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]
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


def _check_kwargs(module: torch.nn.Module, kwargs: dict) -> None:
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"{type(module).__name__} passes `{name}` ({what}) to its attention function; "
                "namm-transfer's attention computes plain softmax attention (with optional window and "
                "soft-capping) only"
            )


def _softmax_rows(
    query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """``[B, H_kv, G, q, S]`` float32 softmax attention of each KV head's query group.

    ``allowed`` is ``[B, H_kv or 1, q, S]`` bool. Each KV head's query group is folded into the query
    axis: one batched matmul per KV head, no repeated keys.
    """
    batch, q_heads, n_q, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * n_q, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(scaling)
    if softcap is not None:  # Gemma2: logits -> softcap * tanh(logits / softcap), before the mask
        scores = torch.tanh(scores / softcap).mul_(softcap)
    scores = scores.view(batch, kv_heads, groups, n_q, n_keys)
    scores.masked_fill_(~allowed[:, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


LOG2E = 1.0 / math.log(2.0)


def _softmax2_(scores: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the last axis of logits given in base 2 (``x * log2(e)``): ``2^(x - max) /
    sum``. On CPU ``exp2`` costs well under half of ``exp`` and this is the attention's largest
    element-wise step; the result equals ``softmax(x)`` to float32 rounding."""
    top = scores.amax(-1, keepdim=True)
    scores.sub_(top).exp2_()
    return scores.mul_(scores.sum(-1, keepdim=True).reciprocal_())


QUERY_TILE = 128  # queries per block of the fused rows + output computation (scores stay in cache)


def _rows_and_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    rows_buffer: Callable[[int], torch.Tensor] | None = None,
    scores_buffer: Callable[[int], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Softmax attention computed once, giving both the output and the policy's rows.

    ``allowed`` is ``[B, H_kv or 1, q, S]`` bool, or None for the plain causal mask of a chunk whose
    ``q`` queries are the last ``q`` slots. The query axis is processed in blocks of
    :data:`QUERY_TILE` so one block's scores stay in cache: scores (in float32) -> mask -> softmax
    (in place) -> the output block and the block's rows averaged over each KV head's query group.
    Slots after a block's newest query are this chunk's later tokens, masked for every query of the
    block, so they are not computed at all (as a causal kernel skips them).

    ``rows_buffer(n)``, if given, returns float32 memory of at least n elements for the rows (reused
    from layer to layer, so a whole context's rows are not page-faulted in again for every layer);
    ``scores_buffer(n)`` likewise for the tiles' float32 scores (used on CPU, where they are updated in
    place; each tile would otherwise take, fault in and free fresh pages).

    Returns ``rows`` ``[B, H_kv, q, S]`` float32, the output ``[B, H_q, q, D]`` and the seconds spent
    on the rows alone (the group mean: the policy's share of the work).
    """
    batch, q_heads, n_q, dim = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    groups = q_heads // kv_heads
    grouped = query.view(batch, kv_heads, groups, n_q, dim)
    key_t = key.transpose(-1, -2)
    out = query.new_empty(batch, kv_heads, groups, n_q, value.shape[-1])
    shape = (batch, kv_heads, n_q, n_keys)
    if rows_buffer is None:
        rows = torch.empty(shape, dtype=torch.float32, device=query.device)
    else:
        rows = rows_buffer(math.prod(shape))[: math.prod(shape)].view(shape)
    blocked = None if allowed is None else ~allowed
    tracked = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad)
    in_place = query.device.type == "cpu" and not tracked  # ATen's CPU softmax may write over its input
    base2 = in_place and softcap is None  # logits scaled by log2(e) with the queries, then _softmax2_
    rows_s = 0.0
    if scores_buffer is not None and not (in_place and query.dtype == torch.float32):
        scores_buffer = None  # written out of place, or converted to float32: a fresh tensor anyway
    if scores_buffer is not None:
        tile_scores = scores_buffer(batch * q_heads * min(n_q, QUERY_TILE) * n_keys)
    for i0 in range(0, n_q, QUERY_TILE):
        i1 = min(n_q, i0 + QUERY_TILE)
        n, width = i1 - i0, n_keys - n_q + i1
        tile = grouped[:, :, :, i0:i1].reshape(batch, kv_heads, groups * n, dim)
        if softcap is None:  # scaling the few queries instead of the many scores
            tile = tile * (scaling * LOG2E if base2 else scaling)
        if scores_buffer is None:
            scores = torch.matmul(tile, key_t[..., :width])
        else:
            scores = tile_scores[: batch * q_heads * n * width].view(batch, kv_heads, groups * n, width)
            torch.matmul(tile, key_t[..., :width], out=scores)
        scores = scores.float() if scores.dtype != torch.float32 else scores
        if softcap is not None:  # Gemma2: logits -> softcap * tanh(logits / softcap), before the mask
            scores = torch.tanh(scores.mul_(scaling / softcap)).mul_(softcap)
        view = scores.view(batch, kv_heads, groups, n, width)
        if blocked is None:
            causal = torch.ones(n, n, dtype=torch.bool, device=query.device).triu_(1)
            view[..., width - n :].masked_fill_(causal, float("-inf"))
        else:
            view.masked_fill_(blocked[:, :, None, i0:i1, :width], float("-inf"))
        if base2:
            _softmax2_(scores)
        elif in_place:
            torch.ops.aten._softmax.out(scores, -1, False, out=scores)
        else:
            scores = torch.softmax(scores, dim=-1)
            view = scores.view(batch, kv_heads, groups, n, width)
        t0 = time.perf_counter()
        view = view.detach()  # the policy's rows carry no gradient
        if groups > 1:  # the group mean as plain adds (one pass each), not a strided reduction
            mean = rows[:, :, i0:i1, :width]
            torch.add(view[:, :, 0], view[:, :, 1], out=mean)
            for g in range(2, groups):
                mean.add_(view[:, :, g])
            mean.div_(groups)
        else:
            rows[:, :, i0:i1, :width] = view[:, :, 0]
        rows[:, :, i0:i1, width:] = 0.0
        rows_s += time.perf_counter() - t0
        block = torch.matmul(scores.to(value.dtype), value[:, :, :width])
        out[:, :, :, i0:i1] = block.view(batch, kv_heads, groups, n, -1)
    return rows, out.view(batch, q_heads, n_q, -1), rows_s


def _weighted_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, H_q, q, D]`` output from ``probs`` ``[B, H_kv, G, q, S]``."""
    batch, kv_heads, groups, n_q, n_keys = probs.shape
    out = torch.matmul(probs.reshape(batch, kv_heads, groups * n_q, n_keys).to(value.dtype), value)
    return out.view(batch, kv_heads * groups, n_q, value.shape[-1])


def _sdpa(query, key, value, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """The fused SDPA kernel with ``allowed`` ``[B, H_kv or 1, q, S]`` expanded to the query heads."""
    batch, q_heads, n_q, _ = query.shape
    kv_heads, n_keys = key.shape[1], key.shape[2]
    if allowed.shape[1] != 1:
        groups = q_heads // kv_heads
        allowed = allowed[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, q_heads, n_q, n_keys)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scaling, enable_gqa=True
    )


def namm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[B, H_q, q, D]`` over the stored ``key``/``value`` ``[B, H_kv, S, D]``.

    Returns the output ``[B, q, H_q, D]`` (the layout transformers' attention functions return).
    """
    n_q, dim = query.shape[2], query.shape[3]
    scaling = dim**-0.5 if scaling is None else scaling
    padding = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    handle = getattr(module, "_namm_handle", None)
    if handle is None:
        # not a managed layer (e.g. a vision tower whose config was switched to this function by a
        # plain-string set_attn_implementation): transformers' SDPA with the module's own causality
        return _unmanaged(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check_kwargs(module, kwargs)
    layer = _evicting_layer(module)

    if layer is None:  # no evicting cache (use_cache=False): ordinary causal attention
        if attention_mask is not None and attention_mask.ndim == 4:
            allowed = attention_mask
        else:
            allowed = _plain_causal(query, key, padding, sliding_window)
        if softcap is None:
            out = _sdpa(query, key, value, allowed, scaling)
        else:
            out = _weighted_values(_softmax_rows(query, key, allowed, scaling, softcap), value)
        return out.transpose(1, 2).contiguous(), None

    memory = layer.memory
    if query.shape[1] != memory.n_groups * key.shape[1]:
        raise RuntimeError(
            f"{type(module).__name__} has {query.shape[1]} query heads for {key.shape[1]} KV heads, but the "
            f"cache was built for {memory.n_groups} query heads per KV head (the family descriptor is wrong)"
        )
    window = layer.window_for(sliding_window)
    new_valid = None
    if padding is not None:
        new_valid = padding[:, -n_q:].bool()
        memory.mark_padding(new_valid)
    needs_rows = memory.policy.needs_attention
    exact = bool(getattr(handle, "exact_output", False))
    plain_causal = bool(memory.valid.all()) and window is None  # one causal mask for every sample and head
    if needs_rows and not exact:
        allowed = None if plain_causal else memory.attention_mask(n_q, window)  # [B, H_kv, q, S]
        reuse = layer.rows_buffer if memory.policy.rows_transient else None
        rows, out, rows_s = _rows_and_output(
            query, key, value, allowed, scaling, softcap, reuse, layer.scores_buffer
        )
        memory.stats.timing["capture_s"] += rows_s
        # A non-finite probability makes its whole output row non-finite, so a finite output clears the
        # rows without a pass over them.
        memory.observe(rows, new_valid, grouped=True, finite=bool(torch.isfinite(out.sum())) or None)
    else:
        if plain_causal:
            q_pos = torch.arange(key.shape[2] - n_q, key.shape[2], device=query.device)[:, None]
            allowed = (torch.arange(key.shape[2], device=query.device) <= q_pos)[None, None]
        else:
            allowed = memory.attention_mask(n_q, window)  # [B, H_kv, q, S]
        out = None
        if softcap is None:
            out = _sdpa(query, key, value, allowed, scaling)
        if needs_rows or out is None:
            t0 = time.perf_counter()
            probs = _softmax_rows(query, key, allowed, scaling, softcap)  # [B, H_kv, G, q, S]
            if out is not None:  # computed for the policy alone: its share of the work
                memory.stats.timing["capture_s"] += time.perf_counter() - t0
            if out is None:
                out = _weighted_values(probs, value)
            if needs_rows:
                memory.observe(probs.view(query.shape[0], query.shape[1], n_q, key.shape[2]), new_valid)

    layer.apply_eviction()
    if layer.after_eviction is not None and (joint_eviction := layer.after_eviction()) is not None:
        joint_eviction()
    return out.transpose(1, 2).contiguous(), None


def _unmanaged(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """transformers' SDPA attention for a module no policy manages (bidirectional or causal)."""
    if attention_mask is not None and attention_mask.ndim == 2:
        if getattr(module, "is_causal", False):
            attention_mask = _plain_causal(query, key, attention_mask)
        else:  # key padding only
            attention_mask = attention_mask[:, None, None, -key.shape[2] :].bool()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def register() -> str:
    """Register the attention and mask functions under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, namm_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, passthrough_mask)
    return ATTENTION_NAME
