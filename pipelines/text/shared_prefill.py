"""Shared-prefill evaluation: one keep-everything prefill of a prompt's context, many policies after it.

The one-shot protocol compresses the cache once, at the end of the context, before the question.
Until that eviction nothing depends on the policy: the KV cache and every policy's per-layer state
(the NAMM's streaming spectrogram, H2O's accumulated attention, SnapKV's window, ...) are the same
whoever evicts. So a prompt's context is prefilled **once**, with a :class:`Tee` policy feeding the
attention rows to every policy's state, and each policy (or a batch of CMA-ES members, one NAMM
parameter vector per batch row) then gets a :meth:`ContextPrefill.fork`: the shared cache expanded to
its batch, compressed by its own ``keep()`` at once, followed by only the question and answer.
On a sliding-window layer (Gemma2/3, Mistral) the layer's own window drops expired tokens during the
prefill; the Tee compacts every recorded state with them (:meth:`Tee.on_select`), so a fork starts from
the state its policy would have reached alone.

Two ways to finish a fork:
- :func:`teacher_forced`: the question, the answer prefix and the *reference* answer in one batched
  forward; per row the answer's log-likelihood and exact match (every answer position's argmax is the
  reference token, which is exactly what greedy decoding would produce). The dense evolution fitness.
- :func:`generate_answer`: greedy ``generate()`` after the question, scored by the task's own scorer.
  The evaluation metric.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from namm_transfer.adapters.cache import EvictingCache
from namm_transfer.memory import LayerMemory
from namm_transfer.policies import MemoryPolicy

NEVER = 1 << 40  # an update cadence that is never reached: no eviction after the one-shot one


class Tee(MemoryPolicy):
    """Feeds the same attention rows to several policies' states and never evicts.

    State per layer: the list of each child's state, in the order of ``children``.
    """

    def __init__(self, children: list[MemoryPolicy]):
        super().__init__(update_every=NEVER)
        self.children = list(children)
        self.needs_attention = any(c.needs_attention for c in self.children)
        self.needs_keys = any(getattr(c, "needs_keys", False) for c in self.children)

    def new_state(self, layer_idx: int) -> list[Any]:
        return [c.new_state(layer_idx) for c in self.children]

    def observe(self, state: list[Any], attention: torch.Tensor, row_valid) -> None:
        for child, child_state in zip(self.children, state, strict=True):
            if child.needs_attention:
                child.observe(child_state, attention, row_valid)

    def on_select(self, state: list[Any], index: torch.Tensor) -> None:
        # Slots were compacted without a policy decision: a sliding-window layer's own window dropped
        # expired tokens during the prefill (LayerMemory.expire). Every child's per-slot state must
        # follow, as it would if the child ran alone, or the forks' states are misaligned with the slots.
        for child, child_state in zip(self.children, state, strict=True):
            child.on_select(child_state, index)

    def keep(self, state, view) -> torch.Tensor:
        return view.valid.clone()


class ReceivedAttention(MemoryPolicy):
    """Never evicts; sums the attention each cached slot receives (the warm start's target)."""

    needs_attention = True

    def __init__(self) -> None:
        super().__init__(update_every=NEVER)

    def new_state(self, layer_idx: int) -> dict[str, torch.Tensor | None]:
        return {"received": None}

    def observe(self, state: dict, attention: torch.Tensor, row_valid) -> None:
        if row_valid is not None:
            attention = attention * row_valid[:, None, :, None]
        received = attention.float().sum(-2)
        prev = state["received"]
        if prev is not None and prev.shape[-1] < received.shape[-1]:
            prev = torch.nn.functional.pad(prev, (0, received.shape[-1] - prev.shape[-1]))
        state["received"] = received if prev is None else prev + received

    def on_select(self, state: dict, index: torch.Tensor) -> None:
        # a sliding-window layer dropped expired slots: the sums follow their tokens
        if state["received"] is not None:
            state["received"] = state["received"].gather(-1, index)

    def keep(self, state, view) -> torch.Tensor:
        return view.valid.clone()


def one_shot(policy: MemoryPolicy) -> MemoryPolicy:
    """A copy of ``policy`` that never evicts on its own cadence (the fork evicts it once)."""
    if hasattr(policy, "replace"):  # a NAMM: its cadence lives in its frozen config
        return policy.replace(update_every=NEVER)
    out = copy.copy(policy)
    out.update_every = NEVER
    return out


def _expand_state(state: Any, batch: int) -> Any:
    """A shallow copy of a per-layer policy state with every batch-1 tensor expanded to ``batch`` rows
    (views: nothing is copied until a policy writes)."""

    def expand(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == 1 and batch != 1:
            grown = value.expand(batch, *value.shape[1:])
            return grown.clone() if value.ndim == 1 else grown  # counters are written in place
        return value

    if state is None:
        return None
    if isinstance(state, dict):
        return {k: expand(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_expand_state(s, batch) for s in state]
    out = copy.copy(state)
    for name, value in vars(out).items():
        if name != "_basis":
            setattr(out, name, expand(value))
    return out


@dataclass
class ContextPrefill:
    """The keep-everything prefill of one prompt's context under a :class:`Tee` of policies.

    Attributes:
        context_ids: ``[S]`` the context tokens (everything before the question).
        suffix_ids: ``[T]`` the question, chat template and answer prefix.
        cache: the shared cache after the context (batch 1); never modified by forks.
        children: the policies whose states the prefill recorded, in the Tee's order.
    """

    context_ids: torch.Tensor
    suffix_ids: torch.Tensor
    cache: EvictingCache
    children: list[MemoryPolicy]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def context_len(self) -> int:
        return int(self.context_ids.shape[0])

    def nbytes(self) -> int:
        """Bytes held: keys, values and every recorded policy state."""
        total = 0
        for layer in self.cache.layers:
            total += layer.stored_bytes()
            for child, state in zip(self.children, layer.memory.state, strict=True):
                total += child.state_nbytes(state)
        return total

    def fork(self, child: int, policy: MemoryPolicy | None = None, batch: int = 1) -> EvictingCache:
        """A cache for ``batch`` rows holding the shared context, compressed once by ``policy``.

        Args:
            child: which recorded state to start from (the index of the policy in the Tee).
            policy: the policy that evicts (default: the recorded one); it must read the same state
                type as the recorded child (e.g. any NAMM of the same feature config for a NAMM).
                Its own cadence is switched off (:func:`one_shot`), so nothing is evicted later.
            batch: rows (e.g. CMA-ES members, one NAMM parameter vector each).
        """
        policy = one_shot(policy if policy is not None else self.children[child])
        num_layers = len(self.cache.layers)
        windows = [layer.sliding_window for layer in self.cache.layers]
        fork = EvictingCache(policy, num_layers, self.cache.layers[0].memory.n_groups, windows)
        joint = policy.joint
        for src, dst in zip(self.cache.layers, fork.layers, strict=True):
            mem_src, mem_dst = src.memory, dst.memory
            dst.lazy_initialization(src.keys, src.values)
            dst.keys = src.keys.expand(batch, *src.keys.shape[1:])
            dst.values = src.values.expand(batch, *src.values.shape[1:])
            mem_dst.positions = mem_src.positions.expand(batch, *mem_src.positions.shape[1:])
            mem_dst.valid = mem_src.valid.expand(batch, *mem_src.valid.shape[1:])
            mem_dst.tokens_seen = mem_src.tokens_seen
            mem_dst.real_seen = mem_src.real_seen.expand(batch).clone()
            mem_dst.last_update = mem_src.last_update.expand(batch).clone()
            mem_dst.state = _expand_state(mem_src.state[child], batch)
            if not joint:
                dst.apply_eviction(force=True)
        if joint:  # its update reads every layer's state: all layers evict together
            fork.evict_jointly(force=True)
        for dst in fork.layers:
            if dst.keys.shape[0] != batch:  # nothing evicted: materialise the rows for later concatenation
                dst.keys, dst.values = dst.keys.contiguous(), dst.values.contiguous()
        return fork


def split_context(example, tokenizer) -> int:
    """Number of prompt tokens before the question: the prompt's user turn ends with a blank line and
    the question (every text task's layout); the context is everything before that blank line."""
    text = example.text
    cut = text.rfind("\n\n")
    if cut < 0:
        raise ValueError(f"{example.task} prompt (seed {example.seed}) has no blank line before its question")
    head = list(tokenizer.encode(text[:cut], add_special_tokens=False))
    ids = list(example.prompt_ids)
    n = 0
    while n < min(len(head), len(ids)) and head[n] == ids[n]:
        n += 1
    if n < len(ids) // 2:
        raise ValueError(f"could not align the context of a {example.task} prompt with its token ids")
    return n


@torch.no_grad()
def prefill_context(
    model, handle, example, tokenizer, policies: list[MemoryPolicy], context_len: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> ContextPrefill:
    """Prefill ``example``'s context once with a :class:`Tee` of ``policies`` (the model must be attached
    through ``handle`` = ``attach(model, some_policy)``, any policy reading attention); ``inputs`` go to
    that forward too (a video model's ``pixel_values_videos``)."""
    n = split_context(example, tokenizer) if context_len is None else context_len
    ids = torch.as_tensor(list(example.prompt_ids), device=model.device)
    tee = Tee(policies)
    cache = EvictingCache(tee, handle.num_layers, handle.n_groups, getattr(handle, "sliding_windows", None))
    model(input_ids=ids[None, :n], past_key_values=cache, use_cache=True, logits_to_keep=1, **(inputs or {}))
    return ContextPrefill(ids[:n], ids[n:], cache, list(policies))


@dataclass
class TeacherForced:
    """Per batch row: summed log-probability of the reference answer, exact match, kept fraction."""

    logprob: np.ndarray
    exact: np.ndarray
    kept_fraction: np.ndarray
    kept_per_layer: np.ndarray  # [rows, layers]: mean over KV heads of kept / context tokens


def kept_report(cache: EvictingCache, context_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept fraction per row, kept per layer per row)`` of the context tokens, before the suffix."""
    per_layer = np.stack(
        [m.kept_tokens().float().mean(-1).cpu().numpy() / context_len for m in _memories(cache)], axis=1
    )
    return per_layer.mean(axis=1), per_layer


def _memories(cache: EvictingCache) -> list[LayerMemory]:
    return [layer.memory for layer in cache.layers]


@torch.no_grad()
def teacher_forced(
    model, prefill: ContextPrefill, cache: EvictingCache, answer_ids: torch.Tensor
) -> TeacherForced:
    """Feed the question, answer prefix and reference answer to every row of ``cache`` at once.

    The question and answer are not compressed (one-shot protocol). Returns the reference answer's
    log-likelihood and exact match per row: exact iff every answer position's argmax is the reference
    token, i.e. greedy decoding would write the reference answer.
    """
    batch = cache.layers[0].keys.shape[0]
    kept, kept_layers = kept_report(cache, prefill.context_len)
    answer_ids = answer_ids.to(prefill.suffix_ids.device)
    tail = torch.cat([prefill.suffix_ids, answer_ids])[None].expand(batch, -1)
    seen = cache.get_seq_length()
    mask = torch.ones(batch, seen + tail.shape[1], dtype=torch.long, device=tail.device)
    n_ans = answer_ids.shape[0]
    out = model(
        input_ids=tail, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=n_ans + 1
    )
    logits = out.logits[:, :-1].float()  # position j predicts answer token j
    logp = torch.log_softmax(logits, dim=-1)
    target = answer_ids[None, :, None].expand(batch, -1, 1)
    token_logp = logp.gather(-1, target).squeeze(-1)
    exact = (logits.argmax(-1) == answer_ids[None]).all(-1)
    return TeacherForced(token_logp.sum(-1).cpu().numpy(), exact.cpu().numpy(), kept, kept_layers)


@torch.no_grad()
def generate_answer(
    model, tokenizer, prefill: ContextPrefill, cache: EvictingCache, max_new_tokens: int
) -> str:
    """Greedy decoding after the question from a forked (compressed) cache of batch 1."""
    tail = prefill.suffix_ids[None]
    seen = cache.get_seq_length()
    mask = torch.ones(1, seen + tail.shape[1], dtype=torch.long, device=tail.device)
    out = model.generate(
        input_ids=tail,
        attention_mask=mask,
        past_key_values=cache,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, tail.shape[1] :], skip_special_tokens=True).strip()


def answer_token_ids(tokenizer, example) -> torch.Tensor:
    """The reference answer as the model would write it right after the answer prefix (" 12345")."""
    return torch.tensor(tokenizer.encode(" " + example.answer, add_special_tokens=False))
