"""An evicting KV cache that is a native member of the transformers ``cache_utils`` family.

:class:`EvictingLayer` stores keys/values ``[B, H_kv, K, D]`` where K is the largest number of tokens
kept by any (sample, head); which slots are real is tracked by a core
:class:`~namm_transfer.memory.LayerMemory`. Like ``DynamicSlidingWindowLayer``, it reports the number
of tokens *seen* from ``get_seq_length()`` and ``(stored + q, seen - stored)`` from
``get_mask_sizes()``, so default position ids, ``generate()`` and chunked prefill keep working after
tokens were removed.

A layer of a sliding-window attention type (Mistral, Gemma2/3's local layers, ...) keeps applying its
own window: after each forward the tokens no later query can see are dropped, as transformers'
``DynamicSlidingWindowLayer`` does, and the policy manages what is inside the window.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from namm_transfer.memory import LayerMemory
from namm_transfer.policies import MemoryPolicy


class RowsBuffer:
    """float32 scratch memory shared by the layers of one cache (they run one after another), one block
    per use (``name``: ``"rows"``, the attention rows a layer hands its policy; ``"scores"``, a query
    tile's attention scores), each grown on demand: a long chunk's rows (hundreds of MiB for a whole 4k
    context) and the score tiles are not allocated, page-faulted in and freed again for every layer and
    tile (fresh pages cost more than the arithmetic on them)."""

    def __init__(self) -> None:
        self.blocks: dict[str, torch.Tensor] = {}

    @property
    def memory(self) -> torch.Tensor | None:
        """The rows block (None before the first use)."""
        return self.blocks.get("rows")

    def __call__(self, numel: int, device: torch.device, name: str = "rows") -> torch.Tensor:
        block = self.blocks.get(name)
        if block is None or block.numel() < numel or block.device != device:
            self.blocks.pop(name, None)  # free the old block before taking a larger one
            block = self.blocks[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return block


def _select_slots(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states[b, h, index[b, h, k]]``: ``[B, H, K, D]`` from ``states`` ``[B, H, S, D]``."""
    batch, heads, slots, dim = states.shape
    offsets = torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * slots
    rows = (index + offsets).reshape(-1)
    return states.reshape(batch * heads * slots, dim).index_select(0, rows).view(batch, heads, -1, dim)


class EvictingLayer(DynamicLayer):
    """One layer's cache, whose slots a memory policy may evict after each forward.

    Args:
        memory: the layer's slot table and policy state.
        sliding_window: the layer's own attention window (None: full attention). The attention function
            also learns it from the model (the ``sliding_window`` its attention module passes) when a
            cache is built without it; the smaller of the two applies.
    """

    is_croppable = False

    def __init__(
        self, memory: LayerMemory, sliding_window: int | None = None, rows: RowsBuffer | None = None
    ):
        super().__init__()
        self.memory = memory
        self.sliding_window = sliding_window
        self._awaiting_attention = False
        self._rows = rows if rows is not None else RowsBuffer()

    def rows_buffer(self, numel: int) -> torch.Tensor:
        """Scratch float32 memory of at least ``numel`` elements for this forward's attention rows (the
        policy must not keep them: see ``MemoryPolicy.rows_transient``)."""
        device = self.keys.device if self.keys is not None else torch.device("cpu")
        return self._rows(numel, device)

    def scores_buffer(self, numel: int) -> torch.Tensor:
        """Scratch float32 memory of at least ``numel`` elements for one query tile's attention scores
        (used and dropped within the attention call)."""
        device = self.keys.device if self.keys is not None else torch.device("cpu")
        return self._rows(numel, device, name="scores")

    @property
    def is_sliding(self) -> bool:  # read by transformers' Cache.is_sliding
        return self.sliding_window is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._awaiting_attention:
            raise RuntimeError(
                f"layer {self.memory.layer_idx} of the evicting cache was updated twice without its "
                "attention running through namm-transfer's registered attention function: this model "
                "computes attention outside transformers' AttentionInterface, which an evicting cache "
                "cannot manage"
            )
        keys, values = super().update(key_states, value_states)
        batch, heads, n_new, _ = key_states.shape
        self.memory.append(batch, heads, n_new, key_states.device)
        self._awaiting_attention = True
        return keys, values

    def get_seq_length(self) -> int:
        return self.memory.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.memory.n_slots
        return stored + query_length, self.memory.tokens_seen - stored

    def window_for(self, module_window: int | None) -> int | None:
        """The window that applies: the smaller of the cache layer's and the attention module's."""
        if module_window is not None and (self.sliding_window is None or module_window < self.sliding_window):
            self.sliding_window = int(module_window)
        return self.sliding_window

    def _gather(self, index: torch.Tensor) -> None:
        """Keep slots ``index`` ``[B, H, K]`` of keys and values: whole rows of the flattened
        ``[B * H * S, D]`` tensors picked by one ``index_select`` each (a row copy, far cheaper than an
        element-wise gather with the index expanded over D)."""
        self.keys = _select_slots(self.keys, index)
        self.values = _select_slots(self.values, index)

    def apply_eviction(self, force: bool = False) -> None:
        """After a forward: drop what left the sliding window, then ask the policy (if due, or at once with
        ``force``) which tokens to keep and drop the others."""
        self._awaiting_attention = False
        if self.sliding_window is not None:
            index = self.memory.expire(self.sliding_window)
            if index is not None:
                self._gather(index)
        needs_keys = getattr(self.memory.policy, "needs_keys", False)
        index = self.memory.maybe_evict(self.keys if needs_keys else None, force=force)
        if index is None:
            return
        t0 = time.perf_counter()
        self._gather(index)
        self.memory.stats.timing["eviction_s"] += time.perf_counter() - t0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped (assisted decoding is not supported)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("an evicting cache does not support contrastive search or beam pruning")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("an evicting cache does not support beam search; use greedy or sampling")

    def stored_bytes(self) -> int:
        if self.keys is None or self.keys.numel() == 0:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def kept_bytes(self) -> int:
        """Key + value bytes of the tokens actually kept (every valid slot of every sample and KV head):
        what :meth:`stored_bytes` would be without the padding of shorter heads to the longest."""
        if self.keys is None or self.keys.numel() == 0 or self.memory.valid is None:
            return 0
        slot = self.keys.shape[-1] * self.keys.element_size()
        slot += self.values.shape[-1] * self.values.element_size()
        return int(self.memory.valid.sum()) * slot

    def full_bytes(self) -> int:
        """Bytes a full (never evicting) transformers cache would hold for the same tokens: every token
        seen, or the last ``sliding_window - 1`` on a sliding-window layer."""
        if self.keys is None or self.keys.numel() == 0:
            return 0
        batch, heads, _, dim = self.keys.shape
        tokens = self.memory.tokens_seen
        if self.sliding_window is not None:
            tokens = min(tokens, self.sliding_window - 1)
        return 2 * batch * heads * tokens * dim * self.keys.element_size()


@dataclass
class MemoryReport:
    """What an :class:`EvictingCache` holds, per layer: the public view jobs read to measure a policy
    (budgets, kept token kinds, retention maps) without reaching into its bookkeeping.

    Attributes:
        valid: per layer ``[B, H_kv, S]``, which slots hold a token (heads keep different numbers).
        positions: per layer ``[B, H_kv, S]``, each slot's absolute position in the sequence.
        since_update: per layer ``[B]``, tokens added since the policy last ran (every policy holds
            them whatever its budget).
        slot_bytes: per layer, the key + value bytes of one token of one KV head.
    """

    valid: list[torch.Tensor]
    positions: list[torch.Tensor]
    since_update: list[torch.Tensor]
    slot_bytes: list[int]

    def sample(self, b: int) -> dict[str, list[float]]:
        """Sample ``b``'s ``kept_per_layer`` (tokens held, mean over KV heads) and ``since_update``
        (per layer): the row fields :func:`namm_transfer.pipelines.harness.matched_budget` reads."""
        return {
            "kept_per_layer": [float(v[b].sum(-1).double().mean()) for v in self.valid],
            "since_update": [float(s[b]) for s in self.since_update],
        }

    def retention(self, b: int, tokens_seen: int) -> torch.Tensor:
        """``[layers, tokens_seen]``: for sample ``b``, the share of each layer's KV heads that still
        hold each token (by absolute position)."""
        image = torch.zeros(len(self.valid), tokens_seen, dtype=torch.float32)
        for i, (valid, positions) in enumerate(zip(self.valid, self.positions, strict=True)):
            held = positions[b][valid[b]].long().cpu()
            image[i].index_add_(0, held, torch.full((held.numel(),), 1.0 / valid.shape[1]))
        return image


class EvictingCache(DynamicCache):
    """A ``DynamicCache`` whose layers are :class:`EvictingLayer` s driven by ``policy``.

    Args:
        policy: the memory policy shared by all layers (per-layer state lives in each LayerMemory).
        num_layers: decoder layers with a KV cache.
        n_groups: query heads per KV head.
        sliding_windows: each layer's own attention window (None entries: full attention); None: learnt
            from the model at the first forward.
    """

    def __init__(
        self,
        policy: MemoryPolicy,
        num_layers: int,
        n_groups: int = 1,
        sliding_windows: Sequence[int | None] | None = None,
    ):
        self.policy = policy
        windows = list(sliding_windows) if sliding_windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows given for {num_layers} layers")
        rows = RowsBuffer()
        layers = [
            EvictingLayer(LayerMemory(policy, i, n_groups), windows[i], rows) for i in range(num_layers)
        ]
        super(DynamicCache, self).__init__(layers=layers)

    def memory(self, layer_idx: int) -> LayerMemory:
        return self.layers[layer_idx].memory

    def memory_report(self) -> MemoryReport:
        """What each sample holds now, per layer (see :class:`MemoryReport`)."""
        valid, positions, since, slot_bytes = [], [], [], []
        for layer in self.layers:
            m = layer.memory
            if m.valid is None:
                raise RuntimeError("the cache holds no tokens yet: run a forward with the policy first")
            valid.append(m.valid)
            positions.append(m.positions)
            since.append(m.real_seen - m.last_update)
            keys = layer.keys
            slot_bytes.append(0 if keys is None else 2 * keys.shape[-1] * keys.element_size())
        return MemoryReport(valid, positions, since, slot_bytes)
