"""Storage that grows a few tokens at a time (decoding, a rollout's steps) without copying itself at
every step.

One rule for every such buffer (the KV cache's slots, the spectrogram state's key columns): a buffer
that must grow by fewer tokens than the spare room it would take takes spare room of an eighth of its
new size, at least :data:`MIN_SPARE` slots, so each slot is copied a bounded number of times; a larger
step (a prefill chunk) is allocated exactly.
"""

from __future__ import annotations

import torch

MIN_SPARE = 64


def grown_capacity(needed: int, step: int) -> int:
    """Slots to allocate when a buffer must hold ``needed`` slots after growing by ``step``."""
    spare = max(MIN_SPARE, needed // 8)
    return needed + spare if step < spare else needed


def max_spare(slots: int) -> int:
    """The most spare slots a buffer grown by :func:`grown_capacity` has beside ``slots`` used ones (it
    took at most that when it was allocated, and has filled some since)."""
    return max(MIN_SPARE, slots // 8)


def widened(x: torch.Tensor, capacity: int, dim: int = -1) -> torch.Tensor:
    """``x`` copied into fresh zeroed storage with ``capacity`` (>= its size) entries along ``dim``."""
    shape = list(x.shape)
    size, shape[dim] = shape[dim], capacity
    out = x.new_zeros(shape)
    out.narrow(dim, 0, size).copy_(x)
    return out
