"""``namm-transfer bench rollout``: env steps per second of Decision Transformer rollouts, full cache vs NAMM.

For each DT, the same seeded batch of episodes is rolled out (as ``eval-rollout`` does: every policy
attached with ``exact_output=True``) under the full cache, the zero-shot NAMM uncapped and the NAMM
capped at each budget, the policies interleaved within each repetition so that machine noise hits them
alike. Reported per policy: the median env steps/s over repetitions, its ratio to the full cache's
median (measured in the same run), the median of each repetition's ratio to the full cache's rollout of
the same repetition (paired, so drift between repetitions cancels), the range, and where the NAMM's own
time goes (``stats()['timing']``: attention rows, spectrogram features, scoring, eviction) as a share of
the rollout.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from namm_transfer.memory import TIMING_KEYS
from namm_transfer.pipelines.common import log, markdown_table, run_metadata, set_threads, write_json


@dataclass
class RolloutSpeedConfig:
    """Settings of :func:`run_rollout_speed`.

    Attributes:
        dts: shipped DT names or local directories, one table block each.
        namm: the NAMM applied zero-shot (a shipped name or a directory).
        budgets: NAMM caps as fractions of an episode's tokens (as ``eval-rollout --budgets``).
        episodes: episodes per rollout batch (all stepping together).
        seed: the first episode's seed; the batch runs seeds ``seed .. seed + episodes - 1`` (as
            ``eval-rollout --seed``, so a memory-task table's own episodes can be timed).
        reps: repetitions; each runs every policy once, in turn.
        update_every: NAMM cadence in tokens (3 tokens per env step).
        exact_output: attach every policy with ``exact_output=True`` as ``eval-rollout`` does (the
            output from the fused kernel, the NAMM's rows computed beside it); False: ``attach``'s
            default, where the NAMM's output comes from the same rows (one pass over the keys).
        kv_layouts: cache layouts (``attach``'s ``kv_layout``) the NAMM rows are timed with, each a row
            of its own when several (the full cache never evicts, so its layout does not matter).
        output: markdown result path (JSON beside it).
        threads: torch intra-op threads.
    """

    dts: list[str] = field(default_factory=lambda: ["cuecorridor-expert", "lunarlander-expert"])
    namm: str = "smollm2-text"
    budgets: list[float] = field(default_factory=lambda: [0.3])
    episodes: int = 50
    seed: int = 0
    reps: int = 5
    update_every: int = 30
    exact_output: bool = True
    kv_layouts: list[str] = field(default_factory=lambda: ["auto"])
    output: str = "benchmarks/results/rollout_speed.md"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.reps < 1 or self.episodes < 1:
            raise ValueError(f"reps and episodes must be >= 1, got {self.reps}, {self.episodes}")
        if any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets are fractions of an episode's tokens in (0, 1], got {self.budgets}")
        from namm_transfer.adapters.cache import KV_LAYOUTS

        if not self.kv_layouts or any(layout not in KV_LAYOUTS for layout in self.kv_layouts):
            raise ValueError(f"kv_layouts must be one or more of {KV_LAYOUTS}, got {self.kv_layouts}")


def _policies(dt, namm, cfg: RolloutSpeedConfig) -> dict[str, tuple[Any, str]]:
    """Row label -> (policy, KV layout): the full cache, and the NAMM uncapped and at each budget (capped
    as ``eval-rollout --budgets`` caps) in each layout (named in the label when there are several)."""
    from namm_transfer.pipelines.rl.evaluate import budget_label, capped_policy, episode_tokens, fraction_cap
    from namm_transfer.policies.registry import FULL_CACHE, NAMM_NAME, build_policy

    tokens = episode_tokens(dt, dt.env_id, None)
    namms = {NAMM_NAME: namm}
    for fraction in cfg.budgets:
        cap = fraction_cap(fraction, tokens)
        namms[budget_label(NAMM_NAME, fraction)] = capped_policy(NAMM_NAME, namm, cap, cfg.update_every, 0)
    policies = {FULL_CACHE: (build_policy(FULL_CACHE, None, None, cfg.update_every, 0), cfg.kv_layouts[0])}
    for layout in cfg.kv_layouts:
        for label, policy in namms.items():
            policies[label if len(cfg.kv_layouts) == 1 else f"{label} [{layout}]"] = (policy, layout)
    return policies


def run_rollout_speed(cfg: RolloutSpeedConfig, argv: list[str] | None = None) -> dict[str, Any]:
    from namm_transfer import NAMM
    from namm_transfer.pipelines.rl.evaluate import rollout_batch
    from namm_transfer.pipelines.rl.models import load_dt
    from namm_transfer.policies.registry import FULL_CACHE

    set_threads(cfg.threads)
    namm = NAMM.from_pretrained(cfg.namm).replace(update_every=cfg.update_every)
    seeds = list(range(cfg.seed, cfg.seed + cfg.episodes))
    results: dict[str, Any] = {}
    for name in cfg.dts:
        dt = load_dt(name)
        policies = _policies(dt, namm, cfg)
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in policies}
        for label, (policy, layout) in policies.items():  # warm-up, not timed
            rollout_batch(dt, label, policy, dt.env_id, seeds[:2], dt.target_return, None, False,
                          progress=False, exact_output=cfg.exact_output, kv_layout=layout)
        for rep in range(cfg.reps):
            for label, (policy, layout) in policies.items():
                run = rollout_batch(dt, label, policy, dt.env_id, seeds, dt.target_return, None, False,
                                    progress=False, exact_output=cfg.exact_output, kv_layout=layout)
                row = run.rows[0]
                runs[label].append({"seconds": row["batch_seconds"], "env_steps": row["batch_env_steps"],
                                    "timing": row.get("policy_timing", {}),
                                    "tokens_mean": sum(r["tokens_mean"] for r in run.rows) / len(run.rows)})
            log(f"{name} rep {rep + 1}/{cfg.reps}: "
                + ", ".join(f"{k} {v[-1]['env_steps'] / v[-1]['seconds']:.0f}" for k, v in runs.items())
                + " env steps/s")
        per_policy = {}
        for label, reps in runs.items():
            rates = [r["env_steps"] / r["seconds"] for r in reps]
            median = statistics.median(rates)
            middle = sorted(reps, key=lambda r: r["env_steps"] / r["seconds"])[len(reps) // 2]
            per_policy[label] = {
                "steps_per_second_median": median,
                "steps_per_second_min": min(rates),
                "steps_per_second_max": max(rates),
                "seconds_median_rep": middle["seconds"],
                "timing_median_rep": middle["timing"],
                "tokens_mean": middle["tokens_mean"],
                "rates": rates,
            }
        full = per_policy[FULL_CACHE]["steps_per_second_median"]
        for s in per_policy.values():
            s["vs_full"] = s["steps_per_second_median"] / full
            # each repetition's ratio to the full cache's rollout of the same repetition (run moments
            # apart): machine drift between repetitions cancels
            paired = [r / f for r, f in zip(s["rates"], per_policy[FULL_CACHE]["rates"], strict=True)]
            s["paired_ratios"] = paired
            s["paired_ratio_median"] = statistics.median(paired)
        results[name] = {"env": dt.env_id, "policies": per_policy}

    meta = run_metadata(argv)
    headers = ["DT", "policy", "mean tokens", "env steps/s (median)", "range", "vs full cache",
               "paired ratio: median (range)", "NAMM time: rows / features / scoring / eviction s",
               "NAMM time / rollout"]
    body = []
    for name, block in results.items():
        for label, s in block["policies"].items():
            timing = s["timing_median_rep"]
            own = sum(timing.get(k, 0.0) for k in TIMING_KEYS)
            body.append([
                name, label, f"{s['tokens_mean']:.0f}", f"{s['steps_per_second_median']:.0f}",
                f"{s['steps_per_second_min']:.0f}-{s['steps_per_second_max']:.0f}", f"{s['vs_full']:.2f}x",
                f"{s['paired_ratio_median']:.2f}x "
                f"({min(s['paired_ratios']):.2f}-{max(s['paired_ratios']):.2f})",
                " / ".join(f"{timing.get(k, 0.0):.3f}" for k in TIMING_KEYS) if timing else "-",
                f"{100 * own / s['seconds_median_rep']:.0f}%" if timing else "-",
            ])
    table = markdown_table(headers, body)
    record = {"config": asdict(cfg), "meta": meta, "results": results}
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), record)
    out.write_text(
        f"# Decision Transformer rollout speed: full cache vs zero-shot NAMM\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}, git {meta['git_revision']}\n"
        f"- torch {meta['torch']}, threads {meta['torch_threads']}; NAMM {cfg.namm}, update every "
        f"{cfg.update_every} tokens, exact_output={cfg.exact_output}, KV layouts "
        f"{', '.join(cfg.kv_layouts)}; {cfg.episodes} episodes per batch "
        f"(seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1}), {cfg.reps} repetitions, policies interleaved\n"
        f"- compiled kernels (namm_transfer/native): {meta['native_kernels']}\n\n"
        "env steps/s: the batch's env steps over its rollout wall time (measurement excluded), median "
        "over repetitions; `vs full cache`: that median over the full cache's median; `paired ratio`: "
        "each repetition's env steps/s over the full cache's in the same repetition, median and range "
        "over repetitions (drift of the machine between repetitions cancels). NAMM time: the "
        "policy's own seconds in the median repetition (attention rows it needs beside the fused "
        "attention, streaming spectrogram features, BAM scoring, eviction), and their share of the "
        "rollout.\n\n" + table + "\n"
    )
    print(table)
    log(f"wrote {out}")
    return record
