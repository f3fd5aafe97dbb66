"""Tiny random decoders of many transformers 5.23 families (shared by the family matrix tests).

Each has 3 layers, 4 query heads and a vocabulary of 64 unless the family needs otherwise; sliding
windows are 12 tokens so that prompts of a few dozen tokens cross them. Each entry says what the
family exercises in the adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 64
WINDOW = 12
_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_SLIDING_MIX = ["sliding_attention", "full_attention", "sliding_attention"]

# model_type -> config overrides
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),  # every layer slides
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # layers 1, 2 slide
    "qwen3": dict(head_dim=16),  # q/k RMS norm per head; head_dim != hidden / heads
    "gemma": dict(head_dim=16, num_key_value_heads=1),
    "gemma2": dict(
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=_SLIDING_MIX,
        attn_logit_softcapping=5.0,  # small enough to bite on random weights
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=24,  # scaling 24**-0.5, not head_dim**-0.5
    ),
    "gemma3_text": dict(
        head_dim=16, num_key_value_heads=1, sliding_window=WINDOW, layer_types=_SLIDING_MIX,
        query_pre_attn_scalar=24,
    ),
    "phi3": dict(partial_rotary_factor=0.5),  # fused qkv_proj
    "phi": dict(partial_rotary_factor=0.5, qk_layernorm=True),
    "olmo2": {},
    "olmo3": dict(sliding_window=WINDOW, layer_types=_SLIDING_MIX),
    "stablelm": dict(partial_rotary_factor=0.25, qk_layernorm=True, use_qkv_bias=True),
    "granite": dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5,
                    logits_scaling=2.0),
    "cohere": dict(use_qk_norm=True, num_key_value_heads=4),
    "cohere2": dict(sliding_window=WINDOW, layer_types=_SLIDING_MIX),
    "starcoder2": dict(sliding_window=WINDOW, use_bias=True),
    "smollm3": dict(no_rope_layers=[1, 1, 0]),  # the last layer has no RoPE
    "gpt2": dict(n_layer=3, n_head=4, n_embd=32, n_positions=256, vocab_size=VOCAB),
    "gpt_neox": dict(rotary_pct=0.25, use_parallel_residual=True),
}
GPT2_DROP = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")


def config_for(model_type: str, **overrides: Any):
    kwargs = dict(_BASE)
    if model_type == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in GPT2_DROP}
    if model_type == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    kwargs.update(CONFIGS[model_type])
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_for(model_type, **overrides)).eval()
    # random weights are small: scale up the projections so that attention is peaked and differences
    # between caches show in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(3.0)
    return model
