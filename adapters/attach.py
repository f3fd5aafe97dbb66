"""``attach(model, policy)``: run a Hugging Face decoder LM with a memory policy managing its KV cache."""

from __future__ import annotations

import functools
from typing import Any

import torch

from namm_transfer.adapters.attention import register
from namm_transfer.adapters.cache import EvictingCache
from namm_transfer.policies import MemoryPolicy

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_supported(model: torch.nn.Module) -> None:
    model_type = getattr(_text_config(model), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"namm-transfer cannot attach to a {type(model).__name__} (model_type={model_type!r}); "
            f"supported decoder families: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


class AttachedPolicy:
    """Handle returned by :func:`attach`; a context manager that detaches on exit.

    Every forward or ``generate()`` call without ``past_key_values`` gets a fresh
    :class:`~namm_transfer.adapters.cache.EvictingCache`; :meth:`stats` describes the latest one.
    """

    def __init__(self, model: torch.nn.Module, policy: MemoryPolicy, prefill_chunk: int | None = None):
        _check_supported(model)
        if getattr(model, "_namm_attached", None) is not None:
            raise RuntimeError(
                f"a memory policy ({model._namm_attached.policy!r}) is already attached to this model; "
                "detach it first (handle.detach() or leave its `with` block)"
            )
        self.model, self.policy = model, policy
        text = _text_config(model)
        self.num_layers = text.num_hidden_layers
        self.n_groups = text.num_attention_heads // (text.num_key_value_heads or text.num_attention_heads)
        self.cache: EvictingCache | None = None
        self._previous_attn = model.config._attn_implementation
        self._attention_modules = [
            m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")
        ]
        if len(self._attention_modules) != self.num_layers:
            raise NotImplementedError(
                f"found {len(self._attention_modules)} attention modules for {self.num_layers} layers in "
                f"{type(model).__name__}; is this a supported decoder ({', '.join(SUPPORTED_MODEL_TYPES)})?"
            )
        model.set_attn_implementation(register())
        for module in self._attention_modules:
            module._namm_handle = self
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._previous_chunk = getattr(model.generation_config, "prefill_chunk_size", None)
        if prefill_chunk is not None:
            model.generation_config.prefill_chunk_size = prefill_chunk
        original_generate = model.generate

        @functools.wraps(original_generate)
        def generate(*args, **kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True):
                kwargs["past_key_values"] = self.new_cache()
            return original_generate(*args, **kwargs)

        model.generate = generate
        model._namm_attached = self
        self._attached = True

    def new_cache(self) -> EvictingCache:
        """A fresh evicting cache for this model (also used automatically)."""
        self.cache = EvictingCache(self.policy, self.num_layers, self.n_groups)
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
        del self.model.generate
        self.model._namm_attached = None
        self.model.generation_config.prefill_chunk_size = self._previous_chunk
        self.model.set_attn_implementation(self._previous_attn)
        self.cache, self._attached = None, False

    def __enter__(self) -> AttachedPolicy:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

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
            "nonfinite": sum(m.stats.nonfinite for m in memories),
            "updates": sum(m.stats.updates for m in memories),
            "stored_kv_bytes": sum(layer.stored_bytes() for layer in self.cache.layers),
            "full_kv_bytes": sum(layer.full_bytes() for layer in self.cache.layers),
            "bookkeeping_bytes": sum(m.bookkeeping_nbytes() for m in memories),
            "max_rows_buffered": max(_rows_buffered(m.state) for m in memories),
            "timing": timing,
        }


def _rows_buffered(state: Any) -> int:
    window = getattr(state, "window", None)
    return 0 if window is None else int(window.shape[-2])


def attach(model: torch.nn.Module, policy: MemoryPolicy, prefill_chunk: int | None = None) -> AttachedPolicy:
    """Make ``model`` (a Llama / Qwen2 / Mistral causal LM) run with ``policy`` managing its KV cache.

    Args:
        model: a transformers decoder LM; its default attention (SDPA) is kept for the output.
        policy: a :class:`~namm_transfer.policies.MemoryPolicy` (a NAMM or a baseline).
        prefill_chunk: if set, ``generate()`` feeds the prompt in chunks of this many tokens, so the
            policy can evict during the prompt (the reference feeds 128-token chunks).

    Returns:
        A handle: ``handle.stats()``, ``handle.detach()``; usable as ``with attach(...) as handle:``.

    Batches must be left-padded. Decisions are per sample and, with the prompt fed in one forward,
    equal to running each sample alone; with ``prefill_chunk`` the chunk boundaries fall at different
    points of each sample's own tokens, so a padded sample's decisions may differ from a solo run.
    Beam search and assisted decoding are not supported (the cache cannot be reordered or cropped).
    """
    return AttachedPolicy(model, policy, prefill_chunk)
