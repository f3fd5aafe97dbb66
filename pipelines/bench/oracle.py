"""``namm-transfer bench oracle``: the ceiling of one-shot compression before the question.

The one-shot protocol compresses the context before the question is read, so no policy can know which
key or document will be asked for. This job measures how much that costs on the text tasks: per test
prompt, one shared prefill of the context, then greedy answers from caches compressed at each kept
fraction by

- ``Oracle``: per layer and KV head, the tokens that the question and the reference answer attend to
  most (their summed attention in the full-cache forward: :func:`.evolve_shared.answer_attention`,
  the evolution warm start's target). It reads the future, so it is a ceiling for attention-based
  selection, not a policy;
- ``Evidence``: a question-agnostic ceiling. It knows which sentences are facts (every key, person or
  needle of the prompt: :func:`.tasks.evidence_mask`) but not which one will be asked; per layer and
  KV head it keeps the first ``SINKS`` tokens, then every fact token, then the most recent tokens.
  It reads the task's ground truth, so it too is a ceiling, not a policy: the ceiling of a policy
  that cannot see the question;
- ``NAMM``: the NAMM by top-k of its scores, from the same prefill (as ``eval-text`` one-shot);
- ``JointProbe`` (with ``--joint-probe``): a learned, question-agnostic ranking that reads the NAMM's
  features of every layer and KV head at once (:class:`.evidence.JointProbe`, fitted on training
  prompts by ``bench evidence``); every layer-head keeps the first ``SINKS`` tokens and then the
  tokens it scores highest. It reads only attention, but it is not a NAMM.

Scores are normalised by the full cache's on the same prompts, as in ``eval-text``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from namm_transfer.pipelines.common import log, markdown_table, parse_dtype, run_metadata, set_threads
from namm_transfer.pipelines.harness import RowStore, check_fractions, check_setting, write_summary
from namm_transfer.pipelines.joint_probe import (
    PROBES,
    FixedScoreTopK,
    JointProbe,
    cache_joint_scores,
    progressive_joint_answer,
)
from namm_transfer.pipelines.text.tasks import SINKS
from namm_transfer.policies.registry import FULL_CACHE, NAMM_NAME

ORACLE = "Oracle"
EVIDENCE = "Evidence"
PROGRESSIVE = "progressive"  # suffix of the probes' progressive rows


def evidence_scores(mask: list[bool], context_len: int) -> torch.Tensor:
    """``[context_len]`` scores whose top-k is: the first :data:`SINKS` tokens, then the fact tokens,
    then the most recent tokens (ties broken by recency)."""
    position = torch.arange(context_len, dtype=torch.float32)
    fact = torch.tensor(mask[:context_len], dtype=torch.float32)
    return 4.0 * (position < SINKS) + 2.0 * fact + position / context_len


@dataclass
class OracleConfig:
    """Settings of :func:`run_oracle`.

    Attributes:
        model: ``smollm2`` or ``gemma3-270m``.
        namm: the NAMM compared with the oracle (a shipped name or a directory).
        tasks: text tasks.
        n: test prompts per task.
        split: ``test`` or ``val``.
        prompt_tokens: prompt length (as ``eval-text``).
        budgets: kept fractions of the context.
        output_dir: rows.jsonl (resumable) and the summary.
        joint_probe: a ``joint_probe.pt`` written by ``bench evidence``: adds the ``JointProbe`` rows.
        joint_progressive: also run the JointProbe in the progressive protocol (rows ``JointProbe
            progressive``): the whole prompt fed in chunks of the NAMM's cadence, all layers compressed
            to the budget's share of the prompt after each chunk (as ``eval-text``'s progressive rows).
        device, dtype, threads: as ``eval-text``.
    """

    model: str = "smollm2"
    namm: str = "smollm2-text"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "kv", "docs"])
    n: int = 32
    split: str = "test"
    prompt_tokens: int = 1024
    budgets: list[float] = field(default_factory=lambda: [0.5, 0.25])
    output_dir: str = "benchmarks/results/oracle_text"
    joint_probe: str | None = None
    joint_progressive: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None

    def __post_init__(self) -> None:
        check_fractions(self.budgets)


def run_oracle(cfg: OracleConfig, argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from namm_transfer import NAMM
    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_named_model
    from namm_transfer.pipelines.text.evaluate import summarise
    from namm_transfer.pipelines.text.evolve_shared import answer_attention
    from namm_transfer.pipelines.text.shared_prefill import (
        answer_token_ids,
        generate_answer,
        kept_report,
        prefill_context,
    )
    from namm_transfer.pipelines.text.tasks import TASKS, evidence_mask, make_split

    set_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # JointProbe rows carry their probe's path; the other rows do not depend on it
    setting = {k: v for k, v in asdict(cfg).items()
               if k not in ("output_dir", "device", "threads", "joint_probe", "joint_progressive")}
    check_setting(out_dir, setting)
    store = RowStore(out_dir / "rows.jsonl", key=lambda r: (r["budget"], r["policy"], r["task"], r["seed"]))
    namm = NAMM.from_pretrained(cfg.namm)
    model, tokenizer = load_named_model(cfg.model, device=cfg.device, dtype=parse_dtype(cfg.dtype))
    examples = [(t, ex) for t in cfg.tasks
                for ex in make_split(t, tokenizer, cfg.split, cfg.n, cfg.prompt_tokens)]
    names = [FULL_CACHE, ORACLE, EVIDENCE, NAMM_NAME]
    probe = None
    if cfg.joint_probe is not None:
        probe = JointProbe.load(cfg.joint_probe)
        names.append(probe.name)
        if cfg.joint_progressive:
            names.append(f"{probe.name} {PROGRESSIVE}")
    elif cfg.joint_progressive:
        raise ValueError("joint_progressive needs joint_probe")
    with attach(model, namm) as handle:
        for task, ex in tqdm(examples, desc="bench oracle", unit="prompt"):
            todo = [(b, p) for b in cfg.budgets for p in names
                    if not store.done((b, p, task, ex.seed)) and (p != FULL_CACHE or b == cfg.budgets[0])]
            if not todo:
                continue
            max_new = TASKS[task].max_new_tokens

            def add(budget: float, name: str, text: str, kept_fraction: float, seconds: float,
                    task: str = task, ex=ex, **extra) -> None:
                """Store one row (the probes' rows carry their probe's path)."""
                probe_path = {"joint_probe": cfg.joint_probe} if name.split()[0] in PROBES else {}
                store.add({"budget": budget, "policy": name, "task": task, "seed": ex.seed,
                           "score": float(TASKS[task].score(text, ex)), "answer": text,
                           "kept_fraction": kept_fraction, **extra, **probe_path, "seconds": seconds})

            for budget, name in [t for t in todo if t[1].endswith(PROGRESSIVE)]:  # no shared prefill
                t0 = time.perf_counter()
                cap = max(1, round(budget * ex.num_tokens))
                text, kept_fraction = progressive_joint_answer(
                    model, tokenizer, handle, ex.prompt_ids, namm, probe, cap, namm.config.update_every,
                    max_new)
                add(budget, name, text, kept_fraction, time.perf_counter() - t0, prompt_tokens=ex.num_tokens,
                    protocol="progressive")
            todo = [t for t in todo if not t[1].endswith(PROGRESSIVE)]
            if not todo:
                continue
            start = time.perf_counter()
            prefill = prefill_context(model, handle, ex, tokenizer, [namm])
            _, target = answer_attention(model, prefill, answer_token_ids(tokenizer, ex))
            layers = len(prefill.cache.layers)
            scores = target.reshape(layers, -1, target.shape[-1])
            agnostic = evidence_scores(evidence_mask(ex, tokenizer), prefill.context_len).expand_as(scores)
            if probe is not None:
                joint = cache_joint_scores(prefill.cache, namm, probe, 0)
            shared_s = time.perf_counter() - start
            for budget, name in todo:
                t0 = time.perf_counter()
                k = max(1, round(budget * prefill.context_len))
                if name == FULL_CACHE:
                    policy = FixedScoreTopK(scores, None)
                elif name == ORACLE:
                    policy = FixedScoreTopK(scores, k)
                elif name == EVIDENCE:
                    policy = FixedScoreTopK(agnostic, k)
                elif name in PROBES:
                    policy = FixedScoreTopK(joint, k)
                else:
                    policy = namm.with_budget(k, keep_threshold=False)
                cache = prefill.fork(0, policy)
                kept, _ = kept_report(cache, prefill.context_len)
                text = generate_answer(model, tokenizer, prefill, cache, max_new)
                add(budget, name, text, float(kept[0]), time.perf_counter() - t0 + shared_s,
                    context_tokens=prefill.context_len)
    rows = store.rows()
    full_rows = [r for r in rows if r["policy"] == FULL_CACHE]
    tables, data = [], {}
    for budget in cfg.budgets:
        group = full_rows + [r for r in rows if r["budget"] == budget and r["policy"] != FULL_CACHE]
        summary = summarise(group, cfg.tasks)
        data[str(budget)] = summary
        tables.append(f"## {100 * budget:g}% of the context kept per layer and KV head\n\n" + markdown_table(
            ["policy", *cfg.tasks, "mean normalised", "kept fraction", "n"],
            [[name, *(f"{s['normalised'][t]:.2f} ± {s['normalised_se'][t]:.2f}" for t in cfg.tasks),
              f"{s['mean_normalised']:.3f} ± {s['mean_normalised_se']:.3f}", f"{s['kept_fraction']:.3f}",
              str(s["n"])] for name, s in summary.items()]))
    meta = run_metadata(argv)
    text = ("# One-shot compression before the question: NAMM vs question-aware and question-agnostic "
            "ceilings\n\n"
            f"- command: `{meta['command']}`\n- date: {meta['date']}, git {meta['git_revision']}\n"
            f"- model: {cfg.model}; NAMM: {cfg.namm}; {cfg.split} split, {cfg.n} prompts per task, "
            f"~{cfg.prompt_tokens} tokens\n\n"
            "Oracle: per layer and KV head, the context tokens the question and the reference answer "
            "attend to most in the full-cache forward (it reads the future: a ceiling for attention-based "
            "selection, not a policy). Evidence: question-agnostic ceiling; it keeps the first "
            f"{SINKS} tokens, every fact sentence of the prompt (all keys or people, not only the asked "
            "one; it reads the task's ground truth), then the most recent tokens. NAMM: top-k of its "
            "scores."
            + (f" JointProbe: a logistic regression on a token's NAMM features in every layer and KV head "
               f"at once, fitted on training prompts to find the fact tokens (`{cfg.joint_probe}`, from "
               "`bench evidence`); it keeps the first "
               f"{SINKS} tokens, then its highest scores; question-agnostic and attention-only, not a NAMM."
               + (" JointProbe progressive: the same ranking in the progressive protocol (the whole prompt "
                  "in chunks of the NAMM's cadence, every layer compressed to the budget's share of the "
                  "prompt after each chunk; the budget is then a share of the prompt, as in `eval-text`)."
                  if cfg.joint_progressive else "")
               if probe is not None else "")
            + " All compress the context once, before "
            "the question, from one shared prefill; normalised = mean score / full cache's mean on the same "
            "prompts, ± standard error over prompts.\n\n" + "\n\n".join(tables) + "\n")
    write_summary(out_dir, {"config": asdict(cfg), "meta": meta, "summary": data}, text, "summary")
    print(text)
    log(f"results in {out_dir}")
    return data
