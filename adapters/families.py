"""One small descriptor per model family: what differs between families when attaching a policy.

Whether a model *can* be attached is decided by capability detection (:mod:`.detect`): its
self-attention modules dispatch through transformers' ``AttentionInterface`` and its cache is a
``DynamicCache`` of per-layer full or sliding-window attention layers. A descriptor says only what
detection cannot guess: where the language model sits inside a wrapper, how many query heads share a
KV head when the config does not say it in the usual fields, and which module owns the cache (the one
whose forward takes ``past_key_values``). Adding a family is one entry in :data:`DECODERS` or
:data:`WRAPPERS`; :func:`supported_families_markdown` renders the README's list from these entries
(``namm-transfer families --write-readme README.md`` rewrites it).

A decoder that passes detection but has no entry here is attached too, with a warning that it is
untested. The kinds that cannot work are in :data:`REFUSED`, each with the reason its error gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def default_kv_groups(config: Any) -> int:
    """Query heads per KV head from the usual config fields (multi-head attention when absent)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads // kv_heads


@dataclass(frozen=True)
class Family:
    """How to attach to one family (a ``model_type``).

    Attributes:
        model_type: ``config.model_type`` of the model handed to ``attach`` (wrappers) or of its
            language model (decoders).
        name: display name.
        notes: what the family does that the adapter handles (README).
        kv_groups: query heads per KV head from the language model's config (default: the GQA fields).
        language_model: for a wrapper, the language model inside it (default: the submodule whose config
            is the wrapper's text config).
        cache_owner: the module whose forward takes ``past_key_values`` (default: the model itself).
    """

    model_type: str
    name: str
    notes: str = ""
    kv_groups: Callable[[Any], int] = default_kv_groups
    language_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    cache_owner: Callable[[torch.nn.Module], torch.nn.Module] | None = None


@dataclass(frozen=True)
class Refusal:
    """A kind of model that cannot be attached, with the reason its error states."""

    kind: str
    examples: tuple[str, ...]
    reason: str


# Decoder families tested in tests/test_adapters_families.py (tiny random configs, transformers 5.23).
DECODERS: tuple[Family, ...] = (
    Family("llama", "Llama", "grouped-query attention"),
    Family("mistral", "Mistral", "sliding window on every layer"),
    Family("qwen2", "Qwen2", "optional sliding window on the upper layers, q/k/v biases"),
    Family("qwen3", "Qwen3", "q/k normalisation"),
    Family("gemma", "Gemma", "head_dim different from hidden/heads"),
    Family(
        "gemma2", "Gemma2", "local (sliding) and global layers, attention-logit soft-capping, custom scaling"
    ),
    Family("gemma3_text", "Gemma3", "local and global layers, q/k normalisation, a single KV head"),
    Family("phi3", "Phi3", "fused qkv projection, partial rotary embeddings"),
    Family("phi", "Phi", "partial rotary embeddings, q/k layer norm"),
    Family("olmo2", "OLMo2", "q/k normalisation over all heads"),
    Family("olmo3", "OLMo3", "sliding and full layers"),
    Family("stablelm", "StableLM", "partial rotary embeddings, per-head q/k layer norm"),
    Family("granite", "Granite", "custom attention scaling (attention_multiplier)"),
    Family("cohere", "Cohere", "parallel attention and MLP, q/k layer norm"),
    Family("cohere2", "Cohere2", "sliding layers with RoPE, global layers without"),
    Family("starcoder2", "Starcoder2", "sliding window, biases"),
    Family("smollm3", "SmolLM3", "layers without RoPE (NoPE) between RoPE layers"),
    Family("gpt2", "GPT-2", "learned absolute positions, fused c_attn projection, multi-head attention"),
    Family("gpt_neox", "GPT-NeoX", "fused qkv projection, partial rotary embeddings"),
    Family(
        "decision_transformer",
        "Decision Transformer",
        "GPT-2 encoder driven with a cache (envs.dt_rollout); all-zero position ids",
        cache_owner=lambda model: model.encoder,
    ),
)

