"""Capability detection: can a memory policy manage this model's KV cache, and how.

A model is attachable when (1) it is decoder-only (no encoder-decoder, no cross-attention), (2) its
language model's cache is a ``DynamicCache`` of per-layer full or sliding-window attention layers
(transformers' ``layer_types``; no state-space, convolution, chunked, sparse or shared-KV layers), and
(3) each layer has one self-attention module whose ``forward`` dispatches through transformers'
``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``), so our registered function both sees the
attention and masks evicted slots. The family descriptor (:mod:`.families`) supplies the rest.
Anything else raises :class:`UnsupportedModelError` naming the reason.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from namm_transfer.adapters.families import WRAPPERS, Family, default_kv_groups, family, is_wrapper, refusal

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
STATE_LAYER_TYPES = ("linear_attention", "conv", "hybrid", "hybrid_sliding")
SPARSE_LAYER_TYPES = ("indexed_attention", "compressed_sparse_attention", "heavily_compressed_attention")
# module class names of recurrent / state-space / convolution token mixers
STATE_MODULE = re.compile(r"Mamba|Mixer|SSM|ShortConv|DeltaNet|Recurrent|RWKV|LinearAttention")
# keyword arguments of the attention call that change the softmax (see attention.UNSUPPORTED_KWARGS)
SINK_ARGUMENT = re.compile(r"\b(s_aux|sinks|position_bias)\s*=")


class UnsupportedModelError(NotImplementedError):
    """The model cannot be attached; the message names the reason."""


@dataclass
class AttachPlan:
    """Where a policy plugs into one model.

    Attributes:
        model_type: the language model's ``model_type``.
        family: its descriptor, or None for a decoder attached by detection alone (untested).
        wrapper: the multimodal wrapper's descriptor, if the model is one.
        text_config: the language model's config.
        text_config_key: the wrapper's sub-config name holding it (None: the model is the language model).
        language_model: the module holding the decoder layers.
        attention_modules: one self-attention module per layer, in layer order.
        sliding_windows: each layer's own attention window (None: full attention).
        n_groups: query heads per KV head.
        cache_owner: the module whose forward takes ``past_key_values``.
    """

    model_type: str
    family: Family | None
    wrapper: Family | None
    text_config: Any
    text_config_key: str | None
    language_model: torch.nn.Module
    attention_modules: list[torch.nn.Module]
    sliding_windows: list[int | None]
    n_groups: int
    cache_owner: torch.nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.attention_modules)


def _refuse(model: torch.nn.Module, kind: str, detail: str) -> UnsupportedModelError:
    model_type = getattr(model.config, "model_type", None)
    return UnsupportedModelError(
        f"namm-transfer cannot attach to {type(model).__name__} (model_type={model_type!r}): {kind} "
        f"({detail}); {refusal(kind).reason}"
    )


@functools.cache
def _forward_source(cls: type) -> str:
    for klass in cls.__mro__:
        if "forward" in vars(klass):
            try:
                return inspect.getsource(vars(klass)["forward"])
            except (OSError, TypeError):
                return ""
    return ""


def dispatches_through_interface(module: torch.nn.Module) -> bool:
    """Whether the module's forward calls the attention function registered for its config."""
    return "ALL_ATTENTION_FUNCTIONS" in _forward_source(type(module))


