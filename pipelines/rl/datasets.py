"""``namm-transfer make-rl-datasets``: local D4RL-style Minari datasets from gymnasium's heuristics.

For each env: the reference scores (uniform random policy, expert level; ``ref_episodes`` episodes
each), then one Minari dataset per quality level (``namm/<env>/<level>-v0``, see
:mod:`namm_transfer.envs.generate`). Datasets are written whole (a failed write leaves none); a rerun
keeps those already made with the same settings and makes the missing ones, and refuses to replace a
dataset made with other settings unless ``overwrite``. Writes a summary table (returns, normalised
scores, sizes) as markdown and JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from namm_transfer.pipelines.common import log, markdown_table, run_metadata, write_json

# The recipes of namm_transfer.envs.generate (LOCAL_ENVS, LEVELS), named here so the CLI's --help
# works without gymnasium; a test keeps the two in step.
ENV_NAMES = ("lunarlander", "bipedalwalker", "cuecorridor", "noisycorridor")
LEVEL_NAMES = ("expert", "medium", "replay")


@dataclass
class RLDatasetsConfig:
    """Settings of :func:`run_make_rl_datasets`.

    Attributes:
        envs: local recipes (``lunarlander``, ``bipedalwalker``, ``cuecorridor``: the memory task;
            ``noisycorridor``: the same with a random sign at every step, the cue at step 20).
        levels: quality levels (``expert``, ``medium``, ``replay``).
        episodes: episodes per dataset.
        seed: seeds everything (same seed, same arrays).
        root: Minari root; None uses ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``.
        ref_episodes: episodes of the random policy and of the expert level for the reference scores.
        max_episode_steps: override the envs' time limits (None keeps them; short values for tests).
        overwrite: replace datasets that exist (otherwise same-settings ones are kept, others refused).
        summary: markdown summary path (JSON written beside it); None: ``<root>/namm_datasets.md``.
    """

    envs: list[str] = field(default_factory=lambda: ["lunarlander", "bipedalwalker"])
    levels: list[str] = field(default_factory=lambda: ["expert", "medium", "replay"])
    episodes: int = 200
    seed: int = 0
    root: str | None = None
    ref_episodes: int = 50
    max_episode_steps: int | None = None
    overwrite: bool = False
    summary: str | None = None

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.ref_episodes < 1:
            raise ValueError(
                f"need episodes >= 1 and ref_episodes >= 1, got {self.episodes}, {self.ref_episodes}"
            )
        unknown = sorted(set(self.envs) - set(ENV_NAMES)) + sorted(set(self.levels) - set(LEVEL_NAMES))
        if unknown:
            raise ValueError(
                f"unknown env(s) or level(s) {unknown}; envs: {', '.join(ENV_NAMES)}, levels: "
                f"{', '.join(LEVEL_NAMES)}"
            )


def run_make_rl_datasets(cfg: RLDatasetsConfig, argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Make the datasets; returns one summary row (a dict) per dataset."""
    from tqdm.auto import tqdm

    from namm_transfer.envs.datasets import (
        dataset_exists,
        dataset_ref_scores,
        episode_returns,
        load_dataset,
        minari_root,
    )
    from namm_transfer.envs.generate import (
        generation_settings,
        local_env,
        reference_scores,
        run_episodes,
        write_dataset,
    )

    with minari_root(cfg.root) as root:
        root = Path(root)
    meta = run_metadata(argv)
    plan: list[tuple[Any, list[str], tuple[float, float] | None]] = []  # (spec, levels to make, known refs)
    for name in cfg.envs:
        spec = local_env(name)
        todo, refs = [], None
        for level in cfg.levels:
            settings = generation_settings(spec, level, cfg.episodes, cfg.seed, cfg.ref_episodes,
                                           cfg.max_episode_steps)
            dataset_id = spec.dataset_id(level)
            if cfg.overwrite or not dataset_exists(dataset_id, root):
                todo.append(level)
                continue
            existing = load_dataset(dataset_id, root)
            stored = existing.storage.metadata.get("namm_generation", {})
            if {k: stored.get(k) for k in settings} != _jsonable(settings):
                raise FileExistsError(
                    f"{dataset_id} exists under {root} with other settings ({_diff(stored, settings)}); "
                    f"pass --overwrite to replace it, or another --root"
                )
            refs = dataset_ref_scores(existing)
            log(f"{dataset_id}: exists with the same settings, kept")
        plan.append((spec, todo, refs))

    total = sum(
        len(todo) * cfg.episodes + (2 * cfg.ref_episodes if todo and refs is None else 0)
        for _, todo, refs in plan
    )
    bar = tqdm(total=total, desc="make-rl-datasets", unit="ep")
    for spec, todo, refs in plan:
        if todo and refs is None:
            bar.set_postfix(dataset=f"{spec.key} reference scores")
            refs = reference_scores(spec, cfg.ref_episodes, cfg.seed, cfg.max_episode_steps, bar.update)
            log(f"{spec.env_id}: random policy {refs[0]:.1f}, expert level {refs[1]:.1f} "
                f"(mean over {cfg.ref_episodes} episodes each)")
        for level in todo:
            bar.set_postfix(dataset=spec.dataset_id(level))
            started = time.perf_counter()
            generated = run_episodes(spec, level, cfg.episodes, cfg.seed, cfg.max_episode_steps, bar.update)
            settings = generation_settings(spec, level, cfg.episodes, cfg.seed, cfg.ref_episodes,
                                           cfg.max_episode_steps)
            write_dataset(
                spec, level, generated, refs, settings, root, overwrite=cfg.overwrite,
                extra_metadata={"seconds": time.perf_counter() - started, "command": meta["command"],
                                "git_revision": meta["git_revision"], "date": meta["date"]},
            )
    bar.close()

    rows = []
    for spec, _, _ in plan:
        for level in cfg.levels:
            dataset = load_dataset(spec.dataset_id(level), root)
            returns = episode_returns(dataset)
            low, high = dataset_ref_scores(dataset)
            normalised = 100 * (returns - low) / (high - low)
            rows.append({
                "dataset_id": spec.dataset_id(level),
                "env_id": spec.env_id,
                "level": level,
                "episodes": int(dataset.total_episodes),
                "steps": int(dataset.total_steps),
                "return_mean": float(returns.mean()),
                "return_std": float(returns.std()),
                "return_min": float(returns.min()),
                "return_max": float(returns.max()),
                "normalised_mean": float(normalised.mean()),
                "ref_min_score": low,
                "ref_max_score": high,
            })
    summary = Path(cfg.summary) if cfg.summary else root / "namm_datasets.md"
    _write_summary(summary, rows, cfg, meta, root)
    log(f"{len(rows)} datasets under {root}; summary in {summary}")
    return rows


