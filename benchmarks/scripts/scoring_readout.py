"""Time one BAM scoring call with the plain read-out against the folded one (``scorers._folded_readout``).

The plain path is assembled from the scorer's own pieces (q/k/v projection, SDPA's fused causal kernel,
``_readout_inplace``) on slots in arrival order, all valid: what ``score_tokens`` ran for one shared
parameter vector before the read-out was folded. Both are checked equal to 1e-5 first, then timed
interleaved (best of ``--rounds`` rounds). One torch thread.

    python benchmarks/scripts/scoring_readout.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from namm_transfer.scorers import ScorerShapes, _linear, _readout_inplace, score_tokens, unflatten

SHAPES = ((100, 2, 66), (50, 2, 66), (100, 2, 220), (1, 3, 512), (1, 3, 2048))  # batch, KV heads, slots


def plain_scores(params: torch.Tensor, x: torch.Tensor, shapes: ScorerShapes) -> torch.Tensor:
    p = unflatten(params, shapes)
    flipped = x.flip(-2)
    q, k, v = _linear(flipped, p["qkv_weight"], p["qkv_bias"]).split(shapes.hidden, dim=-1)
    mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return _readout_inplace(mixed, flipped, p, shapes.in_dim).flip(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = ScorerShapes()
    params = torch.randn(1, shapes.n_params, generator=torch.Generator().manual_seed(0)) * 0.3
    print("| batch x KV heads x slots | plain ms | folded ms | folded / plain |")
    print("|---|---|---|---|")
    for batch, heads, slots in SHAPES:
        x = torch.randn(batch, heads, slots, shapes.in_dim, generator=torch.Generator().manual_seed(1))
        valid = torch.ones(batch, heads, slots, dtype=torch.bool)
        positions = torch.arange(slots).expand(batch, heads, slots)
        calls = {"plain": (plain_scores, (params, x, shapes)),
                 "folded": (score_tokens, (params, x, valid, positions, shapes))}
        torch.testing.assert_close(score_tokens(*calls["folded"][1]), plain_scores(*calls["plain"][1]),
                                   atol=1e-5, rtol=1e-5)
        reps = max(1, int(2e6 // (batch * heads * slots * slots // 8 + 1)))
        best = {"plain": float("inf"), "folded": float("inf")}
        for _ in range(args.rounds):
            for name, (fn, call_args) in calls.items():
                start = time.perf_counter()
                for _ in range(reps):
                    fn(*call_args)
                best[name] = min(best[name], (time.perf_counter() - start) / reps * 1e3)
        print(f"| {batch} x {heads} x {slots} | {best['plain']:.2f} | {best['folded']:.2f} | "
              f"{best['folded'] / best['plain']:.2f} |")


if __name__ == "__main__":
    main()
