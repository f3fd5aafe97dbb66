"""``namm-transfer bench ablation``: validation fitness reached vs wall time, one row per evolution run.

Reads the ``validation.jsonl`` (the CMA mean on held-out prompts, every ``val_every`` generations;
generation 0 = the start: keep-all or warm start) and ``config.json`` of shared-prefill ``evolve``
runs, and writes a table and a PNG of validation fitness against wall-clock minutes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from namm_transfer.pipelines.common import markdown_table, run_metadata, write_json


@dataclass
class AblationConfig:
    """Settings of :func:`run_ablation`.

    Attributes:
        runs: ``LABEL=DIR`` pairs, one per evolution run (its ``--out-dir``).
        output: markdown result path (PNG and JSON beside it).
    """

    runs: list[str] = field(default_factory=list)
    output: str = "benchmarks/results/evolve_ablation.md"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ablation(cfg: AblationConfig, argv: list[str] | None = None) -> list[dict[str, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cfg.runs:
        raise ValueError("give at least one --run LABEL=DIR")
    rows, curves = [], {}
    for item in cfg.runs:
        label, sep, where = item.partition("=")
        if not sep:
            raise ValueError(f"--run must be LABEL=DIR, got {item!r}")
        run_dir = Path(where)
        if not (run_dir / "validation.jsonl").is_file():
            raise FileNotFoundError(f"{run_dir}: no validation.jsonl (is it a shared-prefill evolve run?)")
        config = json.loads((run_dir / "config.json").read_text())
        val = _jsonl(run_dir / "validation.jsonl")
        start, best = val[0], max(val, key=lambda v: v["val_fitness"])
        curves[label] = val
        rows.append(
            {
                "label": label,
                "warm_start_steps": config.get("warm_start_steps", 0),
                "ema_decay": config.get("ema_decay", 0.99),
                "warm_start_lr": config.get("warm_start_lr"),
                "sigma": config.get("sigma"),
                # validation reuses the training budgets and prompt lengths
                "budgets": config.get("budgets", [0.25, 0.5, 0.75]),
                "prompt_tokens": config.get("prompt_lengths") or [config.get("prompt_tokens", 1024)],
                "start_val_fitness": start["val_fitness"],
                "start_val_exact": start["val_exact_normalised"],
                "best_val_fitness": best["val_fitness"],
                "best_val_exact": best["val_exact_normalised"],
                "best_generation": best["generation"],
                "generations": val[-1]["generation"],
                "minutes_to_start": start["seconds"] / 60,
                "minutes_total": val[-1]["seconds"] / 60,
            }
        )
    out = Path(cfg.output)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, val in curves.items():
        ax.plot([v["seconds"] / 60 for v in val], [v["val_fitness"] for v in val], "o-", label=label)
    ax.set_xlabel("wall-clock minutes (prefill pool and warm start included)")
    ax.set_ylabel("validation fitness of the CMA mean")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    meta = run_metadata(argv)
    write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    table = markdown_table(
        [
            "run",
            "warm start steps",
            "EMA decay",
            "warm lr",
            "sigma",
            "val budgets",
            "prompt tokens",
            "start: val fitness / exact",
            "best: val fitness / exact",
            "at generation",
            "generations",
            "minutes",
        ],
        [
            [
                r["label"],
                r["warm_start_steps"],
                r["ema_decay"],
                "-" if r["warm_start_lr"] is None or not r["warm_start_steps"] else r["warm_start_lr"],
                "-" if r["sigma"] is None else r["sigma"],
                " / ".join(f"{b:.0%}" for b in r["budgets"]),
                " / ".join(str(t) for t in r["prompt_tokens"]),
                f"{r['start_val_fitness']:.3f} / {r['start_val_exact']:.3f}",
                f"{r['best_val_fitness']:.3f} / {r['best_val_exact']:.3f}",
                r["best_generation"],
                r["generations"],
                f"{r['minutes_total']:.0f}",
            ]
            for r in rows
        ],
    )
    out.write_text(
        f"# Evolution ablation: validation fitness vs wall time\n\n- command: `{meta['command']}`\n"
        f"- date: {meta['date']}\n\nValidation: the CMA mean on held-out prompts (8 per task) of the run's "
        "prompt lengths, one-shot compression at each of the run's budgets (its training budgets; both are "
        "columns, and rows compare directly only where they match); fitness = 0.5 exact match + 0.5 "
        "likelihood ratio, normalised by the full cache; exact = normalised exact match alone. Generation 0 "
        "is the start (keep-all, or the warm start).\n\n"
        + table
        + f"\n\n![curves]({out.with_suffix('.png').name})\n"
    )
    print(table)
    return rows
