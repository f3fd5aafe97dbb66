"""``namm-transfer demo``: the text-evolved NAMM on a passkey prompt and, zero-shot, on a DT's rollouts.

1. Text: one passkey prompt on SmolLM2 with the full cache, then the NAMM; measures how many tokens
   the NAMM kept per layer (mean over samples and KV heads) and gives each baseline exactly that
   per-layer budget (docs/design.md, "Baselines").
2. Rollouts (when gymnasium is installed, the ``rl`` extra): a few episodes of the shipped
   ``lunarlander-expert`` Decision Transformer with the whole episode in cache, with the same NAMM
   applied zero-shot (every 30 tokens = 10 env steps), and with Recency at the NAMM's budget
   (``namm-transfer eval-rollout`` is the full comparison).
3. Video QA (when decord and PyAV are installed, the ``video`` extra): the first test samples of the
   synthetic video-QA set (generated with the shipped ``smollm2-shapes`` model's data settings) on that
   model with the full cache, the same NAMM zero-shot (every 32 tokens, capped at 64 tokens per layer
   and KV head), Recency at its budget and a uniform frame subset of the same size
   (``namm-transfer eval-video`` is the full comparison).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from namm_transfer.pipelines.common import (
    log,
    markdown_table,
    parse_dtype,
    run_metadata,
    set_threads,
    write_json,
)
from namm_transfer.pipelines.harness import matched_budget
from namm_transfer.pipelines.models import load_smollm2
from namm_transfer.pipelines.text.passkey import PasskeyExample, make_passkey_example, score


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`.

    Attributes:
        prompt_tokens: passkey prompt length in tokens (chat template included).
        seed: seed of the passkey prompt (the key).
        depth: where the key sits in the filler, 0 (start) to 1 (end).
        max_new_tokens: tokens generated after the answer prefix.
        device: torch device.
        dtype: model dtype name (float32 is fastest on CPU).
        update_every: the NAMM's cadence on the passkey prompt, in tokens, and the chunks the prompt is fed
            in (every policy then evicts at the same points, during the prompt too); None: the NAMM's own.
        namm: the NAMM on the passkey prompt: a shipped NAMM's short name, a checkpoint directory or a
            Hub id; the default is ``smollm2-text-joint`` (trained on SmolLM2, reading every layer-head
            at once). ``"random"`` uses an untrained ``NAMM.init_random(namm_seed)`` with feature
            statistics collected on a calibration prompt (it keeps almost everything unless given
            ``namm_budget``).
        transfer_namm: the NAMM applied zero-shot to the Decision Transformer and the video model: a
            per-layer-head NAMM (a joint one is tied to the layer-heads of the model it was trained on).
        namm_seed: seed of that random NAMM.
        namm_budget: optional hard cap on the tokens the NAMM keeps per layer and KV head (top-k by
            score; None or 0: the NAMM's own threshold decides).
        output_dir: where ``demo.json`` is written.
        threads: torch intra-op threads (None leaves torch's default).
        cache_dir: converted-model cache directory (None: the default, see ``models.py``).
        rollout_dt: shipped DT (or directory) for the rollout comparison.
        rollout_episodes: episodes per policy in the rollout comparison (0 skips it).
        rollout_update_every: the NAMM's cadence on the DT, in tokens (3 per env step).
        video_model: shipped video model (or ``train-video-model`` directory) for the video-QA comparison.
        video_samples: test samples in the video-QA comparison (0 skips it).
        video_update_every: the NAMM's cadence (and prefill chunk) on the video prompts, in tokens.
        video_namm_budget: hard cap on the tokens the NAMM keeps per layer and KV head on the video
            prompts (None: uncapped; the text-evolved NAMM then keeps every token of these ~170-token
            prompts).
    """

    prompt_tokens: int = 1024
    seed: int = 0
    depth: float = 0.5
    max_new_tokens: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    update_every: int | None = None
    namm: str = "smollm2-text-joint"
    transfer_namm: str = "smollm2-text"
    namm_seed: int = 0
    namm_budget: int | None = None
    output_dir: str = "runs/demo"
    threads: int | None = None
    cache_dir: str | None = None
    rollout_dt: str = "lunarlander-expert"
    rollout_episodes: int = 6
    rollout_update_every: int = 30
    video_model: str = "smollm2-shapes"
    video_samples: int = 8
    video_update_every: int = 32
    video_namm_budget: int | None = 64


def load_namm(source: str | None, seed: int = 0, budget: int | None = None):
    """A trained NAMM (short name, path or Hub id), or an untrained ``NAMM.init_random(seed)`` when
    ``source`` is None or ``"random"``.

    ``budget`` (if given) caps the tokens kept per layer and KV head.
    """
    from namm_transfer import NAMM

    namm = NAMM.init_random(seed=seed) if source in (None, "random") else NAMM.from_pretrained(source)
    return namm if budget is None else namm.with_budget(budget)


