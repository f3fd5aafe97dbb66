"""``namm-transfer bench overhead``: what attaching a NAMM costs on SmolLM2's prefill, and what it saves.

For each prompt length, one repetition times, interleaved (so load from other processes hits all alike):
the bare model's chunked prefill (a ``DynamicCache``); the same chunks with a keep-everything NAMM
(``keep-all``: the pure bookkeeping cost); the same chunks with the NAMM at its operating point
(``half``: a compression ratio, about half the cache kept, progressive eviction every ``update_every``
tokens); and, for the one-shot protocol, the bare prefill of the whole context in one chunk against the
NAMM evicting once at its end (``half one-shot``: update_every = context length). The median of the
repetitions is reported with the KV bytes stored, the bytes of the tokens actually kept and their ratio
(padding of shorter heads to the longest). Results go to a markdown table and a JSON file next to it,
with the command line, date, library versions and the machine's load.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from namm_transfer.memory import TIMING_KEYS
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
        chunk: prefill chunk size of the progressive settings (bare and NAMM feed the same chunks).
        reps: timed repetitions per length (the median is reported).
        warmup: untimed repetitions before timing (at the shortest length).
        device: torch device.
        dtype: model dtype name (the NAMM's features and statistics stay float32).
        namm: path or hub id of a NAMM checkpoint; None uses ``NAMM.init_random(namm_seed)``.
        namm_seed: seed of that random NAMM.
        namm_budget: optional hard cap on the tokens the ``keep-all`` NAMM keeps per layer and KV head.
            None (the default) measures the pure bookkeeping cost: an untrained NAMM keeps everything.
        operating_ratio: compression ratio (fraction of the tokens seen removed at each update) of the
            ``half`` and ``half one-shot`` rows; None skips them.
        one_shot: also time the one-shot protocol (whole context in one chunk, one eviction at its end).
        decode_tokens: after each prefill, time this many greedy single-token forwards too (bare and
            NAMM, same cache as the prefill left it; 0: prefill only).
        threshold_namm: a trained NAMM (shipped name, path or hub id) timed in its own threshold mode, the
            NAMM's operating point where heads keep different numbers of tokens, once with the
            packed KV layout (``threshold``) and once padded (``threshold padded``); None skips it.
        note: free text for the table's header, e.g. what else was running on the machine.
        output: markdown result path; the JSON goes beside it with a ``.json`` suffix.
        threads: torch intra-op threads (None leaves torch's default).
        cache_dir: converted-model cache directory (None: the default).
    """

    lengths: Sequence[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    chunk: int = 512
    reps: int = 3
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    namm: str | None = None
    namm_seed: int = 0
    namm_budget: int | None = None
    operating_ratio: float | None = 0.5
    one_shot: bool = True
    threshold_namm: str | None = "smollm2-text"
    decode_tokens: int = 0
    note: str = ""
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


def decode_steps(model, cache, n: int, token: int = 13) -> None:
    """``n`` single-token forwards on ``cache`` (the decode loop of greedy generation, one fixed token)."""
    ids = torch.full((1, 1), token, dtype=torch.long, device=model.device)
    with torch.no_grad():
        for _ in range(n):
            model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)


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


def settings_for(namm, tokens: int, cfg: OverheadConfig, trained=None) -> list[tuple[str, Any, int, str]]:
    """``(name, policy, chunk, kv_layout)`` of every timed NAMM setting at one prompt length
    (``trained``: the NAMM of the threshold rows)."""
    settings = [("keep-all", namm, cfg.chunk, "packed")]
    if cfg.operating_ratio is not None:
        half = namm.with_compression_ratio(cfg.operating_ratio)
        settings.append(("half", half, cfg.chunk, "packed"))
        if cfg.one_shot:
            settings.append(("half one-shot", half.replace(update_every=tokens), tokens, "packed"))
    if trained is not None:
        settings.append(("threshold", trained, cfg.chunk, "packed"))
        settings.append(("threshold padded", trained, cfg.chunk, "padded"))
    return settings