def text_config_of(model: torch.nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _text_config_key(model: torch.nn.Module, text: Any) -> str | None:
    config = model.config
    if text is config:
        return None
    for key in getattr(config, "sub_configs", {}):
        if getattr(config, key, None) is text:
            return key
    raise UnsupportedModelError(f"cannot find the language model's sub-config of {type(model).__name__}")


def _check_cross_attention(model: torch.nn.Module, text: Any) -> None:
    for config in (model.config, text):
        if getattr(config, "add_cross_attention", False):
            raise _refuse(model, "cross-attention", "add_cross_attention=True")
        if getattr(config, "cross_attention_layers", None):
            raise _refuse(model, "cross-attention", f"cross_attention_layers={config.cross_attention_layers}")
    for name, module in model.named_modules():
        if getattr(module, "is_cross_attention", False) is True or "CrossAttention" in type(module).__name__:
            raise _refuse(model, "cross-attention", f"module {name} is a {type(module).__name__}")


def _layer_windows(model: torch.nn.Module, text: Any) -> list[int | None]:
    """Each layer's window from transformers' own cache layout (what ``DynamicCache(config=...)`` builds)."""
    layer_types, kwargs = get_layer_types_and_kwargs(text)
    kinds = set(layer_types)
    if kinds & set(STATE_LAYER_TYPES):
        raise _refuse(model, "state-space or hybrid layers", f"layer types {sorted(kinds)}")
    if "chunked_attention" in kinds:
        raise _refuse(model, "chunked attention", f"layer types {sorted(kinds)}")
    if "dummy" in kinds:
        if getattr(text, "kv_sharing_modes", None) is not None:
            raise _refuse(model, "shared KV layers", f"layer types {sorted(kinds)}")
        raise _refuse(model, "state-space or hybrid layers", f"layers without attention: {sorted(kinds)}")
    if kinds & set(SPARSE_LAYER_TYPES):
        raise _refuse(model, "sparse attention layers", f"layer types {sorted(kinds)}")
    other = kinds - set(ATTENTION_LAYER_TYPES)
    if other:
        raise UnsupportedModelError(
            f"namm-transfer cannot attach to {type(model).__name__}: cache layer types {sorted(other)} are "
            f"not full or sliding-window attention"
        )
    return [
        kw.get("sliding_window") if t == "sliding_attention" else None
        for t, kw in zip(layer_types, kwargs, strict=True)
    ]


def _attention_modules(model: torch.nn.Module, language_model: torch.nn.Module, n_layers: int) -> list:
    """One self-attention module per layer that dispatches through the AttentionInterface."""
    found, outside, state = {}, [], []
    for name, module in language_model.named_modules():
        cls = type(module).__name__
        if STATE_MODULE.search(cls):
            state.append(cls)
        if not isinstance(getattr(module, "layer_idx", None), int):
            continue
        if dispatches_through_interface(module):
            if module.layer_idx in found:
                raise UnsupportedModelError(
                    f"namm-transfer cannot attach to {type(model).__name__}: layer {module.layer_idx} has "
                    f"two attention modules ({type(found[module.layer_idx]).__name__}, {cls})"
                )
            found[module.layer_idx] = module
        elif "Attention" in cls:
            outside.append(f"{name} ({cls})")
    if outside:
        raise _refuse(model, "attention outside the AttentionInterface", f"e.g. {outside[0]}")
    if not found:
        if state:
            raise _refuse(model, "state-space or hybrid layers", f"{sorted(set(state))[0]} modules")
        raise _refuse(model, "attention outside the AttentionInterface", "no attention module calls it")
    if sorted(found) != list(range(n_layers)):
        if state:
            raise _refuse(model, "state-space or hybrid layers", f"{sorted(set(state))[0]} modules")
        raise _refuse(
            model,
            "attention outside the AttentionInterface",
            f"attention modules for layers {sorted(found)} of {n_layers}",
        )
    modules = [found[i] for i in range(n_layers)]
    source = _forward_source(type(modules[0]))
    sink = SINK_ARGUMENT.search(source)
    if sink:
        what = f"{type(modules[0]).__name__} passes {sink[1]}"
        raise _refuse(model, "attention sinks or position bias", what)
    return modules


def _language_model(model: torch.nn.Module, text: Any, wrapper: Family | None) -> torch.nn.Module:
    if text is model.config:
        return model
    if wrapper is not None and wrapper.language_model is not None:
        return wrapper.language_model(model)
    owners = [m for m in model.modules() if m is not model and getattr(m, "config", None) is text]
    if not owners:
        raise UnsupportedModelError(f"cannot find the language model inside {type(model).__name__}")
    return owners[0]


def plan_attachment(model: torch.nn.Module) -> AttachPlan:
    """Detect whether ``model`` can be attached and where; raise :class:`UnsupportedModelError` if not."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "encoder-decoder", "is_encoder_decoder=True")
    text = text_config_of(model)
    _check_cross_attention(model, text)
    wrapper = None
    if text is not config:
        if not is_wrapper(config.model_type):
            known = ", ".join(w.model_type for w in WRAPPERS)
            raise UnsupportedModelError(
                f"namm-transfer cannot attach to {type(model).__name__} (model_type={config.model_type!r}): "
                "a multimodal wrapper without a descriptor (its masks may not be causal); known wrappers: "
                f"{known}"
            )
        wrapper = family(config.model_type)
    windows = _layer_windows(model, text)
    language_model = _language_model(model, text, wrapper)
    modules = _attention_modules(model, language_model, len(windows))
    model_type = getattr(text, "model_type", None) or type(model).__name__
    fam = family(model_type)
    if fam is None or fam in WRAPPERS:
        fam = None
        warnings.warn(
            f"model_type={model_type!r} is not among namm-transfer's tested families; attaching because its "
            "attention goes through the AttentionInterface and its cache is full/sliding attention layers",
            UserWarning,
            stacklevel=3,
        )
    n_groups = (fam.kv_groups if fam is not None else default_kv_groups)(text)
    owner = fam.cache_owner(model) if fam is not None and fam.cache_owner is not None else model
    return AttachPlan(
        model_type=model_type,
        family=fam,
        wrapper=wrapper,
        text_config=text,
        text_config_key=_text_config_key(model, text),
        language_model=language_model,
        attention_modules=modules,
        sliding_windows=windows,
        n_groups=n_groups,
        cache_owner=owner,
    )
