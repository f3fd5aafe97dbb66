"""The joint scorer (``NAMMConfig(scorer="joint")``): one score per token from every layer-head at once.

A BAM or MLP NAMM scores each layer and KV head from that layer-head's features alone. ``bench
evidence`` found that on SmolLM2 those features, read one layer-head at a time, hardly tell a context's
facts from its filler (ROC AUC 0.61), and read together they do (0.99): a few heads anywhere in the
stack mark them. A joint NAMM reads them together: per token, a linear read-out of its z-scored
spectrogram features in every layer-head plus its age embedding,

    score(t) = sum_{r, k} w[r, k] * x_r(t)[k] + sum_j a[j] * age(t)[j] + b,

and every layer and KV head keeps the same tokens. Its parameters are tied to one model's layers x KV
heads (``joint_rows``); it does not transfer to another architecture the way a per-head NAMM does.

With ``NAMMConfig.head_mix = m > 0`` each layer-head ranks by its own score instead (:func:`head_mixed`):

    score_r(t) = z(score)(t) + m * z(sum_k w[r, k] * x_r(t)[k]),

the joint score plus m times that layer-head's own term of it, each z-scored over the tokens held. The
weights are the same; the heads then keep different tokens, so the model as a whole sees more of the
context under a tight budget, as it does with a per-head policy such as H2O.

Because an update reads every layer's state, the cache evicts all layers together at the end of the
last layer's attention (:meth:`adapters.cache.EvictingCache.evict_jointly`), not each layer after its
own: the same result, since no layer reads another layer's cache within a forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from namm_transfer.features import age_embedding


def joint_n_params(rows: int, n_bins: int, age_dim: int) -> int:
    """Weights per (layer-head, bin), per age dim, and one bias."""
    return rows * n_bins + age_dim + 1


def joint_inputs(
    features: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    age_dim: int,
) -> torch.Tensor:
    """``[B, T, rows * n_bins]``: each token's spectral features in every layer-head, side by side.

    Args:
        features: per layer ``[B, H, S, age_dim + n_bins]`` (a NAMM's ``features()``).
        positions, valid: per layer ``[B, H, S]`` the slots' token indices and validity.
        age_dim: leading age dims of each feature vector (left out: the age is read once per token).

    ``T`` is one past the largest valid position. A token a layer-head does not hold reads 0 there (the
    z-scored features' mean).
    """
    batch, heads = features[0].shape[:2]
    n_bins = features[0].shape[-1] - age_dim
    tokens = 1 + max(int(p.masked_fill(~v, -1).max()) for p, v in zip(positions, valid, strict=True))
    rows = len(features) * heads
    # one spare token row takes the invalid slots' writes
    out = features[0].new_zeros(batch, tokens + 1, rows, n_bins)
    b_idx = torch.arange(batch, device=out.device)[:, None, None]
    for layer, (feats, pos, ok) in enumerate(zip(features, positions, valid, strict=True)):
        if feats.shape[:2] != (batch, heads):
            raise ValueError(f"layer {layer} has {tuple(feats.shape[:2])} (batch, KV heads), "
                             f"layer 0 {(batch, heads)}: a joint NAMM needs the same in every layer")
        r_idx = (layer * heads + torch.arange(heads, device=out.device))[None, :, None]
        out[b_idx, pos.masked_fill(~ok, tokens), r_idx] = feats[..., age_dim:]
    return out[:, :tokens].flatten(2)


def joint_scores(
    params: torch.Tensor,
    features: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    age_dim: int,
    age_base: float,
) -> torch.Tensor:
    """``[B, T]`` one score per token index (:func:`joint_inputs`, then the linear read-out).

    ``params``: ``[P, n_params]``, ``P`` 1 or the batch (one member per sample). When every sample holds
    the same slots and features (a shared prefill's fork to ``P`` members), the inputs are built once.
    """
    batch = features[0].shape[0]
    shared = batch > 1 and all(
        bool((f[:1] == f).all()) and bool((p[:1] == p).all()) and bool((v[:1] == v).all())
        for f, p, v in zip(features, positions, valid, strict=True)
    )
    if shared:
        features, positions, valid = ([x[:1] for x in xs] for xs in (features, positions, valid))
    x = joint_inputs(features, positions, valid, age_dim)  # [B', T, F]
    n_bins = features[0].shape[-1] - age_dim
    expected = joint_n_params(x.shape[-1] // n_bins, n_bins, age_dim)
    if params.shape[-1] != expected:
        raise ValueError(
            f"this joint NAMM has {params.shape[-1]} parameters, this model's {len(features)} layers x "
            f"{features[0].shape[1]} KV heads need {expected}: a joint NAMM is tied to the model it was "
            "trained on"
        )
    tokens = x.shape[1]
    newest = torch.stack([p.masked_fill(~v, -1).amax(dim=(-1, -2)) for p, v in zip(positions, valid,
                                                                                     strict=True)]).amax(0)
    age = (newest[:, None] - torch.arange(tokens, device=x.device)[None]).clamp_min(0)  # [B', T]
    age = age_embedding(age, age_dim, age_base)
    n_spec = x.shape[-1]
    w_spec, w_age, bias = params[:, :n_spec], params[:, n_spec:-1], params[:, -1]
    if x.shape[0] == 1:  # every member scores the same inputs
        out = x[0] @ w_spec.T + age[0] @ w_age.T + bias  # [T, P]
        return out.T.expand(batch, -1) if params.shape[0] == 1 else out.T
    return torch.einsum("btf,bf->bt", x, w_spec.expand(batch, -1)) + torch.einsum(
        "btf,bf->bt", age, w_age.expand(batch, -1)) + bias[:, None]


def _zscore(x: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """``x`` standardised over the last dim's ``held`` entries (``held`` broadcasts to ``x``)."""
    held = held.expand_as(x)
    n = held.sum(-1, keepdim=True).clamp_min(1)
    mean = torch.where(held, x, 0.0).sum(-1, keepdim=True) / n
    var = torch.where(held, x - mean, 0.0).square().sum(-1, keepdim=True) / n
    return (x - mean) / var.sqrt().clamp_min(1e-6)


def head_mixed(
    params: torch.Tensor,
    scores: torch.Tensor,
    features: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    held: torch.Tensor,
    age_dim: int,
    mix: float,
) -> torch.Tensor:
    """``[B, layers, KV heads, T]`` each layer-head's ranking score: the joint ``scores`` ``[B, T]``
    (:func:`joint_scores`) plus ``mix`` times the layer-head's own term of them, both z-scored over the
    ``held`` ``[B, T]`` tokens (module doc). Tokens not held score -inf."""
    own = own_terms(params, features, positions, valid, age_dim, scores.shape[-1])
    mixed = _zscore(scores, held)[:, None] + mix * _zscore(own, held[:, None])
    mixed = mixed.masked_fill(~held[:, None], float("-inf"))
    return mixed.unflatten(1, (len(features), features[0].shape[1]))


def own_terms(
    params: torch.Tensor,
    features: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    valid: Sequence[torch.Tensor],
    age_dim: int,
    tokens: int,
) -> torch.Tensor:
    """``[B, rows, tokens]`` each layer-head's term of the joint read-out, ``sum_k w[r, k] x_r(t)[k]``
    (rows in layer-major order: ``layer * KV heads + head``)."""
    n_bins = features[0].shape[-1] - age_dim
    x = joint_inputs(features, positions, valid, age_dim)  # [B, T', rows * n_bins]
    x = x[:, :tokens].unflatten(-1, (-1, n_bins))  # [B, T, rows, n_bins]
    w = params[:, : x.shape[2] * n_bins].unflatten(-1, (-1, n_bins))  # [P, rows, n_bins]
    return torch.einsum("btrk,brk->brt", x, w.expand(x.shape[0], -1, -1))


REFERENCES = ("absolute", "fresh-median")


def held_and_fresh(positions: torch.Tensor, valid: torch.Tensor, fresh_from: torch.Tensor | None,
                   tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, tokens], [B, tokens])`` bool: the tokens a layer holds (``positions``, ``valid``
    ``[B, H, S]``), and those of them that arrived since the policy's last update (index >=
    ``fresh_from`` ``[B]``; None: every held token)."""
    held = torch.zeros(positions.shape[0], tokens + 1, dtype=torch.bool, device=positions.device)
    held.scatter_(1, positions.masked_fill(~valid, tokens).flatten(1).clamp(0, tokens), True)
    held = held[:, :tokens]
    if fresh_from is None:
        return held, held
    index = torch.arange(tokens, device=positions.device)
    return held, held & (index[None] >= fresh_from.to(positions.device)[:, None])


def relative_to_fresh(
    scores: torch.Tensor, held: torch.Tensor, fresh: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``scores`` ``[B, T]`` (bias included) measured from the median score of the ``fresh`` ``[B, T]``
    tokens, plus the ``bias`` ``[P]`` (``P`` 1 or B): ``joint_reference="fresh-median"``.

    Why: the read-out's scale drifts with the context. On SmolLM2 the median score of a keep-all cache
    rises from -8 at 256 tokens to -0.4 at 1,024, and after an eviction the same tokens score 2-6 lower
    than in a keep-all cache (the survivors' attention is renormalised). So one absolute threshold keeps
    40% of a context compressed once but 12% of one compressed every 256 tokens. The tokens fed since
    the last update have not been filtered by the policy yet (one-shot: the whole context; progressive:
    the latest chunk), so their median follows that drift and not the policy's own earlier choices.
    A row without fresh tokens (a forced update right after another) is measured from every token it
    holds (``held``).
    """
    fresh = torch.where(fresh.any(-1, keepdim=True), fresh, held)
    reference = scores.masked_fill(~fresh, float("nan")).nanmedian(dim=-1, keepdim=True).values
    return scores - reference.nan_to_num(0.0) + bias.to(scores)[:, None]
