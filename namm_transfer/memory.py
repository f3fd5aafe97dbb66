"""Model-agnostic bookkeeping of one attention layer's KV cache under a memory policy.

:class:`LayerMemory` tracks, for every stored slot, the token's arrival index and validity (padding,
evicted, empty), builds the attention mask from those absolute indices (and the layer's own sliding
window, if it has one), feeds the policy the latest attention, and when an update is due turns its keep
mask into a compact gather index. An adapter owns the key/value tensors and applies that index; nothing
here knows which model it serves.

When an update is due (:meth:`LayerMemory.due`), per sample:
- *cadence*: the sample's real token count crossed a multiple of ``policy.update_every``;
- *first fill*: the policy has not updated this sample yet and it holds more tokens per KV head than the
  policy's cap (:meth:`~namm_transfer.policies.MemoryPolicy.token_cap`), so a prompt shorter than the
  cadence is still brought to its budget at the end of its prefill.
Hence the budget guarantee: after any forward, no (sample, KV head) holds more than
``cap + update_every - 1`` tokens (``cap`` as of the latest update), and none holds more than ``cap``
before its first update.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from namm_transfer.policies.base import CacheView, MemoryPolicy
from namm_transfer.selection import compact_index

# where a policy's own time goes, in LayerStats.timing (and handle.stats()["timing"]): the attention rows
# it reads, its features, its scoring, the eviction
TIMING_KEYS = ("capture_s", "features_s", "scoring_s", "eviction_s")


@dataclass
class LayerStats:
    evictions: int = 0  # tokens the policy dropped
    expired: int = 0  # tokens that left the layer's own sliding window (not the policy's doing)
    nonfinite: int = 0
    updates: int = 0
    timing: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0)
    )


class LayerMemory:
    """Slot table of one layer: ``positions`` and ``valid``, both ``[B, H_kv, S]``.

    Args:
        policy: the memory policy.
        layer_idx: which layer (policies may use per-layer budgets).
        n_groups: query heads per KV head (GQA); attention is averaged over each group.
    """

    def __init__(self, policy: MemoryPolicy, layer_idx: int, n_groups: int = 1):
        self.policy, self.layer_idx, self.n_groups = policy, layer_idx, n_groups
        self.state = policy.new_state(layer_idx)
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.protect: torch.Tensor | None = None
        self.tokens_seen = 0  # arrival indices handed out, padding included
        self.real_seen: torch.Tensor | None = None  # [B] non-padding tokens per sample
        self.last_update: torch.Tensor | None = None  # [B] real_seen at the last policy update
        self.stats = LayerStats()

    @property
    def n_slots(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def append(self, batch: int, heads: int, n_new: int, device: torch.device) -> None:
        """Register ``n_new`` new tokens (all valid until :meth:`mark_padding` says otherwise)."""
        if self.positions is None:
            self.positions = torch.zeros(batch, heads, 0, dtype=torch.long, device=device)
            self.valid = torch.zeros(batch, heads, 0, dtype=torch.bool, device=device)
            self.real_seen = torch.zeros(batch, dtype=torch.long, device=device)
            self.last_update = torch.zeros(batch, dtype=torch.long, device=device)
        new_pos = torch.arange(self.tokens_seen, self.tokens_seen + n_new, device=device)
        self.positions = torch.cat([self.positions, new_pos.expand(batch, heads, n_new)], dim=-1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(batch, heads, n_new)], dim=-1)
        if self.protect is not None:
            self.protect = torch.nn.functional.pad(self.protect, (0, n_new))
        self.tokens_seen += n_new
        self.real_seen += n_new

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """``new_valid`` ``[B, q]``: validity of the latest q tokens (False = padding, left only)."""
        n_new = new_valid.shape[-1]
        pads = (~new_valid).sum(-1)
        if bool(pads.any()):
            new_valid = new_valid.bool()
            had_real = (self.real_seen - n_new) > 0  # real tokens before this chunk
            late_pad = (new_valid.long().cumsum(-1) > 0) & ~new_valid  # a pad after a real token
            if bool(late_pad.any()) or bool((had_real & (pads > 0)).any()):
                raise ValueError(
                    "padding after real tokens (right or interior padding) is not supported with an "
                    "evicting cache: pad on the left (tokenizer.padding_side = 'left')"
                )
            self.valid[..., -n_new:] &= new_valid[:, None, :].to(self.valid.device)
            self.real_seen -= pads.to(self.real_seen.device)

    def attention_mask(self, n_queries: int, window: int | None = None) -> torch.Tensor:
        """``[B, H_kv, q, S]`` bool: query i may attend to slot s iff s is valid and arrived no later
        (and, with a sliding ``window``, less than ``window`` tokens before it, as transformers' sliding
        mask: a query sees itself and the ``window - 1`` tokens before it).

        A query always sees its own slot, so padding queries never get an empty (NaN) row.
        """
        query_pos = torch.arange(self.tokens_seen - n_queries, self.tokens_seen, device=self.positions.device)
        key_pos = self.positions[..., None, :]
        allowed = key_pos <= query_pos[:, None]
        if window is not None:
            allowed = allowed & (key_pos > query_pos[:, None] - window)
        return (allowed & self.valid[..., None, :]) | (key_pos == query_pos[:, None])

    def expire(self, window: int) -> torch.Tensor | None:
        """Drop the slots no later query can see through a sliding ``window`` (arrival index at most
        ``tokens_seen - window``: transformers' sliding layers keep the last ``window - 1`` tokens).

        This is the layer's own window, not a policy decision: counted in ``stats.expired``. Returns a
        ``[B, H, K]`` gather index if slots changed, else None.
        """
        if self.positions is None:
            return None
        t0 = time.perf_counter()
        keep = self.valid & (self.positions > self.tokens_seen - window)
        dropped = int(self.valid.sum() - keep.sum())
        if dropped == 0:
            return None
        self.stats.expired += dropped
        index, new_valid = compact_index(keep)
        self.select(index, new_valid)
        self.stats.timing["eviction_s"] += time.perf_counter() - t0
        return index

    def observe(
        self,
        attention: torch.Tensor,
        row_valid: torch.Tensor | None = None,
        grouped: bool = False,
        finite: bool | None = None,
    ) -> None:
        """Feed ``attention`` ``[B, H_q, q, S]`` (softmax rows of the latest queries) to the policy;
        with ``grouped``, ``[B, H_kv, q, S]`` rows already averaged over each KV head's query group.
        ``finite=True``: the caller knows every value is finite (the check is skipped).

        Non-finite values never reach the policy: the affected keys are protected from the next
        eviction and counted in ``stats.nonfinite``.
        """
        t0 = time.perf_counter()
        batch, q_heads, n_q, n_keys = attention.shape
        rows = attention.float()
        if self.n_groups > 1 and not grouped:
            rows = rows.view(batch, q_heads // self.n_groups, self.n_groups, n_q, n_keys).mean(2)
        if not finite and not bool(torch.isfinite(rows.sum())):  # NaN and inf propagate to the sum
            is_finite = torch.isfinite(rows)
            bad = ~is_finite.all(dim=-2)  # [B, H, S] keys with any non-finite received attention
            count = int(bad.sum())
            self.stats.nonfinite += count
            warnings.warn(
                f"layer {self.layer_idx}: non-finite attention to {count} cached tokens; they are kept "
                "and their attention is treated as zero",
                RuntimeWarning,
                stacklevel=2,
            )
            self.protect = bad if self.protect is None else self.protect | bad
            rows = torch.where(is_finite, rows, torch.zeros((), device=rows.device))
        self.stats.timing["capture_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        self.policy.observe(self.state, rows, row_valid)
        self.stats.timing["features_s"] += time.perf_counter() - t1

    def view(self, keys: torch.Tensor | None = None) -> CacheView:
        """What the policy sees of this layer now (``keys`` where it reads them)."""
        # left padding only: the tokens fed since the last update are the newest arrival indices
        fresh_from = self.tokens_seen - (self.real_seen - self.last_update)
        return CacheView(self.layer_idx, self.positions, self.valid, keys, self.protect, self.real_seen,
                         fresh_from)

    def due(self) -> torch.Tensor:
        """``[B]`` bool: samples whose token count crossed a multiple of ``update_every`` (cadence), or
        that the policy has not updated yet and that hold more tokens than its cap (first fill)."""
        every = self.policy.update_every
        due = (self.real_seen // every) > (self.last_update // every)
        never_updated = self.last_update == 0
        if bool(never_updated.any()):
            view = self.view()
            cap = self.policy.token_cap(view)
            if cap is not None:
                cap = torch.as_tensor(cap, device=self.valid.device).reshape(-1)  # [] or [B]
                held = self.valid.sum(-1).amax(-1)  # [B] the fullest KV head of each sample
                due = due | (never_updated & (held > cap))
        return due

    def maybe_evict(
        self, keys: torch.Tensor | None = None, force: bool = False, due: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Run the policy where due (every sample with ``force``, as a one-shot compression does; the
        samples of ``due`` ``[B]`` when the caller decided); return a ``[B, H, K]`` gather index if
        slots changed, else None. A policy that reads every layer (``joint``) runs only when the
        caller decides (the cache's :meth:`evict_jointly`)."""
        if self.positions is None:
            return None
        if due is None:
            if self.policy.joint and not force:
                return None
            due = torch.ones_like(self.real_seen, dtype=torch.bool) if force else self.due()
        if not bool(due.any()):
            return None
        t0 = time.perf_counter()
        view = self.view(keys)
        keep = self.policy.keep(self.state, view)
        if self.protect is not None:
            keep = keep | self.protect
        keep = torch.where(due[:, None, None], keep, self.valid) & self.valid
        self.stats.timing["scoring_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        self.last_update = torch.where(due, self.real_seen, self.last_update)
        if self.protect is not None:  # samples not due keep their protection for their own update
            self.protect = None if bool(due.all()) else self.protect & ~due[:, None, None]
        self.stats.updates += 1
        self.stats.evictions += int(self.valid.sum() - keep.sum())
        index, new_valid = compact_index(keep)
        if index.shape[-1] == self.n_slots and bool(new_valid.all()):
            self.stats.timing["eviction_s"] += time.perf_counter() - t1
            return None  # nothing dropped, nothing to compact
        self.select(index, new_valid)
        self.stats.timing["eviction_s"] += time.perf_counter() - t1
        return index

    def select(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Compact the slots to ``index`` ``[B, H, K]`` with validity ``valid``; per-slot state follows."""
        self.positions = self.positions.gather(-1, index)
        self.valid = valid
        self.protect = None if self.protect is None else self.protect.gather(-1, index) & valid
        self.policy.on_select(self.state, index)

    def kept_tokens(self) -> torch.Tensor:
        """``[B, H]`` valid tokens per sample and KV head."""
        if self.valid is None:
            return torch.zeros(0, 0, dtype=torch.long)
        return self.valid.sum(-1)

    def bookkeeping_nbytes(self) -> int:
        tables = 0 if self.positions is None else self.positions.numel() * 9  # int64 + bool
        return tables + self.policy.state_nbytes(self.state)
