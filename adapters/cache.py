"""An evicting KV cache that is a native member of the transformers ``cache_utils`` family.

:class:`EvictingLayer` presents keys/values ``[B, H_kv, S, D]`` to the attention, where the first K slots
hold what survived the latest eviction (K: the largest number of tokens kept by any (sample, head)) and
the rest the tokens added since; which slots are real is tracked by a core
:class:`~namm_transfer.memory.LayerMemory`. Heads keep different numbers of tokens (a NAMM's threshold,
left padding), so in the ``"packed"`` layout the survivors are *stored* without the padding
(:class:`PackedSlots`: the valid rows only, plus where they go) and the padded view is rebuilt for each
forward, a copy of the whole cache; ``"padded"`` stores the view itself; the default ``"auto"`` packs
only when the padding exceeds a tenth of the kept slots (:data:`AUTO_PACK_PADDING`). Like
``DynamicSlidingWindowLayer``, it reports the number of tokens *seen* from ``get_seq_length()`` and
``(stored + q, seen - stored)`` from ``get_mask_sizes()``, so default position ids, ``generate()`` and
chunked prefill keep working after tokens were removed.

A layer of a sliding-window attention type (Mistral, Gemma2/3's local layers, ...) keeps applying its
own window: after each forward the tokens no later query can see are dropped, as transformers'
``DynamicSlidingWindowLayer`` does, and the policy manages what is inside the window.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from namm_transfer.capacity import grown_capacity, widened
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
    """``states[b, h, index[b, h, k]]``: ``[B, H, K, D]`` from ``states`` ``[B, H, S, D]``: whole rows of
    the flattened ``[B * H * S, D]`` tensor picked by one ``index_select`` (a row copy, far cheaper than
    an element-wise gather with the index expanded over D)."""
    batch, heads, slots, dim = states.shape
    offsets = torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * slots
    rows = (index + offsets).reshape(-1)
    return states.reshape(batch * heads * slots, dim).index_select(0, rows).view(batch, heads, -1, dim)


KV_LAYOUTS = ("auto", "packed", "padded")
DEFAULT_KV_LAYOUT = "auto"
# ``"auto"`` packs what an eviction kept only when the padded view would store more than this share
# beyond the kept tokens: the storage then stays within 10% of what is kept either way, and per-token
# workloads whose heads keep similar counts (a rollout's evictions every few steps) skip the per-forward
# rebuild of the view, a copy of the whole cache for every token.
AUTO_PACK_PADDING = 0.10
# Most (sample, KV head) pairs a packed layer unpacks by slice copies (one per pair); more take one
# indexed copy of all rows, cheaper than that many small copies.
MAX_SEGMENTS = 32


@dataclass
class PackedSlots:
    """The first ``width`` slots of a layer's ``[B, H, width + tail, D]`` view, stored without padding.

    Attributes:
        keys, values: ``[N, D]``: the N valid slots' rows, in slot order.
        rows: ``[N]`` each row's index in the flattened ``[B * H * width]`` slot table (int32 when it
            fits: 4 bytes against a row's ``2 * D * element_size``).
        width: slots per (sample, head) of the padded view (the largest kept count).
    """

    keys: torch.Tensor
    values: torch.Tensor
    rows: torch.Tensor
    width: int
    # Rows per (sample, head) when each one's valid slots are its first ones (what an eviction's
    # compaction leaves) and there are few (sample, head) pairs: unpacking is then one slice copy per
    # pair instead of an indexed copy of every row. None otherwise.
    segments: tuple[int, ...] | None = None

    @classmethod
    def pack(cls, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> PackedSlots:
        """Keep the rows of ``keys``/``values`` ``[B, H, S, D]`` where ``valid`` ``[B, H, S]``."""
        rows = valid.reshape(-1).nonzero().squeeze(1)
        flat_k = keys.reshape(-1, keys.shape[-1])
        flat_v = values.reshape(-1, values.shape[-1])
        narrow = torch.int32 if valid.numel() < 2**31 else torch.int64  # the index is part of the storage
        packed_k, packed_v = flat_k.index_select(0, rows), flat_v.index_select(0, rows)
        segments = None
        if valid.shape[0] * valid.shape[1] <= MAX_SEGMENTS:
            counts = valid.sum(-1)
            first = torch.arange(valid.shape[-1], device=valid.device) < counts[..., None]
            if bool((valid == first).all()):
                segments = tuple(counts.reshape(-1).tolist())
        return cls(packed_k, packed_v, rows.to(narrow), keys.shape[-2], segments)

    def unpack(self, packed: torch.Tensor, shape: tuple[int, int], tail: torch.Tensor | None) -> torch.Tensor:
        """``[B, H, width + T, D]``: the stored rows at their slots (zeros in the padding; the attention
        masks those slots), followed by ``tail`` ``[B, H, T, D]`` (the slots added since the packing)."""
        batch, heads = shape
        n_tail = 0 if tail is None or tail.dim() < 4 else tail.shape[-2]
        if self.segments is not None:
            out = packed.new_empty(batch, heads, self.width + n_tail, packed.shape[-1])
            per_pair = out.view(batch * heads, self.width + n_tail, packed.shape[-1])
            start = 0
            for pair, count in enumerate(self.segments):
                per_pair[pair, :count] = packed[start : start + count]
                per_pair[pair, count : self.width] = 0.0
                start += count
        else:
            out = packed.new_zeros(batch, heads, self.width + n_tail, packed.shape[-1])
            rows = self.rows.long()
            if n_tail:  # row r of a (sample, head) starting at h * width starts at h * (width + T)
                rows = rows + (rows // self.width) * n_tail
            out.view(-1, packed.shape[-1]).index_copy_(0, rows, packed)
        if n_tail:
            out[:, :, self.width :] = tail
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.rows))


class EvictingLayer(DynamicLayer):
    """One layer's cache, whose slots a memory policy may evict after each forward.

    Args:
        memory: the layer's slot table and policy state.
        sliding_window: the layer's own attention window (None: full attention). The attention function
            also learns it from the model (the ``sliding_window`` its attention module passes) when a
            cache is built without it; the smaller of the two applies.
        kv_layout: ``"packed"`` stores what an eviction kept without the padding of shorter heads
            (:class:`PackedSlots`), ``"padded"`` stores the padded view (a copy less per forward),
            ``"auto"`` packs only when the padding exceeds :data:`AUTO_PACK_PADDING` of the kept slots.

    ``keys`` / ``values`` read the padded view ``[B, H_kv, S, D]`` (rebuilt from the packed rows when
    stored packed); assigning them stores a dense view.
    """

    is_croppable = False

    def __init__(
        self,
        memory: LayerMemory,
        sliding_window: int | None = None,
        rows: RowsBuffer | None = None,
        kv_layout: str = DEFAULT_KV_LAYOUT,
    ):
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        self.kv_layout = kv_layout
        self._packed: PackedSlots | None = None  # the survivors of the latest eviction, when packed
        # keys, values: the view, or the slots after _packed; stored with spare capacity along the slot
        # axis (the first _n_dense slots are real) so that a decoding step appends in place
        self._dense: list[torch.Tensor | None] = [None, None]
        self._n_dense = 0
        self._view: tuple[torch.Tensor, torch.Tensor] | None = None  # this forward's padded view
        super().__init__()
        self.memory = memory
        self.sliding_window = sliding_window
        self._awaiting_attention = False
        self._rows = rows if rows is not None else RowsBuffer()
        # called after this layer's own eviction at the end of its attention (a weak reference to the
        # cache's joint eviction)
        self.after_eviction: weakref.WeakMethod | None = None

    def _dense_view(self, which: int) -> torch.Tensor | None:
        dense = self._dense[which]
        return dense if dense is None or dense.dim() < 4 else dense[..., : self._n_dense, :]

    def _read(self, which: int) -> torch.Tensor | None:
        if self._view is not None:
            return self._view[which]
        dense = self._dense_view(which)
        if self._packed is None:
            return dense
        packed = self._packed.keys if which == 0 else self._packed.values
        return self._packed.unpack(packed, self.memory.valid.shape[:2], dense)

    def _write(self, which: int, value: torch.Tensor | None) -> None:
        self._view = None
        self._packed = None
        self._dense[which] = value
        self._n_dense = 0 if value is None or value.dim() < 4 else value.shape[-2]

    keys = property(lambda self: self._read(0), lambda self, v: self._write(0, v))
    values = property(lambda self: self._read(1), lambda self, v: self._write(1, v))

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
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        tail_k, tail_v = self._append(key_states, value_states)
        batch, heads, n_new, _ = key_states.shape
        self.memory.append(batch, heads, n_new, key_states.device)
        if self._packed is not None:  # rebuilt once per forward; dropped after the eviction step
            shape = (batch, heads)
            self._view = (self._packed.unpack(self._packed.keys, shape, tail_k),
                          self._packed.unpack(self._packed.values, shape, tail_v))
        self._awaiting_attention = True
        return self.keys, self.values

    def _append(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new slots to the dense storage, in place while its spare capacity lasts (a decoding
        step then copies only its own tokens, where ``torch.cat`` would copy the whole cache); returns the
        dense views."""
        n_old, n_new = self._n_dense, key_states.shape[-2]
        buffers = []
        for which, new in enumerate((key_states, value_states)):
            # only buffers grown here are wider than their slots: an assigned tensor (a fork's expanded
            # view, a restored cache) is exactly as wide, so it is copied before anything is written
            buf = self._dense[which]
            if buf is None or buf.dim() < 4 or buf.shape[-2] < n_old + n_new:
                old = new[..., :0, :] if n_old == 0 else buf[..., :n_old, :]
                buf = widened(old, grown_capacity(n_old + n_new, n_new), dim=-2)
            buf[..., n_old : n_old + n_new, :] = new
            buffers.append(buf)
        self._dense, self._n_dense = buffers, n_old + n_new
        return self._dense_view(0), self._dense_view(1)

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

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the view left by an eviction: packed when some (sample, head) holds fewer slots than the
        view is wide and the layout packs (``"packed"``; ``"auto"`` when the padding is more than
        :data:`AUTO_PACK_PADDING` of the kept slots), else as it is."""
        valid = self.memory.valid
        if self._packs(valid):
            packed = PackedSlots.pack(keys, values, valid)
            empty_k, empty_v = keys[..., :0, :], values[..., :0, :]
            self._packed, self._dense, self._view = packed, [empty_k, empty_v], None
            self._n_dense = 0
        else:
            self._packed, self._dense, self._view = None, [keys, values], None
            self._n_dense = keys.shape[-2]

    def _packs(self, valid: torch.Tensor) -> bool:
        if self.kv_layout == "padded":
            return False
        kept = int(valid.sum())
        if kept == valid.numel():
            return False
        return self.kv_layout == "packed" or valid.numel() > (1 + AUTO_PACK_PADDING) * kept

    def apply_eviction(self, force: bool = False, due: torch.Tensor | None = None) -> None:
        """After a forward: drop what left the sliding window, then ask the policy (if due, at once with
        ``force``, or for the samples of ``due``) which tokens to keep and drop the others."""
        self._awaiting_attention = False
        keys, values = self.keys, self.values
        self._view = None  # the stored form (packed + tail) is current; the view was only this forward's
        changed = False
        if self.sliding_window is not None:
            index = self.memory.expire(self.sliding_window)
            if index is not None:
                keys, values = _select_slots(keys, index), _select_slots(values, index)
                changed = True
        needs_keys = getattr(self.memory.policy, "needs_keys", False)
        index = self.memory.maybe_evict(keys if needs_keys else None, force=force, due=due)
        t0 = time.perf_counter()
        if index is not None:
            keys, values = _select_slots(keys, index), _select_slots(values, index)
            changed = True
        if changed:
            self._store(keys, values)
        self.memory.stats.timing["eviction_s"] += time.perf_counter() - t0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be cropped (assisted decoding is not supported)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("an evicting cache does not support contrastive search or beam pruning")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("an evicting cache does not support beam search; use greedy or sampling")

    def stored_slots(self) -> int:
        """Slots per (sample, KV head) of the padded view (what the attention reads)."""
        return self._n_dense + (0 if self._packed is None else self._packed.width)

    def slot_bytes(self) -> int:
        """Key + value bytes of one token of one KV head (0 before the first token)."""
        keys, values = self._dense
        if keys is None or keys.dim() < 4:
            return 0
        return keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()

    def stored_bytes(self) -> int:
        """Bytes of the slots this layer holds between forwards: the packed rows and their slot indices
        (packed layout) plus the dense slots (:meth:`spare_bytes` not included)."""
        total = 0 if self._packed is None else self._packed.nbytes()
        dense = self._dense_view(0), self._dense_view(1)
        return total + sum(0 if t is None else t.numel() * t.element_size() for t in dense)

    def spare_bytes(self) -> int:
        """Bytes allocated beyond the dense slots: the room decoding appends into
        (:func:`~namm_transfer.capacity.grown_capacity`)."""
        allocated = sum(0 if t is None else t.numel() * t.element_size() for t in self._dense)
        return allocated - sum(0 if t is None else t.numel() * t.element_size()
                               for t in (self._dense_view(0), self._dense_view(1)))

    def kept_bytes(self) -> int:
        """Key + value bytes of the tokens actually kept (every valid slot of every sample and KV head):
        what :meth:`stored_bytes` would be with no padding of shorter heads to the longest."""
        if self.memory.valid is None:
            return 0
        return int(self.memory.valid.sum()) * self.slot_bytes()

    def full_bytes(self) -> int:
        """Bytes a full (never evicting) transformers cache would hold for the same tokens: every token
        seen, or the last ``sliding_window - 1`` on a sliding-window layer."""
        if self.memory.valid is None:
            return 0
        batch, heads = self.memory.valid.shape[:2]
        tokens = self.memory.tokens_seen
        if self.sliding_window is not None:
            tokens = min(tokens, self.sliding_window - 1)
        return batch * heads * tokens * self.slot_bytes()


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
        kv_layout: how layers store what an eviction kept (see :class:`EvictingLayer`).
    """

    def __init__(
        self,
        policy: MemoryPolicy,
        num_layers: int,
        n_groups: int = 1,
        sliding_windows: Sequence[int | None] | None = None,
        kv_layout: str = DEFAULT_KV_LAYOUT,
    ):
        self.policy = policy
        windows = list(sliding_windows) if sliding_windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows given for {num_layers} layers")
        rows = RowsBuffer()
        layers = [
            EvictingLayer(LayerMemory(policy, i, n_groups), windows[i], rows, kv_layout)
            for i in range(num_layers)
        ]
        super(DynamicCache, self).__init__(layers=layers)
        if policy.joint:  # all layers evict together, after the last one's attention
            # weakly: a layer holding its cache would make a cycle that only the garbage collector frees,
            # keeping every discarded cache's keys and values alive until it runs
            layers[-1].after_eviction = weakref.WeakMethod(self.evict_jointly)

    def evict_jointly(self, force: bool = False) -> None:
        """Evict every layer at once with a policy whose update reads every layer (``policy.joint``, a
        joint NAMM): where the last layer is due (all layers see the same tokens), or at once with
        ``force``. Called at the end of the last layer's attention, and by a one-shot fork."""
        memories = [layer.memory for layer in self.layers]
        last = memories[-1]
        if last.positions is None:
            return
        due = torch.ones_like(last.real_seen, dtype=torch.bool) if force else last.due()
        if not bool(due.any()):
            return
        t0 = time.perf_counter()
        views = [m.view() for m in memories]
        self.policy.prepare_joint([m.state for m in memories], views)
        last.stats.timing["scoring_s"] += time.perf_counter() - t0
        try:
            for layer in self.layers:
                layer.apply_eviction(due=due)
        finally:
            self.policy.release_joint()

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
            slot_bytes.append(layer.slot_bytes())
        return MemoryReport(valid, positions, since, slot_bytes)