# Multimodal wrappers: the policy manages the language model (any supported decoder) and nothing else.
WRAPPERS: tuple[Family, ...] = (
    Family("llava_next_video", "LLaVA-NeXT-Video", "video tokens frame-major (adapters.frame_map)"),
    Family("llava_onevision", "LLaVA-OneVision", "video tokens frame-major plus a newline token"),
    Family("video_llava", "Video-LLaVA", "video tokens frame-major"),
)

REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "encoder-decoder",
        ("t5", "bart"),
        "encoder-decoder models keep a cross-attention cache over the encoder's output beside the decoder's "
        "self-attention cache; namm-transfer manages decoder-only self-attention caches",
    ),
    Refusal(
        "cross-attention",
        ("mllama", "gpt2 with add_cross_attention=True"),
        "cross-attention layers attend to another sequence (an encoder's or an image's), whose keys are "
        "not this model's tokens; only self-attention caches are managed",
    ),
    Refusal(
        "state-space or hybrid layers",
        ("mamba", "mamba2", "jamba", "bamba", "falcon_h1", "zamba2",
         "qwen3_next", "lfm2", "granitemoehybrid"),
        "state-space, linear-attention and convolution layers keep a recurrent state instead of one cached "
        "key/value per token, so there is no token to keep or evict in them",
    ),
    Refusal(
        "attention outside the AttentionInterface",
        ("falcon", "gpt_neo", "gptj", "bloom", "codegen", "mpt"),
        "their attention modules compute attention themselves instead of calling transformers' registered "
        "attention function, so a policy can neither read the attention nor mask evicted tokens",
    ),
    Refusal(
        "chunked attention",
        ("llama4_text",),
        "chunked-attention layers attend within fixed chunks of absolute positions; that mask is not "
        "reproduced on an evicting cache",
    ),
    Refusal(
        "shared KV layers",
        ("gemma3n_text",),
        "layers that reuse another layer's keys and values (KV sharing) would see that layer's evictions",
    ),
    Refusal(
        "sparse attention layers",
        ("deepseek_v32", "glm_moe_dsa"),
        "indexed or compressed sparse attention layers select their keys with their own indexer cache",
    ),
    Refusal(
        "attention sinks or position bias",
        ("gpt_oss",),
        "learned attention sinks or an additive position bias change the softmax in ways the evicting "
        "attention does not compute",
    ),
)

_BY_TYPE = {f.model_type: f for f in DECODERS + WRAPPERS}


def family(model_type: str | None) -> Family | None:
    """The descriptor of ``model_type``, or None (a decoder attached by detection alone)."""
    return _BY_TYPE.get(model_type or "")


def is_wrapper(model_type: str | None) -> bool:
    return any(f.model_type == model_type for f in WRAPPERS)


def refusal(kind: str) -> Refusal:
    for r in REFUSED:
        if r.kind == kind:
            return r
    raise KeyError(kind)


def supported_families_markdown() -> str:
    """The README's list of supported and refused families, rendered from the descriptors."""
    lines = ["Decoder families (tested on tiny random configs of each, transformers 5.23):", ""]
    lines += [f"- {f.name} (`{f.model_type}`): {f.notes}" for f in DECODERS]
    lines += ["", "Multimodal wrappers, around any supported decoder:", ""]
    lines += [f"- {f.name} (`{f.model_type}`): {f.notes}" for f in WRAPPERS]
    lines += ["", "Other decoders that pass detection attach with a warning that they are untested.", ""]
    lines += ["Refused, with an error naming the reason:", ""]
    lines += [f"- {r.kind} ({', '.join(f'`{e}`' for e in r.examples)}): {r.reason}" for r in REFUSED]
    return "\n".join(lines)


# The README block between these markers is generated (``namm-transfer families --write-readme README.md``);
# tests/test_readme.py fails when it is stale.
README_START, README_END = "<!-- families:start -->", "<!-- families:end -->"


def readme_block() -> str:
    """The generated README block, markers included."""
    return f"{README_START}\n{supported_families_markdown()}\n{README_END}"


def with_readme_block(text: str) -> str:
    """``text`` (a README) with its families block replaced by the generated one."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {README_START} ... {README_END} block")
    return text[:start] + readme_block() + text[end + len(README_END) :]