def measure_length(model, ids: torch.Tensor, namm, cfg: OverheadConfig, trained=None) -> list[dict[str, Any]]:
    """The rows of the overhead table for the prompt ``ids``: one per NAMM setting, each against the bare
    prefill with the same chunks, repetitions interleaved."""
    from transformers import DynamicCache

    from namm_transfer.adapters import attach

    tokens = int(ids.shape[1])
    settings = settings_for(namm, tokens, cfg, trained)
    chunks = sorted({chunk for _, _, chunk, _ in settings})

    def bare(chunk: int) -> DynamicCache:
        cache = DynamicCache(config=model.config)
        chunked_prefill(model, ids, chunk, cache)
        return cache

    def decode(cache) -> float:
        return _timed(lambda: decode_steps(model, cache, cfg.decode_tokens), cfg.device)[0]

    bare_times: dict[int, list[float]] = {c: [] for c in chunks}
    bare_decode: dict[int, list[float]] = {c: [] for c in chunks}
    bare_bytes: dict[int, int] = {}
    runs: dict[str, list[tuple[float, dict, float]]] = {name: [] for name, *_ in settings}
    for _ in range(max(1, cfg.reps)):
        for chunk in chunks:
            seconds, cache = _timed(lambda c=chunk: bare(c), cfg.device)
            bare_bytes[chunk] = _dynamic_cache_bytes(cache)
            bare_times[chunk].append(seconds)
            bare_decode[chunk].append(decode(cache) if cfg.decode_tokens else 0.0)
            for name, policy, setting_chunk, layout in settings:
                if setting_chunk != chunk:
                    continue
                with attach(model, policy, kv_layout=layout) as handle:
                    cache = handle.new_cache()
                    run = lambda c=cache, k=chunk: chunked_prefill(model, ids, k, c)  # noqa: E731
                    seconds, _ = _timed(run, cfg.device)
                    stats = handle.stats()  # as the prefill left the cache
                    runs[name].append((seconds, stats, decode(cache) if cfg.decode_tokens else 0.0))
    rows = []
    for name, policy, chunk, layout in settings:
        times = [t for t, _, _ in runs[name]]
        stats = runs[name][-1][1]
        bookkeeping = statistics.median(sum(st["timing"].values()) for _, st, _ in runs[name])
        bare_s, namm_s = statistics.median(bare_times[chunk]), statistics.median(times)
        rows.append({
            "tokens": tokens,
            "setting": name,
            "kv_layout": layout,
            "chunk": chunk,
            "update_every": policy.update_every,
            "compression_ratio": policy.compression_ratio,
            "bare_s": bare_s,
            "namm_s": namm_s,
            "overhead_ratio": namm_s / bare_s,
            "bookkeeping_s": bookkeeping,
            "bookkeeping_fraction_of_bare": bookkeeping / bare_s,
            "bare_s_all": bare_times[chunk],
            "namm_s_all": times,
            "timing_last_rep": stats["timing"],
            "kv_bytes_bare": bare_bytes[chunk],
            "kv_bytes_full": stats["full_kv_bytes"],
            "kv_bytes_namm": stats["stored_kv_bytes"],
            "kv_bytes_kept": stats["kept_kv_bytes"],
            "stored_to_kept": stats["stored_to_kept"],
            "kept_fraction": stats["kept_fraction"],
            "evictions": stats["evictions"],
            "bookkeeping_bytes": stats["bookkeeping_bytes"],
            "max_rows_buffered": stats["max_rows_buffered"],
        })
        if cfg.decode_tokens:
            bare_d = statistics.median(bare_decode[chunk])
            namm_d = statistics.median(d for _, _, d in runs[name])
            rows[-1].update(decode_tokens=cfg.decode_tokens, bare_decode_s=bare_d, namm_decode_s=namm_d,
                            decode_ratio=namm_d / bare_d)
    return rows




def format_overhead(rows: list[dict[str, Any]]) -> str:
    """The overhead results as a markdown table."""
    mib = 2**20
    headers = ["tokens", "setting", "bare s", "NAMM s", "NAMM / bare", "bookkeeping / bare",
               "capture / features / scoring / eviction s", "KV MiB bare", "KV MiB stored", "KV MiB kept",
               "stored / kept", "kept", "bookkeeping MiB", "max rows buffered"]
    body = [
        [r["tokens"], r.get("setting", "keep-all"), f"{r['bare_s']:.2f}", f"{r['namm_s']:.2f}",
         f"{r['overhead_ratio']:.2f}", f"{r['bookkeeping_fraction_of_bare']:.1%}",
         " / ".join(f"{r['timing_last_rep'][k]:.2f}" for k in TIMING_KEYS),
         f"{r['kv_bytes_bare'] / mib:.2f}", f"{r['kv_bytes_namm'] / mib:.2f}",
         f"{r.get('kv_bytes_kept', r['kv_bytes_namm']) / mib:.2f}", f"{r.get('stored_to_kept', 1.0):.3f}",
         f"{r['kept_fraction']:.1%}", f"{r['bookkeeping_bytes'] / mib:.2f}", r["max_rows_buffered"]]
        for r in rows
    ]
    if any("decode_ratio" in r for r in rows):
        headers += ["decode s bare / NAMM", "decode NAMM / bare"]
        for line, r in zip(body, rows, strict=True):
            has = "decode_ratio" in r
            line += [f"{r['bare_decode_s']:.2f} / {r['namm_decode_s']:.2f}" if has else "-",
                     f"{r['decode_ratio']:.2f}" if has else "-"]
    return markdown_table(headers, body)


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"


