"""``namm-transfer evolve`` on the shared-prefill engine: warm start, then CMA-ES on task fitness.

Config -> data -> model -> evaluate, as :mod:`.evolve`, with three differences that make the search
move on two CPU cores:

1. **Shared prefill** (:mod:`.shared_prefill`). The training prompts form a fixed pool; each is
   prefilled once with a keep-everything NAMM (KV cache + streaming spectrogram state kept in memory,
   about 64 MB per 1k-token prompt on SmolLM2-135M). A member is then scored by its one-shot
   compression of that cache at a hard budget, followed by one teacher-forced forward of the question,
   the answer prefix and the reference answer, all members of a block in one batch.
2. **Dense fitness.** Per prompt, a member's score is ``w * exact + (1 - w) * min(1, exp(mean
   per-token log-likelihood ratio to the full cache))`` (``w = em_weight``, 0.5 by default), and the
   task fitness divides the member's mean by the full cache's (which scores ``w * exact_full + 1 - w``)
   on the same prompts, averaged over tasks. Exact match (greedy decoding's answer) stays the reported
   metric; the likelihood term tells apart members that all fail or all succeed, which a 0/1 score on
   a handful of prompts cannot, and that is what made the previous search a random walk.
3. **Supervised warm start.** Before CMA-ES, the BAM is fitted by gradient descent (Adam) so that the
   softmax of its scores over a layer-head's cached tokens matches how the question and answer
   tokens' attention is spread over them (cross-entropy; targets from the same full-cache pool
   forwards). CMA-ES (separable, the reference's sigma) then refines the whole BAM on task fitness.

Budgets: every prompt of a generation draws a kept fraction from ``budgets`` (shared by its members),
so the ranking has to hold at any cap. Threshold mode: the final bias is calibrated so that by
itself the NAMM keeps ``keep_target`` of a training context (``calibrate_bias``), after the warm start
and again on the shipped mean (CMA-ES under budgets never sees the bias: rankings ignore it).
Validation: every ``val_every`` generations the CMA mean is scored on held-out validation prompts at
each budget; the best mean by validation fitness is saved as ``OUT_DIR/namm`` (the reference keeps its
best checkpoint), the latest as ``OUT_DIR/namm_last``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.joint import joint_inputs, joint_scores, relative_to_fresh
from namm_transfer.pipelines.common import log, open_tensorboard, run_metadata, set_threads
from namm_transfer.pipelines.text.evolve import load_state, save_state, task_fitness
from namm_transfer.pipelines.text.shared_prefill import (
    ContextPrefill,
    ReceivedAttention,
    TeacherForced,
    answer_token_ids,
    prefill_context,
    split_context,
    teacher_forced,
)
from namm_transfer.pipelines.text.tasks import SINKS, evidence_mask
from namm_transfer.policies.base import CacheView
from namm_transfer.scorers import score_tokens


@dataclass
class PoolEntry:
    """One prompt of the pool: its prefill, the full cache's teacher-forced result, the warm-start target."""

    task: str
    seed: int
    prefill: ContextPrefill
    answer_ids: torch.Tensor
    full: TeacherForced
    target: torch.Tensor  # [L * H, S] attention the question and answer paid to each context token
    evidence: torch.Tensor | None = None  # [S] bool: fact tokens any question could need (evidence_mask)


