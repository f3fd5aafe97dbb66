"""NAMM token scorers: backward attention memory (BAM) and the MLP ablation (arXiv 2410.13166, sec. 3.2),
and a linear read-out of each token's features (no hidden layer).

All are pure functions of a flat parameter vector so that a whole CMA-ES population can be scored at
once: ``params`` is ``[P, n_params]`` with P equal to 1 (shared) or to the batch size (one member per
batch element). Weights are laid out ``in x out`` and flattened in the reference order
(qkv weight, qkv bias, out weight, out bias, final weight, final bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from namm_transfer import native

LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class ScorerShapes:
    """Sizes of a scorer; the defaults give the reference BAM with 4,172 parameters."""

    in_dim: int = 25
    hidden: int = 32
    kind: str = "bam"  # "bam" (counter-causal attention), "mlp" (no token-to-token attention), "linear"

    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        d, h = self.in_dim, self.hidden
        if self.kind == "linear":  # score = features @ w + b: no hidden layer
            return [("final_weight", (d, 1)), ("final_bias", (1,))]
        first = ("qkv", (d, 3 * h)) if self.kind == "bam" else ("proj", (d, h))
        return [
            (f"{first[0]}_weight", first[1]),
            (f"{first[0]}_bias", (first[1][1],)),
            ("out_weight", (h, 2 * d)),
            ("out_bias", (2 * d,)),
            ("final_weight", (d, 1)),
            ("final_bias", (1,)),
        ]

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.layout())


def unflatten(params: torch.Tensor, shapes: ScorerShapes) -> dict[str, torch.Tensor]:
    """Split ``[P, n_params]`` into named ``[P, *shape]`` tensors."""
    if params.ndim == 1:
        params = params[None]
    if params.shape[-1] != shapes.n_params:
        raise ValueError(
            f"{shapes.kind} scorer with in_dim={shapes.in_dim}, hidden={shapes.hidden} needs "
            f"{shapes.n_params} parameters, got a vector of {params.shape[-1]}"
        )
    out, start = {}, 0
    for name, shape in shapes.layout():
        size = math.prod(shape)
        out[name] = params[:, start : start + size].reshape(params.shape[0], *shape)
        start += size
    return out


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, i] @ weight [P, i, o] + bias [P, o]`` with P in {1, B}; the bias is added by the
    matrix product itself (one pass, no temporary)."""
    batch, heads, slots, width = x.shape
    if weight.shape[0] == 1:
        out = torch.addmm(bias[0], x.reshape(-1, width), weight[0])
    else:
        out = torch.baddbmm(bias[:, None, :], x.reshape(batch, heads * slots, width), weight)
    return out.view(batch, heads, slots, -1)


