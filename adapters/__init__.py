"""Attaching memory policies to models: any decoder LM whose attention goes through transformers'
AttentionInterface (capability detection, one descriptor per family), Decision Transformers, and the
language model of LLaVA video models (LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA)."""

from namm_transfer.adapters.attach import SUPPORTED_MODEL_TYPES, AttachedPolicy, attach
from namm_transfer.adapters.cache import EvictingCache, EvictingLayer, MemoryReport
from namm_transfer.adapters.detect import AttachPlan, UnsupportedModelError, plan_attachment
from namm_transfer.adapters.families import DECODERS, REFUSED, WRAPPERS, Family, supported_families_markdown
from namm_transfer.adapters.frame_map import (
    VideoTokenLayout,
    frame_map,
    frame_retention,
    retention_image,
    save_retention_heatmap,
    video_layout,
)

__all__ = [
    "DECODERS",
    "REFUSED",
    "SUPPORTED_MODEL_TYPES",
    "WRAPPERS",
    "AttachPlan",
    "AttachedPolicy",
    "EvictingCache",
    "EvictingLayer",
    "MemoryReport",
    "Family",
    "UnsupportedModelError",
    "VideoTokenLayout",
    "attach",
    "frame_map",
    "frame_retention",
    "plan_attachment",
    "retention_image",
    "save_retention_heatmap",
    "supported_families_markdown",
    "video_layout",
]
