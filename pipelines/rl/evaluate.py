"""``namm-transfer eval-rollout``: a Decision Transformer's rollouts with a zero-shot NAMM and the baselines.

Config -> DT + env -> policies -> rows -> summary:
1. a Decision Transformer (a shipped short name such as ``lunarlander-expert``, or a directory) and
   its gymnasium env (checked against the DT's state and action sizes);
2. ``episodes`` episodes stepped together (:class:`~namm_transfer.envs.EnvBatch`, seeds ``seed``,
   ``seed + 1``, ...), the same seeds for every policy;
3. per policy, in this order:
   - ``windowed``: the standard reference, re-encoding the last K (training context) steps each step;
   - ``full``: the KV-cached incremental rollout with the whole episode in cache
     (:class:`~namm_transfer.policies.FullCache` attached, bit-identical to no policy);
   - ``NAMM``: the text-evolved NAMM applied zero-shot, its cadence set to ``update_every`` tokens
     (3 tokens per env step: return, state, action) and its query window to the same;
   - ``Recency``, ``H2O``, ``L2Norm``, ``RandomEviction`` at the NAMM's measured per-layer budget
     (its mean kept tokens at the end of each episode, less the tokens added since its last update,
     averaged over episodes: as in ``eval-text`` and ``demo``) and the same cadence.
   Every cached policy is attached with ``exact_output=True``, so a policy that evicts nothing
   reproduces the full-cache rollout bit for bit.

Per policy it reports the return and the normalised score (mean ± standard error over episodes),
the cached tokens and KV bytes (per step, averaged over the live episodes; mean and peak), the
fraction of return / state / action tokens kept (each layer's slot table, see
:func:`~namm_transfer.envs.dt_rollout.token_kind_and_step`), the NAMM's budget, and env steps per
second; a PNG per policy shows which timesteps are in memory over the first episode. Rows go to
``rows.jsonl`` (one per policy and episode, appended as each policy finishes its batch); a rerun skips
finished policies and refuses another setting; ``summary.md`` / ``summary.json`` hold the table and the
command; TensorBoard scalars and the plots under ``tensorboard/``.

Protocol (why eviction matters here). A DT is trained on K-step windows (K = 20, i.e. 60 tokens);
the standard evaluation never shows it more. The cached rollout instead keeps the *whole episode*:
~630 tokens for LunarLander (~210 steps) and up to 4,800 for BipedalWalker (1,600 steps), 10-80x the
training context. That cache is what a memory policy manages: can the NAMM (evolved only on text)
hold much less of it without losing return, against the baselines at the same per-layer budget, with
the full cache and the windowed reference beside it? Two settings, 20 episodes each, NAMM every 30
tokens (10 env steps):

- ``lunarlander-expert`` (the main one): the DT scores ~100 normalised both windowed and with the full
  cache, so any loss is the policy's. Measured: the NAMM holds ~15% of the full cache's tokens at the
  same score; so do the baselines at its budget, i.e. this DT needs only recent context and the
  setting separates policies by memory and speed, not by return.
- ``bipedalwalker-expert``: long episodes, where the full cache grows 80x past training and the cached
  rollout's cost grows with it; the shipped DT does not walk (~23 normalised with any policy), so this
  setting measures memory and speed only.

Other candidates considered: a DT trained with a longer context (K = 60-100: the full cache would then
sit nearer its training distribution, and 3-5x the training cost) and the medium / replay datasets
(return-conditioning matters more); not run within this issue's CPU budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.pipelines.common import (
    log,
    markdown_table,
    open_tensorboard,
    parse_dtype,
    run_metadata,
    set_threads,
)
from namm_transfer.pipelines.harness import (
    LEGACY_POLICY_NAMES,
    RowStore,
    check_setting,
    matched_budget,
    mean_se,
    namm_budget,
    verdict,
    write_summary,
)
from namm_transfer.policies.registry import BASELINES, FULL_CACHE, NAMM_NAME, build_policy, policy_names

ROWS_NAME, SUMMARY_NAME = "rows.jsonl", "summary"
WINDOWED = "windowed"  # the DT's own re-encode-the-last-K rollout: no cache, so no memory policy


def rollout_policies() -> list[str]:
    """What ``eval-rollout`` runs, in order: the windowed reference, then every registered policy."""
    return [WINDOWED, *policy_names()]
KINDS = ("return", "state", "action")


@dataclass
class EvalRolloutConfig:
    """Settings of :func:`run_eval_rollout`.

    Attributes:
        dt: a shipped Decision Transformer's short name (``lunarlander-expert``,
            ``bipedalwalker-expert``) or a directory written by ``train-dt``.
        namm: a shipped NAMM's short name, a directory (e.g. an ``evolve`` job's ``OUT_DIR/namm``) or a
            Hub id (default: the shipped text-evolved NAMM).
        update_every: tokens between policy updates, for the NAMM and the baselines alike (3 tokens per
            env step; the NAMM reads the attention of that many latest queries).
        episodes: episodes per policy (>= 20 for the reported tables).
        seed: episode ``i`` is seeded ``seed + i``.
        policies: which of :func:`rollout_policies` to run (the baselines need the NAMM's rows for their
            budget).
        budgets: fixed budgets as fractions of an episode's tokens (3 per step over the horizon), e.g.
            ``0.15 0.3 0.5``: every policy of ``policies`` but the windowed reference and the full cache
            also runs capped at each (the NAMM by top-k of its scores); rows are labelled
            ``<policy> @ <percent>%``. Empty: only the NAMM's own budget.
        window: steps the windowed reference re-encodes (None: the DT's training context K).
        state_stats: for a DT that does not store its state normalisation (the public
            ``edbeeching/decision-transformer-gym-*`` format): a JSON file with ``state_mean`` and
            ``state_std``, or a Minari dataset id (under ``root``) whose observations give them.
        batch_size: episodes stepped together; None: all of them.
        target_return: return to condition on (unscaled); None: the DT's own.
        max_steps: cap on env steps per episode (quick runs and tests); None: the env's time limit.
        env: gymnasium id or short name; None: the env the DT was trained on.
        root: Minari root, for reference scores the DT's metadata does not carry.
        calibrate_episodes: 0 (zero-shot: the NAMM's frozen text statistics); n > 0 re-collects its feature
            statistics on n keep-everything episodes with other seeds before it runs (not zero-shot).
        plot: write a PNG per policy of the timesteps in memory over the first episode.
        output_dir: where rows.jsonl, the summary (.md, .json), the PNGs and TensorBoard go.
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: model dtype (float32 is fastest on CPU).
        threads: torch intra-op threads (None: torch's choice; 1 is best beside a busy process).
    """

    dt: str = "lunarlander-expert"
    namm: str = "smollm2-text"
    update_every: int = 30
    episodes: int = 20
    seed: int = 0
    policies: list[str] = dataclasses.field(default_factory=rollout_policies)
    budgets: list[float] = dataclasses.field(default_factory=list)
    window: int | None = None
    state_stats: str | None = None
    batch_size: int | None = None
    target_return: float | None = None
    max_steps: int | None = None
    env: str | None = None
    root: str | None = None
    calibrate_episodes: int = 0
    plot: bool = True
    output_dir: str = "runs/eval_rollout"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        # "full" was this job's name of the full cache: commands recorded with it still run
        self.policies = [LEGACY_POLICY_NAMES.get(p, p) for p in self.policies]
        unknown = sorted(set(self.policies) - set(rollout_policies()))
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {rollout_policies()}")
        if self.episodes < 1 or self.update_every < 1:
            raise ValueError(
                f"episodes and update_every must be >= 1, got {self.episodes}, {self.update_every}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if any(not 0.0 < b <= 1.0 for b in self.budgets):
            raise ValueError(f"budgets are fractions of the episode's tokens in (0, 1], got {self.budgets}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 steps or None, got {self.window}")
        if self.calibrate_episodes < 0:
            raise ValueError(f"calibrate_episodes must be >= 0, got {self.calibrate_episodes}")


# -------------------------------------------------------------------------------------------------
# measurement


class _Meter:
    """Per-episode accumulators of one batch: cache size, KV bytes, kept tokens by kind, timesteps held.

    Cached tokens of an episode at a step = its valid slots, averaged over layers and KV heads; KV bytes =
    its valid slots' keys and values summed over layers and heads (what it holds, not the padded
    rectangle the batch stores).
    """

    def __init__(self, batch: int, plot_steps: int | None):
        self.batch = batch
        self.steps = np.zeros(batch)
        self.tokens_sum = np.zeros(batch)
        self.tokens_peak = np.zeros(batch)
        self.bytes_sum = np.zeros(batch)
        self.bytes_peak = np.zeros(batch)
        self.seen_sum = np.zeros(batch)  # tokens a full cache would hold, summed over steps
        self.kept_kind = np.zeros((batch, 3))  # per kind, mean over layers x heads, summed over steps
        self.seen_kind = np.zeros((batch, 3))
        self.memory_map = None if plot_steps is None else np.full((plot_steps, plot_steps), np.nan)
        self.seconds = 0.0

    def record(self, t: int, live: np.ndarray, kept_kind: np.ndarray, kv_bytes: np.ndarray,
               held_by_step: np.ndarray | None) -> None:
        """``kept_kind [B, 3]`` (mean over layers x heads), ``kv_bytes [B]``, ``held_by_step [t + 1]``
        (share of episode 0's slots of each timestep held; None when not plotted) after step ``t``."""
        seen_kind = np.array([t + 1, t + 1, t], dtype=np.float64)  # R_0..R_t, s_0..s_t, a_0..a_{t-1}
        tokens = kept_kind.sum(-1)
        self.steps[live] += 1
        self.tokens_sum[live] += tokens[live]
        self.tokens_peak[live] = np.maximum(self.tokens_peak[live], tokens[live])
        self.bytes_sum[live] += kv_bytes[live]
        self.bytes_peak[live] = np.maximum(self.bytes_peak[live], kv_bytes[live])
        self.seen_sum[live] += seen_kind.sum()
        self.kept_kind[live] += kept_kind[live]
        self.seen_kind[live] += seen_kind
        if held_by_step is not None and self.memory_map is not None and live[0] and t < len(self.memory_map):
            self.memory_map[: t + 1, t] = held_by_step[: len(self.memory_map)]

    def episode_stats(self, b: int) -> dict[str, Any]:
        steps = max(self.steps[b], 1.0)
        kept, seen = self.kept_kind[b], self.seen_kind[b]
        return {
            "tokens_mean": self.tokens_sum[b] / steps,
            "tokens_peak": float(self.tokens_peak[b]),
            "kv_bytes_mean": self.bytes_sum[b] / steps,
            "kv_bytes_peak": float(self.bytes_peak[b]),
            "tokens_seen_mean": self.seen_sum[b] / steps,
            "kept_tokens_by_kind": kept.tolist(),  # summed over the episode's steps
            "seen_tokens_by_kind": seen.tolist(),
            "kept_fraction": float(kept.sum() / max(seen.sum(), 1.0)),
            "kept_fraction_by_kind": {k: float(kept[i] / max(seen[i], 1.0)) for i, k in enumerate(KINDS)},
            "kept_share_by_kind": {k: float(kept[i] / max(kept.sum(), 1e-12)) for i, k in enumerate(KINDS)},
        }


def cache_measure(report, plot: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """From a cache's :class:`~namm_transfer.adapters.MemoryReport`: kept tokens per kind ``[B, 3]``
    (mean over layers and KV heads), KV bytes per episode ``[B]``, and for episode 0 the share of each
    timestep's (layer, head, token) slots held ``[steps]`` (None unless ``plot``)."""
    from namm_transfer.envs.dt_rollout import TOKENS_PER_STEP, token_kind_and_step

    per_kind, kv_bytes, held, n_layer_heads = None, None, None, 0
    for valid, positions, per_slot in zip(report.valid, report.positions, report.slot_bytes, strict=True):
        kind, step = token_kind_and_step(positions)
        counts = torch.stack([(valid & (kind == k)).sum(-1) for k in range(TOKENS_PER_STEP)], -1)  # [B,H,3]
        heads = valid.shape[1]
        n_layer_heads += heads
        layer_kind = counts.sum(1).double()  # [B, 3] summed over heads
        per_kind = layer_kind if per_kind is None else per_kind + layer_kind
        layer_bytes = counts.sum((1, 2)).double() * per_slot
        kv_bytes = layer_bytes if kv_bytes is None else kv_bytes + layer_bytes
        if plot:
            n_steps = int(positions.max()) // TOKENS_PER_STEP + 1
            held_here = torch.zeros(n_steps, dtype=torch.float64)
            held_steps = step[0][valid[0]].cpu()
            held_here.index_add_(0, held_steps, torch.ones(held_steps.numel(), dtype=torch.float64))
            held = held_here if held is None else held + held_here
    per_kind = (per_kind / n_layer_heads).cpu().numpy()
    kv_bytes = kv_bytes.cpu().numpy()
    if held is not None:
        slots = torch.full_like(held, float(TOKENS_PER_STEP * n_layer_heads))
        slots[-1] = (TOKENS_PER_STEP - 1) * n_layer_heads  # the newest step has no action token yet
        held = (held / slots).numpy()
    return per_kind, kv_bytes, held


def window_measure(model, batch: int, t: int, context: int, plot: bool):
    """What the windowed reference attends over at step ``t`` (it holds no cache: its window's K/V)."""
    w = min(t + 1, context)
    kept_kind = np.tile(np.array([w, w, w - 1], dtype=np.float64), (batch, 1))
    config = model.config
    per_token = 2 * config.hidden_size * config.n_layer * model.embed_state.weight.element_size()
    kv_bytes = np.full(batch, float(kept_kind[0].sum() * per_token))
    held = None
    if plot:
        held = np.zeros(t + 1)
        held[t + 1 - w :] = 1.0
    return kept_kind, kv_bytes, held


# -------------------------------------------------------------------------------------------------
# rollout


@dataclass
class PolicyRun:
    """One policy over one batch of episodes: a row per episode and the first episode's memory map."""

    rows: list[dict[str, Any]]
    memory_map: np.ndarray | None
    tokens_per_step: list[float]  # mean cached tokens over live episodes, per env step
    actions: np.ndarray  # [steps, B, act_dim] the actions executed (clipped to the action space)


def episode_horizon(dt, env, max_steps: int | None) -> int:
    """The most env steps an episode can take: the env's time limit, ``max_steps`` and the DT's
    ``max_ep_len``, whichever is smallest."""
    limit = env.spec.max_episode_steps if env.spec is not None else None
    return min(x for x in (max_steps, limit, dt.model.config.max_ep_len) if x is not None)


def episode_tokens(dt, env_id: str, max_steps: int | None) -> int:
    """Tokens of the longest episode ``dt`` can play on ``env_id``: 3 per step of its horizon."""
    from namm_transfer.envs import make_env

    probe = make_env(env_id)
    try:
        return 3 * episode_horizon(dt, probe, max_steps)
    finally:
        probe.close()


def fraction_cap(fraction: float, tokens: int) -> int:
    """The per-layer, per-KV-head token cap at ``fraction`` of an episode's ``tokens``."""
    return max(1, round(fraction * tokens))


def capped_policy(name: str, namm, cap: int, update_every: int, seed: int):
    """Policy ``name`` capped at ``cap`` tokens: the NAMM keeping the top ``cap`` of its scores (no
    threshold), a baseline at that budget."""
    if name == NAMM_NAME:
        return namm.with_budget(cap, keep_threshold=False)
    return build_policy(name, None, cap, update_every, seed)


def budget_label(name: str, fraction: float) -> str:
    """The row label of ``name`` capped at ``fraction`` of an episode's tokens, e.g. ``NAMM @ 30%``."""
    return f"{name} @ {100 * fraction:g}%"


@torch.no_grad()
def rollout_batch(dt, name: str, policy, env_id: str, seeds: list[int], target_return: float,
                  max_steps: int | None, plot: bool, progress: bool = True,
                  window: int | None = None, exact_output: bool = True,
                  kv_layout: str | None = None) -> PolicyRun:
    """Run ``len(seeds)`` episodes of ``dt`` together under ``policy`` (None: the windowed reference,
    re-encoding the last ``window`` steps, default the DT's context K). ``exact_output``: attach with
    it (the default here, so a policy that evicts nothing reproduces the full cache bit for bit; False
    is ``attach``'s own default, where a policy reading attention computes the output from its rows);
    ``kv_layout``: the cache's layout (``attach``'s argument; None: its default).

    Raises:
        FloatingPointError: the DT predicted a non-finite action (names the policy, step and seeds).
    """
    from tqdm.auto import tqdm

    from namm_transfer.adapters import attach
    from namm_transfer.adapters.cache import DEFAULT_KV_LAYOUT
    from namm_transfer.envs import EnvBatch
    from namm_transfer.envs.dt_rollout import CachedDTRollout, WindowedDTRollout

    envs = EnvBatch(env_id, len(seeds))
    dt.check_spaces(envs.observation_space, envs.action_space, f"environment {envs.env_id!r}")
    horizon = episode_horizon(dt, envs.envs[0], max_steps)
    low, high = envs.action_space.low, envs.action_space.high
    handle = None
    if policy is None:
        rollout = WindowedDTRollout(dt.model, window or dt.context)
    else:
        handle = attach(dt.model, policy, exact_output=exact_output, kv_layout=kv_layout or DEFAULT_KV_LAYOUT)
        rollout = CachedDTRollout(dt.model)
    meter = _Meter(len(seeds), horizon if plot else None)
    ended: dict[int, dict[str, Any]] = {}
    tokens_per_step: list[float] = []
    executed: list[np.ndarray] = []
    try:
        obs = envs.reset(seeds=seeds)
        rtg = np.full(len(seeds), float(target_return))
        bar = tqdm(total=horizon, desc=name, unit="step", disable=not progress, leave=False)
        started = time.perf_counter()
        bookkeeping = 0.0
        for t in range(horizon):
            live = ~envs.done
            action = rollout.act(dt.normalise_states(obs), dt.scale_returns(rtg), t)
            action = action.float().cpu().numpy()
            bad = live & ~np.isfinite(action).all(-1)
            if bad.any():
                raise FloatingPointError(
                    f"{name}: the Decision Transformer predicted a non-finite action at step {t} for the "
                    f"episode(s) seeded {[seeds[i] for i in np.flatnonzero(bad)]}"
                )
            tick = time.perf_counter()
            if policy is None:
                kept_kind, kv_bytes, held = window_measure(dt.model, len(seeds), t, rollout.context, plot)
            else:
                report = rollout.cache.memory_report()
                kept_kind, kv_bytes, held = cache_measure(report, plot and bool(live[0]))
            meter.record(t, live, kept_kind, kv_bytes, held)
            tokens_per_step.append(float(kept_kind.sum(-1)[live].mean()))
            bookkeeping += time.perf_counter() - tick
            executed.append(np.clip(action, low, high))
            obs, rewards, done = envs.step(executed[-1])
            if envs.applied_actions is not None:  # the env says what it applied: the DT records that
                rollout.record_action(envs.applied_actions)
            rtg -= rewards
            tick = time.perf_counter()
            for b in np.flatnonzero(done & live):  # episodes that ended at this step
                ended[int(b)] = rollout.cache.memory_report().sample(b) if handle is not None else {}
            bookkeeping += time.perf_counter() - tick
            bar.update(1)
            bar.set_postfix(live=int((~envs.done).sum()), tokens=f"{tokens_per_step[-1]:.0f}")
            if envs.all_done:
                break
        bar.close()
        seconds = time.perf_counter() - started - bookkeeping
        stats = handle.stats() if handle is not None else {}
    finally:
        if handle is not None:
            handle.detach()
        envs.close()
    env_steps = int(envs.lengths.sum())
    rows = []
    for b, seed in enumerate(seeds):
        if b in ended:
            memory = ended[b]
        else:  # still running at the step cap
            memory = rollout.cache.memory_report().sample(b) if handle is not None else {}
        rows.append({
            "policy": name,
            "seed": int(seed),
            "return": float(envs.returns[b]),
            "length": int(envs.lengths[b]),
            "terminated_early": bool(envs.done[b]),
            **meter.episode_stats(b),
            **memory,  # kept_per_layer, since_update: at the end of the episode
            "batch_seeds": [int(s) for s in seeds],
            "batch_env_steps": env_steps,
            "batch_seconds": seconds,
            "nonfinite": int(stats.get("nonfinite", 0)),
            "policy_timing": stats.get("timing", {}),  # the batch's policy seconds (bench rollout)
            **{k: int(v) for k, v in envs.reset_infos[b].items() if k == "cue_step"},  # memory tasks
        })
    return PolicyRun(rows, meter.memory_map, tokens_per_step, np.stack(executed))


@torch.no_grad()
def calibrate_namm(dt, namm, env_id: str, seeds: list[int], target_return: float,
                   max_steps: int | None) -> None:
    """Re-collect the NAMM's feature statistics on keep-everything episodes (``seeds``)."""
    log(f"re-collecting the NAMM's feature statistics on {len(seeds)} keep-everything episodes ...")
    with namm.collecting_statistics():
        rollout_batch(dt, "calibrate", namm, env_id, seeds, target_return, max_steps, plot=False)


# -------------------------------------------------------------------------------------------------
# results


def _setting(cfg: EvalRolloutConfig, env_id: str, target_return: float) -> dict[str, Any]:
    return {"dt": str(cfg.dt), "namm": str(cfg.namm), "update_every": cfg.update_every,
            "episodes": cfg.episodes, "seed": cfg.seed, "target_return": float(target_return),
            "max_steps": cfg.max_steps, "env": env_id, "calibrate_episodes": cfg.calibrate_episodes,
            "window": cfg.window}


def reference_normaliser(dt, env_id: str, root: str | None):
    """``returns -> normalised scores``, from the DT's stored reference scores, else its dataset's or
    env's (D4RL); None when none are known."""
    from namm_transfer.envs import normalised_score

    low, high = dt.meta.get("ref_min_score"), dt.meta.get("ref_max_score")
    if low is not None and high is not None and high != low:
        return lambda r: 100.0 * (np.asarray(r, dtype=np.float64) - low) / (high - low)
    for name in (dt.dataset_id, env_id):
        if not name:
            continue
        try:
            normalised_score(name, 0.0, root)
        except ValueError:
            continue
        return lambda r, name=name: np.asarray(normalised_score(name, np.asarray(r, dtype=np.float64), root))
    log(f"no reference scores for {dt.source} / {env_id}: normalised scores are reported as NaN")
    return None


def summarise(rows: list[dict[str, Any]], order: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per policy label (in ``order``, default :func:`rollout_policies`): scores, cache size, kept kinds,
    speed."""
    summary: dict[str, dict[str, Any]] = {}
    names = [p for p in (order or rollout_policies()) if any(r["policy"] == p for r in rows)]
    for name in names:
        mine = [r for r in rows if r["policy"] == name]
        lengths = np.array([r["length"] for r in mine], dtype=np.float64)
        weights = lengths / max(lengths.sum(), 1.0)
        kept = np.sum([r["kept_tokens_by_kind"] for r in mine], axis=0)
        seen = np.sum([r["seen_tokens_by_kind"] for r in mine], axis=0)
        batches = {tuple(r["batch_seeds"]): (r["batch_env_steps"], r["batch_seconds"]) for r in mine}
        steps = sum(s for s, _ in batches.values())
        seconds = sum(s for _, s in batches.values())
        ret, ret_se = mean_se([r["return"] for r in mine])
        norm, norm_se = mean_se([r.get("normalised", float("nan")) for r in mine])
        summary[name] = {
            "episodes": len(mine),
            "return_mean": ret, "return_se": ret_se,
            "normalised_mean": norm, "normalised_se": norm_se,
            "length_mean": float(lengths.mean()),
            "tokens_mean": float(np.dot(weights, [r["tokens_mean"] for r in mine])),
            "tokens_peak": float(max(r["tokens_peak"] for r in mine)),
            "kv_bytes_mean": float(np.dot(weights, [r["kv_bytes_mean"] for r in mine])),
            "kv_bytes_peak": float(max(r["kv_bytes_peak"] for r in mine)),
            "tokens_seen_mean": float(np.dot(weights, [r["tokens_seen_mean"] for r in mine])),
            "kept_fraction": float(kept.sum() / max(seen.sum(), 1.0)),
            "kept_fraction_by_kind": {k: float(kept[i] / max(seen[i], 1.0)) for i, k in enumerate(KINDS)},
            "kept_share_by_kind": {k: float(kept[i] / max(kept.sum(), 1e-12)) for i, k in enumerate(KINDS)},
            "env_steps_per_second": float(steps / seconds) if seconds > 0 else float("nan"),
            "nonfinite": int(sum(r.get("nonfinite", 0) for r in mine)),
        }
    full = summary.get(FULL_CACHE)
    for s in summary.values():
        ok = full is not None and full["normalised_mean"] != 0.0 and np.isfinite(full["normalised_mean"])
        s["score_vs_full"] = float(s["normalised_mean"] / full["normalised_mean"]) if ok else float("nan")
        s["tokens_vs_full"] = float(s["tokens_mean"] / full["tokens_mean"]) if full else float("nan")
    return summary


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    headers = ["policy", "normalised", "return", "score / full", "mean tokens", "peak tokens",
               "tokens / full", "mean KV KiB", "peak KV KiB", "kept R / s / a", "env steps/s"]
    body = []
    for name, s in summary.items():
        kinds = s["kept_fraction_by_kind"]
        body.append([
            name,
            f"{s['normalised_mean']:.1f} ± {s['normalised_se']:.1f}",
            f"{s['return_mean']:.1f} ± {s['return_se']:.1f}",
            f"{s['score_vs_full']:.3f}",
            f"{s['tokens_mean']:.0f}",
            f"{s['tokens_peak']:.0f}",
            f"{s['tokens_vs_full']:.3f}",
            f"{s['kv_bytes_mean'] / 1024:.0f}",
            f"{s['kv_bytes_peak'] / 1024:.0f}",
            " / ".join(f"{kinds[k]:.2f}" for k in KINDS),
            f"{s['env_steps_per_second']:.0f}",
        ])
    return markdown_table(headers, body)


def budget_verdicts(summary: dict[str, dict[str, Any]], budgets: Sequence[float],
                    capped: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per fixed budget (``"10%"``), whether the NAMM beats every baseline capped alike, and by more than
    their combined standard error (normalised scores; :func:`~namm_transfer.pipelines.harness.verdict`)."""
    out = {}
    for fraction in budgets:
        table = {name: summary[budget_label(name, fraction)] for name in capped
                 if budget_label(name, fraction) in summary}
        found = verdict(table, NAMM_NAME, [], "normalised_mean", "normalised_se")
        if found:
            out[f"{100 * fraction:g}%"] = {"fraction": fraction, **found}
    return out


def verdict_table(summary: dict[str, dict[str, Any]], verdicts: dict[str, dict[str, Any]]) -> str:
    """One row per budget: the NAMM, the best baseline, the NAMM's lead and the verdict."""
    headers = ["budget", "NAMM", "best baseline", "lead (combined s.e.)", "above every baseline",
               "by more than the combined s.e."]
    body = []
    for budget, v in verdicts.items():
        namm = summary[budget_label(NAMM_NAME, v["fraction"])]
        best = v["best_baseline"]
        other = summary[budget_label(best, v["fraction"])]
        lead = v["margins"][best]
        body.append([
            budget,
            f"{namm['normalised_mean']:.1f} ± {namm['normalised_se']:.1f}",
            f"{best} {other['normalised_mean']:.1f} ± {other['normalised_se']:.1f}",
            f"{lead['margin']:+.1f} ({lead['combined_se']:.1f})",
            "yes" if v["above_every_baseline"] else "no",
            "yes" if v["above_every_baseline_by_combined_se"] else "no",
        ])
    return markdown_table(headers, body)


def plot_memory(memory_map: np.ndarray, title: str, path: Path | None = None, cue_step: int | None = None):
    """The timesteps in memory over one episode as a matplotlib figure (saved to ``path`` if given);
    ``cue_step`` (a memory task's) is drawn as a line across the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = int(np.sum(~np.isnan(memory_map).all(axis=0)))  # columns recorded
    data = memory_map[: max(steps, 1), : max(steps, 1)]
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(data), origin="lower", aspect="auto", vmin=0.0, vmax=1.0,
                      cmap="viridis", interpolation="nearest")
    ax.set_xlabel("env step")
    ax.set_ylabel("episode timestep of cached tokens")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of layers x heads x tokens held")
    if cue_step is not None:
        ax.axhline(cue_step, color="red", linestyle="--", linewidth=1)
        ax.annotate(f"cue (step {cue_step})", (1, cue_step + 1), color="red", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


# -------------------------------------------------------------------------------------------------
# entry point


def run_eval_rollout(cfg: EvalRolloutConfig, argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    from namm_transfer.pipelines.rl.models import load_dt, state_statistics

    set_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = state_statistics(cfg.state_stats, cfg.root) if cfg.state_stats else (None, None)
    dt = load_dt(cfg.dt, *stats, target_return=cfg.target_return, device=cfg.device)
    dt.model.to(dtype=parse_dtype(cfg.dtype))
    env_id = cfg.env or dt.env_id
    if env_id is None:
        raise ValueError(
            f"the Decision Transformer {cfg.dt!r} does not say which env it was trained on: pass --env"
        )
    target = cfg.target_return if cfg.target_return is not None else dt.target_return
    if target is None:
        raise ValueError(f"the Decision Transformer {cfg.dt!r} stores no target return: pass --target-return")
    setting = _setting(cfg, env_id, target)
    check_setting(out_dir, setting, assumed={"window": None})  # older runs: the DT's own K
    normalise = reference_normaliser(dt, env_id, cfg.root)
    if cfg.episodes < 20:
        log(f"{cfg.episodes} episodes per policy: the standard errors are rough (reported tables use >= 20)")

    store = RowStore(out_dir / ROWS_NAME, key=lambda r: (r["policy"], r["seed"]))
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    size = cfg.batch_size or cfg.episodes
    batches = [seeds[i : i + size] for i in range(0, len(seeds), size)]
    writer = open_tensorboard(out_dir)

    namm = None
    if any(p not in (WINDOWED, FULL_CACHE) for p in cfg.policies):
        from namm_transfer import NAMM

        namm = NAMM.from_pretrained(cfg.namm).replace(update_every=cfg.update_every)
    def run(label: str, policy) -> None:
        """Every pending episode of ``label`` under ``policy`` (None: windowed), written as it ends."""
        todo = [b for b in batches if any(not store.done((label, s)) for s in b)]
        if not todo:
            log(f"{label}: all {cfg.episodes} episodes already done")
            return
        for batch_seeds in todo:
            run = rollout_batch(dt, label, policy, env_id, batch_seeds, target, cfg.max_steps, cfg.plot,
                                window=cfg.window)
            for row in run.rows:  # incremental: a kill loses at most this batch
                row["normalised"] = float(normalise(row["return"])) if normalise else float("nan")
                if not store.done((label, row["seed"])):
                    store.add(row)
            first = batch_seeds == batches[0]
            if first and writer is not None:
                for t, tokens in enumerate(run.tokens_per_step):
                    writer.add_scalar(f"cached_tokens/{label}", tokens, t)
            if first and cfg.plot and run.memory_map is not None:
                title = (f"{label}: timesteps in memory, {Path(str(cfg.dt)).name} episode seed "
                         f"{batch_seeds[0]}")
                png = out_dir / f"memory_{label.replace(' @ ', '_').replace('%', 'pct')}.png"
                fig = plot_memory(run.memory_map, title, png, run.rows[0].get("cue_step"))
                if writer is not None:
                    writer.add_figure(f"memory/{label}", fig)
                import matplotlib.pyplot as plt

                plt.close(fig)
        mine = store.rows(lambda r: r["policy"] == label and r["seed"] in seeds)
        score, se = mean_se([r["normalised"] for r in mine])
        log(f"{label}: normalised {score:.1f} ± {se:.1f}, mean tokens "
            f"{np.mean([r['tokens_mean'] for r in mine]):.0f}")

    budget = None
    order = [p for p in rollout_policies() if p in cfg.policies]
    for name in order:
        if name in BASELINES and budget is None:
            is_namm = lambda r: r["policy"] == NAMM_NAME and r["seed"] in seeds  # noqa: E731
            budget = namm_budget(store, is_namm, cfg.episodes, needed_by=name)
        if name == NAMM_NAME and cfg.calibrate_episodes and any(not store.done((name, s)) for s in seeds):
            calib = [cfg.seed + 10_000 + i for i in range(cfg.calibrate_episodes)]
            calibrate_namm(dt, namm, env_id, calib, target, cfg.max_steps)
        run(name, None if name == WINDOWED else build_policy(name, namm, budget, cfg.update_every, cfg.seed))

    capped = [p for p in order if p not in (WINDOWED, FULL_CACHE)]
    tokens = episode_tokens(dt, env_id, cfg.max_steps) if cfg.budgets else 0
    for fraction in cfg.budgets:  # fixed budgets: every policy capped at the same token count
        cap = fraction_cap(fraction, tokens)
        log(f"{100 * fraction:g}% of an episode's {tokens} tokens: {cap} per layer and KV head")
        for name in capped:
            run(budget_label(name, fraction), capped_policy(name, namm, cap, cfg.update_every, cfg.seed))

    rows = store.rows()
    labels = [*order, *(budget_label(n, f) for f in cfg.budgets for n in capped)]
    summary = summarise([r for r in rows if r["policy"] in labels], labels)
    if budget is None and any(r["policy"] == NAMM_NAME for r in rows):
        namm_rows = [r for r in rows if r["policy"] == NAMM_NAME]
        budget = matched_budget(namm_rows) if len(namm_rows) >= cfg.episodes else None
    if writer is not None:
        for name, s in summary.items():
            for key in ("normalised_mean", "return_mean", "tokens_mean", "tokens_peak", "kv_bytes_mean",
                        "kept_fraction", "env_steps_per_second"):
                writer.add_scalar(f"summary/{name}/{key}", s[key], 0)
        writer.close()
    meta = run_metadata(argv)
    table = summary_table(summary)
    verdicts = budget_verdicts(summary, cfg.budgets, capped)
    if verdicts:
        table += ("\n\nThe NAMM against the best baseline at each fixed budget (normalised score ± standard "
                  "error; the lead over that baseline with their combined standard error in brackets):\n\n"
                  + verdict_table(summary, verdicts))
    data = {"config": asdict(cfg), "setting": setting, "meta": meta, "budget": budget, "summary": summary,
            "budget_verdicts": verdicts}
    full = summary.get(FULL_CACHE, {})
    statistics = (f" (feature statistics re-collected on {cfg.calibrate_episodes} episodes)"
                  if cfg.calibrate_episodes else " (its frozen text statistics)")
    write_summary(out_dir, data,
        f"# Decision Transformer rollouts: {cfg.dt} on {env_id}\n\n"
        f"- command: `{meta['command']}`\n- date: {meta['date']}, git {meta['git_revision']}\n"
        f"- DT: {dt.source} (K = {dt.context} steps = {3 * dt.context} tokens), target return {target:g}\n"
        f"- NAMM: {cfg.namm}, zero-shot{statistics}, update every {cfg.update_every} tokens "
        f"({cfg.update_every / 3:g} env steps)\n"
        f"- episodes per policy: {cfg.episodes} (seeds {seeds[0]}..{seeds[-1]}), max steps {cfg.max_steps}\n"
        f"- baselines' per-layer budget: {budget}\n"
        + (f"- fixed budgets: {', '.join(f'{100 * f:g}%' for f in cfg.budgets)} of an episode's "
           f"{tokens} tokens, per layer and KV head (`<policy> @ <percent>%` rows)\n"
           if cfg.budgets else "")
        + (f"- windowed: the last {cfg.window} steps\n" if cfg.window else "")
        +
        f"- full cache: {full.get('tokens_mean', float('nan')):.0f} tokens on average, "
        f"{full.get('tokens_peak', float('nan')):.0f} at the peak, vs {3 * dt.context} in training\n\n"
        "Protocol: the cached rollout keeps the whole episode (far past the DT's training context K); "
        "`windowed` is the standard re-encode-the-last-K reference, `FullCache` the KV-cached rollout with "
        "nothing evicted, the NAMM runs zero-shot and the baselines at its measured per-layer budget "
        "and cadence. Normalised = 100 (R - random) / (expert - random) with the dataset's reference "
        "scores, mean ± standard error over episodes. Tokens: cached tokens of an episode per step "
        "(mean over layers and heads), averaged over its live steps (mean) or the largest (peak); KV: "
        "the keys and values those tokens hold, all layers (windowed: its window's, recomputed every "
        "step). kept R / s / a: kept / seen return, state and action tokens over the episode's steps. "
        "env steps/s: env steps of the batch over the rollout's wall time (measurement excluded).\n\n"
        + table + "\n",
        SUMMARY_NAME,
    )
    print(table)
    return summary