def score_tokens(
    params: torch.Tensor,
    features: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    shapes: ScorerShapes,
) -> torch.Tensor:
    """Score every cached token.

    Args:
        params: ``[P, n_params]``, P = 1 or B.
        features: ``[B, H, S, in_dim]`` token features.
        valid: ``[B, H, S]`` bool, False for empty or padding slots.
        positions: ``[B, H, S]`` arrival index of each slot (larger = newer).
        shapes: scorer sizes and kind.

    Returns:
        ``[B, H, S]`` scores; the keep threshold is 0. In BAM a token attends only to itself and to
        newer valid tokens (counter-causal), so its score depends on what came after it.
    """
    p = unflatten(params.to(features.dtype), shapes)
    all_valid = bool(valid.all())
    # garbage in empty slots must not leak
    x = features if all_valid else features.masked_fill(~valid[..., None], 0.0)
    if shapes.kind == "linear":
        return _linear(x, p["final_weight"], p["final_bias"]).squeeze(-1)
    tracked = torch.is_grad_enabled() and (features.requires_grad or params.requires_grad)
    folded = params.shape[0] == 1 and not tracked  # the read-out folded into the first projection
    flipped, order = False, None
    if shapes.kind == "bam":
        in_order = _valid_in_order(positions, valid)
        if in_order and not all_valid:
            # Heads keep different counts (a threshold, left padding): gather each row's valid slots,
            # oldest first, to the right end of a row as wide as the fullest one (padding to the left),
            # so the reversed rows below are valid-first and the fused causal kernel applies as well.
            order = _right_aligned(positions, valid)
            x = _gather_slots(x, order)
        if in_order and not tracked and native.bam_applicable(x):
            mixed = _native_bam(x, p, shapes.hidden)
        else:
            if in_order:
                # Slots are stored oldest first, so "itself and newer" is causal attention on the reversed
                # sequence: SDPA's fused causal kernel, no S x S mask. The features are reversed once and
                # every per-token step runs in that order; only the scores are put back.
                x, flipped = x.flip(-2), True
            q, k, v = _linear(x, p["qkv_weight"], p["qkv_bias"]).split(shapes.hidden, dim=-1)
            if in_order:
                mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                allowed = (positions[..., None, :] >= positions[..., :, None]) & valid[..., None, :]
                allowed = allowed | torch.eye(x.shape[-2], dtype=torch.bool, device=x.device)  # no empty row
                mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    elif shapes.kind == "mlp":
        mixed = torch.relu(_linear(x, p["proj_weight"], p["proj_bias"]))
    else:
        raise ValueError(f"unknown scorer kind {shapes.kind!r}; expected 'bam', 'mlp' or 'linear'")
    if folded:
        scores = _folded_readout(mixed, x, p, shapes.in_dim)
    elif tracked:
        residual, multiplier = _linear(mixed, p["out_weight"], p["out_bias"]).split(shapes.in_dim, dim=-1)
        hidden = x * (1 + multiplier) + residual
        scores = _linear(hidden, p["final_weight"], p["final_bias"]).squeeze(-1)
    else:
        scores = _readout_inplace(mixed, x, p, shapes.in_dim)
    scores = scores.flip(-1) if flipped else scores
    if order is None:
        return scores
    # back to the slots (``order`` holds distinct slots); invalid slots, never kept, score -inf
    return scores.new_full(valid.shape, float("-inf")).scatter_(-1, order, scores).masked_fill_(
        ~valid, float("-inf")
    )


def _native_bam(x: torch.Tensor, p: dict[str, torch.Tensor], hidden: int) -> torch.Tensor:
    """The BAM head through the compiled kernel (:mod:`namm_transfer.native`), on the features themselves.

    With ``q = x W_q + b_q``, ``k = x W_k + b_k``, ``v = x W_v + b_v`` (``x`` of width d), the logit
    ``q_i . k_j = (q_i W_k^T) . x_j + q_i . b_k``; the second term is the same for every key of query i,
    so the softmax drops it. And the weights sum to one, so ``sum_j a_ij v_j = (sum_j a_ij x_j) W_v + b_v``.
    The kernel thus attends with ``q_i W_k^T`` over the d-wide features as keys and values (d = 25
    instead of the head's 32 columns, and no key or value projection of the slots), and ``W_v`` is
    applied once to its output. Slots in arrival order; each attends to itself and the later ones."""
    w_q, w_k, w_v = p["qkv_weight"].split(hidden, dim=-1)  # [P, d, hidden] each
    b_q, _, b_v = p["qkv_bias"].split(hidden, dim=-1)  # [P, hidden]
    scale = LOG2E / math.sqrt(hidden)  # SDPA's 1 / sqrt(head width), in base 2 for the kernel's exp2
    fold = torch.matmul(w_q, w_k.transpose(-1, -2)).mul_(scale)  # [P, d, d]
    fold_bias = torch.matmul(b_q[:, None, :], w_k.transpose(-1, -2))[:, 0].mul_(scale)  # [P, d]
    query = _linear(x, fold, fold_bias)
    return _linear(native.bam_attention(query, x), w_v, b_v)


