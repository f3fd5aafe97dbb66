"""``attach(model, policy)``: run a Hugging Face transformer with a memory policy managing its KV cache.

Which models: any decoder whose self-attention modules call transformers' registered attention function
(``AttentionInterface``) and whose cache is a ``DynamicCache`` of per-layer full or sliding-window
attention layers, found by capability detection (:mod:`.detect`); per-family differences live in one
descriptor each (:mod:`.families`). RoPE decoders cache keys after RoPE and take default positions from
the cache's count of tokens seen; GPT-2-style models (GPT-2 LMs and the Decision Transformer's GPT-2
encoder) add learned absolute position embeddings before attention, so their cached keys never depend
on where they sit in the cache either. LLaVA video models wrap one of those decoders: the policy
manages the language model's cache, and only the language model's attention is switched to our
function (the vision towers keep their own implementation, see :func:`_attn_setting`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from namm_transfer.adapters.attention import register
from namm_transfer.adapters.cache import DEFAULT_KV_LAYOUT, KV_LAYOUTS, EvictingCache
from namm_transfer.adapters.detect import plan_attachment
from namm_transfer.adapters.families import DECODERS
from namm_transfer.policies import MemoryPolicy

# The tested families (descriptors); detection also admits untested decoders, with a warning.
SUPPORTED_MODEL_TYPES = tuple(f.model_type for f in DECODERS)


def _attn_setting(key: str | None, implementation: str) -> str | dict:
    """The argument of ``set_attn_implementation`` that changes only the language model.

    In transformers 5.23 a string is dispatched to every sub-model (the vision towers too); a dict
    keyed by sub-config name changes only that sub-config's modules and leaves the rest as they were.
    """
    return implementation if key is None else {key: implementation}


class AttachedPolicy:
    """Handle returned by :func:`attach`; a context manager that detaches on exit.

    Every forward or ``generate()`` call without ``past_key_values`` gets a fresh
    :class:`~namm_transfer.adapters.cache.EvictingCache`; :meth:`stats` describes the latest one.
    For a Decision Transformer the cache belongs to ``model.encoder`` (the module that takes
    ``past_key_values``): both ``model(...)`` and direct ``model.encoder(...)`` calls are managed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        policy: MemoryPolicy,
        prefill_chunk: int | None = None,
        exact_output: bool = False,
        kv_layout: str = DEFAULT_KV_LAYOUT,
    ):
        if getattr(model, "_namm_attached", None) is not None:
            raise RuntimeError(
                f"a memory policy ({model._namm_attached.policy!r}) is already attached to this model; "
                "detach it first (handle.detach() or leave its `with` block)"
            )
        self.plan = plan_attachment(model)
        self.model_type = self.plan.model_type
        self.exact_output = exact_output
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        self.kv_layout = kv_layout
        self.model, self.policy = model, policy
        self.num_layers = self.plan.num_layers
        self.n_groups = self.plan.n_groups
        self.sliding_windows = list(self.plan.sliding_windows)
        self.cache: EvictingCache | None = None
        self._text_key = self.plan.text_config_key
        self._previous_attn = self.plan.text_config._attn_implementation
        self._attention_modules = self.plan.attention_modules
        self._can_generate = callable(getattr(model, "generate", None)) and model.can_generate()
        generation_config = getattr(model, "generation_config", None)
        if prefill_chunk is not None and (not self._can_generate or generation_config is None):
            raise ValueError(
                f"prefill_chunk applies to generate(), which a {type(model).__name__} does not have; feed "
                "the sequence in chunks yourself (each forward with the returned past_key_values)"
            )
        model.set_attn_implementation(_attn_setting(self._text_key, register()))
        for module in self._attention_modules:
            module._namm_handle = self
        # the module whose forward takes ``past_key_values`` (the DT's forward does not, its encoder does)
        self._hook = self.plan.cache_owner.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._previous_chunk = getattr(generation_config, "prefill_chunk_size", None)
        if prefill_chunk is not None:
            model.generation_config.prefill_chunk_size = prefill_chunk
        if self._can_generate:
            original_generate = model.generate

            @functools.wraps(original_generate)
            def generate(*args, **kwargs):
                if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
                    kwargs["past_key_values"] = self.new_cache()
                return original_generate(*args, **kwargs)

            model.generate = generate
        model._namm_attached = self
        self._attached = True

    def new_cache(self, policy: MemoryPolicy | None = None) -> EvictingCache:
        """A fresh evicting cache for this model (also used automatically), managed by ``policy``
        (default: the attached one), with each layer's own sliding window."""
        self.cache = EvictingCache(
            policy if policy is not None else self.policy,
            self.num_layers,
            self.n_groups,
            self.sliding_windows,
            self.kv_layout,
        )
        return self.cache

    def _before_forward(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = kwargs.get("past_key_values")
        if cache is None:
            if kwargs.get("use_cache") is False:
                self.cache = None
                return args, kwargs
            kwargs["past_key_values"] = self.new_cache()
        elif isinstance(cache, EvictingCache):
            self.cache = cache
        elif cache.get_seq_length() == 0:
            kwargs["past_key_values"] = self.new_cache()
        else:
            raise ValueError(
                f"a non-empty {type(cache).__name__} was passed to a model with a memory policy attached; "
                "pass no past_key_values (one is created) or the EvictingCache from handle.new_cache()"
            )
        return args, kwargs

    def detach(self) -> None:
        """Restore the model: attention implementation, generate(), hooks."""
        if not self._attached:
            return
        self._hook.remove()
        for module in self._attention_modules:
            del module._namm_handle
        if self._can_generate:
            del self.model.generate
        self.model._namm_attached = None
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.prefill_chunk_size = self._previous_chunk
        self.model.set_attn_implementation(_attn_setting(self._text_key, self._previous_attn))
        self.cache, self._attached = None, False

    def frame_retention(self, frame_map) -> Any:
        """``[layers, frames]`` share of each frame's tokens still cached in the latest cache.

        See :func:`namm_transfer.adapters.frame_map.frame_retention`.
        """
        from namm_transfer.adapters.frame_map import frame_retention

        return frame_retention(self, frame_map)

    def __enter__(self) -> AttachedPolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def memory_report(self):
        """What each sample holds now, per layer: :class:`~namm_transfer.adapters.cache.MemoryReport`."""
        if self.cache is None:
            raise RuntimeError("no cache yet: run a forward or generate() with the policy attached first")
        return self.cache.memory_report()

    def stats(self) -> dict[str, Any]:
        """Kept tokens per layer / sample / KV head, evictions, non-finite counts, bytes and timings."""
        if self.cache is None:
            raise RuntimeError("no cache yet: run a forward or generate() with the policy attached first")
        memories = [layer.memory for layer in self.cache.layers]
        kept = [m.kept_tokens().tolist() for m in memories]
        seen = max((int(m.real_seen.max()) for m in memories if m.real_seen is not None), default=0)
        per_layer = []
        for m in memories:
            if m.real_seen is None:
                per_layer.append(1.0)
                continue
            frac = m.kept_tokens().float() / m.real_seen.clamp(min=1)[:, None].float()
            per_layer.append(float(frac.mean()))
        timing = {key: sum(m.stats.timing[key] for m in memories) for key in memories[0].stats.timing}
        stored = sum(layer.stored_bytes() for layer in self.cache.layers)
        kept_bytes = sum(layer.kept_bytes() for layer in self.cache.layers)
        return {
            "tokens_seen": seen,
            "kept_fraction": sum(per_layer) / len(per_layer),
            "kept_fraction_per_layer": per_layer,
            "kept_tokens_per_layer": kept,
            "tokens_since_update_per_layer": [
                0.0 if m.real_seen is None else float((m.real_seen - m.last_update).float().mean())
                for m in memories
            ],
            "evictions": sum(m.stats.evictions for m in memories),
            "expired": sum(m.stats.expired for m in memories),
            "nonfinite": sum(m.stats.nonfinite for m in memories),
            "updates": sum(m.stats.updates for m in memories),
            "stored_kv_bytes": stored,
            # allocated past the stored slots: the room decoding steps append into
            "spare_kv_bytes": sum(layer.spare_bytes() for layer in self.cache.layers),
            "kept_kv_bytes": kept_bytes,
            # stored / kept: 1.0 when every head of a layer keeps as many tokens as the fullest one
            "stored_to_kept": stored / kept_bytes if kept_bytes else 1.0,
            "full_kv_bytes": sum(layer.full_bytes() for layer in self.cache.layers),
            "bookkeeping_bytes": sum(m.bookkeeping_nbytes() for m in memories),
            "max_rows_buffered": max(_rows_buffered(m.state) for m in memories),
            "timing": timing,
        }


def _rows_buffered(state: Any) -> int:
    window = getattr(state, "window", None)
    return 0 if window is None else int(window.shape[-2])


def attach(
    model: torch.nn.Module,
    policy: MemoryPolicy,
    prefill_chunk: int | None = None,
    exact_output: bool = False,
    kv_layout: str = DEFAULT_KV_LAYOUT,
) -> AttachedPolicy:
    """Make ``model`` run with ``policy`` managing its KV cache.

    Args:
        model: a transformers decoder whose attention goes through the ``AttentionInterface`` and whose
            cache holds full or sliding-window attention layers (the tested families are listed in
            :mod:`namm_transfer.adapters.families` and the README; others that pass detection attach
            with a warning), a ``DecisionTransformerModel`` (see :mod:`namm_transfer.envs.dt_rollout`
            for its KV-cached rollout), or a LLaVA video model (``LlavaNextVideoForConditionalGeneration``,
            ``LlavaOnevisionForConditionalGeneration``, ``VideoLlavaForConditionalGeneration``) around any
            such decoder. Its default attention (SDPA) is kept for the output. For a LLaVA model only the
            language model's cache and attention are managed: the vision tower runs exactly as without a
            policy (see :mod:`namm_transfer.adapters.frame_map` for which cached tokens belong to which
            frame). Sliding-window layers keep their window; the policy manages what is inside it.
            Encoder-decoders, cross-attention, state-space/hybrid layers and attention computed outside
            the interface raise :class:`~namm_transfer.adapters.detect.UnsupportedModelError` (a
            ``NotImplementedError``) naming the reason.
        policy: a :class:`~namm_transfer.policies.MemoryPolicy` (a NAMM or a baseline). A policy with a
            cap (``budget`` or ``compression_ratio``) keeps every layer at no more than
            ``cap + update_every - 1`` tokens per KV head after any forward, and compresses a sample to
            its cap at the end of the first forward that exceeds it (a short prompt's prefill).
        prefill_chunk: if set, ``generate()`` feeds the prompt in chunks of this many tokens, so the
            policy can evict during the prompt (the reference feeds 128-token chunks).
        exact_output: when the policy reads attention, compute the layer output with the same fused
            SDPA kernel as an unattached model (and the attention rows for the policy separately), so a
            policy that evicts nothing reproduces the model bit for bit. Costs one more attention
            product per layer; the default reuses the rows for the output (equal up to float rounding).
        kv_layout: ``"packed"`` stores what an eviction kept without padding the heads that kept
            fewer tokens to the fullest one (heads of a NAMM in threshold mode keep different numbers):
            stored bytes match kept bytes, for one copy of the cache per forward. ``"padded"`` stores the
            padded view. ``"auto"`` (default) packs a layer only when its padding would exceed 10% of
            the kept tokens (``AUTO_PACK_PADDING``), so stored bytes stay within 10% of kept bytes and a
            per-token workload whose heads keep similar counts (a rollout) skips the rebuild.

    Returns:
        A handle: ``handle.stats()``, ``handle.detach()``; usable as ``with attach(...) as handle:``.

    Batches must be left-padded. Decisions are per sample and, with the prompt fed in one forward,
    equal to running each sample alone; with ``prefill_chunk`` the chunk boundaries fall at different
    points of each sample's own tokens, so a padded sample's decisions may differ from a solo run.
    Beam search and assisted decoding are not supported (the cache cannot be reordered or cropped).
    """
    return AttachedPolicy(model, policy, prefill_chunk, exact_output, kv_layout)
