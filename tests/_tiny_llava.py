"""Tiny random LLaVA video models of the three families (shared by the adapter and video-IO tests).

Vision towers: 32 px frames, 8 px patches (P = 4 patches per side), 2 layers; language models: a
2-layer Llama (LLaVA-NeXT-Video, Video-LLaVA) or Qwen2 (OneVision) with 4 query / 2 KV heads, or
another family's language model inside LLaVA-NeXT-Video (:func:`other_text`).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

FAMILIES = ("llava_next_video", "llava_onevision", "video_llava")
VIDEO_ID, IMAGE_ID, VOCAB = 100, 101, 120
FRAMES = 3


def _vision(cls):  # 32 px, 8 px patches: P = 4 patches per side
    return cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )


def _text(cls):
    return cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )


def other_text(model_type: str):
    """A non-Llama language model: ``gemma3_text`` (sliding-window layers 12 tokens wide around a global
    one, a single KV head, head_dim 16) or any family taking the usual size fields (e.g. ``qwen3``)."""
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )
    if model_type == "gemma3_text":
        kwargs.update(
            num_key_value_heads=1, head_dim=16, sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    return AutoConfig.for_model(model_type, **kwargs)


def build(family: str, text_type: str | None = None):
    """A tiny LLaVA video model; ``text_type`` swaps LLaVA-NeXT-Video's Llama for another family."""
    torch.manual_seed(0)
    ids = {"video_token_index": VIDEO_ID, "image_token_index": IMAGE_ID}
    if family == "llava_next_video":
        text = _text(LlamaConfig) if text_type is None else other_text(text_type)
        config = LlavaNextVideoConfig(vision_config=_vision(CLIPVisionConfig), text_config=text, **ids)
        return LlavaNextVideoForConditionalGeneration(config).eval()
    if family == "llava_onevision":
        config = LlavaOnevisionConfig(
            vision_config=_vision(SiglipVisionConfig), text_config=_text(Qwen2Config), **ids
        )
        return LlavaOnevisionForConditionalGeneration(config).eval()
    config = VideoLlavaConfig(vision_config=_vision(CLIPVisionConfig), text_config=_text(LlamaConfig), **ids)
    return VideoLlavaForConditionalGeneration(config).eval()
