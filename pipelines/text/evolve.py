"""``namm-transfer evolve``: CMA-ES over a NAMM's parameters on long-context text tasks.

Config -> data -> model -> evaluate, top to bottom (docs/design.md, "The NAMM"):

- Separable CMA-ES (``cmaes.SepCMA``; at ~4k dimensions the full covariance barely adapts), the
  population sampled around the keep-everything initialisation with sigma 0.065.
- Each generation draws fresh training prompts, shared by every member. A member's fitness is, per
  task, its mean score divided by the full-cache model's mean score on the same prompts (full-cache
  results are cached), averaged over the stage's tasks. CMA-ES minimises, so it is told -fitness.
  Optional (our addition, off by default): ``memory_weight`` adds ``memory_weight * (1 - kept
  fraction)``, a pressure to evict that a small model on ~1k-token prompts does not get from the task
  score alone (eviction rarely *helps* it), and ``init_keep_bias`` lowers the starting keep bias so
  the population evicts from the first generation.
- Members are evaluated together: one ``generate()`` over a batch holding the same prompt once per
  member, with one NAMM parameter vector per batch row.
- Stages add tasks; each starts a new CMA-ES from the previous stage's mean. The CMA **mean** is the
  evaluated, logged (``mean_fitness``) and saved solution.
- The feature normalisation statistics are collected on the first keep-everything evaluation (the
  first full-cache pass) and frozen.
- After every generation the whole state (optimizer, its RNG, the full-cache cache, statistics,
  history) is written atomically; ``resume`` continues from it and, with the same seed, follows the
  same trajectory as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.pipelines.common import log, open_tensorboard, run_metadata, set_threads

STATE_NAME, RESULTS_NAME, BEST_DIR = "evolve_state.pkl", "results.jsonl", "namm"


class Example(Protocol):
    prompt_ids: Sequence[int]
    answer: str


class EvolveTask(Protocol):
    """A text task: seeded prompts and a scorer in [0, 1]."""

    name: str

    def make(self, tokenizer: Any, seed: int, prompt_tokens: int) -> Example: ...

    def score(self, generated_text: str, example: Example) -> float: ...


@dataclass
class EvolveConfig:
    """Settings of :func:`run_evolve` (defaults: docs/design.md, "The NAMM", scaled to a 2-core CPU).

    Attributes:
        stages: task names per stage; each stage adds tasks and restarts CMA-ES from the last mean.
        generations: generations per stage.
        population: CMA-ES population size (the reference uses 32).
        sigma: initial step size (reference 0.065).
        prompts_per_task: training prompts per task per generation, shared by all members.
        prompt_tokens: approximate prompt length.
        prompt_lengths: shared-prefill engine: several prompt lengths, one drawn per pool prompt by its
            seed (so that the ranking holds beyond one length); None: ``prompt_tokens`` only.
        max_new_tokens: greedy generation length when scoring; None uses each task's own
            ``max_new_tokens`` (8 when a task has none).
        members_per_batch: members evaluated in one forward (1 = one at a time).
        update_every: NAMM update cadence in tokens (also the prefill chunk).
        seed: seeds CMA-ES and the prompt draws.
        out_dir: where the state, results.jsonl, TensorBoard logs and the NAMM are written.
        resume: continue from ``out_dir``'s saved state.
        device: torch device, e.g. ``cpu`` or ``cuda``.
        dtype: model dtype (float32 is fastest on CPU).
        threads: torch intra-op threads (None: torch's choice; 1 is best beside a busy process).
        scorer: "bam", "mlp" (the ablation) or "joint" (one score per token from every layer-head,
            ``namm_transfer/joint.py``; shared-prefill engine only: a warm start, then CMA-ES over one
            gain per layer-head and the age weights).
        init_keep_bias: final bias of the starting mean (all other parameters zero); the reference's
            keep-everything start is any positive value (1.0 here). Smaller values put the population's
            scores nearer the threshold, so members evict more.
        memory_weight: fitness bonus per unit of evicted fraction (0 = the reference's fitness).
        backend: "local" (in-process, the default) or "ray" (members split over Ray actors, each
            holding one model replica).
        workers: Ray actors (one CPU each) with ``backend="ray"``.
        ray_address: an existing Ray cluster; None starts a local one.
        engine: "shared-prefill" (one-shot protocol: prefill a fixed pool of prompts once, score members
            by their one-shot compression plus one teacher-forced forward; :mod:`.evolve_shared`) or
            "generate" (progressive protocol: every member runs ``generate()`` with eviction every
            ``update_every`` tokens, prompt included; slow, for a last fine-tuning stage).
        budgets: kept fractions of the context drawn per prompt (shared-prefill engine).
        pool_per_task: training prompts per task in the prefilled pool (shared-prefill engine).
        val_per_task: validation prompts per task, scored at every budget.
        val_every: generations between validations of the CMA mean.
        warm_start_steps: Adam steps fitting the BAM to the question's attention (0: no warm start).
        warm_start_lr: its learning rate.
        keep_target: share of a training context the calibrated NAMM keeps in threshold mode.
        em_weight: weight of exact match in a prompt's score (the rest: the likelihood ratio).
        warm_loss: "topk" (cross-entropy towards the oracle's top 10% tokens), "rank" (correlation
            with the log attention share) or "evidence" (cross-entropy towards every fact token of the
            prompt and the first 4 tokens: question-agnostic); see :mod:`.evolve_shared`.
        ema_decay: per-query decay of the NAMM's spectrogram EMA (the reference's 0.99).
        sink_tokens: each member always keeps every sample's first ``sink_tokens`` tokens (attention
            sinks; saved in the NAMM's config). 0 (the reference) lets evolution evict the sink, which
            it learns to exploit on passkey and which wrecks transfer to video (see
            benchmarks/results/eval_text_smollm2-text_sinks4/README.md).
        joint_reference: what a joint NAMM's threshold is measured from (``NAMMConfig.joint_reference``):
            "absolute" or "fresh-median" (the median score of the tokens fed since the last update, so
            that one threshold keeps about as much of a context compressed once as of one compressed
            every ``update_every`` tokens). The final bias is calibrated with it.
    """

    # Three stages as in the reference (retrieval, + a QA-like task, + a natural-text task). vartrack is
    # left out: full-cache SmolLM2 scores below chance on it (benchmarks/results/text_tasks_full_cache.md).
    stages: list[list[str]] = field(
        default_factory=lambda: [["passkey"], ["passkey", "kv"], ["passkey", "kv", "docs"]]
    )
    generations: int = 10
    population: int = 8
    sigma: float = 0.065
    prompts_per_task: int = 2
    prompt_tokens: int = 1024
    prompt_lengths: list[int] | None = None
    max_new_tokens: int | None = None
    members_per_batch: int = 8
    update_every: int = 256
    seed: int = 0
    out_dir: str = "runs/evolve"
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    scorer: str = "bam"
    init_keep_bias: float = 1.0
    memory_weight: float = 0.0
    backend: str = "local"
    workers: int = 2
    ray_address: str | None = None
    engine: str = "generate"
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    pool_per_task: int = 24
    val_per_task: int = 8
    val_every: int = 2
    warm_start_steps: int = 0
    warm_start_lr: float = 3e-3
    keep_target: float = 0.4
    em_weight: float = 0.5
    warm_loss: str = "topk"
    ema_decay: float = 0.99
    sink_tokens: int = 0
    joint_reference: str = "absolute"

    def namm_config(self, joint_rows: int = 0) -> NAMMConfig:
        """The members' NAMM config. A joint scorer's needs the model's layers x KV heads
        (``joint_rows``); without them: the per-head config whose features it reads."""
        scorer = "bam" if self.scorer == "joint" and not joint_rows else self.scorer
        return NAMMConfig(
            update_every=self.update_every, scorer=scorer, init_keep_bias=self.init_keep_bias,
            ema_decay=self.ema_decay, sink_tokens=self.sink_tokens,
            joint_rows=joint_rows if scorer == "joint" else 0,
            joint_reference=self.joint_reference if scorer == "joint" else "absolute",
        )

    def __post_init__(self) -> None:
        if self.population < 2 or self.generations < 1 or self.prompts_per_task < 1:
            raise ValueError("need population >= 2, generations >= 1 and prompts_per_task >= 1")
        if self.memory_weight < 0:
            raise ValueError(f"memory_weight must be >= 0, got {self.memory_weight}")
        if self.scorer == "joint" and self.engine != "shared-prefill":
            raise ValueError("scorer='joint' needs engine='shared-prefill'")
        if self.engine not in ("generate", "shared-prefill"):
            raise ValueError(f"unknown engine {self.engine!r}; use 'shared-prefill' or 'generate'")
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be kept fractions in (0, 1], got {self.budgets}")


# ---------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Evaluation:
    """Scores ``[members, examples]``, mean kept fraction per member, and for the last member on the
    last example: kept fraction per layer and a retention map ``[layers, tokens]`` (share of KV heads
    still holding each token at the end)."""

    scores: np.ndarray
    kept: np.ndarray
    kept_per_layer: list[float] = field(default_factory=list)
    retention: np.ndarray | None = None


@dataclass
class NAMMFactory:
    """Builds the NAMM for a block of member parameter vectors (picklable, for Ray workers)."""

    config: NAMMConfig
    norm_mean: np.ndarray | None = None
    norm_var: np.ndarray | None = None

    def __call__(self, block: torch.Tensor) -> NAMM:
        return NAMM(self.config, block, _t(self.norm_mean), _t(self.norm_var))


class LocalEvaluator:
    """Evaluates NAMM parameter vectors in-process on one model replica."""

    def __init__(self, model, tokenizer, cfg: EvolveConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg

    @torch.no_grad()
    def run(
        self, namm_factory: Callable[[torch.Tensor], Any], params: np.ndarray, examples, tasks
    ) -> Evaluation:
        """Score every parameter vector (rows of ``params``) on every example."""
        from namm_transfer.adapters import attach

        n_members = params.shape[0]
        kept_per_layer, retention = [], None
        scores = np.zeros((n_members, len(examples)))
        kept = np.zeros((n_members, len(examples)))
        step = max(1, self.cfg.members_per_batch)
        for e, (task, example) in enumerate(zip(tasks, examples, strict=True)):
            ids = torch.tensor([list(example.prompt_ids)], device=self.cfg.device)
            for start in range(0, n_members, step):
                block = torch.as_tensor(params[start : start + step], dtype=torch.float32)
                batch = ids.expand(block.shape[0], -1)
                policy = namm_factory(block)
                with attach(self.model, policy, prefill_chunk=self.cfg.update_every) as handle:
                    out = self.model.generate(
                        input_ids=batch,
                        attention_mask=torch.ones_like(batch),
                        do_sample=False,
                        max_new_tokens=self.cfg.max_new_tokens or getattr(task, "max_new_tokens", 8),
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                    stats = handle.stats()
                    per_sample = _kept_per_sample(stats)
                    if start + block.shape[0] == n_members and e == len(examples) - 1:
                        last = block.shape[0] - 1
                        kept_per_layer = _kept_per_layer(stats, last)
                        retention = handle.memory_report().retention(last, stats["tokens_seen"]).numpy()
                texts = self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
                for i, text in enumerate(texts):
                    scores[start + i, e] = task.score(text.strip(), example)
                    kept[start + i, e] = per_sample[i]
        return Evaluation(scores, kept.mean(axis=1), kept_per_layer, retention)

    def full_cache(self, namm_cfg: NAMMConfig, examples, tasks, collect: bool):
        """Full-cache scores ``[examples]``; with ``collect``, the pass is a keep-everything NAMM that
        also returns the frozen feature statistics ``(mean, var)``, else ``None``."""
        from namm_transfer.policies import FullCache

        keep_all = NAMM(namm_cfg)
        policy = keep_all if collect else FullCache()
        context = keep_all.collecting_statistics() if collect else contextlib.nullcontext()
        with context:
            ev = self.run(lambda block: policy, keep_all.params.numpy(), examples, tasks)
        stats = (keep_all.norm_mean.numpy(), keep_all.norm_var.numpy()) if collect else None
        return ev.scores[0], stats

    def close(self) -> None:
        pass


class _EvaluatorActor:
    """A Ray actor holding one model replica (built by ``model_factory`` inside the worker)."""

    def __init__(self, model_factory: Callable[[], tuple[Any, Any]], cfg: EvolveConfig):
        torch.set_num_threads(1)
        model, tokenizer = model_factory()
        self.local = LocalEvaluator(model, tokenizer, cfg)

    def run(self, factory, params, examples, tasks) -> Evaluation:
        return self.local.run(factory, params, examples, tasks)

    def full_cache(self, namm_cfg, examples, tasks, collect):
        return self.local.full_cache(namm_cfg, examples, tasks, collect)


class RayEvaluator:
    """Evaluates members on Ray actors, each holding one model replica; members are split evenly.

    Args:
        model_factory: picklable callable returning ``(model, tokenizer)``, run inside each worker.
        cfg: the evolution config.
        workers: number of actors (one CPU each).
        address: a running Ray cluster's address; None starts a local one.
        runtime_env: passed to ``ray.init`` when a local cluster is started.
    """

    def __init__(
        self,
        model_factory,
        cfg: EvolveConfig,
        workers: int = 2,
        address: str | None = None,
        runtime_env: dict | None = None,
    ):
        try:
            import ray
        except ImportError as err:
            raise ImportError("--backend ray needs Ray: pip install 'namm-transfer[distributed]'") from err
        self.ray = ray
        if not ray.is_initialized():
            ray.init(
                address=address,
                num_cpus=None if address else workers,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env=runtime_env,
            )
        actor = ray.remote(num_cpus=1)(_EvaluatorActor)
        self.actors = [actor.remote(model_factory, cfg) for _ in range(workers)]

    def run(self, factory, params: np.ndarray, examples, tasks) -> Evaluation:
        parts = [idx for idx in np.array_split(np.arange(params.shape[0]), len(self.actors)) if len(idx)]
        actors = self.actors[: len(parts)]
        futures = [
            a.run.remote(factory, params[idx], examples, tasks) for a, idx in zip(actors, parts, strict=True)
        ]
        results = self.ray.get(futures)
        return Evaluation(
            np.concatenate([r.scores for r in results]),
            np.concatenate([r.kept for r in results]),
            results[-1].kept_per_layer,
            results[-1].retention,
        )

    def full_cache(self, namm_cfg, examples, tasks, collect):
        return self.ray.get(self.actors[0].full_cache.remote(namm_cfg, examples, tasks, collect))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


def _kept_per_sample(stats: dict) -> list[float]:
    """Mean kept fraction per batch row (over layers and KV heads)."""
    seen = max(stats["tokens_seen"], 1)
    layers = stats["kept_tokens_per_layer"]
    n_rows = len(layers[0])
    return [float(np.mean([np.mean(layer[row]) for layer in layers]) / seen) for row in range(n_rows)]


def _kept_per_layer(stats: dict, row: int) -> list[float]:
    seen = max(stats["tokens_seen"], 1)
    return [float(np.mean(layer[row]) / seen) for layer in stats["kept_tokens_per_layer"]]


def task_fitness(scores: np.ndarray, full: np.ndarray, task_of: Sequence[str]) -> np.ndarray:
    """Per member: mean over tasks of (member's mean score / full cache's mean score), same prompts.

    A task on which the full cache scored 0 everywhere says nothing about memory and is skipped.
    """
    names = sorted(set(task_of))
    ratios = []
    for name in names:
        cols = [i for i, t in enumerate(task_of) if t == name]
        reference = full[cols].mean()
        if reference > 0:
            ratios.append(scores[:, cols].mean(axis=1) / reference)
    if not ratios:
        return np.zeros(scores.shape[0])
    return np.mean(ratios, axis=0)


# ---------------------------------------------------------------------------------------------------
# state


@dataclass
class EvolveState:
    stage: int = 0
    generation: int = 0  # within the stage
    total_generations: int = 0
    mean: np.ndarray | None = None
    optimizer: Any = None  # ResumableSepCMA: pickles with its RNG
    optimizer_rng: Any = None  # only in checkpoints written before ResumableSepCMA
    full_cache: dict = field(default_factory=dict)  # (task, seed) -> full-cache score
    norm_mean: np.ndarray | None = None
    norm_var: np.ndarray | None = None
    elapsed_s: float = 0.0


def save_state(state: EvolveState, out_dir: Path) -> None:
    """Atomic: write a temporary file, then rename over the previous state."""
    tmp = out_dir / (STATE_NAME + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
    os.replace(tmp, out_dir / STATE_NAME)


def load_state(out_dir: Path) -> EvolveState:
    path = out_dir / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no saved state at {path}")
    with open(path, "rb") as f:
        state: EvolveState = pickle.load(f)
    if state.optimizer is not None:
        from namm_transfer.pipelines.text.cma import ResumableSepCMA

        state.optimizer = ResumableSepCMA.upgrade(state.optimizer, state.optimizer_rng)
        state.optimizer_rng = None
    return state


def draw_examples(
    tasks: dict[str, EvolveTask], names: Sequence[str], tokenizer, cfg: EvolveConfig, generation: int
) -> tuple[list, list[str], list[int]]:
    """Fresh training prompts for a generation, shared by all members; deterministic in (seed, generation)."""
    rng = random.Random(f"{cfg.seed}-{generation}")
    examples, task_of, seeds = [], [], []
    for name in names:
        for _ in range(cfg.prompts_per_task):
            seed = train_seed(rng)
            examples.append(tasks[name].make(tokenizer, seed, cfg.prompt_tokens))
            task_of.append(name)
            seeds.append(seed)
    return examples, task_of, seeds


def train_seed(rng: random.Random) -> int:
    """Training prompts use seeds in [0, 10^6); validation and test splits use seeds above that."""
    return rng.randrange(0, 1_000_000)


# ---------------------------------------------------------------------------------------------------
# the job


def run_evolve(
    cfg: EvolveConfig,
    tasks: dict[str, EvolveTask],
    model=None,
    tokenizer=None,
    evaluator=None,
    max_total_generations: int | None = None,
    argv: Sequence[str] | None = None,
) -> EvolveState:
    """Run (or resume) the evolution; returns the final state. ``max_total_generations`` stops early
    (as a kill would) after that many generations in total, for tests. Every start (and resume) appends
    its command line, git revision and versions to ``out_dir/runs.jsonl``."""
    try:
        from namm_transfer.pipelines.text.cma import ResumableSepCMA
    except ImportError as err:
        raise ImportError("evolution needs the `cmaes` package: pip install 'namm-transfer[evolve]'") from err
    from tqdm.auto import tqdm

    set_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = sorted({t for stage in cfg.stages for t in stage} - set(tasks))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {sorted(tasks)}")
    if model is None:
        model, tokenizer = load_model(cfg.device, cfg.dtype)
    if cfg.engine == "shared-prefill":
        from namm_transfer.pipelines.text.evolve_shared import run_evolve_shared

        return run_evolve_shared(cfg, tasks, model, tokenizer, argv=argv)
    if evaluator is None and cfg.backend == "ray":
        evaluator = RayEvaluator(functools.partial(load_model, cfg.device, cfg.dtype), cfg, cfg.workers,
                                 cfg.ray_address)
    elif evaluator is None and cfg.backend != "local":
        raise ValueError(f"unknown backend {cfg.backend!r}; use 'local' or 'ray'")
    evaluator = evaluator or LocalEvaluator(model, tokenizer, cfg)
    namm_cfg = cfg.namm_config()

    state = load_state(out_dir) if cfg.resume else EvolveState()
    if not cfg.resume:
        (out_dir / RESULTS_NAME).unlink(missing_ok=True)
        (out_dir / "runs.jsonl").unlink(missing_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    with open(out_dir / "runs.jsonl", "a") as f:
        f.write(json.dumps({**run_metadata(argv), "resume": cfg.resume}) + "\n")
    if state.mean is None:
        state.mean = NAMM(namm_cfg).params[0].numpy().astype(np.float64)
    writer = open_tensorboard(out_dir)
    total = cfg.generations * len(cfg.stages)
    bar = tqdm(total=total, initial=state.total_generations, desc="evolve", unit="gen")
    started = time.perf_counter() - state.elapsed_s

    while state.stage < len(cfg.stages):
        names = cfg.stages[state.stage]
        if state.optimizer is None:
            state.optimizer = ResumableSepCMA(
                mean=state.mean.copy(),
                sigma=cfg.sigma,
                population_size=cfg.population,
                seed=cfg.seed + 1000 * state.stage,
            )
        opt = state.optimizer
        while state.generation < cfg.generations:
            if max_total_generations is not None and state.total_generations >= max_total_generations:
                bar.close()
                return state
            examples, task_of, seeds = draw_examples(tasks, names, tokenizer, cfg, state.total_generations)
            full = _full_cache_scores(state, evaluator, namm_cfg, examples, task_of, seeds, tasks)
            members = [opt.ask() for _ in range(cfg.population)]
            params = np.stack(members + [opt.mean])  # last row: the CMA mean, the shipped solution

            factory = NAMMFactory(namm_cfg, state.norm_mean, state.norm_var)
            evaluation = evaluator.run(factory, params, examples, [tasks[t] for t in task_of])
            score_ratio = task_fitness(evaluation.scores, full, task_of)
            fitness = score_ratio + cfg.memory_weight * (1.0 - evaluation.kept)
            opt.tell([(x, -float(f)) for x, f in zip(members, fitness[:-1], strict=True)])
            state.mean = opt.mean.copy()
            record = {
                "stage": state.stage,
                "generation": state.generation,
                "total_generation": state.total_generations,
                "tasks": names,
                "fitness_mean": float(fitness[:-1].mean()),
                "fitness_best": float(fitness[:-1].max()),
                "mean_fitness": float(fitness[-1]),
                "mean_score_ratio": float(score_ratio[-1]),
                "population_score_ratio": float(score_ratio[:-1].mean()),
                "mean_kept_fraction": float(evaluation.kept[-1]),
                "population_kept_fraction": float(evaluation.kept[:-1].mean()),
                "sigma": opt.sigma,
                "full_cache_score": float(full.mean()),
                "seconds": time.perf_counter() - started,
            }
            record["kept_per_layer"] = evaluation.kept_per_layer
            _log(out_dir, writer, record, evaluation.retention)
            state.generation += 1
            state.total_generations += 1
            state.elapsed_s = time.perf_counter() - started
            save_state(state, out_dir)
            NAMM(
                namm_cfg,
                torch.as_tensor(state.mean, dtype=torch.float32),
                _t(state.norm_mean),
                _t(state.norm_var),
            ).save_pretrained(out_dir / BEST_DIR)
            bar.update(1)
            bar.set_postfix(
                fitness=f"{record['mean_fitness']:.3f}", kept=f"{record['mean_kept_fraction']:.2f}"
            )
        state.stage += 1
        state.generation = 0
        state.optimizer = None
        save_state(state, out_dir)
    bar.close()
    evaluator.close()
    if writer is not None:
        writer.close()
    log(f"evolution finished: {state.total_generations} generations, NAMM (CMA mean) in {out_dir / BEST_DIR}")
    return state


def load_model(device: str, dtype: str):
    """SmolLM2-135M-Instruct and its tokenizer (also what each Ray worker runs)."""
    from namm_transfer.pipelines.common import parse_dtype
    from namm_transfer.pipelines.models import load_smollm2

    return load_smollm2(device=device, dtype=parse_dtype(dtype))


def _t(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.tensor(np.asarray(array), dtype=torch.float32)  # a copy


def _full_cache_scores(
    state: EvolveState, evaluator, namm_cfg: NAMMConfig, examples, task_of, seeds, tasks
) -> np.ndarray:
    """Full-cache score of each example, cached by (task, seed). The first pass is a keep-everything
    NAMM collecting the feature statistics, which are then frozen for the rest of the run."""
    missing = [i for i, key in enumerate(zip(task_of, seeds, strict=True)) if key not in state.full_cache]
    if missing:
        collect = state.norm_mean is None
        scores, stats = evaluator.full_cache(
            namm_cfg, [examples[i] for i in missing], [tasks[task_of[i]] for i in missing], collect
        )
        if collect:
            state.norm_mean, state.norm_var = stats
        for j, i in enumerate(missing):
            state.full_cache[(task_of[i], seeds[i])] = float(scores[j])
    return np.array([state.full_cache[key] for key in zip(task_of, seeds, strict=True)])


def _log(out_dir: Path, writer, record: dict, retention: np.ndarray | None) -> None:
    with open(out_dir / RESULTS_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        step = record["total_generation"]
        for key in (
            "fitness_mean",
            "fitness_best",
            "mean_fitness",
            "mean_score_ratio",
            "population_score_ratio",
            "sigma",
            "mean_kept_fraction",
            "population_kept_fraction",
            "full_cache_score",
        ):
            writer.add_scalar(f"evolve/{key}", record[key], step)
        for layer, fraction in enumerate(record["kept_per_layer"]):
            writer.add_scalar(f"kept_fraction_per_layer/{layer:02d}", fraction, step)
        if retention is not None:  # rows: layers, columns: token position; white = kept by every head
            writer.add_image("retention/cma_mean", retention[None], step, dataformats="CHW")
        writer.flush()