class PrefillPool:
    """Context prefills of training / validation prompts, computed once and reused every generation."""

    def __init__(self, model, tokenizer, handle, tasks: dict, namm_cfg: NAMMConfig,
                 prompt_tokens: int | list[int], context_share: float | None = None,
                 question_in_prefill: bool = False):
        if context_share is not None and question_in_prefill:
            raise ValueError("context_share cuts the context before the question; question_in_prefill "
                             "prefills past it: choose one")
        self.model, self.tokenizer, self.handle, self.tasks = model, tokenizer, handle, tasks
        # several lengths: each prompt's is drawn by its seed, so a pool mixes them reproducibly
        self.lengths = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
        self.namm_cfg = namm_cfg
        # f: prefill only the first f of each context; the rest of it joins the question and answer, so
        # the target is the attention everything after the cut pays to the tokens before it
        self.context_share = context_share
        # the question and answer prefix prefilled too (all but the prompt's last token, which the answer
        # is predicted from): the eviction reads the question's attention, as the reference's last
        # progressive eviction after the prompt does; only the answer's likelihood is scored after it
        self.question_in_prefill = question_in_prefill
        self.entries: dict[tuple[str, int], PoolEntry] = {}

    def get(self, task: str, seed: int) -> PoolEntry:
        key = (task, seed)
        if key not in self.entries:
            self.entries[key] = self._build(task, seed)
        return self.entries[key]

    @torch.no_grad()
    def _build(self, task: str, seed: int) -> PoolEntry:
        example = self.tasks[task].make(self.tokenizer, seed, self.lengths[seed % len(self.lengths)])
        if self.question_in_prefill:
            cut = len(example.prompt_ids) - 1
        elif self.context_share is not None:
            cut = int(split_context(example, self.tokenizer) * self.context_share)
        else:
            cut = None  # prefill_context's own cut: the whole context, before the question
        prefill = prefill_context(self.model, self.handle, example, self.tokenizer, [NAMM(self.namm_cfg)],
                                  context_len=cut)
        answer = answer_token_ids(self.tokenizer, example)
        full, target = answer_attention(self.model, prefill, answer)
        try:
            mask = evidence_mask(example, self.tokenizer)[: prefill.context_len]
            evidence = torch.tensor(mask, dtype=torch.bool)
        except (ValueError, KeyError):  # a task without marked facts: no evidence target
            evidence = None
        return PoolEntry(task, seed, prefill, answer, full, target, evidence)

    def nbytes(self) -> int:
        return sum(e.prefill.nbytes() + e.target.numel() * 4 for e in self.entries.values())


@torch.no_grad()
def answer_attention(model, prefill: ContextPrefill,
                     answer_ids: torch.Tensor) -> tuple[TeacherForced, torch.Tensor]:
    """The full cache's teacher-forced result on the question and reference answer, and ``[L * H, S]``
    the attention those tokens paid to each context token (summed over their queries, per layer and KV
    head): the warm start's target, and what a question-aware oracle would keep."""
    recorder = ReceivedAttention()
    cache = prefill.fork(0, recorder)
    for layer in cache.layers:  # fresh recorder state: only the question and answer are summed
        layer.memory.state = recorder.new_state(layer.memory.layer_idx)
    full = teacher_forced(model, prefill, cache, answer_ids)
    n = prefill.context_len
    received = [layer.memory.state["received"][0, :, :n] for layer in cache.layers]
    return full, torch.cat(padded_slots(received, 0.0))


def padded_slots(rows: list[torch.Tensor], fill: float | bool | int) -> list[torch.Tensor]:
    """Per-layer ``[H, S_l, ...]`` slot tensors widened with ``fill`` to the widest layer's slots, so they
    stack: a sliding-window layer (Gemma 3's local layers) holds fewer slots than a global one; its
    padding is invalid (``fill`` False / -1 / 0), so a fit never reads it."""
    width = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        if r.shape[1] < width:
            pad = r.new_full((r.shape[0], width - r.shape[1], *r.shape[2:]), fill)
            r = torch.cat([r, pad], dim=1)
        out.append(r)
    return out


def entry_features(entry: PoolEntry, namm: NAMM) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features [L*H, S, in_dim], valid [L*H, S], positions [L*H, S])`` of a pool prompt's context
    as ``namm`` sees them at the one-shot eviction point (its frozen statistics applied)."""
    return cache_features(entry.prefill.cache, namm, 0)


def cache_features(
    cache, namm: NAMM, index: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`entry_features` of an evicting cache (batch 1) whose layers' policy state is ``namm``'s
    feature state (``index``: its place in a :class:`.shared_prefill.Tee`'s list of states)."""
    feats, valid, positions = [], [], []
    for layer in cache.layers:
        mem = layer.memory
        view = CacheView(mem.layer_idx, mem.positions, mem.valid)
        state = mem.state if index is None else mem.state[index]
        feats.append(namm.features(state, view)[0])
        valid.append(mem.valid[0])
        positions.append(mem.positions[0])
    return (torch.cat(padded_slots(feats, 0.0)), torch.cat(padded_slots(valid, False)),
            torch.cat(padded_slots(positions, -1)))