def run_overhead(cfg: OverheadConfig, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the overhead benchmark; prints the table, writes ``cfg.output`` (.md) and its .json twin."""
    set_threads(cfg.threads)
    log("loading SmolLM2-135M-Instruct ...")
    model, tokenizer = load_smollm2(device=cfg.device, dtype=parse_dtype(cfg.dtype), cache_dir=cfg.cache_dir)
    namm = load_namm(cfg.namm, cfg.namm_seed, cfg.namm_budget)
    trained = None if cfg.threshold_namm is None else load_namm(cfg.threshold_namm, 0, None)
    lengths = sorted(int(n) for n in cfg.lengths)
    prompts = {n: benchmark_prompt(tokenizer, n).to(cfg.device) for n in lengths}
    load_before = _load()
    if cfg.warmup:
        log("warming up ...")
        warm = OverheadConfig(**{**asdict(cfg), "reps": cfg.warmup})
        measure_length(model, prompts[lengths[0]], namm, warm, trained)
    meta = run_metadata(argv)
    md_path = Path(cfg.output)
    rows: list[dict[str, Any]] = []
    for n in lengths:
        log(f"timing {prompts[n].shape[1]} tokens x {cfg.reps} reps ...")
        new_rows = measure_length(model, prompts[n], namm, cfg, trained)
        rows.extend(new_rows)
        for r in new_rows:
            log(f"{n} {r['setting']}: bare {r['bare_s']:.2f} s, NAMM {r['namm_s']:.2f} s, "
                f"bookkeeping {r['bookkeeping_fraction_of_bare']:.1%}, "
                f"stored / kept {r['stored_to_kept']:.3f}")
        meta["load_average"] = {"start": load_before, "now": _load()}
        record = {"config": asdict(cfg), "meta": meta, "rows": rows}
        json_path = write_json(md_path.with_suffix(".json"), record)  # after every length: nothing is lost

    table = format_overhead(rows)
    print(table)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(
        "# NAMM overhead on SmolLM2-135M-Instruct (prefill)\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}\n"
        f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}\n"
        f"- device: {cfg.device}, dtype: {cfg.dtype}, torch threads: {meta['torch_threads']}, "
        f"chunk: {cfg.chunk}, median of {cfg.reps} reps\n"
        f"- compiled kernels (namm_transfer/native): {meta['native_kernels']}\n"
        f"- NAMM: {cfg.namm or f'NAMM.init_random(seed={cfg.namm_seed})'}, budget: {cfg.namm_budget}, "
        f"operating point: compression ratio {cfg.operating_ratio}\n"
        f"- machine load average (1 / 5 / 15 min) at start: {load_before}, at end: {_load()}"
        + (f"; {cfg.note}" if cfg.note else "") + "\n\n"
        "Settings: `keep-all` = the NAMM keeps everything (pure bookkeeping cost), chunked prefill; "
        "`half` = the NAMM at its operating point (compression ratio: about half of the tokens seen kept "
        "at every update), chunked prefill evicting every `update_every` tokens; `half one-shot` = the "
        "whole context in one chunk with one eviction at its end (update_every = context length), "
        "against the bare model's one-chunk prefill; `threshold` = the trained NAMM "
        f"`{cfg.threshold_namm}` in its own threshold mode (its heads keep different numbers of tokens), "
        "chunked prefill, with the packed KV layout and with the padded one (the default, `auto`, packs a "
        "layer whose padding exceeds a tenth of its kept slots).\n"
        "`NAMM / bare` = NAMM seconds / bare seconds, both measured in the same run, interleaved; "
        "`bookkeeping / bare` = the NAMM's own time (capture + features + scoring + eviction, from "
        "`stats()['timing']`) over the bare forward. `KV MiB stored` is what the cache holds between "
        "forwards (packed: the kept rows plus a 4-byte slot index each; padded: each layer's heads padded "
        "to its fullest head), `KV MiB kept` the bytes of the tokens kept; `stored / kept` their ratio.\n\n"
        f"{table}\n"
    )
    log(f"wrote {md_path} and {json_path}")
    return rows
