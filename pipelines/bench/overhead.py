"""``namm-transfer bench overhead``: what attaching a NAMM costs on SmolLM2's chunked prefill.

For each prompt length, the bare model's chunked prefill (a ``DynamicCache``) is timed against the
same chunks with a NAMM attached (median of a few repetitions). Results go to a markdown table and a
JSON file next to it, with the command line, date and library versions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from namm_transfer.pipelines.common import (
    log,
    markdown_table,
    parse_dtype,
    run_metadata,
    set_threads,
    write_json,
)
from namm_transfer.pipelines.demo import load_namm
from namm_transfer.pipelines.models import load_smollm2
from namm_transfer.pipelines.text.passkey import make_passkey_example


@dataclass
class OverheadConfig:
    """Settings of :func:`run_overhead`.

    Attributes:
        lengths: prompt lengths in tokens.
        chunk: prefill chunk size (both runs feed the same chunks).
        reps: timed repetitions per length and setting (the median is reported).
        warmup: untimed runs before timing (at the shortest length).
        device: torch device.
        dtype: model dtype name.
        namm: path or hub id of a NAMM checkpoint; None uses ``NAMM.init_random(namm_seed)``.
        namm_seed: seed of that random NAMM.
        namm_budget: optional hard cap on the tokens the NAMM keeps per layer and KV head. None (the
            default) measures the pure bookkeeping cost: an untrained NAMM keeps everything, so every
            forward sees the full cache; a budget shows the net effect when eviction shrinks it.
        output: markdown result path; the JSON goes beside it with a ``.json`` suffix.
        threads: torch intra-op threads (None leaves torch's default).
        cache_dir: converted-model cache directory (None: the default).
    """

    lengths: Sequence[int] = field(default_factory=lambda: [512, 1024, 2048])
    chunk: int = 512
    reps: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    namm: str | None = None
    namm_seed: int = 0
    namm_budget: int | None = None
    output: str = "benchmarks/results/overhead.md"
    threads: int | None = None
    cache_dir: str | None = None


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def chunked_prefill(model, ids: torch.Tensor, chunk: int, cache) -> None:
    """Feed ``ids`` ``[B, T]`` through ``model`` in chunks, filling ``cache`` (only last logits computed)."""
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            part = ids[:, start : start + chunk]
            model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1)


def _timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def benchmark_prompt(tokenizer, tokens: int) -> torch.Tensor:
    """``[1, tokens]`` ids: a passkey prompt cut to exactly ``tokens`` (so update points are hit exactly)."""
    ids = make_passkey_example(tokenizer, seed=0, prompt_tokens=tokens + 64).prompt_ids[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"could not build a {tokens}-token prompt")
    return torch.tensor([ids])


def measure_length(model, ids: torch.Tensor, namm, cfg: OverheadConfig) -> dict[str, Any]:
    """One row of the overhead table for the prompt ``ids``."""
    from transformers import DynamicCache

    from namm_transfer.adapters import attach

    def bare() -> int:
        cache = DynamicCache(config=model.config)
        chunked_prefill(model, ids, cfg.chunk, cache)
        return _dynamic_cache_bytes(cache)

    bare_times, namm_times, bookkeeping = [], [], []
    for _ in range(max(1, cfg.reps)):  # interleaved, so load from other processes hits both alike
        seconds, bare_bytes = _timed(bare, cfg.device)
        bare_times.append(seconds)
        with attach(model, namm) as handle:
            cache = handle.new_cache()
            seconds, _ = _timed(lambda c=cache: chunked_prefill(model, ids, cfg.chunk, c), cfg.device)
            stats = handle.stats()
        namm_times.append(seconds)
        bookkeeping.append(sum(stats["timing"].values()))
    bare_s, namm_s = statistics.median(bare_times), statistics.median(namm_times)
    bookkeeping_s = statistics.median(bookkeeping)
    return {
        "tokens": int(ids.shape[1]),
        "bare_s": bare_s,
        "namm_s": namm_s,
        "overhead_ratio": namm_s / bare_s,
        "bookkeeping_s": bookkeeping_s,
        "bookkeeping_fraction_of_bare": bookkeeping_s / bare_s,
        "bare_s_all": bare_times,
        "namm_s_all": namm_times,
        "timing_last_rep": stats["timing"],
        "kv_bytes_bare": bare_bytes,
        "kv_bytes_full": stats["full_kv_bytes"],
        "kv_bytes_namm": stats["stored_kv_bytes"],
        "kept_fraction": stats["kept_fraction"],
        "evictions": stats["evictions"],
        "bookkeeping_bytes": stats["bookkeeping_bytes"],
        "max_rows_buffered": stats["max_rows_buffered"],
    }


TIMING_KEYS = ("capture_s", "features_s", "scoring_s", "eviction_s")


def format_overhead(rows: list[dict[str, Any]]) -> str:
    """The overhead results as a markdown table."""
    mib = 2**20
    headers = ["tokens", "bare s", "NAMM s", "overhead x", "bookkeeping / bare",
               "capture / features / scoring / eviction s", "KV MiB bare", "KV MiB NAMM", "kept",
               "bookkeeping MiB", "max rows buffered"]
    body = [
        [r["tokens"], f"{r['bare_s']:.2f}", f"{r['namm_s']:.2f}", f"{r['overhead_ratio']:.2f}",
         f"{r['bookkeeping_fraction_of_bare']:.1%}",
         " / ".join(f"{r['timing_last_rep'][k]:.2f}" for k in TIMING_KEYS),
         f"{r['kv_bytes_bare'] / mib:.2f}",
         f"{r['kv_bytes_namm'] / mib:.2f}", f"{r['kept_fraction']:.1%}",
         f"{r['bookkeeping_bytes'] / mib:.2f}", r["max_rows_buffered"]]
        for r in rows
    ]
    return markdown_table(headers, body)


def run_overhead(cfg: OverheadConfig, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the overhead benchmark; prints the table, writes ``cfg.output`` (.md) and its .json twin."""
    set_threads(cfg.threads)
    log("loading SmolLM2-135M-Instruct ...")
    model, tokenizer = load_smollm2(device=cfg.device, dtype=parse_dtype(cfg.dtype), cache_dir=cfg.cache_dir)
    namm = load_namm(cfg.namm, cfg.namm_seed, cfg.namm_budget)
    lengths = sorted(int(n) for n in cfg.lengths)
    prompts = {n: benchmark_prompt(tokenizer, n).to(cfg.device) for n in lengths}
    if cfg.warmup:
        log("warming up ...")
        warm = OverheadConfig(**{**asdict(cfg), "reps": cfg.warmup})
        measure_length(model, prompts[lengths[0]], namm, warm)
    meta = run_metadata(argv)
    md_path = Path(cfg.output)
    rows: list[dict[str, Any]] = []
    for n in lengths:
        log(f"timing {prompts[n].shape[1]} tokens x {cfg.reps} reps ...")
        rows.append(measure_length(model, prompts[n], namm, cfg))
        log(f"{n}: bare {rows[-1]['bare_s']:.2f} s, NAMM {rows[-1]['namm_s']:.2f} s")
        record = {"config": asdict(cfg), "meta": meta, "rows": rows}
        json_path = write_json(md_path.with_suffix(".json"), record)  # after every length: nothing is lost

    table = format_overhead(rows)
    print(table)
    md_path.write_text(
        "# NAMM overhead on SmolLM2-135M-Instruct (chunked prefill)\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}\n"
        f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}\n"
        f"- device: {cfg.device}, dtype: {cfg.dtype}, torch threads: {meta['torch_threads']}, "
        f"chunk: {cfg.chunk}, median of {cfg.reps} reps\n"
        f"- NAMM: {cfg.namm or f'NAMM.init_random(seed={cfg.namm_seed})'}, budget: {cfg.namm_budget}\n\n"
        "`overhead x` = NAMM seconds / bare seconds; `bookkeeping / bare` = the NAMM's own time "
        "(capture + features + scoring + eviction, from `stats()['timing']`) over the bare forward.\n\n"
        f"{table}\n"
    )
    log(f"wrote {md_path} and {json_path}")
    return rows