def calibrate_namm(model, tokenizer, namm, cfg: DemoConfig) -> None:
    """Freeze the NAMM's feature statistics on a keep-everything run over another prompt (the reference
    collects them on its first, keep-everything evaluation); without them an untrained NAMM's spectral
    features are ~1e-2 and it decides on token age alone."""
    from namm_transfer.adapters import attach

    calibration = make_passkey_example(tokenizer, cfg.seed + 10_000, cfg.prompt_tokens, cfg.depth)
    ids = torch.tensor([calibration.prompt_ids], device=cfg.device)
    log("collecting the NAMM's feature statistics on a calibration prompt ...")
    with torch.no_grad(), namm.collecting_statistics(), attach(model, namm, prefill_chunk=cfg.update_every):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)


def run_policy(
    model, tokenizer, example: PasskeyExample, name: str, policy, cfg: DemoConfig
) -> dict[str, Any]:
    """Generate with ``policy`` attached; the result row (answer, correctness, cache size, time)."""
    from namm_transfer.adapters import attach

    ids = torch.tensor([example.prompt_ids], device=cfg.device)
    log(f"running {name} ...")
    with attach(model, policy, prefill_chunk=cfg.update_every) as handle:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
        stats = handle.stats()
        memory = handle.memory_report().sample(0)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    row = {
        "policy": name,
        "answer": answer,
        "correct": score(answer, example.answer),
        "kept_fraction": stats["kept_fraction"],
        "stored_kv_mib": stats["stored_kv_bytes"] / 2**20,
        "full_kv_mib": stats["full_kv_bytes"] / 2**20,
        "seconds": seconds,
        "stats": stats,
        **memory,  # kept_per_layer, since_update: what the baselines' budget is measured from
    }
    log(f"{name}: {answer!r} ({'correct' if row['correct'] else 'wrong'}), kept {row['kept_fraction']:.1%}, "
        f"{seconds:.1f} s")
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The demo's result table in markdown."""
    headers = ["policy", "answer", "correct?", "mean kept fraction", "stored KV MiB", "seconds"]
    body = [
        [r["policy"], repr(r["answer"]), "yes" if r["correct"] else "no", f"{r['kept_fraction']:.3f}",
         f"{r['stored_kv_mib']:.2f}", f"{r['seconds']:.1f}"]
        for r in rows
    ]
    return markdown_table(headers, body)


