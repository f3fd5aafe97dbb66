"""The ``namm-transfer`` command line.

Subcommands mirror the pipeline config dataclasses: ``demo`` (:class:`DemoConfig`) and
``bench overhead`` (:class:`OverheadConfig`). ``bench`` is a nested group so more benchmarks can join it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from namm_transfer.pipelines.bench import OverheadConfig
from namm_transfer.pipelines.demo import DemoConfig
from namm_transfer.pipelines.eval_text import EvalTextConfig
from namm_transfer.pipelines.evolve import EvolveConfig


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
                    "mean kept fraction | stored KV MiB | seconds) and writes OUTPUT_DIR/demo.json.",
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
    _add_model_args(demo, d)
    demo.set_defaults(handler=_run_demo)

    _add_evolve(sub)
    _add_eval_text(sub)
    _add_export(sub)

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


def _add_eval_text(sub) -> None:
    c = EvalTextConfig()
    ev = sub.add_parser(
        "eval-text", formatter_class=_Formatter,
        help="a NAMM vs full cache and baselines at its budget, on the text tasks' test split",
        description="Run SmolLM2-135M-Instruct on the test split of each text task with the full cache, the "
                    "NAMM, and Recency, H2O, L2Norm and RandomEviction given the NAMM's measured per-layer "
                    "budget. Reports per task the normalised score (score / full-cache score on the same "
                    "prompts) and the mean kept fraction. Appends every prompt's result to "
                    "OUTPUT_DIR/rows.jsonl and skips finished ones on a rerun; writes OUTPUT_DIR/summary.md "
                    "and .json.",
    )
    ev.add_argument("--namm", default=c.namm, help="path or hub id of the NAMM to evaluate")
    ev.add_argument("--tasks", nargs="+", default=c.tasks, help="task names")
    ev.add_argument("--n", type=int, default=c.n, help="test prompts per task")
    ev.add_argument("--prompt-tokens", type=int, default=c.prompt_tokens, help="prompt length in tokens")
    ev.add_argument("--max-new-tokens", type=int, default=c.max_new_tokens,
                    help="tokens generated (default: each task's own)")
    ev.add_argument("--output-dir", default=c.output_dir, help="output directory")
    _add_placement_args(ev, c)
    ev.set_defaults(handler=_run_eval_text)


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
