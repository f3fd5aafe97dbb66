"""namm-transfer: Neural Attention Memory Models that read only attention, for any transformer.

The core (this package) consumes attention matrices and decides which KV-cache tokens to keep; it
imports no model, environment or video library. ``namm_transfer.adapters`` attaches a policy to
Hugging Face models, ``namm_transfer.envs`` holds the RL side, ``namm_transfer.pipelines`` the jobs.
"""

from namm_transfer.checkpoint import import_reference_checkpoint
from namm_transfer.memory import LayerMemory
from namm_transfer.namm import NAMM, NAMMConfig
from namm_transfer.policies import H2O, TOVA, FullCache, L2Norm, MemoryPolicy, RandomEviction, Recency, SnapKV
from namm_transfer.shipped import pretrained

__version__ = "0.1.0"

__all__ = [
    "NAMM",
    "NAMMConfig",
    "FullCache",
    "H2O",
    "L2Norm",
    "LayerMemory",
    "MemoryPolicy",
    "RandomEviction",
    "Recency",
    "SnapKV",
    "TOVA",
    "import_reference_checkpoint",
    "pretrained",
]
