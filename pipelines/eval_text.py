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
        namm: a shipped NAMM's short name, a directory (e.g. an ``evolve`` job's ``OUT_DIR/namm``) or a
            Hub id (default: the shipped text-evolved NAMM).
        tasks: task names (keys of ``text_tasks.TASKS``).
        n: test prompts per task.
        prompt_tokens: prompt length.
        max_new_tokens: greedy generation length; None uses each task's own (``hop`` needs 20).
        output_dir: where rows.jsonl and the summary (.md, .json) go.
        device, dtype, threads: model placement.
    """

    namm: str = "smollm2-text"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "kv", "docs"])  # see evolve's stages
    n: int = 16
    prompt_tokens: int = 1024
    max_new_tokens: int | None = None
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


def _check_same_setting(out_dir: Path, cfg: EvalTextConfig) -> None:
    """Resuming mixes rows only from the same NAMM, prompt length and generation length: the first run
    records them in ``setting.json`` and a rerun with others is refused."""
    setting = {"namm": str(cfg.namm), "prompt_tokens": cfg.prompt_tokens,
               "max_new_tokens": cfg.max_new_tokens}
    path = out_dir / "setting.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != setting:
            raise ValueError(
                f"{out_dir} holds results for {before}, not {setting}: use another --output-dir "
                "(or delete it) rather than mixing the two in one table"
            )
    else:
        write_json(path, setting)


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
        per_task, per_task_se = {}, {}
        for t in tasks:
            scores = [r["score"] for r in rows if r["policy"] == policy and r["task"] == t]
            ok = bool(scores) and full[t] > 0
            per_task[t] = float(np.mean(scores) / full[t]) if ok else float("nan")
            # standard error of the policy's mean over prompts, in normalised units (the full cache's
            # mean is taken as exact)
            spread = np.std(scores, ddof=1) / np.sqrt(len(scores)) if len(scores) > 1 else 0.0
            per_task_se[t] = float(spread / full[t]) if ok else float("nan")
        kept = [r["kept_fraction"] for r in rows if r["policy"] == policy]
        counted = [t for t in tasks if not np.isnan(per_task[t])]
        summary[policy] = {
            "normalised": per_task,
            "normalised_se": per_task_se,
            "mean_normalised": float(np.nanmean(list(per_task.values()))),
            "mean_normalised_se": float(
                np.sqrt(sum(per_task_se[t] ** 2 for t in counted)) / max(len(counted), 1)
            ),
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
    _check_same_setting(out_dir, cfg)
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
            max_new = cfg.max_new_tokens or TASKS[t].max_new_tokens
            row = evaluate_prompt(model, tokenizer, policy, ex, TASKS[t], chunk, max_new)
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
        ["policy", *cfg.tasks, "mean normalised", "mean kept fraction", "raw accuracy"],
        [
            [
                p,
                *(f"{s['normalised'][t]:.2f} ± {s['normalised_se'][t]:.2f}" for t in cfg.tasks),
                f"{s['mean_normalised']:.3f} ± {s['mean_normalised_se']:.3f}",
                f"{s['kept_fraction']:.3f}",
                f"{s['raw_score']:.3f}",
            ]
            for p, s in summary.items()
        ],
    )
    full_raw = {t: np.mean([r["score"] for r in rows if r["policy"] == "FullCache" and r["task"] == t])
                for t in cfg.tasks}
    write_json(
        out_dir / f"{SUMMARY_NAME}.json",
        {"config": asdict(cfg), "meta": meta, "budget": budget, "summary": summary},
    )
    (out_dir / f"{SUMMARY_NAME}.md").write_text(
        f"# Text tasks, test split ({cfg.n} prompts per task, ~{cfg.prompt_tokens} tokens)\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}\n- NAMM: {cfg.namm}\n"
        f"- baselines' per-layer budget: {budget}\n\n"
        f"- full-cache accuracy per task: {', '.join(f'{t} {v:.3f}' for t, v in full_raw.items())}\n\n"
        "Normalised score = mean score / full cache's mean score on the same prompts, ± its standard "
        "error over prompts; kept fraction = tokens cached at the end / tokens seen, mean over layers, "
        "KV heads and prompts. Baselines run at the NAMM's cadence with its measured per-layer budget.\n\n"
        + table + "\n"
    )
    print(table)
    return summary
