"""``namm-transfer bench evidence``: can a NAMM's inputs tell the facts of a context from its filler?

The one-shot protocol compresses the context before the question, so a policy has to keep every fact
that some question could ask for (``bench oracle``'s ``Evidence`` ceiling shows that this is enough on
``kv`` and ``docs``). This job measures whether the NAMM's per-token features at that eviction point
(8 age dims + 17 spectrogram bins of the attention each token received) carry that information:

- **evidence recall** of the NAMM's scores: the share of fact tokens (:func:`.tasks.evidence_mask`) in
  each layer-head's top-k, at each kept fraction; a ranking blind to facts recalls the kept fraction
  itself. Recency is shown beside it;
- **ROC AUC** of the NAMM's scores and of probes fitted on training prompts (a logistic regression
  and a one-hidden-layer MLP on the 25 features of one layer-head, shared by all, as the NAMM is) on
  held-out validation prompts. 0.5 is no information; these probes bound what any per-token function
  of one layer-head's features can do, where the BAM can also compare a token with newer ones;
- the same for probes that read a token's features in **every layer and KV head at once** (a
  logistic regression on the ``layers x heads x 17`` spectrogram bins plus the 8 age dims): what the
  features hold when no layer-head is scored on its own; and on those bins **pooled** over the
  layer-heads (mean, standard deviation, maximum: a vector of the same size for any model). Both
  probes are saved (``joint_probe.pt``, ``pooled_probe.pt``) for ``bench oracle --joint-probe`` and
  ``eval-video --joint-probe``.

The first :data:`.tasks.SINKS` tokens are left out of both (their age gives them away; they are not
facts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.pipelines.common import log, markdown_table, parse_dtype, run_metadata, set_threads
from namm_transfer.pipelines.harness import check_fractions, write_summary
from namm_transfer.pipelines.joint_probe import JointProbe, fit_probe, joint_vector
from namm_transfer.pipelines.text.tasks import SINKS, TASKS


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for boolean ``labels`` (ties count half: average ranks).

    Raises:
        ValueError: when ``labels`` holds only one class.
    """
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # rank (0-based) of each distinct value's first element
    ranks = (first + (counts - 1) / 2.0)[inverse] + 1  # average 1-based rank of tied elements
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evidence_recall(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, k: int) -> float:
    """Share of the labelled valid slots of ``[rows, S]`` that are in their row's top-``k`` by score."""
    top = scores.masked_fill(~valid, -torch.inf).topk(min(k, scores.shape[-1]), dim=-1).indices
    kept = torch.zeros_like(valid).scatter(-1, top, True) & valid
    wanted = labels & valid
    return float((kept & wanted).sum() / wanted.sum().clamp_min(1))


@dataclass
class _Rows:
    """One prompt's context at the eviction point, flattened over layer-head rows."""

    task: str
    feats: torch.Tensor  # [R, S, 25]
    valid: torch.Tensor  # [R, S] slots scored (sinks left out)
    labels: torch.Tensor  # [R, S] fact tokens
    positions: torch.Tensor  # [R, S]
    namm_scores: torch.Tensor  # [R, S]
    context_len: int