def _write_summary(path: Path, rows: list[dict], cfg: RLDatasetsConfig, meta: dict, root: Path) -> None:
    table = markdown_table(
        ["dataset", "episodes", "steps", "return (mean +- sd)", "min / max", "normalised",
         "ref random / expert"],
        [
            [r["dataset_id"], r["episodes"], r["steps"], f"{r['return_mean']:.1f} +- {r['return_std']:.1f}",
             f"{r['return_min']:.1f} / {r['return_max']:.1f}", f"{r['normalised_mean']:.1f}",
             f"{r['ref_min_score']:.1f} / {r['ref_max_score']:.1f}"]
            for r in rows
        ],
    )
    text = (
        f"# Local Minari datasets\n\nRoot: `{root}`. Command: `{meta['command']}` "
        f"(git {meta['git_revision']}).\n"
        f"Normalised = 100 (R - random) / (expert - random), reference scores stored in each dataset.\n\n"
        f"{table}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    write_json(path.with_suffix(".json"), {"rows": rows, "config": vars(cfg), **meta})


def _jsonable(value: Any) -> Any:
    """What a value reads back as from Minari's JSON metadata (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _diff(stored: dict, settings: dict) -> str:
    wanted = _jsonable(settings)
    return ", ".join(
        f"{k}: {stored.get(k)!r} there, {wanted[k]!r} asked" for k in wanted if stored.get(k) != wanted[k]
    )