def collect_statistics(entries: list[PoolEntry], namm_cfg: NAMMConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and variance of the spectral features over every context token of ``entries``
    (the keep-everything evaluation the statistics are frozen after)."""
    raw = NAMM(namm_cfg)
    count, total, squares = 0, 0.0, 0.0
    for entry in entries:
        feats, valid, _ = entry_features(entry, raw)
        x = feats[valid][:, namm_cfg.age_dim :].double()
        count += x.shape[0]
        total = total + x.sum(0)
        squares = squares + x.square().sum(0)
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return mean.float().numpy(), var.float().numpy()


def warm_start(
    entries: list[PoolEntry],
    namm: NAMM,
    steps: int,
    lr: float,
    seed: int,
    progress: bool = True,
    loss: str = "topk",
) -> tuple[torch.Tensor, list[float]]:
    """Fit the scorer's parameters so that ``softmax(scores)`` over each layer-head's context tokens
    matches the share of the question's and answer's attention each token received (cross-entropy);
    with ``loss="evidence"``, the uniform distribution over the first :data:`SINKS` tokens and every
    fact token of the prompt (question-agnostic: what any question about the context could need).

    Starts from ``namm``'s parameters plus N(0, 0.065^2) noise (all-zero weights are a saddle: no
    gradient reaches the attention block). Returns the parameters and the loss curve.
    """
    from tqdm.auto import tqdm

    shapes = namm.config.shapes
    data = []
    for entry in entries:
        feats, valid, positions = entry_features(entry, namm)
        target = entry.target
        if loss == "evidence":
            if entry.evidence is None:
                raise ValueError(f"task {entry.task!r} has no evidence tokens: use another warm_loss")
            target = evidence_target(entry.evidence, positions).float()
        target = target.masked_fill(~valid, 0)
        target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
        data.append((feats[None], valid[None], positions[None], target[None]))
    gen = torch.Generator().manual_seed(seed)
    params = namm.params[:1].clone() + 0.065 * torch.randn(namm.params[:1].shape, generator=gen)
    params.requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    losses = []
    order = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="warm start", unit="step", disable=not progress)
    for _ in bar:
        feats, valid, positions, target = data[int(order.integers(len(data)))]
        with torch.enable_grad():
            scores = score_tokens(params, feats, valid, positions, shapes)
            value = LOSSES[loss](scores, target, valid)
            opt.zero_grad()
            value.backward()
        opt.step()
        losses.append(float(value.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return params.detach()[0], losses


def rank_loss(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 - Pearson correlation`` between the scores and the log of the attention share, per
    layer-head row (mean over rows). On the log scale the few tokens the question needs stand out
    from the filler even when an attention sink takes most of the mass; the correlation ignores the
    scores' offset and scale, which budgets never see (top-k) and calibration sets afterwards."""
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    y = torch.log(target * n + 1e-2)

    def centred(x):
        x = x.masked_fill(~valid, 0)
        x = (x - x.sum(-1, keepdim=True) / n).masked_fill(~valid, 0)
        return x / x.square().sum(-1, keepdim=True).add(1e-12).sqrt()

    return 1 - (centred(scores) * centred(y)).sum(-1).mean()


def listwise_loss(scores: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``softmax(scores)`` over each row's valid tokens against the uniform
    distribution over the row's labelled tokens (rows without a label count 0)."""
    label = (label > 0) & valid
    label = label.float() / label.sum(-1, keepdim=True).clamp_min(1)
    logp = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), dim=-1).masked_fill(~valid, 0)
    return -(label * logp).sum(-1).mean()


