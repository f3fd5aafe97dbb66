"""``namm-transfer eval-text``: a NAMM against every baseline at matched budgets, on the test split.

Config -> data -> model -> evaluate:
1. the test split of every task (seeds disjoint from training and validation);
2. per protocol (see below) and per budget: the full cache, the NAMM and every baseline of
   :data:`namm_transfer.policies.BASELINES` (Recency, H2O, L2Norm, RandomEviction, SnapKV, TOVA), each
   keeping the same number of tokens per layer and KV head;
3. per policy and task: the normalised score (mean score / full cache's mean score on the same prompts)
   with its standard error over prompts, the kept fraction and the stored KV bytes.

Protocols:
- ``one-shot`` (kvpress's): the context (everything before the question) is prefilled whole and
  compressed once at its end; the question and the answer are not compressed. The context is
  prefilled once per prompt for every policy (:mod:`.shared_prefill`: until the eviction nothing
  depends on the policy) and each policy's compressed copy answers by greedy decoding.
- ``progressive`` (the reference's): the prompt is fed in chunks of the NAMM's ``update_every`` and every
  policy evicts at that cadence, prompt and answer included.

Budgets: a kept fraction of the context (one-shot) or of the prompt (progressive), the same tokens per
layer and KV head for every policy; ``own`` runs the NAMM in its own threshold mode (one-shot: each
baseline then gets the NAMM's kept tokens per layer on the same prompt). Rows are appended to
``rows*.jsonl`` as they finish; a rerun skips what is there (resume), ``--shard K/N`` splits the
prompts over processes.
"""

from __future__ import annotations

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
)
from namm_transfer.pipelines.harness import (
    RowStore,
    check_setting,
    parse_shard,
    shard_rows_name,
    write_summary,
)
from namm_transfer.pipelines.harness import verdict as harness_verdict
from namm_transfer.pipelines.models import MODELS
from namm_transfer.policies.registry import BASELINES, FULL_CACHE, NAMM_NAME, build_policy

ROWS_NAME, SUMMARY_NAME = "rows.jsonl", "summary"
PROTOCOLS = ("one-shot", "progressive")
OWN = "own"


