"""Operation count of a DT rollout with a faithful NAMM against the full cache (issue 15's speed target).

Counts multiply-adds x 2 of a GPT-2 style Decision Transformer (``d`` wide, ``inner`` MLP, ``layers`` x
``heads``, 3 tokens per env step) over an episode, with the full cache (every token kept) and with a
NAMM that keeps a share ``kept`` of the tokens seen (or a fixed cap, ``--caps``) and scores at
``cadence`` tokens (the BAM: qkv, causal attention, read-out, on every cached slot of every layer and
head, skipped while under a cap; the streaming features: one ``n_fft``-point real DFT frame per ``hop``
attention rows per slot). The ratio ``full / (NAMM model + NAMM policy)`` is the env-steps/s ratio if
every operation ran at the same FLOP rate: an estimate, not a bound (a tiny DT's forward is partly
bound by per-operation overheads, and the NAMM's small products run at other rates than the model's).

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


def episode(steps: int, d: int, inner: int, layers: int, heads: int, kept: float, cadence: int,
            cap: float | None = None) -> dict:
    """``kept``: the share of everything seen the NAMM keeps at each update (uncapped, its threshold);
    ``cap``: instead, a fixed cap of that share of the episode's tokens (``eval-rollout --budgets``)."""
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
            limit = None if cap is None else max(1.0, cap * 3 * steps)
            if fed % cadence == 0 and (limit is None or held > limit):  # under its cap: no scoring
                namm_policy += layers * heads * bam_head(held)
                # what the NAMM keeps of everything seen, or its top-k under a fixed cap
                held = min(held, limit) if limit is not None else max(1.0, kept * fed)
    return {"full": full, "namm_model": namm_model, "namm_policy": namm_policy,
            "bound": full / (namm_model + namm_policy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=121)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--inner", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kept", type=float, nargs="*", default=[0.5, 0.3])
    parser.add_argument("--cadences", type=int, nargs="+", default=[30, 90, 180, 363])
    parser.add_argument("--caps", type=float, nargs="*", default=[],
                        help="also fixed caps, as shares of the episode's tokens (eval-rollout --budgets)")
    args = parser.parse_args()
    print(f"DT {args.layers} layers x {args.heads} heads, {args.d} wide (MLP {args.inner}), "
          f"{args.steps} steps")
    print("| kept | cadence (tokens) | full MFLOP | NAMM model MFLOP | NAMM policy MFLOP "
          "| steps/s ratio at equal FLOP rates |")
    print("|---|---|---|---|---|---|")
    settings = [(f"{kept:.0%}", kept, None) for kept in args.kept]
    settings += [(f"cap {cap:.1%}", 1.0, cap) for cap in args.caps]
    for label, kept, cap in settings:
        for cadence in args.cadences:
            r = episode(args.steps, args.d, args.inner, args.layers, args.heads, kept, cadence, cap)
            print(f"| {label} | {cadence} | {r['full'] / 1e6:.1f} | {r['namm_model'] / 1e6:.1f} | "
                  f"{r['namm_policy'] / 1e6:.1f} | {r['bound']:.2f}x |")


if __name__ == "__main__":
    main()
