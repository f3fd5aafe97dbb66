"""Diagnostic, not a policy: read-outs fitted on text beyond the joint one, tried on video at 15%.

The joint NAMM gives every layer and head one score. Two ways to give each layer or head its own, both
fitted on the text pool of the shipped joint NAMM's recipe (passkey, kv, docs; 16 training prompts per
task of 1,024 or 1,536 tokens; EMA 0.9999, 4 sinks), then run on the video validation split at 15% of the
video tokens, progressive, with the video statistics of the shipped video NAMM:

- ``fit`` (per layer group): for each group of consecutive layers a joint read-out (all layer-heads'
  features, as the joint one) by the listwise warm start of ``evolve --scorer joint``, towards the tokens
  the question and answer attended to *in that group's layers*; writes ``groups{G}.pt`` (``[G, n_params]``)
  per group count. G = 1 is the control: the joint warm start alone, before CMA-ES. ``eval --params``:
  each layer keeps the top of its group's score (plus ``m`` times each head's own term of it, as
  ``--namm-head-mix``); ``--group K`` uses group K's read-out in every layer.
- ``fit-heads`` (per layer-head): each layer-head's linear read-out of its *own* spectral features,
  towards the tokens the question and answer attended to *in that head*: what H2O's accumulated attention
  guesses by hand. ``eval --own``: the shipped NAMM's joint score plus ``m`` times that read-out, both
  z-scored, per head (the head mix with these as its own terms). ``--shared``: one read-out for every
  layer-head; ``--future f``: the target is the attention everything after the first ``f`` of the context
  paid to it (which tokens each head goes on reading); ``--exclude-recent W``: the last ``W`` positions,
  kept by a recent window anyway, are left out of the fit; ``--save-namm DIR``: the shared read-out as a
  per-head NAMM (``scorer="linear"``, ``recent_tokens``), what ``benchmarks/results/video_128_linear/``
  evaluates; ``--nonneg``: every weight kept >= 0; ``--tasks``: the text pool's tasks (default passkey,
  kv, docs; also hop, vartrack, alias); ``--score-pool K``: the read-out of scores averaged over K
  neighbouring tokens (``NAMMConfig.score_pool``, SnapKV's pool), saved with it.
- ``fit-bam``: one BAM read-out (the reference's scorer) shared by every layer-head, fitted as ``fit-heads
  --shared`` on a cached pool's spectral features and saved as a ranking NAMM (``--warm-start``: from a
  linear NAMM's read-out, which it scores exactly at step 0).
- ``text-bins``: each spectral bin alone as the ranking, per task of a cached pool (which bin text rewards).
- ``text-fitness``: the text task fitness evolution climbs (one-shot, capped) of hand-set read-outs:
  whether CMA-ES on text could find what the future-attention fit does not.

Capped, rankings alone matter, so no bias is set.

    python benchmarks/scripts/joint_readouts.py fit --groups 1 3 6 --out-dir runs/layer_groups
    python benchmarks/scripts/joint_readouts.py eval --params runs/layer_groups/groups3.pt \\
        --annotations runs/video_qa_128_val216/val.jsonl --limit 216 --output-dir runs/lg_val_g3
    python benchmarks/scripts/joint_readouts.py fit-heads --out-dir runs/layer_groups
    python benchmarks/scripts/joint_readouts.py eval --own runs/layer_groups/per_head.pt --head-mix 1 \\
        --output-dir runs/own_val_m1
    python benchmarks/scripts/joint_readouts.py fit-heads --shared --future 0.6 --exclude-recent 64 \\
        --name linear --out-dir runs/linear --save-namm runs/linear/namm_text --recent-tokens 61
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from video_diagnostics import VIDEO_NAMM, run_capped_namm

from namm_transfer import NAMM, NAMMConfig, joint
from namm_transfer import namm as namm_module
from namm_transfer.pipelines.models import MODELS
from namm_transfer.policies.base import pool_over_slots


def layer_groups(layers: int, groups: int) -> list[range]:
    """``groups`` runs of consecutive layers, as equal as they can be (the first ones one longer)."""
    if not 1 <= groups <= layers:
        raise ValueError(f"need 1 <= groups <= {layers} layers, got {groups}")
    size, extra = divmod(layers, groups)
    out, start = [], 0
    for g in range(groups):
        end = start + size + (g < extra)
        out.append(range(start, end))
        start = end
    return out


POOL_TASKS = ("passkey", "kv", "docs")  # the text pool's tasks, in its order (per cut share)
POOL_PROMPTS = 16  # training prompts per task
POOL_LENGTHS = [1024, 1536]  # prompt lengths in tokens, one drawn per prompt by its seed


def text_pool(future: float | list[float] | None = None, ema_decay: float = 0.9999,
              tasks: tuple[str, ...] = POOL_TASKS, ema_unbiased: bool = False, model_name: str = "smollm2"):
    """``(training entries, probe NAMM with their statistics)``: the text pool of the joint NAMM's recipe.

    ``future = f``: each prompt's context is cut after its first ``f`` share of tokens, and the target is
    the attention everything after the cut paid to the tokens before it (the rest of the context, the
    question and the answer): which tokens each head goes on reading, whatever the task asks. Several
    shares: every prompt once per share (an eviction early and late in a long prefill, as the
    progressive protocol makes them), the statistics over all of them.
    ``ema_decay``: the features' per-query EMA decay (0.9999: the joint NAMM's recipe, a memory of
    every query; 0.99: about the last 100).
    ``tasks``: the text tasks, :data:`POOL_PROMPTS` training prompts each (``vartrack`` and ``alias`` of
    ``EXTRA_TASKS`` too: the future target needs the model's attention, not its answer).
    ``ema_unbiased``: features divided by the weight of the frames since each token arrived
    (``NAMMConfig.ema_unbiased``: a token's mean attention spectrum, not a sum growing with its age).
    ``model_name``: whose attention (``smollm2``, or ``gemma3-270m``: another text model, whose read-out
    then transfers across models as well as to video).
    """
    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_named_model
    from namm_transfer.pipelines.text.evolve import EvolveConfig
    from namm_transfer.pipelines.text.evolve_shared import PrefillPool, collect_statistics, pool_seeds
    from namm_transfer.pipelines.text.tasks import EXTRA_TASKS, TASKS

    torch.set_num_threads(1)
    cfg = EvolveConfig(engine="shared-prefill", scorer="joint", sink_tokens=4, update_every=256, seed=0,
                       ema_decay=ema_decay, joint_reference="fresh-median")
    model, tokenizer = load_named_model(model_name)
    feature_cfg = replace(cfg.namm_config(), ema_unbiased=ema_unbiased)
    shares = future if isinstance(future, list) else [future]
    train = []
    with attach(model, NAMM(feature_cfg)) as handle:
        for share in shares:
            pool = PrefillPool(model, tokenizer, handle, {**TASKS, **EXTRA_TASKS}, feature_cfg, POOL_LENGTHS,
                               context_share=share)
            train += [pool.get(t, s) for t in tasks for s in pool_seeds(0, "train", POOL_PROMPTS)]
    mean, var = collect_statistics(train, feature_cfg)
    return train, NAMM(feature_cfg, None, torch.as_tensor(mean), torch.as_tensor(var))


def fit(args) -> None:
    from namm_transfer.pipelines.text.evolve_shared import joint_label, joint_warm_start

    train, probe = text_pool()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = len(train[0].prefill.cache.layers)
    heads = train[0].prefill.cache.layers[0].keys.shape[1]
    full_labels = [joint_label(e, torch.arange(e.target.shape[1]), "topk") for e in train]
    for n_groups in args.groups:
        groups = layer_groups(layers, n_groups)
        record = {"groups": [[g.start, g.stop] for g in groups], "losses": [], "label_overlap": []}
        params = []
        for g in groups:
            rows = slice(g.start * heads, g.stop * heads)
            p, losses = joint_warm_start(train, probe, args.steps, args.lr, 0, label_rows=rows,
                                         progress=False)
            params.append(p)
            labels = [joint_label(e, torch.arange(e.target.shape[1]), "topk", rows=rows) for e in train]
            jaccard = [float((a & b).sum() / (a | b).sum()) for a, b in zip(labels, full_labels, strict=True)]
            overlap = sum(jaccard) / len(jaccard)
            record["losses"].append([sum(losses[:50]) / 50, sum(losses[-50:]) / 50])
            record["label_overlap"].append(overlap)
            print(f"G={n_groups} layers {g.start}-{g.stop - 1}: loss {record['losses'][-1][0]:.3f} -> "
                  f"{record['losses'][-1][1]:.3f}; label Jaccard with all layers' {overlap:.3f}", flush=True)
        torch.save({"params": torch.stack(params), **record}, out_dir / f"groups{n_groups}.pt")
        (out_dir / f"groups{n_groups}.json").write_text(json.dumps(
            {**record, "steps": args.steps, "lr": args.lr, "prompts": len(train),
             "command": shlex.join(["python", *sys.argv])}, indent=2))


def fit_tokens(pool: list, exclude_recent: int) -> list:
    """``(features, target, allowed)`` per prompt: the tokens a fit ranks (``--exclude-recent W``: the
    last W positions are kept by a recent window anyway, so they count neither in the loss nor in its
    labels; nor do the sinks)."""
    from namm_transfer.pipelines.text.tasks import SINKS

    return [(x, t, v & (p >= SINKS) & (p <= p.masked_fill(~v, -1).amax() - exclude_recent))
            for x, t, v, p in pool]


def pool_features(saved: dict, with_age: bool, cached: Path | str | None) -> list:
    """A cached pool's ``(features, target, valid, positions)``: the spectral bins, after the age
    embedding too with ``with_age`` (pools written before ``with_age`` was stored hold the bins only)."""
    age_dim = saved["config"]["age_dim"]
    if saved.get("with_age"):  # the features begin with the age embedding: read it only with --with-age
        return [(x if with_age else x[..., age_dim:], t, v, p) for x, t, v, p in saved["pool"]]
    if with_age:
        raise SystemExit(f"{cached} holds the spectral features only: --with-age needs a new --cache")
    return saved["pool"]


def pooled_tokens(data: list, kernel: int) -> list:
    """``fit_tokens``'s prompts with each ranked token's features averaged over its ``kernel`` nearest
    ranked tokens (``NAMMConfig.score_pool``: a linear read-out of pooled features is the pooled
    read-out, so fitting on them fits the NAMM that pools its scores)."""
    if kernel == 1:
        return data
    return [(pool_over_slots(x.transpose(-1, -2), a[:, None, :].expand(-1, x.shape[-1], -1), kernel)
             .transpose(-1, -2), t, a) for x, t, a in data]


def readout_loss(scores: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The listwise loss every fit here minimises: towards each row's top 10% of ``target`` (attention),
    or, for a bool ``target``, towards exactly its marked tokens (the answer frames of a video pool)."""
    from namm_transfer.pipelines.text.evolve_shared import listwise_loss, topk_loss

    if target.dtype == torch.bool:
        return listwise_loss(scores, target, allowed)
    return topk_loss(scores, target, allowed)


def equal_loss(data: list) -> float:
    """The mean listwise loss of equal scores (every ranking's reference)."""
    return sum(float(readout_loss(torch.zeros_like(x[..., 0]), t, a)) for x, t, a in data) / len(data)


def alone_loss(data: list, k: int) -> float:
    """The mean listwise loss of feature ``k`` alone as the ranking, at the best of six scales."""
    return min(sum(float(readout_loss(scale * x[..., k], t, a)) for x, t, a in data) / len(data)
               for scale in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0))


def pool_settings(saved: dict, future=None) -> dict:
    """The settings a cached pool was written with; a cache written before a setting was recorded is
    taken at its word (the defaults, and ``future`` for the cut share)."""
    return {"future": saved.get("future", future), "ema_decay": saved["config"]["ema_decay"],
            "tasks": list(saved.get("tasks", POOL_TASKS)),
            "ema_unbiased": saved["config"].get("ema_unbiased", False),
            "model": saved.get("model", "smollm2")}


def fit_heads(args) -> None:
    """Per layer-head read-outs of its own spectral features, fitted (Adam, listwise, all rows at once)
    towards the top 10% of the context by the attention the question and answer paid *in that head*."""
    from namm_transfer.pipelines.text.evolve_shared import entry_features

    torch.set_num_threads(1)
    future = args.future[0] if args.future and len(args.future) == 1 else args.future  # one share: a float
    cached = Path(args.cache) if args.cache else None
    if cached is not None and cached.exists():  # the pool's features, targets and statistics, as below
        saved = torch.load(cached)
        wanted = {"future": future, "ema_decay": args.ema_decay, "tasks": list(args.tasks),
                  "ema_unbiased": args.ema_unbiased, "model": args.model}
        held = pool_settings(saved, future)
        if held != wanted:
            raise SystemExit(f"{cached} holds the pool of {held}, not {wanted}: name another --cache")
        saved.setdefault("future", future)  # taken at its word above, so the fit's record gives it too
    else:
        train, probe = text_pool(future, args.ema_decay, tuple(args.tasks), args.ema_unbiased, args.model)
        pool = []
        for entry in train:
            feats, valid, positions = entry_features(entry, probe)  # [rows, S, age_dim + bins]
            pool.append((feats, entry.target, valid, positions))
        saved = {"pool": pool, "config": asdict(probe.config), "mean": probe.norm_mean, "var": probe.norm_var,
                 "with_age": True, "future": future, "tasks": list(args.tasks), "model": args.model}
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(saved, cached)
    fit_shared_readout(saved, args, cached)


def fit_shared_readout(saved: dict, args, cached: Path | None) -> None:
    """``fit-heads``' fit on a pool (``saved``: its features, targets and statistics, as ``--cache`` holds
    them): the read-outs (one with ``--shared``), their record, and with ``--save-namm`` the NAMM."""
    age_dim = saved["config"]["age_dim"]
    data = pooled_tokens(fit_tokens(pool_features(saved, args.with_age, cached), args.exclude_recent),
                         args.score_pool)
    rows, bins = data[0][0].shape[0], data[0][0].shape[-1]
    free = torch.zeros(1 if args.shared else rows, bins, requires_grad=True)  # --shared: one for every row
    opt = torch.optim.Adam([free], lr=args.lr)
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(args.steps):
        x, target, allowed = data[int(torch.randint(len(data), (), generator=order))]
        weights = free.expand(rows, bins)
        loss = readout_loss(torch.einsum("rsk,rk->rs", x, weights), target, allowed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.nonneg:  # projected Adam: more attention in any band never lowers a token's score
            with torch.no_grad():
                free.clamp_(min=0)
        losses.append(float(loss.detach()))
    weights = free.detach().expand(rows, bins).clone()
    record = {"losses": [sum(losses[:50]) / 50, sum(losses[-50:]) / 50], "steps": args.steps, "lr": args.lr,
              "shared": args.shared, **pool_settings(saved),
              "with_age": args.with_age, "nonneg": args.nonneg,
              "exclude_recent": args.exclude_recent, "score_pool": args.score_pool,
              "prompts": len(data), "target": saved.get("target", "attention"),
              "command": shlex.join(["python", *sys.argv])}
    with torch.no_grad():  # references: equal scores, and the attention mass (bin 0) alone at its best scale
        uniform = equal_loss(data)
        mass = alone_loss(data, age_dim if args.with_age else 0)
        fitted = sum(float(readout_loss(torch.einsum("rsk,rk->rs", x, weights), t, a))
                     for x, t, a in data) / len(data)
    record["reference_losses"] = {"equal scores": uniform, "bin 0 alone": mass, "fitted": fitted}
    print(f"per-head read-outs: loss {record['losses'][0]:.3f} -> {record['losses'][1]:.3f}; over every "
          f"prompt: fitted {fitted:.3f}, bin 0 alone {mass:.3f}, equal scores {uniform:.3f}", flush=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": weights, **record}, out_dir / f"{args.name}.pt")
    (out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    if args.save_namm:
        save_linear_namm(weights[0], saved, args, record)


def fit_bam(args) -> None:
    """One BAM read-out shared by every layer-head (the reference's scorer: each token attends to itself and
    the newer ones), fitted like ``fit-heads --shared`` (Adam, listwise, towards the tokens each head goes
    on reading) on a cached pool's spectral features (``age_dim = 0``: no text age profile), and saved as a
    per-head NAMM that only ranks, ``recent_tokens`` always kept. ``--warm-start``: a linear NAMM's
    spectral weights as the final read-out and a zero output projection, so step 0 scores as it does."""
    from namm_transfer.pipelines.text.evolve_shared import topk_loss
    from namm_transfer.scorers import score_tokens

    torch.set_num_threads(1)
    if not Path(args.cache).exists():
        raise SystemExit(f"{args.cache} does not exist: write the pool with fit-heads --cache {args.cache}")
    saved = torch.load(args.cache)
    raw = pool_features(saved, False, args.cache)  # [rows, S, bins], target, valid, positions
    data = [(x, t, v, a, p) for (x, t, v, p), (_, _, a) in zip(raw, fit_tokens(raw, args.exclude_recent),
                                                             strict=True)]
    config = ranking_config(saved, "bam", args.recent_tokens, age_dim=0)
    shapes = config.shapes
    layout = dict(shapes.layout())
    noise = 0.01 * torch.randn(shapes.n_params, generator=torch.Generator().manual_seed(0))
    chunks = dict(zip(layout, noise.split([torch.Size(v).numel() for v in layout.values()]), strict=True))
    chunks["out_weight"] = torch.zeros_like(chunks["out_weight"])  # the BAM's term starts at zero
    chunks["out_bias"] = torch.zeros_like(chunks["out_bias"])
    chunks["final_bias"] = torch.zeros(1)
    chunks["final_weight"] = torch.zeros(shapes.in_dim)
    if args.warm_start:
        linear = NAMM.from_pretrained(args.warm_start)
        if linear.config.scorer != "linear" or linear.config.n_bins != shapes.in_dim:
            raise SystemExit(f"--warm-start needs a linear NAMM with {shapes.in_dim} bins, got {linear!r}")
        age = linear.config.age_dim
        chunks["final_weight"] = linear.params[0, age: age + shapes.in_dim]
    free = torch.cat([chunks[name] for name in layout])[None].clone().requires_grad_(True)

    def loss_of(params, x, target, valid, allowed, positions):
        scores = score_tokens(params, x[None], valid[None], positions[None], shapes)[0]
        return topk_loss(scores, target, allowed)

    with torch.no_grad():
        start = sum(float(loss_of(free, *d)) for d in data) / len(data)
    opt = torch.optim.Adam([free], lr=args.lr)
    order = torch.Generator().manual_seed(0)
    losses = []
    for step in range(args.steps):
        loss = loss_of(free, *data[int(torch.randint(len(data), (), generator=order))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}: loss {sum(losses[-100:]) / 100:.4f}", flush=True)
    with torch.no_grad():
        fitted = sum(float(loss_of(free, *d)) for d in data) / len(data)
        uniform = equal_loss([(x, t, a) for x, t, _, a, _ in data])
    print(f"BAM read-out over every prompt: fitted {fitted:.3f}, warm start {start:.3f}, equal scores "
          f"{uniform:.3f}", flush=True)
    record = {"steps": args.steps, "lr": args.lr, "exclude_recent": args.exclude_recent,
              "warm_start_namm": args.warm_start, "cache": str(args.cache),
              "reference_losses": {"equal scores": uniform, "warm start": start, "fitted": fitted},
              "losses": [sum(part) / max(1, len(part)) for part in (losses[:50], losses[-50:])],
              "command": shlex.join(["python", *sys.argv])}
    save_fitted_namm(NAMM(config, free.detach().clone(), saved["mean"], saved["var"]), args.save_namm, record)


def text_bins(args) -> None:
    """Each spectral bin alone as the ranking, per task of a cached pool (``fit-heads --cache``): the
    listwise loss at the best of six scales, against equal scores, over the fit's tokens
    (``--exclude-recent``, sinks left out). Which single bin text rewards."""
    torch.set_num_threads(1)
    saved = torch.load(args.cache)
    pool = fit_tokens(pool_features(saved, False, args.cache), args.exclude_recent)
    bins = pool[0][0].shape[-1]
    print(f"{saved['config']['ema_decay']=}: loss per task, each bin alone at its best scale")
    print("| task | equal scores | " + " | ".join(f"bin {k}" for k in range(bins)) + " |")
    tasks = saved.get("tasks", POOL_TASKS)
    for i, task in enumerate(tasks):  # every cut share lists the tasks in this order
        part = [e for j, e in enumerate(pool) if (j // POOL_PROMPTS) % len(tasks) == i]
        cells = [equal_loss(part)] + [alone_loss(part, k) for k in range(bins)]
        print(f"| {task} | " + " | ".join(f"{v:.3f}" for v in cells) + " |", flush=True)


def text_fitness(args) -> None:
    """Whether task fitness on text could teach a read-out bin 0: the shared-prefill engine's fitness
    (``evolve --engine shared-prefill``: answer likelihood and exact match against the full cache, the
    context compressed once to a budget, sinks and a recent window kept) of hand-set read-outs on the text
    pool's training prompts: ``--namm``'s read-out, each of ``--bins`` alone, and equal scores (ties).
    A markdown table per task, normalised to the full cache. ``--ema-decay``: the features' memory
    (default: ``--namm``'s); ``--question-in-prefill``: the eviction after the question instead of before
    it (it reads the question's attention; only the answer is scored after it)."""
    import numpy as np

    from namm_transfer.adapters import attach
    from namm_transfer.pipelines.models import load_named_model
    from namm_transfer.pipelines.text.evolve import EvolveConfig
    from namm_transfer.pipelines.text.evolve_shared import (
        PrefillPool,
        collect_statistics,
        pool_seeds,
        population_fitness,
    )
    from namm_transfer.pipelines.text.tasks import TASKS

    torch.set_num_threads(1)
    source = NAMM.from_pretrained(args.namm)
    if source.config.scorer != "linear":
        raise SystemExit(f"{args.namm} has a {source.config.scorer!r} scorer; text-fitness sets bins of a "
                         "linear read-out (scorer='linear', e.g. smollm2-text-linear)")
    if not all(0 <= k < source.config.n_bins for k in args.bins):
        raise SystemExit(f"--bins must be in 0..{source.config.n_bins - 1}, got {args.bins}")
    cfg = replace(source.config, budget=None)
    if args.ema_decay is not None:
        cfg = replace(cfg, ema_decay=args.ema_decay)
    model, tokenizer = load_named_model("smollm2")
    base = source.params[0].double().numpy()
    readouts = {f"{args.namm} read-out": base}
    for k in args.bins:
        alone = np.zeros_like(base)
        alone[cfg.age_dim + k] = 1.0
        readouts[f"bin {k} alone"] = alone
    readouts["equal scores"] = np.zeros_like(base)
    params = np.stack(list(readouts.values()))
    where = "after the question" if args.question_in_prefill else "before the question"
    command = shlex.join(["python", *sys.argv])
    lines = [f"Text task fitness, one-shot {where}, features' EMA {cfg.ema_decay}, "
             f"{args.prompts} {args.split} prompts per task (normalised to the full cache; `{command}`)", "",
             "| window | budget | read-out | " + " | ".join(POOL_TASKS) + " | mean |",
             "|---|---|---|" + "---|" * (len(POOL_TASKS) + 1)]
    with attach(model, NAMM(cfg)) as handle:
        pool = PrefillPool(model, tokenizer, handle, TASKS, cfg, POOL_LENGTHS,
                           question_in_prefill=args.question_in_prefill)
        entries = {t: [pool.get(t, s) for s in pool_seeds(0, args.split, args.prompts)] for t in POOL_TASKS}
        engine = EvolveConfig()  # the evolve engine's block size and exact-match weight
        norm = collect_statistics([e for part in entries.values() for e in part], cfg)
        for window in args.windows:
            for budget in args.budgets:
                scored = replace(cfg, recent_tokens=window)
                per_task = np.stack([  # [tasks, read-outs]
                    population_fitness(model, part, [budget] * len(part), scored, params, norm,
                                       engine.members_per_batch, engine.em_weight)["fitness"]
                    for part in entries.values()])
                for j, name in enumerate(readouts):
                    cells = [f"{v:.3f}" for v in per_task[:, j]] + [f"{per_task[:, j].mean():.3f}"]
                    lines.append(f"| {window} | {budget:.0%} | {name} | " + " | ".join(cells) + " |")
                print("\n".join(lines[-len(readouts):]), flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def ranking_config(saved: dict, scorer: str, recent_tokens: int, **changes) -> NAMMConfig:
    """The config of a per-head NAMM read off a cached pool: the pool's features and cadence, ``scorer``,
    no threshold (it ranks; capped runs only), ``recent_tokens`` always kept, and ``changes``."""
    return NAMMConfig.from_dict({**saved["config"], "scorer": scorer, "joint_rows": 0,
                                 "joint_reference": "absolute", "recent_tokens": recent_tokens,
                                 "threshold": None, **changes})


def save_linear_namm(weights: torch.Tensor, saved: dict, args, record: dict) -> None:
    """A per-head NAMM (``scorer="linear"``) whose read-out is the shared fitted one: its age weights
    (zero without ``--with-age``), no bias and no threshold (it ranks; capped runs only), the pool's
    feature config and text statistics, ``recent_tokens`` always kept."""
    if not args.shared:
        raise SystemExit("--save-namm needs --shared: a per-head NAMM reads one read-out in every layer-head")
    config = ranking_config(saved, "linear", args.recent_tokens, score_pool=args.score_pool)
    if not args.with_age:  # no age weights
        weights = torch.cat([weights.new_zeros(config.age_dim), weights])
    params = torch.cat([weights, weights.new_zeros(1)])[None]
    save_fitted_namm(NAMM(config, params, saved["mean"], saved["var"]), args.save_namm, record)


def save_fitted_namm(namm: NAMM, directory: str | Path, record: dict) -> None:
    """``namm`` in ``directory`` with a ``training.json``: the run's metadata, the fit (seed 0, Adam, the
    listwise top-10% loss, unless ``record`` names its own ``optimiser`` and ``loss``, as an evolution's
    does) and ``record`` (the script's command, steps, losses)."""
    from namm_transfer.pipelines.common import run_metadata

    out = Path(directory)
    namm.save_pretrained(out)
    meta = {**run_metadata(), "seed": 0, "optimiser": "Adam",
            "loss": "listwise: top 10% of the target, or a bool target's tokens"}
    (out / "training.json").write_text(json.dumps({**meta, **record}, indent=2))
    print(f"wrote {out}: {namm!r}", flush=True)


def grouped_mixed(grouped: torch.Tensor, groups: list[range], mix: float, age_base: float):
    """A stand-in for :func:`joint.head_mixed`: each layer's heads rank by their group's joint score (plus
    ``mix`` times each head's own term of it), z-scored over the tokens held."""

    def mixed_scores(params, scores, features, positions, valid, held, age_dim, _mix):
        out = []
        for g, p in zip(groups, grouped.to(scores.device), strict=True):
            s = joint.joint_scores(p[None], features, positions, valid, age_dim, age_base)
            ranked = joint.head_mixed(p[None], s, features, positions, valid, held, age_dim, mix)
            out.append(ranked[:, g.start : g.stop])
        return torch.cat(out, 1)

    return mixed_scores


def own_mixed(weights: torch.Tensor, mix: float):
    """A stand-in for :func:`joint.head_mixed` whose own term is each layer-head's fitted read-out of its
    own features (``weights`` ``[rows, bins]``, from ``fit-heads``) instead of its term of the joint one."""
    own_params = torch.cat([weights.flatten(), weights.new_zeros(1)])[None]  # own_terms reads [:rows * bins]

    def mixed_scores(params, scores, features, positions, valid, held, age_dim, _mix):
        own = own_params.to(scores.device)
        return joint.head_mixed(own, scores, features, positions, valid, held, age_dim, mix)

    return mixed_scores


def evaluate_video(args) -> None:
    torch.set_num_threads(1)
    namm = NAMM.from_pretrained(VIDEO_NAMM)
    if args.own is not None:  # the shipped joint score, with fitted per-head own terms in the mix
        weights = torch.load(args.own)["weights"].float()
        namm_module.head_mixed = own_mixed(weights, args.head_mix)
        run_capped(namm, args)
        return
    saved = torch.load(args.params)
    grouped, groups = saved["params"].float(), [range(a, b) for a, b in saved["groups"]]
    if args.group is not None:  # one group's read-out for every layer
        if not 0 <= args.group < len(groups):
            raise SystemExit(f"--group {args.group}: {args.params} has groups 0 to {len(groups) - 1}")
        grouped, groups = grouped[args.group : args.group + 1], [range(groups[0].start, groups[-1].stop)]
    if grouped.shape[-1] != namm.params.shape[-1]:
        raise SystemExit(f"{args.params}: {grouped.shape[-1]} parameters per group, the video NAMM has "
                         f"{namm.params.shape[-1]}")
    with torch.no_grad():
        namm.params.copy_(grouped[:1])  # capped, how many it keeps does not read it; which (per layer) does
    namm_module.head_mixed = grouped_mixed(grouped, groups, args.head_mix, namm.config.age_base)
    run_capped(namm, args)


def run_capped(namm: NAMM, args) -> None:
    # head_mix nonzero: every layer ranks on its own scores (the patched head_mixed's)
    run_capped_namm(namm, annotations=args.annotations, limit=args.limit, output_dir=args.output_dir,
                    shard=args.shard, head_mix=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fit = sub.add_parser("fit", help="warm-start a read-out per layer group on the text pool")
    p_fit.add_argument("--groups", type=int, nargs="+", default=[1, 3, 6], help="group counts to fit")
    p_fit.add_argument("--steps", type=int, default=6000, help="Adam steps per group (the shipped recipe's)")
    p_fit.add_argument("--lr", type=float, default=0.003)
    p_fit.add_argument("--out-dir", default="runs/layer_groups")
    p_heads = sub.add_parser("fit-heads", help="fit each layer-head's read-out of its own features on text")
    p_heads.add_argument("--steps", type=int, default=6000, help="Adam steps")
    p_heads.add_argument("--lr", type=float, default=0.01)
    p_heads.add_argument("--out-dir", default="runs/layer_groups")
    p_heads.add_argument("--shared", action="store_true", help="one read-out shared by every layer-head")
    p_heads.add_argument("--name", default="per_head", help="writes NAME.pt and NAME.json")
    p_heads.add_argument("--future", type=float, nargs="+", default=None,
                         help="f: cut each context after its first f share; the target is the attention "
                              "paid by everything after the cut (default: the question and answer's). "
                              "Several: each prompt once per share")
    p_heads.add_argument("--exclude-recent", type=int, default=0,
                         help="W: leave each context's last W positions out of the fit (a window keeps them)")
    p_heads.add_argument("--ema-decay", type=float, default=0.9999,
                         help="the features' per-query EMA decay (0.9999: every query; 0.99: ~the last 100)")
    p_heads.add_argument("--ema-unbiased", action="store_true",
                         help="features divided by the weight of the frames since each token arrived "
                              "(NAMMConfig.ema_unbiased: mean attention, not a sum growing with age)")
    p_heads.add_argument("--with-age", action="store_true",
                         help="fit the read-out's 8 age weights too (the NAMM's age embedding of each token)")
    p_heads.add_argument("--nonneg", action="store_true",
                         help="keep every weight >= 0 (projected Adam): a token's score never falls as any "
                              "band of its attention grows")
    p_heads.add_argument("--tasks", nargs="+", default=list(POOL_TASKS),
                         help="the text pool's tasks (also hop, vartrack, alias)")
    p_heads.add_argument("--model", default="smollm2", choices=tuple(MODELS),
                         help="whose text attention the pool reads (gemma3-270m: the gemma extra's packages)")
    p_heads.add_argument("--save-namm", default=None,
                         help="DIR: also write a per-head linear NAMM of the shared read-out (--shared)")
    p_heads.add_argument("--recent-tokens", type=int, default=61,
                         help="the saved NAMM's recent window (61: H2O's at 15%% of the video tokens)")
    p_heads.add_argument("--score-pool", type=int, default=1,
                         help="K: fit (and save) a read-out of scores averaged over K neighbouring tokens")
    p_heads.add_argument("--cache", default=None,
                         help="a file for the pool's features and targets (written once, then read)")
    p_bam = sub.add_parser("fit-bam", help="fit one shared BAM read-out on a cached text pool, save a NAMM")
    p_bam.add_argument("--cache", required=True, help="a pool written by fit-heads --cache")
    p_bam.add_argument("--steps", type=int, default=3000, help="Adam steps (one prompt each)")
    p_bam.add_argument("--lr", type=float, default=0.003)
    p_bam.add_argument("--exclude-recent", type=int, default=64, help="as fit-heads --exclude-recent")
    p_bam.add_argument("--warm-start", default=None, help="a linear NAMM whose read-out starts the fit")
    p_bam.add_argument("--recent-tokens", type=int, default=61, help="the saved NAMM's recent window")
    p_bam.add_argument("--save-namm", required=True, help="the NAMM's directory (with training.json)")
    p_bins = sub.add_parser("text-bins", help="each bin alone as the ranking, per task of a cached pool")
    p_bins.add_argument("--cache", required=True, help="a pool written by fit-heads --cache")
    p_bins.add_argument("--exclude-recent", type=int, default=64, help="as fit-heads --exclude-recent")
    p_fitness = sub.add_parser("text-fitness", help="text task fitness (one-shot, capped) of set read-outs")
    p_fitness.add_argument("--namm", default="smollm2-text-linear", help="whose read-out and features")
    p_fitness.add_argument("--bins", type=int, nargs="+", default=[0, 1, 2], help="bins scored alone")
    p_fitness.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.25], help="kept shares")
    p_fitness.add_argument("--windows", type=int, nargs="+", default=[61, 32], help="recent windows")
    p_fitness.add_argument("--prompts", type=int, default=POOL_PROMPTS, help="prompts per task")
    p_fitness.add_argument("--split", default="train", choices=["train", "val", "test"])
    p_fitness.add_argument("--ema-decay", type=float, default=None,
                           help="the features' EMA (default: --namm's)")
    p_fitness.add_argument("--question-in-prefill", action="store_true",
                           help="evict after the question (its attention read), not before it")
    p_fitness.add_argument("--out", default=None, help="also write the table to this markdown file")
    p_eval = sub.add_parser("eval", help="15%% progressive on video with one fitted set of read-outs")
    which = p_eval.add_mutually_exclusive_group(required=True)
    which.add_argument("--params", help="a groups{G}.pt written by fit")
    which.add_argument("--own", help="a per_head.pt written by fit-heads: the own terms of the head mix")
    p_eval.add_argument("--group", type=int, default=None, help="K: group K's read-out in every layer")
    p_eval.add_argument("--head-mix", type=float, default=0.0, help="m: each head's own term's weight")
    p_eval.add_argument("--annotations", default="runs/video_qa_128_val216/val.jsonl")
    p_eval.add_argument("--limit", type=int, default=216)
    p_eval.add_argument("--output-dir", required=True)
    p_eval.add_argument("--shard", default="0/1", help="K/N: this process's share of the questions")
    args = parser.parse_args()
    commands = {"fit": fit, "fit-heads": fit_heads, "fit-bam": fit_bam, "text-bins": text_bins,
                "text-fitness": text_fitness, "eval": evaluate_video}
    commands[args.command](args)


if __name__ == "__main__":
    main()