@dataclass
class EvalTextConfig:
    """Settings of :func:`run_eval_text`.

    Attributes:
        model: the language model evaluated, by short name: ``smollm2`` (SmolLM2-135M-Instruct) or
            ``gemma3-270m`` (Gemma-3-270M, the ``gemma`` extra); the NAMM is applied to it zero-shot.
        namm: a shipped NAMM's short name, a directory (e.g. an ``evolve`` job's ``OUT_DIR/namm``) or a
            Hub id (default: ``smollm2-text-joint``, trained on SmolLM2 reading every layer-head; a joint
            NAMM runs only on the model it was trained on).
        tasks: task names (keys of ``text_tasks.TASKS``).
        n: prompts per task.
        split: ``test`` (reported results) or ``val`` (the held-out prompts evolution validates on).
        prompt_tokens: prompt length.
        protocols: ``one-shot`` and/or ``progressive``.
        budgets: kept fractions (e.g. ``0.5``) and/or ``own`` (the NAMM's threshold mode).
        baselines: names from :data:`namm_transfer.policies.BASELINES`.
        update_every: the progressive protocol's cadence (None: the NAMM's own).
        max_new_tokens: greedy generation length; None uses each task's own (``hop`` needs 20).
        shard: ``"K/N"``: evaluate only every N-th prompt starting at K (parallel processes).
        namm_rows: False runs only the full cache and the baselines at the fixed budgets (they do not
            depend on the NAMM, so they can run before it exists; a later run adds its rows).
        output_dir: where rows and the summary (.md, .json) go.
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: model dtype (float32 is fastest on CPU).
        threads: torch intra-op threads (None: torch's choice; 1 is best beside a busy process).
    """

    model: str = "smollm2"
    namm: str = "smollm2-text-joint"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "kv", "docs"])
    n: int = 32
    split: str = "test"
    prompt_tokens: int = 1024
    protocols: list[str] = field(default_factory=lambda: ["one-shot", "progressive"])
    budgets: list[str] = field(default_factory=lambda: ["0.5", "0.25", OWN])
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    update_every: int | None = None
    max_new_tokens: int | None = None
    shard: str = "0/1"
    namm_rows: bool = True
    output_dir: str = "runs/eval_text"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"unknown protocol(s) {bad}; choose from {', '.join(PROTOCOLS)}")
        for b in self.budgets:
            if b != OWN and not 0 < float(b) <= 1:
                raise ValueError(f"a budget is a kept fraction in (0, 1] or {OWN!r}, got {b!r}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
        parse_shard(self.shard)
        if self.split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {self.split!r}")


def _key(row: dict[str, Any]) -> tuple:
    return (
        row.get("protocol", "progressive"),
        row.get("budget", OWN),
        row["policy"],
        row["task"],
        row["seed"],
    )


@torch.no_grad()
def evaluate_prompt(
    model, tokenizer, policy, example, task, chunk: int, max_new_tokens: int
) -> dict[str, Any]:
    """Progressive protocol, one prompt under one policy: score, kept fraction, kept tokens per layer,
    tokens since the last update, stored KV bytes."""
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


def _check_same_setting(out_dir: Path, cfg: EvalTextConfig, update_every: int | None = None) -> None:
    """Resuming mixes rows only from the same model, split, prompt length, cadence and generation length:
    the first run records them in ``setting.json`` and a rerun with others is refused, naming what
    differs. (Rows that depend on the NAMM carry its name and are redone for another NAMM.)"""
    setting = {
        "model": cfg.model,
        "split": cfg.split,
        "prompt_tokens": cfg.prompt_tokens,
        "max_new_tokens": cfg.max_new_tokens,
        "update_every": update_every if update_every is not None else cfg.update_every,
    }
    # older setting files: no model (always SmolLM2) nor split (always test), and the NAMM's name (now
    # carried by its rows)
    check_setting(out_dir, setting, assumed={"model": "smollm2", "split": "test"}, ignored=("namm",))


def summarise(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, Any]]:
    """Per policy (rows of one protocol and budget): normalised score per task and mean with standard
    errors, mean kept fraction, raw score, stored KV MiB."""
    full = {
        t: np.mean([r["score"] for r in rows if r["policy"] == FULL_CACHE and r["task"] == t] or [np.nan])
        for t in tasks
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
        mine = [r for r in rows if r["policy"] == policy]
        counted = [t for t in tasks if not np.isnan(per_task[t])]
        stored = [r["stored_kv_bytes"] for r in mine if "stored_kv_bytes" in r]
        summary[policy] = {
            "normalised": per_task,
            "normalised_se": per_task_se,
            "mean_normalised": float(np.mean([per_task[t] for t in counted])) if counted else float("nan"),
            "mean_normalised_se": float(
                np.sqrt(sum(per_task_se[t] ** 2 for t in counted)) / max(len(counted), 1)
            ),
            "kept_fraction": float(np.mean([r["kept_fraction"] for r in mine])),
            "raw_score": float(np.mean([r["score"] for r in mine])),
            "stored_kv_mib": float(np.mean(stored) / 2**20) if stored else float("nan"),
            "seconds": float(np.mean([r.get("seconds", np.nan) for r in mine])),
            "n": len(mine),
        }
    return summary


def verdict(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Does the NAMM beat every baseline of one table, and by more than their combined standard error?"""
    return harness_verdict(summary, NAMM_NAME, [FULL_CACHE], "mean_normalised", "mean_normalised_se")


def _one_shot_prompt(model, tokenizer, handle, namm, example, task, cfg, todo, max_new,
                     own_row: dict | None = None) -> list[dict]:
    """Every pending (budget, policy) of one prompt from one shared prefill of its context.

    ``own_row``: the NAMM's finished threshold-mode row of this prompt, whose kept tokens per layer are
    the baselines' budget in the ``own`` table (None: computed here if pending)."""
    from namm_transfer.pipelines.text.shared_prefill import generate_answer, kept_report, prefill_context

    start = time.perf_counter()
    baselines = {name: build_policy(name, update_every=namm.update_every) for name in cfg.baselines}
    prefill = prefill_context(model, handle, example, tokenizer, [namm, *baselines.values()])
    prefill_s = time.perf_counter() - start
    index = {NAMM_NAME: 0, **{name: i + 1 for i, name in enumerate(baselines)}}
    n = prefill.context_len
    rows = []

    def run(budget_label: str, name: str, policy, child: int) -> dict:
        t0 = time.perf_counter()
        cache = prefill.fork(child, policy)
        kept, per_layer = kept_report(cache, n)
        stored = sum(layer.stored_bytes() for layer in cache.layers)
        text = generate_answer(model, tokenizer, prefill, cache, max_new)
        row = {
            "protocol": "one-shot",
            "budget": budget_label,
            "policy": name,
            "task": task.name,
            "seed": example.seed,
            "score": float(task.score(text, example)),
            "answer": text,
            "kept_fraction": float(kept[0]),
            "kept_per_layer": (per_layer[0] * n).tolist(),
            "context_tokens": n,
            "tokens": len(example.prompt_ids),
            "stored_kv_bytes": stored,
            "seconds": time.perf_counter() - t0 + prefill_s,
        }
        rows.append(row)
        return row

    for label in cfg.budgets:
        if label == OWN:
            namm_row = None
            if ("one-shot", label, NAMM_NAME, task.name, example.seed) in todo:
                namm_row = run(label, NAMM_NAME, namm, 0)
            else:  # the NAMM's row exists: its kept counts set the baselines' budget
                namm_row = own_row
            budget = [max(1, round(k)) for k in namm_row["kept_per_layer"]] if namm_row else None
        else:
            budget = max(1, round(float(label) * n))
        for name in [FULL_CACHE, NAMM_NAME, *baselines]:
            if ("one-shot", label, name, task.name, example.seed) not in todo:
                continue
            if name == FULL_CACHE:
                if label == cfg.budgets[0]:
                    run(label, name, build_policy(FULL_CACHE), 0)
                continue
            if name == NAMM_NAME:
                if label != OWN:
                    run(label, name, namm.with_budget(budget, keep_threshold=False), 0)
                continue
            if budget is not None:
                run(label, name, baselines[name].with_budget(budget), index[name])
    return rows


def _progressive_prompt(model, tokenizer, namm, example, task, cfg, todo, max_new, every) -> list[dict]:

    rows = []
    n = len(example.prompt_ids)
    for label in cfg.budgets:
        # own: the NAMM alone (and the full cache when no fixed budget runs it; ``todo`` says which)
        names = [FULL_CACHE, NAMM_NAME, *cfg.baselines] if label != OWN else [FULL_CACHE, NAMM_NAME]
        for name in names:
            if ("progressive", label, name, task.name, example.seed) not in todo:
                continue
            if name == FULL_CACHE and label != cfg.budgets[0]:
                continue
            budget = None if label == OWN else max(1, round(float(label) * n))
            if name == NAMM_NAME and budget is not None:
                policy = namm.with_budget(budget, keep_threshold=False)
            else:
                policy = build_policy(name, namm, budget, update_every=every)
            t0 = time.perf_counter()
            row = evaluate_prompt(model, tokenizer, policy, example, task, every, max_new)
            row.update(
                protocol="progressive",
                budget=label,
                policy=name,
                task=task.name,
                seed=example.seed,
                tokens=n,
                seconds=time.perf_counter() - t0,
            )
            rows.append(row)
    return rows


def _expected(cfg: EvalTextConfig) -> list[tuple[str, str, str]]:
    """(protocol, budget, policy) triples a complete run holds for each prompt."""
    out = []
    for protocol in cfg.protocols:
        for label in cfg.budgets:
            if label == OWN and not cfg.namm_rows:
                continue
            if label == OWN:
                names = [NAMM_NAME, *cfg.baselines] if protocol == "one-shot" else [NAMM_NAME]
            else:
                names = ([FULL_CACHE] if label == cfg.budgets[0] else []) + [NAMM_NAME, *cfg.baselines]
            out += [(protocol, label, name) for name in names]
    if FULL_CACHE not in {name for _, _, name in out}:
        out += [(p, cfg.budgets[0], FULL_CACHE) for p in cfg.protocols]
    if not cfg.namm_rows:
        out = [x for x in out if x[2] != NAMM_NAME]
    return out


def depends_on_namm(row: dict[str, Any]) -> bool:
    """The NAMM's own rows and the baselines given its measured budget."""
    return row["policy"] == NAMM_NAME or row.get("budget") == OWN


def run_eval_text(cfg: EvalTextConfig, argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from namm_transfer import NAMM
    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_named_model
    from namm_transfer.pipelines.text.tasks import TASKS, make_split

    unknown = sorted(set(cfg.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {sorted(TASKS)}")
    set_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    namm = NAMM.from_pretrained(cfg.namm)
    every = cfg.update_every or namm.update_every
    if every != namm.update_every:
        namm = namm.replace(update_every=every)
    _check_same_setting(out_dir, cfg, every)
    shard, n_shards = parse_shard(cfg.shard)
    rows_path = out_dir / shard_rows_name(shard, n_shards, ROWS_NAME)
    def is_stale(r):
        return depends_on_namm(r) and r.get("namm") != str(cfg.namm)

    # every shard's rows; those of another NAMM are ignored (and redone) wherever they lie
    store = RowStore(rows_path, _key, shards="rows*.jsonl", valid=lambda r: not is_stale(r))
    if store.ignored:
        log(f"{store.ignored} rows of another NAMM are ignored and redone")
    model, tokenizer = load_named_model(cfg.model, device=cfg.device, dtype=parse_dtype(cfg.dtype))
    examples = [
        (t, ex) for t in cfg.tasks for ex in make_split(t, tokenizer, cfg.split, cfg.n, cfg.prompt_tokens)
    ][shard::n_shards]
    expected = _expected(cfg)

    def write(new_rows: list[dict]) -> None:  # incremental: a kill loses at most one prompt
        for row in new_rows:
            if depends_on_namm(row):
                row["namm"] = str(cfg.namm)
            store.add(row)

    latest = store.latest

    with attach(model, namm) as handle:
        bar = tqdm(examples, desc="eval-text", unit="prompt")
        for t, ex in bar:
            todo = {
                (p, b, name, t, ex.seed): True
                for p, b, name in expected
                if (p, b, name, t, ex.seed) not in latest
            }
            if not todo:
                continue
            own = latest.get(("one-shot", OWN, NAMM_NAME, t, ex.seed))
            max_new = cfg.max_new_tokens or TASKS[t].max_new_tokens
            if "one-shot" in cfg.protocols and any(k[0] == "one-shot" for k in todo):
                write(_one_shot_prompt(model, tokenizer, handle, namm, ex, TASKS[t], cfg, todo, max_new, own))
    if "progressive" in cfg.protocols:
        for t, ex in tqdm(examples, desc="eval-text progressive", unit="prompt"):
            todo = {
                (p, b, name, t, ex.seed): True
                for p, b, name in expected
                if p == "progressive" and (p, b, name, t, ex.seed) not in latest
            }
            if todo:
                max_new = cfg.max_new_tokens or TASKS[t].max_new_tokens
                write(_progressive_prompt(model, tokenizer, namm, ex, TASKS[t], cfg, todo, max_new, every))
    store.refresh()  # the other shards' rows written meanwhile
    return write_text_summary(out_dir, cfg, store.rows(), argv)


def write_text_summary(out_dir: Path, cfg: EvalTextConfig, rows: list[dict], argv=None) -> dict[str, Any]:
    """``summary.json`` / ``summary.md``: one table per (protocol, budget), with the verdict."""
    meta = run_metadata(argv)
    tables, md = {}, []
    for protocol in cfg.protocols:
        full_rows = [r for r in rows if r.get("protocol") == protocol and r["policy"] == FULL_CACHE]
        for label in cfg.budgets:
            group = [
                r
                for r in rows
                if r.get("protocol") == protocol and r.get("budget") == label and r["policy"] != FULL_CACHE
            ] + full_rows
            if len(group) == len(full_rows):
                continue
            summary = summarise(group, cfg.tasks)
            key = f"{protocol}/{label}"
            tables[key] = {"summary": summary, "verdict": verdict(summary)}
            what = (
                "the NAMM's own threshold"
                if label == OWN
                else f"{float(label):.0%} of the "
                + ("context" if protocol == "one-shot" else "prompt")
                + " kept per layer and KV head"
            )
            md.append(f"## {protocol}, {what}\n")
            md.append(
                markdown_table(
                    ["policy", *cfg.tasks, "mean normalised", "kept fraction", "KV MiB", "s / prompt", "n"],
                    [
                        [
                            p,
                            *(f"{s['normalised'][t]:.2f} ± {s['normalised_se'][t]:.2f}" for t in cfg.tasks),
                            f"{s['mean_normalised']:.3f} ± {s['mean_normalised_se']:.3f}",
                            f"{s['kept_fraction']:.3f}",
                            f"{s['stored_kv_mib']:.2f}",
                            f"{s['seconds']:.2f}",
                            s["n"],
                        ]
                        for p, s in summary.items()
                    ],
                )
            )
            v = tables[key]["verdict"]
            if v:
                md.append(
                    f"\nNAMM above every baseline: {v['above_every_baseline']}; by more than the combined "
                    f"standard error: {v['above_every_baseline_by_combined_se']}\n"
                )
    write_summary(
        out_dir, {"config": asdict(cfg), "meta": meta, "tables": tables},
        f"# Text tasks, {cfg.split} split ({cfg.n} prompts per task, ~{cfg.prompt_tokens} tokens)\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}\n- git: {meta['git_revision']}\n"
        f"- model: {cfg.model}\n- NAMM: {cfg.namm}\n\n"
        "Normalised score = mean score / full cache's mean score on the same prompts (exact match of the "
        "answer from greedy decoding), ± its standard error over prompts; kept fraction = tokens cached / "
        "tokens seen (one-shot: of the context, right after its compression; progressive: at the end), mean "
        "over layers, KV heads and prompts; s / prompt includes the shared prefill (one-shot).\n\n"
        + "\n".join(md)
        + "\n"
    )
    print("\n".join(md))
    return tables