def run_demo(cfg: DemoConfig, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the demo: prints the table to stdout, writes ``<output_dir>/demo.json``, returns the rows."""
    from namm_transfer.policies import BASELINES, FULL_CACHE, NAMM_NAME, build_policy

    set_threads(cfg.threads)
    total = time.perf_counter()
    log("loading SmolLM2-135M-Instruct ...")
    model, tokenizer = load_smollm2(device=cfg.device, dtype=parse_dtype(cfg.dtype), cache_dir=cfg.cache_dir)
    example = make_passkey_example(tokenizer, cfg.seed, cfg.prompt_tokens, cfg.depth)
    log(f"passkey prompt: {example.num_tokens} tokens, key {example.answer} at depth {example.depth:.2f}")

    namm = load_namm(cfg.namm, cfg.namm_seed, cfg.namm_budget or None)
    if cfg.update_every is None:
        cfg = replace(cfg, update_every=namm.update_every)
    namm = namm.replace(update_every=cfg.update_every)
    if namm.norm_mean is None:
        calibrate_namm(model, tokenizer, namm, cfg)
    out = Path(cfg.output_dir) / "demo.json"
    record: dict[str, Any] = {
        "config": asdict(cfg),
        "meta": run_metadata(argv),
        "example": {"tokens": example.num_tokens, "answer": example.answer, "depth": example.depth,
                    "seed": example.seed, "needle_span": list(example.needle_span)},
        "namm": repr(namm),
        "rows": [],
    }
    rows = record["rows"]

    def add(name: str, policy) -> None:  # results are written after every policy: nothing finished is lost
        rows.append(run_policy(model, tokenizer, example, name, policy, cfg))
        write_json(out, record)

    add(FULL_CACHE, build_policy(FULL_CACHE))
    add(NAMM_NAME, build_policy(NAMM_NAME, namm))
    record["namm_kept_per_layer"] = [max(1, round(k)) for k in rows[-1]["kept_per_layer"]]
    budget = matched_budget(rows[-1:])
    record["budget_per_layer"] = budget
    log(f"NAMM kept per layer (mean over heads): {record['namm_kept_per_layer']}")
    log(f"baseline budget per layer (less the tokens added since the last update): {budget}")
    every = namm.update_every
    for name in BASELINES:  # every registered baseline at the NAMM's measured budget
        add(name, build_policy(name, budget=budget, update_every=every, seed=cfg.seed))
    print(format_rows(rows))
    if cfg.rollout_episodes > 0:
        record["rollouts"] = run_rollouts(cfg)
        write_json(out, record)
    if cfg.video_samples > 0:
        record["video"] = run_video(cfg)
        write_json(out, record)
    log(f"wrote {out}; total {time.perf_counter() - total:.1f} s")
    return rows


def run_rollouts(cfg: DemoConfig) -> dict[str, Any] | None:
    """Full cache vs the NAMM (zero-shot) vs Recency at its budget on a shipped DT; prints a table."""
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        log("rollout comparison skipped: gymnasium is not installed (pip install 'namm-transfer[rl]')")
        return None
    from namm_transfer import NAMM
    from namm_transfer.envs import make_env
    from namm_transfer.pipelines.rl import evaluate as er
    from namm_transfer.pipelines.rl.models import load_dt
    from namm_transfer.policies import FULL_CACHE, NAMM_NAME, build_policy

    dt = load_dt(cfg.rollout_dt, device=cfg.device)
    env_id = dt.env_id
    try:  # gymnasium alone is not enough: box2d / mujoco environments need their own packages
        make_env(env_id).close()
    except ImportError as error:
        log(f"rollout comparison skipped: {error}")
        return None
    seeds = list(range(cfg.seed, cfg.seed + cfg.rollout_episodes))
    normalise = er.reference_normaliser(dt, env_id, None)
    namm = NAMM.from_pretrained(cfg.transfer_namm).replace(update_every=cfg.rollout_update_every)
    log(f"rollouts: {cfg.rollout_dt} on {env_id}, {len(seeds)} episodes per policy ...")
    rows = []
    for name in (FULL_CACHE, NAMM_NAME):
        rows += er.rollout_batch(dt, name, build_policy(name, namm), env_id, seeds, dt.target_return, None,
                                 plot=False, progress=False).rows
    budget = matched_budget([r for r in rows if r["policy"] == NAMM_NAME])
    recency = build_policy("Recency", budget=budget, update_every=cfg.rollout_update_every, seed=cfg.seed)
    rows += er.rollout_batch(dt, "Recency", recency, env_id, seeds, dt.target_return, None, plot=False,
                                 progress=False).rows
    for row in rows:
        row["normalised"] = float(normalise(row["return"])) if normalise else float("nan")
    summary = er.summarise(rows)
    print(f"\nDecision Transformer {cfg.rollout_dt} on {env_id}, {len(seeds)} episodes "
          f"(Recency at the NAMM's per-layer budget {budget}):")
    print(er.summary_table(summary))
    return {"dt": cfg.rollout_dt, "env": env_id, "seeds": seeds, "budget": budget, "summary": summary}


VIDEO_POLICIES = ("FullCache", "NAMM", "Recency", "UniformFrames")


def run_video(cfg: DemoConfig) -> dict[str, Any] | None:
    """Full cache vs the NAMM (zero-shot) vs Recency and uniform frames at its budget on the first
    ``video_samples`` test samples of the shipped video model's task; prints a table."""
    try:
        import av  # noqa: F401
        import decord  # noqa: F401
    except ImportError:
        log("video comparison skipped: decord / PyAV are not installed (pip install 'namm-transfer[video]')")
        return None
    from namm_transfer.pipelines.video.evaluate import EvalVideoConfig, run_eval_video
    from namm_transfer.pipelines.video.models import video_model_dir, video_model_meta
    from namm_transfer.pipelines.video.qa_data import VideoQAConfig, make_video_qa

    try:
        video_model_dir(cfg.video_model)
    except FileNotFoundError as error:
        log(f"video comparison skipped: {error}")
        return None
    meta = video_model_meta(cfg.video_model)
    data_dir = Path(cfg.output_dir) / "video_qa"
    log(f"video QA: {cfg.video_samples} test videos of {cfg.video_model}'s task ...")
    make_video_qa(VideoQAConfig(out_dir=str(data_dir), train=0, val=0, test=cfg.video_samples,
                                **meta["data"]["settings"]))
    namm = cfg.transfer_namm
    eval_cfg = EvalVideoConfig(
        annotations=str(data_dir / "test.jsonl"), model=cfg.video_model, namm=namm,
        namm_budget=cfg.video_namm_budget or None, update_every=cfg.video_update_every,
        policies=list(VIDEO_POLICIES), heatmaps=1,
        output_dir=str(Path(cfg.output_dir) / "video"), device=cfg.device, dtype=cfg.dtype,
    )
    cap = f", capped at {cfg.video_namm_budget} tokens" if cfg.video_namm_budget else ""
    print(f"\nVideo QA on {cfg.video_model}, {cfg.video_samples} test samples (NAMM {namm} zero-shot{cap}, "
          f"every {cfg.video_update_every} tokens; Recency and uniform frames at its budget):")
    summary = run_eval_video(eval_cfg)
    return {"model": cfg.video_model, "samples": cfg.video_samples, "output_dir": eval_cfg.output_dir,
            "summary": summary}
