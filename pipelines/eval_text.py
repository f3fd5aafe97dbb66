"""``namm-transfer eval-text``: any NAMM against the baselines on the text tasks' test split.

Config -> data -> model -> evaluate:
1. the test split of every task (seeds disjoint from training and validation);
2. the full cache, then the NAMM; the NAMM's kept tokens per layer (mean over prompts, samples and
   KV heads, less the tokens that arrived after its last update) become the baselines' budget;
3. Recency, H2O, L2Norm and RandomEviction at that per-layer budget and the NAMM's cadence.
Per policy and task: the normalised score (mean score / full cache's mean score on the same prompts)
and the mean kept fraction. Every prompt's result is appended to ``rows.jsonl`` as it finishes, and a
rerun skips what is already there (resume).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.pipelines.common import (
    log,
    markdown_table,
    parse_dtype,
    run_metadata,
    set_threads,
    write_json,
)

ROWS_NAME, SUMMARY_NAME = "rows.jsonl", "summary"


@dataclass
class EvalTextConfig:
    """Settings of :func:`run_eval_text`.

    Attributes:
        namm: path or hub id of the NAMM to evaluate (default: the ``evolve`` job's output).
        tasks: task names (keys of ``text_tasks.TASKS``).
        n: test prompts per task.
        prompt_tokens: prompt length.
        max_new_tokens: greedy generation length.
        output_dir: where rows.jsonl and the summary (.md, .json) go.
        device, dtype, threads: model placement.
    """

    namm: str = "runs/evolve/namm"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "kv", "docs"])  # see evolve's stages
    n: int = 10
    prompt_tokens: int = 1536
    max_new_tokens: int = 8
    output_dir: str = "runs/eval_text"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


def _load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


@torch.no_grad()
def evaluate_prompt(
    model, tokenizer, policy, example, task, chunk: int, max_new_tokens: int
) -> dict[str, Any]:
    """One prompt under one policy: score, kept fraction, kept tokens per layer, tokens since update."""
    from namm_transfer.adapters import attach

    ids = torch.tensor([example.prompt_ids], device=model.device)
    with attach(model, policy, prefill_chunk=chunk) as handle:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        stats = handle.stats()
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    return {
        "score": float(task.score(text, example)),
        "answer": text,
        "kept_fraction": stats["kept_fraction"],
        "kept_per_layer": [float(np.mean(layer)) for layer in stats["kept_tokens_per_layer"]],
        "since_update": stats["tokens_since_update_per_layer"],
        "stored_kv_bytes": stats["stored_kv_bytes"],
    }


def namm_budget(rows: list[dict[str, Any]]) -> list[int]:
    """Per-layer budget for the baselines: the NAMM's mean kept tokens after its last update."""
    kept = np.array([r["kept_per_layer"] for r in rows])
    fresh = np.array([r["since_update"] for r in rows])
    return [max(1, int(round(v))) for v in (kept - fresh).mean(axis=0)]


def summarise(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per policy: normalised score per task and mean, mean kept fraction."""
    full = {
        t: np.mean([r["score"] for r in rows if r["policy"] == "FullCache" and r["task"] == t]) for t in tasks
    }
    summary = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        per_task = {}
        for t in tasks:
            scores = [r["score"] for r in rows if r["policy"] == policy and r["task"] == t]
            per_task[t] = float(np.mean(scores) / full[t]) if scores and full[t] > 0 else float("nan")
        kept = [r["kept_fraction"] for r in rows if r["policy"] == policy]
        summary[policy] = {
            "normalised": per_task,
            "mean_normalised": float(np.nanmean(list(per_task.values()))),
            "kept_fraction": float(np.mean(kept)),
            "raw_score": float(np.mean([r["score"] for r in rows if r["policy"] == policy])),
        }
    return summary


def run_eval_text(cfg: EvalTextConfig, argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    from tqdm.auto import tqdm

    from namm_transfer import NAMM
    from namm_transfer.pipelines.models import load_smollm2
    from namm_transfer.pipelines.text_tasks import TASKS, make_split
    from namm_transfer.policies import H2O, FullCache, L2Norm, RandomEviction, Recency

    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {sorted(TASKS)}")
    set_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_path = out_dir / ROWS_NAME
    rows = _load_rows(rows_path)
    done = {(r["policy"], r["task"], r["seed"]) for r in rows}
    if rows:
        log(f"resuming: {len(rows)} prompt results already in {rows_path}")
    model, tokenizer = load_smollm2(device=cfg.device, dtype=parse_dtype(cfg.dtype))
    namm = NAMM.from_pretrained(cfg.namm)
    examples = [
        (t, ex) for t in cfg.tasks for ex in make_split(t, tokenizer, "test", cfg.n, cfg.prompt_tokens)
    ]
    chunk = namm.update_every

    def run(name: str, policy) -> None:
        todo = [(t, ex) for t, ex in examples if (name, t, ex.seed) not in done]
        for t, ex in tqdm(todo, desc=name, unit="prompt"):
            start = time.perf_counter()
            row = evaluate_prompt(model, tokenizer, policy, ex, TASKS[t], chunk, cfg.max_new_tokens)
            row.update(
                policy=name,
                task=t,
                seed=ex.seed,
                tokens=len(ex.prompt_ids),
                seconds=time.perf_counter() - start,
            )
            rows.append(row)
            with open(rows_path, "a") as f:  # incremental: a kill loses at most this prompt
                f.write(json.dumps(row) + "\n")

    run("FullCache", FullCache())
    run("NAMM", namm)
    budget = namm_budget([r for r in rows if r["policy"] == "NAMM"])
    log(f"baseline budget per layer (the NAMM's kept tokens after its last update): {budget}")
    every = namm.update_every
    for name, policy in {
        "Recency": Recency(budget, update_every=every),
        "H2O": H2O(budget, update_every=every),
        "L2Norm": L2Norm(budget, update_every=every),
        "RandomEviction": RandomEviction(budget, seed=0, update_every=every),
    }.items():
        run(name, policy)

    summary = summarise(rows, cfg.tasks)
    meta = run_metadata(argv)
    table = markdown_table(
        ["policy", *cfg.tasks, "mean normalised", "mean kept fraction"],
        [
            [
                p,
                *(f"{s['normalised'][t]:.3f}" for t in cfg.tasks),
                f"{s['mean_normalised']:.3f}",
                f"{s['kept_fraction']:.3f}",
            ]
            for p, s in summary.items()
        ],
    )
    write_json(
        out_dir / f"{SUMMARY_NAME}.json",
        {"config": asdict(cfg), "meta": meta, "budget": budget, "summary": summary},
    )
    (out_dir / f"{SUMMARY_NAME}.md").write_text(
        f"# Text tasks, test split ({cfg.n} prompts per task, ~{cfg.prompt_tokens} tokens)\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}\n- NAMM: {cfg.namm}\n"
        f"- baselines' per-layer budget: {budget}\n\n"
        "Normalised score = mean score / full cache's mean score on the same prompts.\n\n" + table + "\n"
    )
    print(table)
    return summary
