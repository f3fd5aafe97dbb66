"""``namm-transfer bench population``: evaluating CMA-ES members together vs one at a time.

The evolution scores every population member on the same prompts. Batched, the prompt is repeated
once per member and each batch row carries its own NAMM parameter vector; one at a time, each
member runs the prompt alone. Both must give the same scores (checked here); the ratio of their
wall times is the speed-up.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from namm_transfer import NAMM
from namm_transfer.pipelines.common import (
    log,
    markdown_table,
    parse_dtype,
    run_metadata,
    set_threads,
    write_json,
)
from namm_transfer.pipelines.models import load_smollm2
from namm_transfer.pipelines.text.evolve import EvolveConfig, LocalEvaluator
from namm_transfer.pipelines.text.passkey import make_passkey_example, score


@dataclass
class PopulationConfig:
    """Settings of :func:`run_population`.

    Attributes:
        population: members timed (random CMA-ES-like NAMMs, sigma 0.065 around keep-all).
        prompt_tokens: passkey prompt length.
        update_every: NAMM cadence and prefill chunk.
        max_new_tokens: generated tokens per member.
        output: markdown result path (JSON beside it).
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: model dtype (float32 is fastest on CPU).
        threads: torch intra-op threads (None: torch's choice; 1 is best beside a busy process).
    """

    population: int = 8
    prompt_tokens: int = 1024
    update_every: int = 256
    max_new_tokens: int = 8
    output: str = "benchmarks/results/population_batching.md"
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"


class _Passkey:
    name = "passkey"

    def score(self, generated_text: str, example) -> float:
        return float(score(generated_text, example.answer))


def run_population(cfg: PopulationConfig, argv: list[str] | None = None) -> dict[str, Any]:
    set_threads(cfg.threads)
    model, tokenizer = load_smollm2(device=cfg.device, dtype=parse_dtype(cfg.dtype))
    example = make_passkey_example(tokenizer, seed=0, prompt_tokens=cfg.prompt_tokens)
    params = np.stack([NAMM.init_random(seed=s).params[0].numpy() for s in range(cfg.population)])
    base = EvolveConfig(update_every=cfg.update_every, max_new_tokens=cfg.max_new_tokens, device=cfg.device)
    namm_cfg = base.namm_config()

    def factory(block) -> NAMM:
        return NAMM(namm_cfg, block)

    rows, results = [], {}
    for per_batch in (1, cfg.population):
        evaluator = LocalEvaluator(model, tokenizer, replace(base, members_per_batch=per_batch))
        evaluator.run(factory, params[:per_batch], [example], [_Passkey()])  # warm-up
        log(f"timing {cfg.population} members, {per_batch} per forward ...")
        start = time.perf_counter()
        results[per_batch] = evaluator.run(factory, params, [example], [_Passkey()])
        seconds = time.perf_counter() - start
        rows.append(
            {
                "members_per_forward": per_batch,
                "seconds": seconds,
                "seconds_per_member": seconds / cfg.population,
            }
        )
    same = bool(np.array_equal(results[1].scores, results[cfg.population].scores))
    speedup = rows[0]["seconds"] / rows[1]["seconds"]
    meta = run_metadata(argv)
    record = {
        "config": asdict(cfg),
        "meta": meta,
        "rows": rows,
        "speedup": speedup,
        "prompt_tokens": len(example.prompt_ids),
        "same_scores": same,
    }
    table = markdown_table(
        ["members per forward", "seconds", "seconds per member"],
        [[r["members_per_forward"], f"{r['seconds']:.1f}", f"{r['seconds_per_member']:.2f}"] for r in rows],
    )
    out = Path(cfg.output)
    write_json(out.with_suffix(".json"), record)
    out.write_text(
        f"# Population-batched NAMM evaluation on SmolLM2-135M-Instruct\n\n- command: `{meta['command']}`\n"
        f"- date: {meta['date']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"threads {meta['torch_threads']}\n- {cfg.population} members, one {len(example.prompt_ids)}-token "
        f"passkey prompt, update every {cfg.update_every}, {cfg.max_new_tokens} new tokens\n\n{table}\n\n"
        f"Speed-up of batching: **{speedup:.2f}x**; identical scores both ways: {same}.\n"
    )
    print(table)
    log(f"speed-up {speedup:.2f}x (same scores: {same}); wrote {out}")
    return record
