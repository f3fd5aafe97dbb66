"""A learned, question-agnostic selection that reads a token's NAMM features in every layer and KV head
at once (:class:`JointProbe`), and the policy that applies fixed per-slot scores
(:class:`FixedScoreTopK`).

A NAMM scores each layer-head from that layer-head's own features; ``bench evidence`` found that those
features, read one layer-head at a time, hardly tell the facts of a context from its filler, and read
all together do (``docs/design.md``, "Evaluation protocols"). A joint ranking needs every layer's state,
so it evicts after a forward, all layers at once (:func:`cache_joint_scores`): one-shot from a shared
prefill (``bench oracle --joint-probe`` on text, ``eval-video --joint-probe`` on video) or after every
chunk (:func:`progressive_joint_answer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from namm_transfer.pipelines.text.tasks import SINKS
from namm_transfer.policies import MemoryPolicy
from namm_transfer.policies.base import CacheView

JOINT = "JointProbe"  # rows of a side-by-side probe
POOLED = "PooledProbe"  # rows of a pooled one
PROBES = (JOINT, POOLED)


def fit_probe(x: torch.Tensor, y: torch.Tensor, hidden: int, steps: int, seed: int) -> torch.nn.Module:
    """A per-token classifier of ``y`` from ``x`` (logistic regression when ``hidden`` is 0, else one
    hidden ReLU layer), Adam on class-balanced binary cross-entropy over minibatches of 8,192."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dim = x.shape[1]
    net = (torch.nn.Linear(dim, 1) if hidden == 0 else
           torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    pos_weight = (1 - y.float().mean()) / y.float().mean().clamp_min(1e-6)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(len(x), (8192,), generator=gen)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(x[idx])[:, 0], y[idx].float(), pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


class FixedScoreTopK(MemoryPolicy):
    """Keeps, per layer and KV head, the ``budget`` valid slots with the highest given scores.

    Args:
        scores: ``[layers, kv_heads, slots]`` one score per cached slot (batch 1).
        budget: slots kept per layer and KV head (None keeps all).
    """

    def __init__(self, scores: torch.Tensor | None, budget: int | None):
        super().__init__(update_every=1 << 40)
        self.scores, self.budget = scores, budget

    def new_state(self, layer_idx: int) -> None:
        return None

    def keep(self, state: Any, view: CacheView) -> torch.Tensor:
        valid = view.valid
        if self.budget is None or self.budget >= valid.shape[-1]:
            return valid.clone()
        scores = self.scores[view.layer_idx].to(valid.device)[None, :, : valid.shape[-1]]
        scores = scores.expand_as(valid).masked_fill(~valid, -torch.inf)
        top = scores.topk(self.budget, dim=-1).indices
        return torch.zeros_like(valid).scatter(-1, top, True) & valid


@dataclass
class JointProbe:
    """A question-agnostic fact detector that reads a token's NAMM features in every layer and KV head
    at once: a logistic regression on :func:`joint_vector`, standardised with the training
    prompts' mean and deviation. It is not a NAMM (a NAMM scores each layer-head from that layer-head's
    features alone); ``bench oracle --joint-probe`` measures what its ranking keeps.

    Attributes:
        weight: ``[R * bins + age_dim]`` logistic weights on the standardised vector.
        bias: logistic bias.
        mean, std: the standardisation.
        age_dim: age dims at the end of the vector (the NAMM's ``age_dim``).
        pooled: the vector pools the layer-heads (:func:`joint_vector`): any model's features fit.
    """

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    std: torch.Tensor
    age_dim: int
    pooled: bool = False

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, age_dim: int, steps: int, seed: int,
            pooled: bool = False) -> JointProbe:
        """Fitted on :func:`joint_vector` rows ``x`` (built with the same ``pooled``) and labels ``y``."""
        mean, std = x.mean(0), x.std(0) + 1e-6
        net = fit_probe((x - mean) / std, y, 0, steps, seed)
        return cls(net.weight.detach()[0].clone(), float(net.bias.detach()[0]), mean, std, age_dim, pooled)

    @property
    def name(self) -> str:
        """The policy name its rows carry: :data:`POOLED` or :data:`JOINT`."""
        return POOLED if self.pooled else JOINT

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """``[S]`` fact scores of a keep-everything context's ``[R, S, D]`` NAMM features."""
        x = joint_vector(feats, self.age_dim, self.pooled)
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"the probe reads {self.weight.shape[0]} features per token, this model's "
                             f"context gives {x.shape[-1]} (another model or NAMM config?)")
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def save(self, path: str | Path) -> None:
        torch.save({"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std,
                    "age_dim": self.age_dim, "pooled": self.pooled}, path)

    @classmethod
    def load(cls, path: str | Path) -> JointProbe:
        state = torch.load(path, weights_only=True)
        return cls(state["weight"], float(state["bias"]), state["mean"], state["std"], int(state["age_dim"]),
                   bool(state.get("pooled", False)))


