"""Attaching memory policies to model families (Hugging Face decoder LMs for now)."""

from namm_transfer.adapters.attach import SUPPORTED_MODEL_TYPES, AttachedPolicy, attach
from namm_transfer.adapters.cache import EvictingCache, EvictingLayer

__all__ = ["SUPPORTED_MODEL_TYPES", "AttachedPolicy", "EvictingCache", "EvictingLayer", "attach"]
