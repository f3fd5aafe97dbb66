"""Operation count of a DT rollout with a faithful NAMM against the full cache (issue 15's speed target).

Counts multiply-adds x 2 of a GPT-2 style Decision Transformer (``d`` wide, ``inner`` MLP, ``layers`` x
``heads``, 3 tokens per env step) over an episode, with the full cache (every token kept) and with a
NAMM that keeps a share ``kept`` of the tokens and scores at ``cadence`` tokens (the BAM: qkv, causal
attention, read-out, on every cached slot of every layer and head; the streaming features: one
``n_fft``-point real DFT frame per ``hop`` attention rows per slot). The ratio ``full / (NAMM model +
NAMM policy)`` is the env-steps/s ratio reachable if both ran at the same FLOP rate: an upper bound for
kernels that are no faster on the NAMM's small matrices than on the model's.

    python benchmarks/scripts/rollout_flops.py   # the shipped cue-corridor DT: 2 x 2, 64 wide, 121 steps
"""

from __future__ import annotations

import argparse


def model_token(d: int, inner: int, keys: float) -> float:
    """One token through one layer: q/k/v/o projections, MLP, attention over ``keys`` cached slots."""
    return 2 * (4 * d * d + 2 * d * inner + 2 * keys * d)


def bam_head(slots: float, in_dim: int = 25, hidden: int = 32) -> float:
    """One BAM scoring of ``slots`` tokens of one head: qkv, counter-causal attention, read-out."""
    qkv, readout = slots * in_dim * 3 * hidden, slots * hidden * 2 * in_dim + slots * in_dim
    return 2 * (qkv + slots * slots * hidden + readout)  # causal: half of S x S, for QK and for PV


def features_row(slots: float, n_fft: int = 32, hop: int = 16) -> float:
    """Streaming spectrogram per attention row: one real-DFT frame of every slot every ``hop`` rows."""
    return 2 * slots * n_fft * (n_fft // 2 + 1) * 2 / hop


def episode(steps: int, d: int, inner: int, layers: int, heads: int, kept: float, cadence: int) -> dict:
    full = namm_model = namm_policy = 0.0
    held = 0.0  # tokens the NAMM holds (per layer and head)
    fed = 0
    for _ in range(steps):
        for _ in range(3):
            fed += 1
            full += layers * model_token(d, inner, fed)
            held += 1
            namm_model += layers * model_token(d, inner, held)
            namm_policy += layers * heads * features_row(held)
            if fed % cadence == 0:
                namm_policy += layers * heads * bam_head(held)
                held = max(1.0, kept * fed)  # what the NAMM keeps of everything seen
    return {"full": full, "namm_model": namm_model, "namm_policy": namm_policy,
            "bound": full / (namm_model + namm_policy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=121)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--cadences", type=int, nargs="+", default=[30, 90, 180, 363])
    args = parser.parse_args()
    print(f"DT {args.layers} layers x {args.heads} heads, {args.d} wide (MLP {args.inner}), "
          f"{args.steps} steps")
    print("| kept | cadence (tokens) | full MFLOP | NAMM model MFLOP | NAMM policy MFLOP "
          "| bound on steps/s ratio |")
    print("|---|---|---|---|---|---|")
    for kept in args.kept:
        for cadence in args.cadences:
            r = episode(args.steps, args.d, args.inner, args.layers, args.heads, kept, cadence)
            print(f"| {kept:.0%} | {cadence} | {r['full'] / 1e6:.1f} | {r['namm_model'] / 1e6:.1f} | "
                  f"{r['namm_policy'] / 1e6:.1f} | {r['bound']:.2f}x |")


if __name__ == "__main__":
    main()
