"""The joint scorer (``NAMMConfig(scorer="joint")``): one score per token from every layer-head at once.

A BAM or MLP NAMM scores each layer and KV head from that layer-head's features alone. ``bench
evidence`` found that on SmolLM2 those features, read one layer-head at a time, hardly tell a context's
facts from its filler (ROC AUC 0.61), and read together they do (0.99): a few heads anywhere in the
stack mark them. A joint NAMM reads them together: per token, a linear read-out of its z-scored
spectrogram features in every layer-head plus its age embedding,

    score(t) = sum_{r, k} w[r, k] * x_r(t)[k] + sum_j a[j] * age(t)[j] + b,

and every layer and KV head keeps the same tokens. Its parameters are tied to one model's layers x KV
heads (``joint_rows``); it does not transfer to another architecture the way a per-head NAMM does.

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
