"""Attaching memory policies to models: decoder LMs (Llama, Qwen2, Mistral, GPT-2), Decision Transformers,
and the language model of LLaVA video models (LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA)."""

from namm_transfer.adapters.attach import SUPPORTED_MODEL_TYPES, VIDEO_LLAVA_TYPES, AttachedPolicy, attach
from namm_transfer.adapters.cache import EvictingCache, EvictingLayer, MemoryReport
from namm_transfer.adapters.frame_map import (
    VideoTokenLayout,
    frame_map,
    frame_retention,
    retention_image,
    save_retention_heatmap,
    video_layout,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "VIDEO_LLAVA_TYPES",
    "AttachedPolicy",
    "EvictingCache",
    "EvictingLayer",
    "MemoryReport",
    "VideoTokenLayout",
    "attach",
    "frame_map",
    "frame_retention",
    "retention_image",
    "save_retention_heatmap",
    "video_layout",
]
