"""The Neural Attention Memory Model policy (Cetin et al. 2024, arXiv 2410.13166).

Per layer and KV head, every ``update_every`` tokens: features = [age embedding, z-scored attention
spectrogram EMA] -> scorer (BAM, MLP or linear) -> keep iff score >= threshold (newest always kept, padding
never, optional hard budget).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from namm_transfer.features import StreamingSpectrogram, age_embedding
from namm_transfer.joint import (
    REFERENCES,
    head_mixed,
    held_and_fresh,
    joint_n_params,
    joint_scores,
    relative_to_fresh,
)
from namm_transfer.policies.base import (
    Budget,
    CacheView,
    MemoryPolicy,
    check_budget,
    pool_over_slots,
    recent_slots,
    resolve_budget,
    sink_slots,
    within_cap,
)
from namm_transfer.scorers import ScorerShapes, keep_all_params, score_tokens
from namm_transfer.selection import select_tokens, select_tokens_across_heads

HEAD_BUDGETS = ("each", "shared")


@dataclass(frozen=True)
class NAMMConfig:
    """Every size and cadence of a NAMM; the defaults are the reference's (docs/design.md, "The NAMM").

    Frozen: a NAMM with another cadence or budget is a new object (:meth:`NAMM.replace`), so a
    setting is made in one place and never patched into a shared copy.
    """

    n_fft: int = 32
    hop: int = 16
    ema_decay: float = 0.99
    age_dim: int = 8
    age_base: float = 50_000.0  # the reference recency embedding's max_freq
    scorer: str = "bam"
    hidden: int = 32
    update_every: int = 512
    threshold: float | None = 0.0  # None: rank only (a budget or compression ratio decides)
    budget: int | list[int] | None = None
    init_keep_bias: float = 1.0
    # Instead of ``budget``: the fraction of the tokens seen so far to remove at each update (kvpress's
    # convention), a cap of max(1, round((1 - ratio) * seen)) per sample and KV head. In [0, 1).
    compression_ratio: float | None = None
    # Always keep each sample's first ``sink_tokens`` tokens (StreamingLLM's attention sinks), whatever
    # their score: a hand-written prior on top of the learned policy, 0 (off) as evolved. Within a budget
    # they take part of it.
    sink_tokens: int = 0
    # Always keep each sample's newest ``recent_tokens`` tokens (H2O's recent window), whatever their
    # score: a token that arrived since the last update has been read by few queries, so a score built on
    # received attention cannot judge it yet. 0: off (the reference). Within a budget they take part of it.
    recent_tokens: int = 0
    # Smooth each token's score with its neighbours' before selection: the mean over the ``score_pool``
    # (odd) nearest scored tokens in arrival order (SnapKV's average pool; the sinks and the recent window
    # are not pooled). Neighbouring tokens belong together (a word's pieces, a video frame's patches), so a
    # token is kept with its span. 1: off (the reference). On the 128-frame videos it costs accuracy
    # (benchmarks/results/video_128_linear/, "SnapKV's pool in the NAMM").
    score_pool: int = 1
    # Threshold mode only: never keep fewer than the ``min_tokens`` best-scoring tokens per sample and KV
    # head (within a budget: at most the budget). An early update judges tokens that few queries have read
    # yet; a floor keeps it from evicting a short context's tokens on that evidence. 0: off (the reference).
    min_tokens: int = 0
    # scorer="joint" only: the layers x KV heads of the model it reads (namm_transfer/joint.py), and what
    # its threshold is measured from: "absolute" (the score itself) or "fresh-median" (the score less the
    # median score of the tokens fed since the last update, plus the bias: joint.relative_to_fresh)
    joint_rows: int = 0
    joint_reference: str = "absolute"
    # scorer="joint" only: 0 (as evolved) every layer-head keeps the same tokens; m > 0 each layer-head
    # ranks by the z-scored joint score plus m times its own z-scored term of it (joint.head_mixed), so
    # the heads keep different tokens. A threshold still decides how many each head keeps.
    head_mix: float = 0.0
    # Divide each token's spectrogram EMA by the total weight of the frames emitted since it arrived
    # (1 - (decay ** hop) ** frames): its features become a weighted mean of its frames' magnitudes, not
    # a sum that grows with its age, so an old token and a new one read alike are scored alike. With a
    # decay near 1 that is the mean attention a token has received per query. False: the reference.
    ema_unbiased: bool = False
    # How a budget is split among a layer's KV heads: "each" (every head keeps its own cap, as every
    # baseline does) or "shared" (the heads of a sample keep H x cap tokens between them, the best-scored
    # of all heads: AdaKV's allocation, as the reference's threshold lets heads differ). As many tokens
    # in all; the cache stores each layer as wide as its fullest head (stats()["stored_to_kept"]).
    head_budget: str = "each"

    def __post_init__(self) -> None:
        if self.scorer == "joint" and self.joint_rows < 1:
            raise ValueError("a joint NAMM needs joint_rows = the model's layers x KV heads (>= 1)")
        if self.joint_reference not in REFERENCES:
            raise ValueError(f"joint_reference must be one of {REFERENCES}, got {self.joint_reference!r}")
        if not 0 < self.ema_decay < 1:  # 1 would weight every frame by 1 - decay ** hop = 0
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.recent_tokens < 0:
            raise ValueError(f"recent_tokens must be >= 0, got {self.recent_tokens}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise ValueError(f"score_pool must be an odd size >= 1, got {self.score_pool}")
        if not self.head_mix >= 0:
            raise ValueError(f"head_mix must be >= 0, got {self.head_mix}")
        if self.head_mix and self.scorer != "joint":
            raise ValueError(f"head_mix applies to a joint NAMM only (scorer={self.scorer!r})")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.head_budget not in HEAD_BUDGETS:
            raise ValueError(f"head_budget must be one of {HEAD_BUDGETS}, got {self.head_budget!r}")
        check_budget(self.budget, self.compression_ratio, owner="NAMMConfig.budget")
        if self.update_every < 1 or self.hop < 1 or self.n_fft < self.hop:
            raise ValueError(
                f"need update_every >= 1 and n_fft >= hop >= 1, got update_every={self.update_every}, "
                f"n_fft={self.n_fft}, hop={self.hop}"
            )

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def shapes(self) -> ScorerShapes:
        return ScorerShapes(in_dim=self.age_dim + self.n_bins, hidden=self.hidden, kind=self.scorer)

    @property
    def n_params(self) -> int:
        if self.scorer == "joint":
            return joint_n_params(self.joint_rows, self.n_bins, self.age_dim)
        return self.shapes.n_params

    @classmethod
    def from_dict(cls, data: dict) -> NAMMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown NAMMConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _per_slot(per_token: torch.Tensor, view: CacheView) -> torch.Tensor:
    """``[B, H, S]`` the value of each slot's token in ``per_token`` ``[B' (1 or B), H' (1 or H), T]``;
    -inf on invalid slots."""
    per_token = per_token.to(view.positions.device).expand(*view.positions.shape[:2], -1)
    index = view.positions.clamp(0, per_token.shape[-1] - 1)
    return per_token.gather(2, index).masked_fill(~view.valid, float("-inf"))


class NAMM(MemoryPolicy):
    """A NAMM memory policy.

    Args:
        config: sizes and cadence (``NAMMConfig()`` by default).
        params: ``[n_params]`` or ``[P, n_params]`` (one member per batch element). Default: the
            keep-everything initialisation (zeros, final bias ``init_keep_bias``).
        norm_mean, norm_var: ``[n_bins]`` frozen per-bin statistics of the spectrogram features.
            None: no normalisation until :meth:`collecting_statistics` fills them.
    """

    needs_attention = True
    rows_transient = True  # the streaming spectrogram keeps copies (its window), never the rows

    def __init__(
        self,
        config: NAMMConfig | None = None,
        params: torch.Tensor | None = None,
        norm_mean: torch.Tensor | None = None,
        norm_var: torch.Tensor | None = None,
    ):
        self.config = config or NAMMConfig()
        super().__init__(update_every=self.config.update_every)
        if params is None:
            params = self.keep_all_params(self.config)
        params = torch.as_tensor(params, dtype=torch.float32)
        if params.ndim == 0 or params.shape[-1] != self.config.n_params or params.ndim > 2:
            raise ValueError(
                f"NAMM parameters must be [{self.config.n_params}] or [P, {self.config.n_params}] for "
                f"scorer={self.config.scorer!r}, hidden={self.config.hidden}, "
                f"in_dim={self.config.shapes.in_dim}; got shape {tuple(params.shape)}"
            )
        self.params = params if params.ndim == 2 else params[None]
        for name, value in (("norm_mean", norm_mean), ("norm_var", norm_var)):
            if value is not None and tuple(torch.as_tensor(value).reshape(-1).shape) != (self.config.n_bins,):
                shape = tuple(torch.as_tensor(value).shape)
                raise ValueError(f"{name} must hold {self.config.n_bins} values, got shape {shape}")
        if (norm_mean is None) != (norm_var is None):
            raise ValueError("give both norm_mean and norm_var (frozen statistics), or neither")
        self.norm_mean = None if norm_mean is None else torch.as_tensor(norm_mean).float().reshape(-1)
        self.norm_var = None if norm_var is None else torch.as_tensor(norm_var).float().reshape(-1)
        self._collect: list[torch.Tensor] | None = None  # [count, sum, sum of squares] while collecting
        self._pending: torch.Tensor | None = None  # joint scorer: [B, T] token scores of this update
        self._pending_heads: torch.Tensor | None = None  # head_mix > 0: [B, layers, KV heads, T]

    @staticmethod
    def keep_all_params(config: NAMMConfig) -> torch.Tensor:
        """Zero weights and the final bias ``init_keep_bias``: every token scores above the threshold."""
        if config.scorer == "joint":
            params = torch.zeros(config.n_params)
            params[-1] = config.init_keep_bias
            return params
        return keep_all_params(config.shapes, config.init_keep_bias)

    @property
    def joint(self) -> bool:
        """True for the joint scorer: an update reads every layer, so the cache evicts all layers
        together (:meth:`prepare_joint`, then each layer's :meth:`keep`)."""
        return self.config.scorer == "joint"

    # construction helpers ------------------------------------------------------------------------
    @classmethod
    def init_random(cls, seed: int = 0, sigma: float = 0.065, config: NAMMConfig | None = None) -> NAMM:
        """An untrained NAMM: the keep-all initialisation plus ``sigma`` Gaussian noise (a CMA-ES member)."""
        config = config or NAMMConfig()
        base = cls.keep_all_params(config)
        noise = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))
        return cls(config, base + sigma * noise)

    @property
    def budget(self) -> Budget:
        return self.config.budget

    @property
    def compression_ratio(self) -> float | None:
        return self.config.compression_ratio

    def with_budget(self, budget: Budget, keep_threshold: bool = True) -> NAMM:
        """This NAMM (same parameters and statistics) with a hard token budget per layer and KV head.

        With ``keep_threshold`` (the reference's cap) it still drops every token scored below the
        threshold and keeps the top ``budget`` of the rest; without it, it keeps exactly the ``budget``
        best-scored tokens, as every baseline does (matched-budget comparisons).
        """
        threshold = self.config.threshold if keep_threshold else None
        return self.replace(budget=budget, compression_ratio=None, threshold=threshold)

    def with_compression_ratio(self, compression_ratio: float | None, keep_threshold: bool = True) -> NAMM:
        """This NAMM (same parameters and statistics) capped at ``max(1, round((1 - ratio) * seen))``
        tokens per sample and KV head at each update, instead of a fixed budget (``keep_threshold``
        as in :meth:`with_budget`)."""
        threshold = self.config.threshold if keep_threshold else None
        return self.replace(budget=None, compression_ratio=compression_ratio, threshold=threshold)

    def replace(self, **changes) -> NAMM:
        """This NAMM (same parameters and frozen statistics) with ``changes`` to its config, e.g.
        ``namm.replace(update_every=32)`` for a Decision Transformer's short context."""
        return NAMM(replace(self.config, **changes), self.params, self.norm_mean, self.norm_var)

    # policy interface ------------------------------------------------------------------------------
    def new_state(self, layer_idx: int) -> StreamingSpectrogram:
        c = self.config
        return StreamingSpectrogram(n_fft=c.n_fft, hop=c.hop, decay=c.ema_decay)

    def observe(self, state: StreamingSpectrogram, attention: torch.Tensor, row_valid) -> None:
        # LayerMemory hands over causal softmax rows whose last q slots are the chunk's own tokens
        # (appended in order), so each slot's frames before it arrived are zero and are skipped.
        state.observe(attention, row_valid, causal=True)

    def on_select(self, state: StreamingSpectrogram, index: torch.Tensor) -> None:
        state.select(index)

    def state_nbytes(self, state: StreamingSpectrogram) -> int:
        return state.nbytes()

    def features(self, state: StreamingSpectrogram, view: CacheView) -> torch.Tensor:
        """``[B, H, S, age_dim + n_bins]`` scorer input for every slot."""
        spectral = self._spectral(state, view)
        if self.norm_mean is not None and self.norm_var is not None:
            mean, var = self.norm_mean.to(spectral.device), self.norm_var.to(spectral.device)
            spectral = (spectral - mean) / var.sqrt().clamp_min(1e-7)
        age = age_embedding(view.age, self.config.age_dim, self.config.age_base)
        return torch.cat([age, spectral], dim=-1)

    def _spectral(self, state: StreamingSpectrogram, view: CacheView) -> torch.Tensor:
        if state.ema is None:
            return torch.zeros(*view.positions.shape, self.config.n_bins, device=view.positions.device)
        state.grow(view.positions.shape[-1])
        if not self.config.ema_unbiased:
            return state.ema
        return state.ema / state.emitted_weight(view.age)[..., None]

    def keep(self, state: StreamingSpectrogram, view: CacheView) -> torch.Tensor:
        if self._collect is not None:
            self._accumulate(self._spectral(state, view), view.valid)
            return view.valid.clone()
        params = self.params.to(view.positions.device)
        if params.shape[0] not in (1, view.positions.shape[0]):
            raise ValueError(
                f"NAMM holds {params.shape[0]} parameter vectors but the batch has "
                f"{view.positions.shape[0]} samples; use one vector or one per sample"
            )
        cap = resolve_budget(self.config.budget, self.config.compression_ratio, view)
        if self.config.threshold is None and cap is not None and within_cap(view.valid, cap):
            return view.valid.clone()  # a pure ranking under its cap keeps everything: no scoring
        if self.joint:
            scores = self._joint_slot_scores(view)
        else:
            feats = self.features(state, view)
            scores = score_tokens(params, feats, view.valid, view.positions, self.config.shapes)
        scores = self._selection_scores(scores, view)
        select = select_tokens_across_heads if self.config.head_budget == "shared" else select_tokens
        keep = select(scores, view.valid, view.positions, self.config.threshold, cap, view.protect)
        if self.config.min_tokens and self.config.threshold is not None:
            floor = self.config.min_tokens
            if cap is not None:
                floor = cap.clamp(max=floor) if isinstance(cap, torch.Tensor) else min(cap, floor)
            keep |= select_tokens(scores, view.valid, view.positions, None, floor, view.protect)
        if self.config.head_mix:  # how many: as above; which: each head's own ranking
            return self._rerank_per_head(keep, view)
        return keep

    def _rerank_per_head(self, keep: torch.Tensor, view: CacheView) -> torch.Tensor:
        """``head_mix > 0``: each KV head keeps as many tokens as the joint ``keep`` mask gives it, the
        best of its own ranking (:func:`~namm_transfer.joint.head_mixed`)."""
        own = self._selection_scores(_per_slot(self._pending_heads[:, view.layer_idx], view), view)
        return select_tokens(own, view.valid, view.positions, None, keep.sum(-1, keepdim=True), view.protect)

    def _selection_scores(self, scores: torch.Tensor, view: CacheView) -> torch.Tensor:
        """``scores`` as selection reads them: averaged over ``score_pool`` neighbours among the slots that
        are neither sinks nor the recent window, and those slots (``sink_tokens``, ``recent_tokens``) at
        +inf: always kept."""
        c = self.config
        always = torch.zeros_like(view.valid)
        if c.sink_tokens:
            always |= sink_slots(view, c.sink_tokens)
        if c.recent_tokens:
            always |= recent_slots(view, c.recent_tokens)
        if c.score_pool > 1:
            scores = pool_over_slots(scores, view.valid & ~always, c.score_pool)
        return scores.masked_fill(always, float("inf"))

    def prepare_joint(self, states: list[StreamingSpectrogram], views: list[CacheView]) -> None:
        """Score every token from all layers' ``states`` and ``views`` (one per layer, in order) for the
        layers' :meth:`keep` calls of this update (joint scorer only; :meth:`release_joint` after)."""
        feats = [self.features(s, v) for s, v in zip(states, views, strict=True)]
        params = self.params.to(feats[0].device)
        positions, valid = [v.positions for v in views], [v.valid for v in views]
        scores = joint_scores(params, feats, positions, valid, self.config.age_dim, self.config.age_base)
        self._pending = scores
        if self.config.joint_reference == "absolute" and not self.config.head_mix:
            return
        # a token any layer holds (sliding-window layers hold fewer)
        masks = [held_and_fresh(v.positions, v.valid, v.fresh_from, scores.shape[-1]) for v in views]
        held = torch.stack([h for h, _ in masks]).any(0)
        if self.config.joint_reference == "fresh-median":
            fresh = torch.stack([f for _, f in masks]).any(0)
            self._pending = scores = relative_to_fresh(scores, held, fresh, params[:, -1])
        if self.config.head_mix:
            self._pending_heads = head_mixed(params, scores, feats, positions, valid, held,
                                             self.config.age_dim, self.config.head_mix)

    def release_joint(self) -> None:
        self._pending = self._pending_heads = None

    def _joint_slot_scores(self, view: CacheView) -> torch.Tensor:
        if self._pending is None:
            raise RuntimeError(
                "a joint NAMM scores all layers at once: use it through an EvictingCache (attach, "
                "ContextPrefill.fork), which calls prepare_joint before the layers' keep()"
            )
        return _per_slot(self._pending[:, None], view)

    def token_cap(self, view: CacheView) -> int | torch.Tensor | None:
        """The hard cap (``budget`` or ``compression_ratio``), if any; None while collecting statistics
        (the NAMM then keeps everything) or in pure threshold mode."""
        if self._collect is not None:
            return None
        return resolve_budget(self.config.budget, self.config.compression_ratio, view)

    # normalisation statistics --------------------------------------------------------------------
    @contextlib.contextmanager
    def collecting_statistics(self) -> Iterator[NAMM]:
        """Within this block the NAMM keeps everything and accumulates per-bin feature statistics
        over every valid token at every update; on exit they are frozen as ``norm_mean``/``norm_var``."""
        self._collect = [torch.zeros(()), torch.zeros(self.config.n_bins), torch.zeros(self.config.n_bins)]
        try:
            yield self
        finally:
            count, total, squares = self._collect
            self._collect = None
            if count > 0:
                self.norm_mean = total / count
                self.norm_var = (squares / count - self.norm_mean.square()).clamp_min(0)

    def _accumulate(self, spectral: torch.Tensor, valid: torch.Tensor) -> None:
        x = spectral[valid].double().cpu()
        self._collect[0] = self._collect[0] + x.shape[0]
        self._collect[1] = self._collect[1] + x.sum(0).float()
        self._collect[2] = self._collect[2] + x.square().sum(0).float()

    # persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (parameters + normalisation statistics)."""
        from namm_transfer.checkpoint import save_namm

        return save_namm(self, Path(directory))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **hub_kwargs) -> NAMM:
        """Load from a local directory, a shipped NAMM's short name (``"smollm2-text"``, see
        :func:`namm_transfer.shipped.available`) or a Hub repo id (``config.json`` +
        ``model.safetensors``)."""
        from namm_transfer.checkpoint import load_namm

        return load_namm(cls, name_or_path, **hub_kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"NAMM(scorer={c.scorer!r}, params={tuple(self.params.shape)}, update_every={c.update_every}, "
            f"budget={c.budget}, "
            + ("" if c.compression_ratio is None else f"compression_ratio={c.compression_ratio}, ")
            + f"normalised={self.norm_mean is not None})"
        )

