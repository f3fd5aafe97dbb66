"""The compiled kernels (namm_transfer/native) against the PyTorch path, per call, in one process.

    python benchmarks/scripts/native_kernels.py --output benchmarks/results/native_kernels.md

Each row times the same call with the kernels on and off (``native.use``), repetitions interleaved, one
torch thread, and gives the medians and their ratio:
- ``features``: one layer's streaming spectrogram (3 KV heads, SmolLM2-135M's layout) fed a chunk of 512
  causal softmax rows over S keys (S - 512 already cached), as a chunked prefill does;
- ``ring step``: a Decision Transformer step (3 rows over S keys, the ring path), 48 steps per call;
- ``BAM``: one layer's scoring (``score_tokens``, 3 KV heads, a random NAMM parameter vector) over S
  slots, all valid and in arrival order.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from namm_transfer import native
from namm_transfer.features import StreamingSpectrogram
from namm_transfer.namm import NAMM
from namm_transfer.scorers import score_tokens

HEADS = 3


def causal_rows(n_keys: int, n_rows: int, seed: int) -> torch.Tensor:
    """``[1, HEADS, n_rows, n_keys]`` softmax rows; the last ``n_rows`` keys arrive with the rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, HEADS, n_rows, n_keys, generator=g) * 3
    old = n_keys - n_rows
    visible = torch.arange(n_keys)[None, :] <= old + torch.arange(n_rows)[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def features_call(n_keys: int) -> Callable[[], Callable[[], None]]:
    """A factory of timed calls: the state before the chunk is built outside the timer."""
    old = n_keys - 512
    before = causal_rows(old, old, 0) if old else None
    rows = causal_rows(n_keys, 512, 1)

    def prepared() -> Callable[[], None]:
        state = StreamingSpectrogram()
        if before is not None:
            state.observe(before, causal=True)
        return lambda: state.observe(rows, causal=True)

    return prepared


def ring_call(n_keys: int) -> Callable[[], Callable[[], None]]:
    g = torch.Generator().manual_seed(2)
    steps = [torch.softmax(torch.randn(1, HEADS, 3, n_keys, generator=g), -1) for _ in range(48)]

    def prepared() -> Callable[[], None]:
        state = StreamingSpectrogram()
        state.observe(causal_rows(n_keys, n_keys, 3), causal=True)

        def call() -> None:
            for rows in steps:
                state.observe(rows)

        return call

    return prepared


def bam_call(n_slots: int) -> Callable[[], Callable[[], None]]:
    namm = NAMM.init_random(0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, HEADS, n_slots, namm.config.shapes.in_dim, generator=g)
    valid = torch.ones(1, HEADS, n_slots, dtype=torch.bool)
    positions = torch.arange(n_slots).expand(1, HEADS, n_slots).contiguous()
    return lambda: lambda: score_tokens(namm.params, x, valid, positions, namm.config.shapes)


def timed(make: Callable[[], Callable[[], None]], on: bool) -> float:
    with native.use(on):
        call = make()
        start = time.perf_counter()
        call()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per row")
    parser.add_argument("--output", default=None, help="markdown file to write the table to")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if native.library() is None:
        raise SystemExit(f"the native kernels are unavailable here: {native.failure()}")
    cases = [("features", s, features_call(s)) for s in (512, 1024, 2048, 4096)]
    cases += [("ring step x48", s, ring_call(s)) for s in (66, 512)]
    cases += [("BAM", s, bam_call(s)) for s in (66, 512, 1024, 2048, 4096)]
    lines = [
        "| call | slots | PyTorch ms | kernel ms | kernel / PyTorch |",
        "|---|---|---|---|---|",
    ]
    for name, slots, make in cases:
        timed(make, True), timed(make, False)  # warm-up
        on, off = [], []
        for _ in range(args.reps):
            off.append(timed(make, False))
            on.append(timed(make, True))
        t_on, t_off = statistics.median(on) * 1e3, statistics.median(off) * 1e3
        lines.append(f"| {name} | {slots} | {t_off:.2f} | {t_on:.2f} | {t_on / t_off:.2f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.output:
        header = (
            "# Compiled kernels against the PyTorch path (one torch thread, medians of "
            f"{args.reps} interleaved repetitions)\n\n"
            "- command: `python benchmarks/scripts/native_kernels.py "
            f"--reps {args.reps} --output {args.output}`\n"
            f"- torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}\n\n"
        )
        Path(args.output).write_text(header + table + "\n")


if __name__ == "__main__":
    main()