def across_heads(rows: list[_Rows], age_dim: int, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per context token (sinks left out): its features in every layer-head read together
    (:func:`~namm_transfer.pipelines.joint_probe.joint_vector`: side by side, ``[tokens, R * bins +
    age_dim]``, or ``pooled``) and its fact label. Needs caches that kept everything (every row holds
    every token, in position order)."""
    xs, ys = [], []
    for r in rows:
        if not bool(r.valid.any(0).eq(r.valid.all(0)).all()):
            raise ValueError("across_heads needs keep-everything caches (the same tokens in every row)")
        cols = r.valid[0]
        xs.append(joint_vector(r.feats[:, cols], age_dim, pooled))
        ys.append(r.labels[0, cols])
    return torch.cat(xs), torch.cat(ys)


@dataclass
class EvidenceConfig:
    """Settings of :func:`run_evidence`.

    Attributes:
        model: ``smollm2`` (the model the NAMM was evolved on).
        namm: the NAMM whose features and scores are probed (a shipped name or a directory).
        tasks: text tasks with marked facts.
        train_n: training prompts per task (the probes are fitted on them).
        val_n: validation prompts per task (every figure is measured on them).
        prompt_tokens: prompt length.
        budgets: kept fractions for evidence recall.
        probe_steps: Adam steps per probe.
        seed: the probes' seed.
        output_dir: summary.md and summary.json.
        device, dtype, threads: as ``eval-text``.
    """

    model: str = "smollm2"
    namm: str = "smollm2-text"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "kv", "docs"])
    train_n: int = 8
    val_n: int = 8
    prompt_tokens: int = 1024
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5])
    probe_steps: int = 400
    seed: int = 0
    output_dir: str = "benchmarks/results/evidence_probe"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        check_fractions(self.budgets)
        if self.train_n < 1 or self.val_n < 1:
            raise ValueError("train_n and val_n must be at least 1")


def run_evidence(cfg: EvidenceConfig, argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from namm_transfer import NAMM
    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_named_model
    from namm_transfer.pipelines.text.evolve_shared import PrefillPool, entry_features, evidence_target
    from namm_transfer.pipelines.text.tasks import split_seeds
    from namm_transfer.scorers import score_tokens

    set_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    namm = NAMM.from_pretrained(cfg.namm)
    age_dim = namm.config.age_dim
    model, tokenizer = load_named_model(cfg.model, device=cfg.device, dtype=parse_dtype(cfg.dtype))
    keep_all = replace(namm.config, threshold=None, budget=None)
    rows: dict[str, list[_Rows]] = {"train": [], "val": []}
    with attach(model, NAMM(keep_all)) as handle:
        pool = PrefillPool(model, tokenizer, handle, TASKS, keep_all, cfg.prompt_tokens)
        todo = [(split, t, s) for split, n in (("train", cfg.train_n), ("val", cfg.val_n))
                for t in cfg.tasks for s in split_seeds(split, n)]
        for split, task, seed in tqdm(todo, desc="bench evidence", unit="prompt"):
            entry = pool.get(task, seed)
            if entry.evidence is None:
                raise ValueError(f"task {task!r} has no marked facts")
            with torch.no_grad():
                feats, valid, positions = entry_features(entry, namm)
                scores = score_tokens(namm.params[:1], feats[None], valid[None], positions[None],
                                      namm.config.shapes)[0]
            facts = evidence_target(entry.evidence, positions) & (positions >= SINKS)
            rows[split].append(_Rows(task, feats, valid & (positions >= SINKS), facts & valid, positions,
                                     scores, entry.prefill.context_len))
            pool.entries.clear()  # one prefill at a time in memory

    def flat(split: str, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen = [r for r in rows[split] if r.task in tasks]
        return (torch.cat([r.feats[r.valid] for r in chosen]), torch.cat([r.labels[r.valid] for r in chosen]),
                torch.cat([r.namm_scores[r.valid] for r in chosen]))

    x_train, y_train, _ = flat("train", cfg.tasks)
    probes = {"logistic probe, one layer-head": fit_probe(x_train, y_train, 0, cfg.probe_steps, cfg.seed),
              "MLP probe (64 hidden), one layer-head": fit_probe(x_train, y_train, 64, cfg.probe_steps,
                                                                 cfg.seed)}
    train_rows = [r for r in rows["train"] if r.task in cfg.tasks]
    joint = JointProbe.fit(*across_heads(train_rows, age_dim), age_dim, cfg.probe_steps, cfg.seed)
    pooled = JointProbe.fit(*across_heads(train_rows, age_dim, pooled=True), age_dim, cfg.probe_steps,
                            cfg.seed, pooled=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    joint.save(out_dir / "joint_probe.pt")
    pooled.save(out_dir / "pooled_probe.pt")
    auc: dict[str, dict[str, float]] = {}
    groups = {**{t: [t] for t in cfg.tasks}, "all": cfg.tasks}
    for group, tasks in groups.items():
        x, y, namm_scores = flat("val", tasks)
        auc.setdefault(f"NAMM ({cfg.namm})", {})[group] = roc_auc(namm_scores, y)
        with torch.no_grad():
            for name, net in probes.items():
                auc.setdefault(name, {})[group] = roc_auc(net(x)[:, 0], y)
            chosen = [r for r in rows["val"] if r.task in tasks]
            labels = across_heads(chosen, age_dim)[1]
            for name, probe in (("logistic probe, every layer-head at once", joint),
                                ("logistic probe, pooled over layer-heads (mean / std / max)", pooled)):
                probe_scores = torch.cat([probe.scores(r.feats[:, r.valid[0]]) for r in chosen])
                auc.setdefault(name, {})[group] = roc_auc(probe_scores, labels)
    recall: dict[str, dict[str, dict[str, float]]] = {}
    for budget in cfg.budgets:
        for task in cfg.tasks:
            for policy in (f"NAMM ({cfg.namm})", "Recency"):
                values = []
                for r in (r for r in rows["val"] if r.task == task):
                    s = r.namm_scores if policy != "Recency" else r.positions.float()
                    k = max(1, round(budget * r.context_len)) - SINKS  # the sinks take their own slots
                    values.append(evidence_recall(s, r.labels, r.valid, k))
                recall.setdefault(str(budget), {}).setdefault(policy, {})[task] = float(np.mean(values))

    meta = run_metadata(argv)
    n_facts = {t: float(np.mean([float(r.labels[0].sum()) for r in rows["val"] if r.task == t]))
               for t in cfg.tasks}
    text = [
        "# Do the NAMM's inputs tell facts from filler? (one-shot eviction point, before the question)\n",
        f"- command: `{meta['command']}`\n- date: {meta['date']}, git {meta['git_revision']}",
        f"- model: {cfg.model}; NAMM: {cfg.namm} (its features: 8 age + 17 spectrogram bins, EMA "
        f"{namm.config.ema_decay}); probes fitted on {cfg.train_n} training prompts per task, every "
        f"figure on {cfg.val_n} validation prompts per task, ~{cfg.prompt_tokens} tokens",
        "- fact tokens per prompt: " + ", ".join(f"{t} {n:.0f}" for t, n in n_facts.items())
        + f" (every fact sentence, not only the asked one; the first {SINKS} tokens are left out)\n",
        "## ROC AUC for fact tokens, validation prompts (0.5 = no information)\n",
        markdown_table(["scores", *groups], [[name, *(f"{v[g]:.3f}" for g in groups)]
                                             for name, v in auc.items()]),
        "\n## Evidence recall: share of fact tokens in each layer-head's top-k\n",
        "A ranking blind to facts recalls about the kept fraction itself.\n",
    ]
    for budget, by_policy in recall.items():
        text += [f"### {100 * float(budget):g}% of the context kept\n",
                 markdown_table(["policy", *cfg.tasks], [[p, *(f"{v[t]:.3f}" for t in cfg.tasks)]
                                                         for p, v in by_policy.items()]), ""]
    markdown = "\n".join(text) + "\n"
    write_summary(out_dir, {"config": asdict(cfg), "meta": meta, "auc": auc, "recall": recall,
                            "fact_tokens": n_facts}, markdown, "summary")
    print(markdown)
    log(f"results in {out_dir}")
    return {"auc": auc, "recall": recall}