def joint_vector(feats: torch.Tensor, age_dim: int, pooled: bool = False) -> torch.Tensor:
    """``[S, F]``: each token's NAMM features ``[R, S, D]`` of every layer-head read together. Side by
    side (``R * bins + age_dim``, tied to one model's layers and heads), or ``pooled`` over the
    layer-heads: the mean, standard deviation and maximum of each spectral bin, then the age
    (``3 * bins + age_dim``, the same size for any model)."""
    spectral = feats[..., age_dim:]
    age = feats[0, :, :age_dim]
    if pooled:
        parts = [spectral.mean(0), spectral.std(0, unbiased=False), spectral.amax(0)]
        return torch.cat([*parts, age], -1)
    return torch.cat([spectral.permute(1, 0, 2).flatten(1), age], -1)


def cache_joint_scores(cache, namm, probe: JointProbe, index: int | None = None) -> torch.Tensor:
    """``[layers, kv_heads, S]`` scores for :class:`FixedScoreTopK`: the first :data:`~.tasks.SINKS`
    tokens first, then the probe's fact probability, the same ranking in every layer-head. ``cache``'s
    layer-heads must all hold the same tokens (a keep-everything cache, e.g. a shared prefill's, or one
    only a joint ranking evicted from); ``index``: the NAMM's place among a shared prefill's recorded
    policy states (None: the cache's policy is the NAMM's feature recorder itself).

    Raises:
        ValueError: when layer-heads hold different tokens (no joint vector per token exists).
    """
    from namm_transfer.pipelines.text.evolve_shared import cache_features

    feats, valid, positions = cache_features(cache, namm, index)
    if not (torch.equal(positions, positions[:1].expand_as(positions)) and bool(valid.all())):
        raise ValueError("a joint ranking needs every layer and KV head to hold the same tokens")
    scores = probe.scores(feats).sigmoid() + 2.0 * (positions[0] < SINKS)
    layers = len(cache.layers)
    return scores.expand(layers, feats.shape[0] // layers, -1)


class ScoredKeep(FixedScoreTopK):
    """A :class:`FixedScoreTopK` whose :attr:`scores` are set from outside before each forced eviction
    (e.g. :func:`cache_joint_scores`), and which records ``namm``'s features meanwhile (its feature
    state and updates). It never evicts on its own cadence."""

    needs_attention = True
    rows_transient = True

    def __init__(self, namm, budget: int | None):
        super().__init__(None, budget)
        self.namm = namm

    def new_state(self, layer_idx: int):
        return self.namm.new_state(layer_idx)

    def observe(self, state, attention: torch.Tensor, row_valid) -> None:
        self.namm.observe(state, attention, row_valid)

    def on_select(self, state, index: torch.Tensor) -> None:
        self.namm.on_select(state, index)

    def state_nbytes(self, state) -> int:
        return self.namm.state_nbytes(state)

    def keep(self, state, view: CacheView) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError("ScoredKeep evicts only after its scores are set")
        return super().keep(state, view)


@torch.no_grad()
def progressive_joint_answer(model, tokenizer, handle, prompt_ids: list[int], namm, probe: JointProbe,
                             budget: int, chunk: int, max_new_tokens: int) -> tuple[str, float]:
    """The progressive protocol with a joint ranking: the prompt is fed in chunks of ``chunk`` tokens,
    and after each chunk every layer keeps the ``budget`` tokens :func:`cache_joint_scores` ranks first
    (features of every layer at that point: evicting all layers after a forward is what evicting each
    layer after its own attention gives, since no later layer reads an earlier layer's cache). The
    last prompt token is fed with the greedy decoding, after the last compression. Returns the answer
    and the kept fraction of the tokens seen at the end (mean over layers and KV heads).
    """
    from namm_transfer.adapters.cache import EvictingCache
    from namm_transfer.pipelines.text.shared_prefill import generate_answer

    ids = torch.as_tensor(prompt_ids, device=model.device)
    policy = ScoredKeep(namm, budget)
    cache = EvictingCache(policy, handle.num_layers, handle.n_groups)
    body = ids.shape[0] - 1
    for start in range(0, body, chunk):
        model(input_ids=ids[None, start : min(start + chunk, body)], past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        policy.scores = cache_joint_scores(cache, namm, probe)
        for layer in cache.layers:
            layer.apply_eviction(force=True)
    tail = SimpleNamespace(suffix_ids=ids[body:])
    text = generate_answer(model, tokenizer, tail, cache, max_new_tokens)
    kept = cache.memory_report().sample(0)["kept_per_layer"]
    return text, sum(kept) / len(kept) / cache.get_seq_length()
