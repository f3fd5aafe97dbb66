"""Independent, deliberately plain re-implementation of the BAM scorer and the age embedding.

Written from the description in docs/design.md, "The NAMM", only (not from
``namm_transfer.scorers``): flat parameters in the reference order qkv weight (in x out), qkv bias,
out weight, out bias, final weight, final bias.
"""

from __future__ import annotations

import math

import torch

IN_DIM, HIDDEN = 25, 32


def split_params(flat: torch.Tensor, in_dim: int = IN_DIM, hidden: int = HIDDEN) -> dict[str, torch.Tensor]:
    flat = flat.reshape(-1).double()
    sizes = [
        ("qkv_w", (in_dim, 3 * hidden)),
        ("qkv_b", (3 * hidden,)),
        ("out_w", (hidden, 2 * in_dim)),
        ("out_b", (2 * in_dim,)),
        ("fin_w", (in_dim, 1)),
        ("fin_b", (1,)),
    ]
    out, start = {}, 0
    for name, shape in sizes:
        n = math.prod(shape)
        out[name] = flat[start : start + n].reshape(shape)
        start += n
    assert start == flat.numel(), (start, flat.numel())
    return out


def bam_scores_one(
    flat: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Scores ``[S]`` of one (sample, head): ``x [S, in_dim]``; NaN for invalid tokens."""
    w = split_params(flat, x.shape[-1])
    x = x.double()
    qkv = x @ w["qkv_w"] + w["qkv_b"]
    hidden = w["qkv_w"].shape[1] // 3
    q, k, v = qkv[:, :hidden], qkv[:, hidden : 2 * hidden], qkv[:, 2 * hidden :]
    n_tok = x.shape[0]
    scores = torch.full((n_tok,), float("nan"), dtype=torch.float64)
    for i in range(n_tok):
        if not bool(valid[i]):
            continue
        js = [j for j in range(n_tok) if bool(valid[j]) and int(pos[j]) >= int(pos[i])]
        logits = torch.stack([q[i] @ k[j] for j in js]) / math.sqrt(hidden)
        weights = torch.exp(logits - logits.max())
        weights = weights / weights.sum()
        mixed = sum(weights[n] * v[j] for n, j in enumerate(js))
        out = mixed @ w["out_w"] + w["out_b"]
        d = x.shape[-1]
        r, m = out[:d], out[d:]
        h = x[i] * (1 + m) + r
        scores[i] = (h @ w["fin_w"] + w["fin_b"])[0]
    return scores


def bam_scores(params: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[B, H, S]`` scores for ``x [B, H, S, in_dim]``; ``params`` is ``[n]`` or ``[B, n]``."""
    batch, heads = x.shape[:2]
    out = torch.empty(x.shape[:3], dtype=torch.float64)
    for b in range(batch):
        flat = params if params.ndim == 1 else params[b]
        for h in range(heads):
            out[b, h] = bam_scores_one(flat, x[b, h], valid[b, h], pos[b, h])
    return out


def age_embedding_ref(age: torch.Tensor, dim: int = 8, base: float = 50_000.0) -> torch.Tensor:
    """sin(age / base**(2i/dim)) for i < dim/2, then the cosines."""
    cols = []
    for fn in (math.sin, math.cos):
        for i in range(dim // 2):
            freq = base ** (-(2 * i) / dim)
            cols.append(age.double().apply_(lambda a, fn=fn, freq=freq: fn(a * freq)))
    return torch.stack(cols, dim=-1)
