"""``namm-transfer bench engine``: member evaluations per second, old evolution path vs shared prefill.

Same model, same prompts, same member parameter vectors:
- **old** (``engine="generate"``): every member runs ``generate()`` on the whole prompt with eviction
  every ``update_every`` tokens (progressive), members batched together, one NAMM vector per row;
- **new** (``engine="shared-prefill"``): one keep-everything prefill of the prompt's context, then all
  members' one-shot compressions at a hard budget and one teacher-forced forward of the question and
  reference answer in one batch. Timed twice: with the prefill counted (a prompt seen once) and without
  it (the evolution's cached pool, reused every generation).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
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


@dataclass
class EngineBenchConfig:
    """Settings of :func:`run_engine_bench`.

    Attributes:
        population: members (keep-all start plus N(0, 0.065^2) noise, as CMA-ES samples them).
        old_members: members timed on the old path (it is ~20x slower; per-member figures compare).
        tasks: one prompt of each task (training split).
        prompt_tokens: prompt length.
        update_every: the old path's cadence (and prefill chunk).
        fraction: the new path's kept fraction of the context.
        output: markdown result path (JSON beside it).
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: model dtype (float32 is fastest on CPU).
        threads: torch intra-op threads (None: torch's choice; 1 is best beside a busy process).
    """

    population: int = 16
    old_members: int = 8
    tasks: tuple[str, ...] = ("passkey", "kv")
    prompt_tokens: int = 1024
    update_every: int = 256
    fraction: float = 0.5
    output: str = "benchmarks/results/evolve_engine.md"
    threads: int | None = 1
    device: str = "cpu"
    dtype: str = "float32"


def run_engine_bench(cfg: EngineBenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_smollm2
    from namm_transfer.pipelines.text.evolve import EvolveConfig, LocalEvaluator, NAMMFactory
    from namm_transfer.pipelines.text.evolve_shared import PrefillPool, member_scores
    from namm_transfer.pipelines.text.tasks import TASKS

    set_threads(cfg.threads)
    model, tokenizer = load_smollm2(device=cfg.device, dtype=parse_dtype(cfg.dtype))
    base = EvolveConfig(update_every=cfg.update_every, members_per_batch=cfg.old_members, device=cfg.device)
    namm_cfg = base.namm_config()
    params = np.stack(
        [NAMM.init_random(seed=s, config=namm_cfg).params[0].numpy() for s in range(cfg.population)]
    )
    examples = [TASKS[t].make(tokenizer, seed=0, prompt_tokens=cfg.prompt_tokens) for t in cfg.tasks]
    tasks = [TASKS[t] for t in cfg.tasks]

    log(f"old path: {cfg.old_members} members x {len(examples)} prompts (progressive generate) ...")
    old = LocalEvaluator(model, tokenizer, base)
    start = time.perf_counter()
    old.run(NAMMFactory(namm_cfg), params[: cfg.old_members], examples, tasks)
    old_s = time.perf_counter() - start
    old_rate = cfg.old_members * len(examples) / old_s

    log(f"new path: {cfg.population} members x {len(examples)} prompts (shared prefill) ...")
    norm = (np.zeros(namm_cfg.n_bins, np.float32), np.ones(namm_cfg.n_bins, np.float32))
    with attach(model, NAMM(namm_cfg)) as handle:
        pool = PrefillPool(model, tokenizer, handle, TASKS, namm_cfg, cfg.prompt_tokens)
        start = time.perf_counter()
        entries = [pool.get(t, 0) for t in cfg.tasks]
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for entry in entries:
            member_scores(model, entry, namm_cfg, params, cfg.fraction, norm, cfg.population, 0.5)
        members_s = time.perf_counter() - start
    n_new = cfg.population * len(examples)
    rows = [
        {
            "path": "old: progressive generate(), members batched",
            "members": cfg.old_members,
            "seconds": old_s,
            "member_evals_per_s": old_rate,
            "ratio": 1.0,
        },
        {
            "path": "new: shared prefill, prefill counted",
            "members": cfg.population,
            "seconds": prefill_s + members_s,
            "member_evals_per_s": n_new / (prefill_s + members_s),
            "ratio": n_new / (prefill_s + members_s) / old_rate,
        },
        {
            "path": "new: shared prefill, prefill cached (the evolution's pool)",
            "members": cfg.population,
            "seconds": members_s,
            "member_evals_per_s": n_new / members_s,
            "ratio": n_new / members_s / old_rate,
        },
    ]
    meta = run_metadata(argv)
    record = {
        "config": asdict(cfg),
        "meta": meta,
        "rows": rows,
        "prefill_s": prefill_s,
        "pool_bytes_per_prompt": pool.nbytes() / len(entries),
        "torch_threads": torch.get_num_threads(),
    }
    table = markdown_table(
        ["path", "members", "seconds", "member-evaluations / s", "vs old"],
        [
            [
                r["path"],
                r["members"],
                f"{r['seconds']:.1f}",
                f"{r['member_evals_per_s']:.3f}",
                f"{r['ratio']:.1f}x",
            ]
            for r in rows
        ],
    )
    out = Path(cfg.output)
    write_json(out.with_suffix(".json"), record)
    out.write_text(
        f"# Evolution engine: member evaluations per second on SmolLM2-135M-Instruct\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}; git {meta['git_revision']}; torch "
        f"{meta['torch']}, threads {meta['torch_threads']}\n- prompts: one training prompt of each of "
        f"{', '.join(cfg.tasks)} (~{cfg.prompt_tokens} tokens); old path: update every {cfg.update_every}, "
        f"8 new tokens; new path: {cfg.fraction:.0%} of the context kept, teacher-forced answer\n"
        f"- prefill pool memory: {record['pool_bytes_per_prompt'] / 2**20:.1f} MiB per prompt (fp32 keys, "
        f"values and spectrogram state)\n\n{table}\n"
    )
    print(table)
    return record