def topk_loss(
    scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, top: float = 0.1
) -> torch.Tensor:
    """:func:`listwise_loss` towards each layer-head row's ``top`` share of tokens by received attention
    (what an oracle budget keeps): the learning goes to the few tokens the question needs, not to
    ordering the filler."""
    k = (valid.sum(-1, keepdim=True).float() * top).clamp_min(1).long()
    ranked = target.masked_fill(~valid, -1.0).argsort(-1, descending=True).argsort(-1)
    return listwise_loss(scores, ranked < k, valid)


def evidence_target(evidence: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[rows, S]`` bool: the fact tokens of ``evidence`` (``[context]``, by position) and the first
    :data:`SINKS` positions, at each cached slot's position."""
    index = positions.clamp(0, evidence.shape[0] - 1)
    return (evidence[index] & (positions < evidence.shape[0])) | ((positions >= 0) & (positions < SINKS))


LOSSES = {"rank": rank_loss, "topk": topk_loss, "evidence": listwise_loss}


@torch.no_grad()
def calibrate_bias(params: torch.Tensor, entries: list[PoolEntry], namm: NAMM, keep: float) -> torch.Tensor:
    """``params`` with the final bias shifted so that ``score >= 0`` holds for a ``keep`` share of the
    context tokens of ``entries`` (the threshold mode's operating point)."""
    probe = NAMM(namm.config, params, namm.norm_mean, namm.norm_var)
    scores = []
    for entry in entries:
        feats, valid, positions = entry_features(entry, probe)
        s = score_tokens(probe.params, feats[None], valid[None], positions[None], namm.config.shapes)[0]
        scores.append(s[valid])
    return _bias_keeping(params, scores, keep)


def _bias_keeping(params: torch.Tensor, scores: list[torch.Tensor], keep: float) -> torch.Tensor:
    """``params`` with the final bias shifted so that ``score >= 0`` for a ``keep`` share of ``scores``."""
    cut = torch.quantile(torch.cat(scores)[:1_000_000], 1 - keep)
    out = params.clone()
    out[-1] -= cut
    return out


def joint_inputs_of(entry: PoolEntry, namm: NAMM) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [S, rows * n_bins], age [S, age_dim])``: a pool prompt's context tokens as a joint NAMM reads
    them at the one-shot eviction point (every layer-head side by side, layer-major)."""
    feats, valid, positions = entry_features(entry, namm)
    age_dim = namm.config.age_dim
    # the pool's rows are the layer-heads in layer-major order: one "layer" of them all
    return joint_inputs([feats[None]], [positions[None]], [valid[None]], age_dim)[0], feats[0, :, :age_dim]


def joint_label(entry: PoolEntry, positions: torch.Tensor, loss: str, top: float = 0.1,
                rows: slice | None = None) -> torch.Tensor:
    """``[S]`` bool: the tokens a joint warm start ranks first. ``"topk"``: the ``top`` share of the
    context by the attention the question and answer paid it (each layer-head's share, averaged over
    the layer-heads ``rows``, layer-major; None: all); ``"evidence"``: every fact token of the prompt
    (question-agnostic). The first :data:`SINKS` tokens are left out (a joint NAMM keeps them whatever
    its scores)."""
    sinks = positions < SINKS
    if loss == "evidence":
        if entry.evidence is None:
            raise ValueError(f"task {entry.task!r} has no evidence tokens: use another warm_loss")
        return evidence_target(entry.evidence, positions[None])[0] & ~sinks
    target = entry.target if rows is None else entry.target[rows]
    share = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    share = share.mean(0).masked_fill(sinks, -1.0)
    k = max(1, int(top * int((~sinks).sum())))
    return torch.zeros_like(sinks).scatter(0, share.topk(k).indices, True)


def joint_warm_start(
    entries: list[PoolEntry], namm: NAMM, steps: int, lr: float, seed: int, loss: str = "topk",
    progress: bool = True, label_rows: slice | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """A joint NAMM's parameters fitted by Adam so that, per prompt, ``softmax(scores)`` over the context
    puts its mass on :func:`joint_label`'s tokens (listwise cross-entropy; ``label_rows``: the layer-heads
    whose attention picks them, None: all), the inputs z-scored per dimension over the pool; the
    z-scoring is then folded into the weights and bias, so the result reads the NAMM's own features.
    Returns ``[n_params]`` and the loss curve."""
    from tqdm.auto import tqdm

    data = []
    for entry in entries:
        x, age = joint_inputs_of(entry, namm)
        positions = torch.arange(x.shape[0])
        label = joint_label(entry, positions, loss, rows=label_rows)
        data.append((torch.cat([x, age], -1), label, positions >= SINKS))
    allx = torch.cat([d[0] for d in data])
    mean, std = allx.mean(0), allx.std(0) + 1e-6
    torch.manual_seed(seed)
    linear = torch.nn.Linear(allx.shape[1], 1)
    torch.nn.init.zeros_(linear.weight)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    order = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(steps), desc="joint warm start", unit="step", disable=not progress)
    for _ in bar:
        x, label, allowed = data[int(order.integers(len(data)))]
        with torch.enable_grad():
            scores = linear((x - mean) / std)[:, 0]
            value = listwise_loss(scores[None], label[None], allowed[None])
            opt.zero_grad()
            value.backward()
        opt.step()
        losses.append(float(value.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    w = linear.weight.detach()[0] / std
    bias = linear.bias.detach()[0] - (w * mean).sum()
    return torch.cat([w, bias[None]]), losses


@dataclass
class JointGains:
    """The search space CMA-ES refines a warm-started joint NAMM in: one gain per layer-head (scaling
    that layer-head's warm-started weights) and the age weights, ``rows + age_dim`` numbers instead of
    the ``rows * n_bins + age_dim + 1`` parameters. Rankings ignore the bias, which calibration sets."""

    base: np.ndarray  # [n_params] the warm-started parameters
    rows: int
    n_bins: int
    age_dim: int

    def start(self) -> np.ndarray:
        return np.concatenate([np.ones(self.rows), self.base[self.rows * self.n_bins : -1]])

    def decode(self, theta: np.ndarray) -> np.ndarray:
        """``[P, n_params]`` NAMM parameters of ``[P, rows + age_dim]`` search points."""
        theta = np.atleast_2d(theta)
        spectral = self.base[: self.rows * self.n_bins].reshape(self.rows, self.n_bins)
        w = (theta[:, : self.rows, None] * spectral[None]).reshape(theta.shape[0], -1)
        bias = np.full((theta.shape[0], 1), self.base[-1])
        return np.concatenate([w, theta[:, self.rows :], bias], axis=1)


@torch.no_grad()
def calibrate_joint_bias(
    params: torch.Tensor, entries: list[PoolEntry], namm: NAMM, keep: float, reference: str = "absolute"
) -> torch.Tensor:
    """:func:`calibrate_bias` for a joint NAMM: the bias set so that ``score >= 0`` for a ``keep`` share
    of the training contexts' tokens (the first :data:`SINKS` aside: always kept), compressed once, with
    the joint NAMM's ``reference`` (``NAMMConfig.joint_reference``: there every context token is fresh)."""
    scores = []
    for entry in entries:
        feats, valid, positions = entry_features(entry, namm)
        s = joint_scores(params[None], [feats[None]], [positions[None]], [valid[None]], namm.config.age_dim,
                         namm.config.age_base)
        if reference == "fresh-median":
            every = torch.ones_like(s, dtype=torch.bool)
            s = relative_to_fresh(s, every, every, params[None, -1])
        scores.append(s[0, SINKS:])
    return _bias_keeping(params, scores, keep)


# ---------------------------------------------------------------------------------------------------
# member evaluation


def member_scores(
    model,
    entry: PoolEntry,
    namm_cfg: NAMMConfig,
    params: np.ndarray,
    fraction: float,
    norm: tuple[np.ndarray, np.ndarray],
    block: int,
    em_weight: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(score, exact, kept fraction)`` per member of ``params`` on one pool prompt at a kept fraction."""
    budget = max(1, round(fraction * entry.prefill.context_len))
    cfg = replace(namm_cfg, budget=budget, threshold=None)  # exactly the budget, as every baseline
    mean, var = (torch.as_tensor(v, dtype=torch.float32) for v in norm)
    out_score, out_exact, out_kept = [], [], []
    n_ans = entry.answer_ids.shape[0]
    for start in range(0, params.shape[0], block):
        part = torch.as_tensor(params[start : start + block], dtype=torch.float32)
        namm = NAMM(cfg, part, mean, var)
        cache = entry.prefill.fork(0, namm, batch=part.shape[0])
        tf = teacher_forced(model, entry.prefill, cache, entry.answer_ids)
        dense = np.minimum(1.0, np.exp((tf.logprob - entry.full.logprob[0]) / n_ans))
        out_score.append(em_weight * tf.exact + (1 - em_weight) * dense)
        out_exact.append(tf.exact.astype(float))
        out_kept.append(tf.kept_fraction)
    return np.concatenate(out_score), np.concatenate(out_exact), np.concatenate(out_kept)


def full_score(entry: PoolEntry, em_weight: float) -> float:
    return em_weight * float(entry.full.exact[0]) + (1 - em_weight)


def population_fitness(
    model,
    entries: list[PoolEntry],
    fractions: list[float],
    namm_cfg: NAMMConfig,
    params: np.ndarray,
    norm,
    block: int,
    em_weight: float,
) -> dict[str, np.ndarray]:
    """Per member: fitness (mean over tasks of member's mean score / full cache's), normalised exact
    match (same ratio on exact match alone) and mean kept fraction."""
    scores, exact, kept = [], [], []
    for entry, fraction in zip(entries, fractions, strict=True):
        s, e, k = member_scores(model, entry, namm_cfg, params, fraction, norm, block, em_weight)
        scores.append(s)
        exact.append(e)
        kept.append(k)
    scores, exact, kept = (np.stack(x, axis=1) for x in (scores, exact, kept))
    task_of = [e.task for e in entries]
    full = np.array([full_score(e, em_weight) for e in entries])
    full_exact = np.array([float(e.full.exact[0]) for e in entries])
    return {
        "fitness": task_fitness(scores, full, task_of),
        "exact_normalised": task_fitness(exact, full_exact, task_of),
        "kept": kept.mean(axis=1),
    }


# ---------------------------------------------------------------------------------------------------
# the job


@dataclass
class SharedState:
    generation: int = 0
    mean: np.ndarray | None = None
    optimizer: Any = None  # ResumableSepCMA: pickles with its RNG
    optimizer_rng: Any = None  # only in checkpoints written before ResumableSepCMA
    norm_mean: np.ndarray | None = None
    norm_var: np.ndarray | None = None
    warm_losses: list[float] = field(default_factory=list)
    best_val: float = -np.inf
    best_mean: np.ndarray | None = None
    best_generation: int = -1
    elapsed_s: float = 0.0
    joint_base: np.ndarray | None = None  # scorer="joint": the warm start CMA-ES searches gains around


def pool_seeds(seed: int, split: str, n: int) -> list[int]:
    """The pool's prompt seeds: the first ``n`` of the split (training: offset by the run's ``seed``)."""
    from namm_transfer.pipelines.text.tasks import split_seeds

    first = (seed * 10_007) % 1_000_000 if split == "train" else 0
    return split_seeds(split, n, first)


def run_evolve_shared(cfg, tasks: dict, model, tokenizer, argv=None) -> SharedState:
    """Warm start + separable CMA-ES on the shared-prefill engine (see the module docstring)."""
    from tqdm.auto import tqdm

    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.text.cma import ResumableSepCMA

    set_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted({t for stage in cfg.stages for t in stage}, key=[t for s in cfg.stages for t in s].index)
    if not cfg.resume:
        for stale in ("results.jsonl", "runs.jsonl", "validation.jsonl"):
            (out_dir / stale).unlink(missing_ok=True)
    # the latest start's settings (a resume may change the generation count; runs.jsonl keeps each start)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    with open(out_dir / "runs.jsonl", "a") as f:
        f.write(json.dumps({**run_metadata(argv), "resume": cfg.resume}) + "\n")
    state = load_state(out_dir) if cfg.resume else SharedState()
    joint = cfg.scorer == "joint"
    # a joint member reads a per-head NAMM's features (the pool records them); its own config needs the
    # model's layer-heads, known once the pool is built
    namm_cfg = cfg.namm_config()
    started = time.perf_counter() - state.elapsed_s
    writer = open_tensorboard(out_dir)

    with attach(model, NAMM(namm_cfg)) as handle:
        pool = PrefillPool(model, tokenizer, handle, tasks, namm_cfg, cfg.prompt_lengths or cfg.prompt_tokens)
        train = [(t, s) for t in names for s in pool_seeds(cfg.seed, "train", cfg.pool_per_task)]
        val = [(t, s) for t in names for s in pool_seeds(cfg.seed, "val", cfg.val_per_task)]
        log(f"prefilling {len(train)} training and {len(val)} validation prompts (once; kept in memory)")
        train_entries = [pool.get(t, s) for t, s in tqdm(train, desc="prefill", unit="prompt")]
        val_entries = [pool.get(t, s) for t, s in tqdm(val, desc="prefill val", unit="prompt")]
        log(f"prefill pool: {pool.nbytes() / 2**30:.2f} GiB for {len(pool.entries)} prompts")
        if state.norm_mean is None:
            state.norm_mean, state.norm_var = collect_statistics(train_entries, namm_cfg)
        norm = (state.norm_mean, state.norm_var)
        probe = NAMM(namm_cfg, None, torch.as_tensor(norm[0]), torch.as_tensor(norm[1]))
        if joint:
            rows = sum(layer.keys.shape[1] for layer in train_entries[0].prefill.cache.layers)
            namm_cfg = cfg.namm_config(joint_rows=rows)
        gains: JointGains | None = None

        def decode(theta: np.ndarray) -> np.ndarray:  # search points -> NAMM parameters
            return gains.decode(theta) if gains is not None else np.atleast_2d(theta)
        val_fractions = [f for _ in val_entries for f in cfg.budgets]
        val_rows = [e for e in val_entries for _ in cfg.budgets]

        def validate(mean: np.ndarray) -> dict[str, float]:
            res = population_fitness(
                model,
                val_rows,
                val_fractions,
                namm_cfg,
                decode(mean),
                norm,
                cfg.members_per_batch,
                cfg.em_weight,
            )
            return {k: float(v[0]) for k, v in res.items()}

        if state.joint_base is not None:
            gains = JointGains(state.joint_base, namm_cfg.joint_rows, namm_cfg.n_bins, namm_cfg.age_dim)
        if state.mean is None and joint:
            base, state.warm_losses = joint_warm_start(
                train_entries, probe, max(1, cfg.warm_start_steps), cfg.warm_start_lr, cfg.seed,
                loss=cfg.warm_loss,
            )
            base = calibrate_joint_bias(base, train_entries, probe, cfg.keep_target, cfg.joint_reference)
            state.joint_base = base.numpy().astype(np.float64)
            gains = JointGains(state.joint_base, namm_cfg.joint_rows, namm_cfg.n_bins, namm_cfg.age_dim)
            state.mean = gains.start()
        if state.mean is None:
            start = probe.params[0].clone()
            if cfg.warm_start_steps > 0:
                start, state.warm_losses = warm_start(
                    train_entries,
                    probe,
                    cfg.warm_start_steps,
                    cfg.warm_start_lr,
                    cfg.seed,
                    loss=cfg.warm_loss,
                )
                start = calibrate_bias(start, train_entries, probe, cfg.keep_target)
            state.mean = start.numpy().astype(np.float64)
        if state.optimizer is None and state.best_mean is None:
            v = validate(state.mean)
            _record(
                out_dir,
                writer,
                "validation.jsonl",
                {
                    "generation": 0,
                    **{f"val_{k}": x for k, x in v.items()},
                    "seconds": time.perf_counter() - started,
                    "warm_start_steps": cfg.warm_start_steps,
                },
            )
            state.best_val, state.best_mean, state.best_generation = v["fitness"], state.mean.copy(), 0
            _save_namm(out_dir / "namm", namm_cfg, decode(state.best_mean)[0], norm)
            save_state(state, out_dir)
        if state.optimizer is None:
            bounds = None
            state.optimizer = ResumableSepCMA(
                mean=state.mean.copy(),
                sigma=cfg.sigma,
                bounds=bounds,
                population_size=cfg.population,
                seed=cfg.seed,
            )
        opt = state.optimizer
        bar = tqdm(total=cfg.generations, initial=state.generation, desc="evolve", unit="gen")
        while state.generation < cfg.generations:
            rng = random.Random(f"{cfg.seed}-{state.generation}")
            picks = rng.sample(train, min(len(train), cfg.prompts_per_task * len(names)))
            entries = [pool.get(t, s) for t, s in picks]
            fractions = [rng.choice(cfg.budgets) for _ in entries]
            members = [opt.ask() for _ in range(cfg.population)]
            params = decode(np.stack(members + [opt.mean]))  # last row: the CMA mean
            res = population_fitness(
                model, entries, fractions, namm_cfg, params, norm, cfg.members_per_batch, cfg.em_weight
            )
            fit = res["fitness"]
            opt.tell([(x, -float(f)) for x, f in zip(members, fit[:-1], strict=True)])
            state.mean = opt.mean.copy()
            state.generation += 1
            record = {
                "generation": state.generation,
                "fitness_mean": float(fit[:-1].mean()),
                "fitness_best": float(fit[:-1].max()),
                "mean_fitness": float(fit[-1]),
                "mean_exact_normalised": float(res["exact_normalised"][-1]),
                "population_exact_normalised": float(res["exact_normalised"][:-1].mean()),
                "sigma": opt.sigma,
                "seconds": time.perf_counter() - started,
            }
            _record(out_dir, writer, "results.jsonl", record)
            if state.generation % cfg.val_every == 0 or state.generation == cfg.generations:
                v = validate(state.mean)
                _record(
                    out_dir,
                    writer,
                    "validation.jsonl",
                    {
                        "generation": state.generation,
                        **{f"val_{k}": x for k, x in v.items()},
                        "seconds": time.perf_counter() - started,
                    },
                )
                if v["fitness"] > state.best_val:
                    state.best_val, state.best_mean = v["fitness"], state.mean.copy()
                    state.best_generation = state.generation
                    _save_namm(out_dir / "namm", namm_cfg, decode(state.best_mean)[0], norm)
            _save_namm(out_dir / "namm_last", namm_cfg, decode(state.mean)[0], norm)
            state.elapsed_s = time.perf_counter() - started
            save_state(state, out_dir)
            bar.update(1)
            bar.set_postfix(fitness=f"{record['mean_fitness']:.3f}", best_val=f"{state.best_val:.3f}")
        bar.close()
        # the shipped mean's own threshold: recalibrated on the training pool (rankings ignore the bias)
        best = torch.as_tensor(decode(state.best_mean)[0], dtype=torch.float32)
        if joint:
            best = calibrate_joint_bias(best, train_entries, probe, cfg.keep_target, cfg.joint_reference)
        else:
            best = calibrate_bias(best, train_entries, probe, cfg.keep_target)
        _save_namm(out_dir / "namm", namm_cfg, best.numpy(), norm)
    if writer is not None:
        writer.close()
    log(
        f"done: best validation fitness {state.best_val:.3f} at generation {state.best_generation}; "
        f"NAMM in {out_dir / 'namm'}"
    )
    return state


def _save_namm(path: Path, namm_cfg: NAMMConfig, mean: np.ndarray, norm) -> None:
    NAMM(
        namm_cfg,
        torch.as_tensor(np.asarray(mean), dtype=torch.float32),
        torch.as_tensor(norm[0]),
        torch.as_tensor(norm[1]),
    ).save_pretrained(path)


def _record(out_dir: Path, writer, name: str, record: dict) -> None:
    with open(out_dir / name, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        group = name.split(".")[0]
        for key, value in record.items():
            if isinstance(value, float | int) and key != "generation":
                writer.add_scalar(f"{group}/{key}", value, record["generation"])
        writer.flush()
