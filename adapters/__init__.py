"""Attaching memory policies to models: decoder LMs (Llama, Qwen2, Mistral, GPT-2), Decision Transformers."""

from namm_transfer.adapters.attach import SUPPORTED_MODEL_TYPES, AttachedPolicy, attach
from namm_transfer.adapters.cache import EvictingCache, EvictingLayer

__all__ = ["SUPPORTED_MODEL_TYPES", "AttachedPolicy", "EvictingCache", "EvictingLayer", "attach"]