def _folded_readout(
    mixed: torch.Tensor, x: torch.Tensor, p: dict[str, torch.Tensor], dim: int
) -> torch.Tensor:
    """:func:`_readout_inplace`'s function for one shared parameter vector, with the output projection
    folded into the final one. With ``[r, m] = mixed @ [W_r, W_m] + [b_r, b_m]`` and
    ``score = ((1 + m) * x + r) @ w + b``,

        score = mixed . y + l,  y = x @ (W_m * w^T)^T + W_r @ w,  l = x @ (w * (1 + b_m)) + b_r . w + b,

    so the ``hidden x 2 dim`` product of every token's ``mixed`` becomes a ``dim x hidden`` one of its
    features and a dot product: equal up to float rounding, with about half the multiply-adds per
    token, and 5-11% less time per scoring call where the slots are few (a Decision Transformer's
    capped cache; ``benchmarks/scripts/scoring_readout.py``). (One product of 3 hidden + hidden + 1
    columns would be a single call, but an odd width falls off the matrix kernel's fast path: 4x slower
    here.)
    """
    final = p["final_weight"][0, :, 0]  # [dim]
    out_weight, out_bias = p["out_weight"][0], p["out_bias"][0]  # [hidden, 2 dim], [2 dim]
    flat = x.reshape(-1, dim)
    y = torch.addmm(out_weight[:, :dim] @ final, flat, (out_weight[:, dim:] * final).T)
    lin = torch.mv(flat, final * (1 + out_bias[dim:])).add_(out_bias[:dim] @ final + p["final_bias"][0, 0])
    return torch.linalg.vecdot(mixed.reshape(-1, y.shape[-1]), y).add_(lin).view(mixed.shape[:-1])


def _readout_inplace(
    mixed: torch.Tensor, x: torch.Tensor, p: dict[str, torch.Tensor], dim: int
) -> torch.Tensor:
    """``((1 + m) * x + r) @ final_weight + final_bias`` with ``[r, m] = mixed @ out_weight + out_bias``,
    the same arithmetic in place on the product's own output: the out bias is not broadcast into the
    product (a copy as large as it) but added with the ``1 +`` (multiplicative half) or folded into the
    final bias (residual half: ``(r + b) @ w = r @ w + b @ w``)."""
    out_bias, final_weight = p["out_bias"], p["final_weight"]  # [P, 2 * dim], [P, dim, 1]
    batch, heads, slots, width = mixed.shape
    flat = mixed.reshape(batch, heads * slots, width)
    product = torch.matmul(flat, p["out_weight"])  # [B, H * S, 2 * dim]; P = 1 broadcasts
    residual, multiplier = product.view(batch, heads, slots, -1).split(dim, dim=-1)
    scale = out_bias[:, None, None, dim:] + 1  # [P, 1, 1, dim]
    hidden = multiplier.add_(scale).mul_(x).add_(residual)
    final_bias = p["final_bias"] + (out_bias[:, :dim, None] * final_weight).sum(1)  # [P, 1]
    scores = torch.matmul(hidden, final_weight[:, None])  # [B, H, S, 1]
    return scores.squeeze(-1).add_(final_bias[:, :, None])


def _gather_slots(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, S, d]`` at slots ``order`` ``[B, H, W]`` of each row: whole feature rows picked by
    ``index_select`` on the flattened slots (an element-wise ``gather`` is ~10x slower here)."""
    batch, heads, slots, dim = x.shape
    base = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * slots
    flat = x.reshape(-1, dim).index_select(0, (order + base).reshape(-1))
    return flat.view(batch, heads, order.shape[-1], dim)


def _valid_in_order(positions: torch.Tensor, valid: torch.Tensor) -> bool:
    """True when each row's valid slots are in arrival order (slots are stored oldest first)."""
    masked = positions.masked_fill(~valid, -1)
    running = masked.cummax(-1).values
    return bool(((masked >= running) | ~valid).all())


def _right_aligned(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` slot indices: each row's valid slots in arrival order at the right end of a row of
    W = the largest valid count, invalid slots before them."""
    width = int(valid.sum(-1).max())
    key = positions.masked_fill(~valid, -1)
    return torch.argsort(key, dim=-1, stable=True)[..., -width:]


def keep_all_params(shapes: ScorerShapes, bias: float = 1.0) -> torch.Tensor:
    """All-zero parameters with a positive final bias: every score equals ``bias``, so all tokens are kept."""
    params = torch.zeros(shapes.n_params)
    params[-1] = bias
    return params
