"""The ``namm-transfer`` command line: one subcommand per row of :data:`COMMANDS`.

Each subcommand's flags are generated from its config dataclass (:mod:`.cli_config`): a field
``prompt_tokens`` is the flag ``--prompt-tokens``, documented by the config's docstring. ``bench ...``
commands form a nested group.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from namm_transfer.pipelines.bench.ablation import AblationConfig, run_ablation
from namm_transfer.pipelines.bench.engine import (
    EngineBenchConfig,
    run_engine_bench,
)
from namm_transfer.pipelines.bench.evidence import EvidenceConfig, run_evidence
from namm_transfer.pipelines.bench.oracle import OracleConfig, run_oracle
from namm_transfer.pipelines.bench.overhead import OverheadConfig, run_overhead
from namm_transfer.pipelines.bench.population import (
    PopulationConfig,
    run_population,
)
from namm_transfer.pipelines.bench.rollout import RolloutSpeedConfig, run_rollout_speed
from namm_transfer.pipelines.cli_config import Command, config_from_args
from namm_transfer.pipelines.cli_config import build_parser as _build_parser
from namm_transfer.pipelines.demo import DemoConfig, run_demo
from namm_transfer.pipelines.models import MODELS
from namm_transfer.pipelines.rl.datasets import ENV_NAMES, LEVEL_NAMES, RLDatasetsConfig, run_make_rl_datasets
from namm_transfer.pipelines.rl.evaluate import EvalRolloutConfig, run_eval_rollout
from namm_transfer.pipelines.rl.train import TrainDTConfig, train_dt
from namm_transfer.pipelines.text.calibrate import CalibrateConfig, run_calibrate
from namm_transfer.pipelines.text.evaluate import EvalTextConfig, run_eval_text
from namm_transfer.pipelines.text.evolve import EvolveConfig, run_evolve
from namm_transfer.pipelines.text.export import export_namm
from namm_transfer.pipelines.text.tasks import (
    EXTRA_TASKS,
    SPLIT_BASE,
    TASKS,
    MeasureConfig,
    ShowConfig,
    measure_full_cache,
    show_example,
)
from namm_transfer.pipelines.video.evaluate import FORMATS, EvalVideoConfig, run_eval_video
from namm_transfer.pipelines.video.models import export_video_model
from namm_transfer.pipelines.video.qa_data import TASK_TYPES, VideoQAConfig, make_video_qa
from namm_transfer.pipelines.video.stats import VideoStatsConfig, run_video_stats
from namm_transfer.pipelines.video.train import TrainVideoModelConfig, train_video_model


@dataclass
class ExportNAMMConfig:
    """Settings of ``export-namm`` (:func:`.export.export_namm`).

    Attributes:
        run_dir: the evolve job's ``--out-dir``.
        name: short name, e.g. ``smollm2-text``.
        destination: parent directory (None: ``namm_transfer/pretrained`` of this installation).
    """

    run_dir: str
    name: str
    destination: str | None = None


@dataclass
class ExportVideoModelConfig:
    """Settings of ``export-video-model`` (:func:`.video_models.export_video_model`).

    Attributes:
        model_dir: the train-video-model job's ``--out-dir``.
        name: short name, e.g. ``smollm2-shapes``.
        destination: parent directory (None: ``namm_transfer/pretrained_video`` of this installation).
    """

    model_dir: str
    name: str
    destination: str | None = None


@dataclass
class FamiliesConfig:
    """Settings of ``families``.

    Attributes:
        write_readme: a README whose block between ``<!-- families:start -->`` and
            ``<!-- families:end -->`` is rewritten from the descriptors (None: print the list).
    """

    write_readme: str | None = None


def run_families(cfg: FamiliesConfig, argv: Sequence[str] | None = None) -> str:
    from pathlib import Path

    from namm_transfer.adapters.families import supported_families_markdown, with_readme_block

    if cfg.write_readme is None:
        print(supported_families_markdown())
        return supported_families_markdown()
    path = Path(cfg.write_readme)
    path.write_text(with_readme_block(path.read_text()))
    print(f"rewrote the families block of {path}")
    return str(path)


def _stages(text: str) -> list[list[str]]:
    """``"passkey;passkey,kv"`` -> ``[["passkey"], ["passkey", "kv"]]``."""
    stages = [[t.strip() for t in stage.split(",") if t.strip()] for stage in text.split(";")]
    if not stages or not all(stages):
        raise argparse.ArgumentTypeError(f"bad --stages {text!r}: use e.g. 'passkey;passkey,kv'")
    return stages


def _fractions(text: str) -> list[float]:
    """``"0.25,0.5"`` -> ``[0.25, 0.5]``."""
    return [float(x) for x in text.split(",")]


DTYPE = {"dtype": {"choices": ("float32", "bfloat16", "float16")}}
DESCRIPTION = ("Neural Attention Memory Models: evolve on text, attach zero-shot to any transformer's KV "
               "cache, and compare with KV-cache baselines at matched cache size.")
GROUPS = {"bench": ("benchmarks: overhead, engine and batching speed, evolution ablation, text tasks",
                    "Benchmarks of the toolkit itself, and the bare model's full-cache accuracy on the text "
                    "tasks.")}

COMMANDS: tuple[Command, ...] = (
    Command(
        "demo", DemoConfig, run_demo,
        "passkey retrieval on SmolLM2: full cache, NAMM and baselines at the NAMM's cache size",
        "Build one passkey-retrieval prompt, run SmolLM2-135M-Instruct with the full cache, then with a "
        "NAMM, then with Recency, H2O, L2Norm and RandomEviction each given the NAMM's mean kept tokens per "
        "layer as budget.\nPrints a table (policy | answer | correct? | mean kept fraction | stored KV MiB | "
        "seconds). Then, zero-shot, a few episodes of the shipped LunarLander Decision Transformer with the "
        "full cache, the same NAMM and Recency at its budget (needs the rl extra). Then the first test "
        "videos of the shipped video model's synthetic QA task with the full cache, the same NAMM, Recency "
        "at its budget and a uniform frame subset of the same size (needs the video extra). Writes "
        "OUTPUT_DIR/demo.json and OUTPUT_DIR/video/ (eval-video's rows, summary, heatmaps).",
        DTYPE,
    ),
    Command(
        "evolve", EvolveConfig, lambda cfg, argv: run_evolve(cfg, TASKS, argv=argv),
        "evolve a NAMM with CMA-ES on long-context text tasks (SmolLM2-135M-Instruct)",
        "Separable CMA-ES over the NAMM's parameters. Each generation draws fresh training prompts shared by "
        "all members; fitness = per-task score / full-cache score on the same prompts, averaged over the "
        "stage's tasks. Stages add tasks, each starting from the previous CMA mean, which is the saved "
        "solution (OUT_DIR/namm). Writes OUT_DIR/results.jsonl, TensorBoard logs and a checkpoint after "
        "every generation; --resume continues a killed run.",
        {**DTYPE, "stages": {"type": _stages, "metavar": "'T1;T1,T2'"},
         "budgets": {"type": _fractions, "metavar": "F1,F2"}, "scorer": {"choices": ("bam", "mlp", "joint")},
         "backend": {"choices": ("local", "ray")}, "engine": {"choices": ("shared-prefill", "generate")},
         "warm_loss": {"choices": ("topk", "rank", "evidence")},
         "joint_reference": {"choices": ("absolute", "fresh-median")}},
    ),
    Command(
        "calibrate", CalibrateConfig, lambda cfg, argv: run_calibrate(cfg, TASKS, argv=argv),
        "set a trained NAMM's threshold-mode operating point (its final bias) on training prompts",
        "Prefill POOL_PER_TASK training prompts per task (those an evolve run with SEED trains on), then set "
        "the NAMM's final bias so that, compressing each context once, it keeps KEEP of it in its own "
        "threshold mode (the evolve job's last step). --joint-reference first switches a joint NAMM to "
        "another reference: fresh-median measures scores from the median score of the tokens fed since the "
        "last update, so that one threshold serves both the one-shot and the progressive protocol. Writes "
        "OUT_DIR (config.json, model.safetensors, calibration.json).",
        {"joint_reference": {"choices": ("absolute", "fresh-median")}},
    ),
    Command(
        "eval-text", EvalTextConfig, run_eval_text,
        "a NAMM vs full cache and every baseline at matched budgets, both protocols, test split",
        "Run SmolLM2-135M-Instruct (or, with --model gemma3-270m, Gemma-3-270M) on the test split of each "
        "text task with the full cache, the NAMM and "
        "every baseline (Recency, H2O, L2Norm, RandomEviction, SnapKV, TOVA) at the same tokens per layer "
        "and KV head, in the one-shot protocol (the context compressed once before the question; one shared "
        "prefill per prompt) and the progressive one (eviction every UPDATE_EVERY tokens). Reports per task "
        "the normalised score (score / full-cache score on the same prompts) with standard errors, kept "
        "fraction and KV MiB, and whether the NAMM beats every baseline by more than their combined "
        "standard error. Appends results to OUTPUT_DIR/rows*.jsonl and skips finished ones on a rerun; "
        "writes OUTPUT_DIR/summary.md and .json.",
        {**DTYPE, "split": {"choices": ("test", "val")}, "model": {"choices": tuple(MODELS)},
         "protocols": {"choices": ("one-shot", "progressive")}},
    ),
    Command(
        "export-namm", ExportNAMMConfig, lambda c, argv: print(export_namm(c.run_dir, c.name, c.destination)),
        "ship a finished evolve run's NAMM as package data, loadable by short name",
        "Copy RUN_DIR/namm (the CMA mean) into namm_transfer/pretrained/NAME with training.json (command, "
        "git revision, seed, config, run time), results.jsonl and fitness_curve.md. Then "
        "NAMM.from_pretrained(NAME) and namm_transfer.pretrained(NAME) load it.",
        {"run_dir": {"positional": True}},
    ),
    Command(
        "export-video-model", ExportVideoModelConfig,
        lambda c, argv: print(export_video_model(c.model_dir, c.name, c.destination)),
        "ship a train-video-model output as package data, loadable by short name",
        "Copy MODEL_DIR (config.json, video_model.safetensors, video_model.json with the command, seed and "
        "scores, README.md, train_log.jsonl, predictions_test.jsonl) into "
        "namm_transfer/pretrained_video/NAME. Then `eval-video --model NAME` and load_video_model(NAME) find "
        "it; the language model stays referenced, not copied.",
        {"model_dir": {"positional": True}},
    ),
    Command(
        "make-rl-datasets", RLDatasetsConfig, run_make_rl_datasets,
        "local D4RL-style Minari datasets (expert / medium / replay) from gymnasium's heuristics",
        "The Minari servers are unreachable here, so offline-RL data is made locally: gymnasium's heuristic "
        "controllers (LunarLanderContinuous-v3, BipedalWalker-v3) with controlled action noise give the "
        "quality levels expert (small noise), medium (noisier, return about half-way between random and "
        "expert) and replay (a mix across noise levels). Each is written as a Minari dataset "
        "namm/<env>/<level>-v0 under ROOT with ref_min_score (a uniform random policy's mean return) and "
        "ref_max_score (the expert level's), so normalised scores work. Seeded: the same seed gives "
        "identical arrays. A rerun keeps datasets made with the same settings; writes a summary table "
        "ROOT/namm_datasets.md (and .json) unless --summary says otherwise.",
        {"envs": {"choices": ENV_NAMES}, "levels": {"choices": LEVEL_NAMES}},
    ),
    Command(
        "train-dt", TrainDTConfig, train_dt,
        "train a Decision Transformer (transformers.DecisionTransformerModel) on a Minari dataset",
        "The standard recipe: K-step subsequences (episodes drawn in proportion to their length, padded on "
        "the left), states normalised by the dataset's mean/std, returns-to-go divided by --return-scale, "
        "action MSE on the non-padded steps, AdamW with linear warm-up. Writes OUT_DIR as a Hugging Face "
        "model directory plus dt_meta.json (state mean/std, return scale, K, target return, env and dataset "
        "ids, reference scores, seed, command, git revision), OUT_DIR/train_log.jsonl and TensorBoard "
        "scalars in OUT_DIR/tensorboard.",
        {"context": {"flags": ("--context", "-K")}, "extra_datasets": {"metavar": "ID"}},
    ),
    Command(
        "eval-rollout", EvalRolloutConfig, run_eval_rollout,
        "Decision Transformer rollouts: windowed, full cache, a zero-shot NAMM, baselines at its budget",
        "Run EPISODES episodes of a Decision Transformer in parallel (seeds SEED, SEED+1, ...) with each "
        "policy: windowed (the standard re-encode-the-last-K reference), full (KV-cached, the whole episode "
        "in cache), NAMM (the text-evolved NAMM zero-shot, every UPDATE_EVERY tokens), then Recency, H2O, "
        "L2Norm and RandomEviction at the NAMM's measured per-layer budget and the same cadence. Reports per "
        "policy the return and normalised score (mean ± standard error), mean and peak cached tokens and KV "
        "bytes, the kept fraction of return / state / action tokens and env steps per second; a PNG per "
        "policy of the timesteps in memory over the first episode. Appends one row per policy and episode "
        "to OUTPUT_DIR/rows.jsonl (a rerun skips finished policies and refuses other settings); writes "
        "OUTPUT_DIR/summary.md and .json and TensorBoard logs in OUTPUT_DIR/tensorboard.",
        DTYPE,  # policies: checked by the config against the registry when the job runs
    ),
    Command(
        "eval-video", EvalVideoConfig, run_eval_video,
        "multiple-choice video QA (MLVU, LongVideoBench, JSONL): full cache, a zero-shot NAMM, baselines at "
        "its budget, uniform frame subsampling",
        "Answer every question of ANNOTATIONS (MLVU's per-task JSON files or json/ folder, LongVideoBench's "
        "lvb_val.json, or the generic JSONL of make-video-qa) with a LLaVA video model (LLaVA-NeXT-Video, "
        "LLaVA-OneVision, Video-LLaVA) on NUM_FRAMES uniformly sampled frames, the prompt fed in chunks of "
        "UPDATE_EVERY tokens, under each policy: FullCache, NAMM (zero-shot, every UPDATE_EVERY tokens), "
        "every registered baseline (Recency, H2O, L2Norm, RandomEviction, SnapKV, TOVA) at the NAMM's "
        "measured per-layer budget, and UniformFrames "
        "(a uniform subset of the frames holding as many video tokens as the NAMM kept on average). With "
        "--budgets (fractions of the video tokens) every policy also runs capped at each, the NAMM by top-k, "
        "in each of --protocols (progressive: evict every UPDATE_EVERY tokens; one-shot: once at the video's "
        "end, before the question). Scores "
        "by option-letter extraction; reports accuracy overall and per task type, kept video tokens and "
        "frames, stored KV MiB and seconds per sample. Appends one row per policy and sample to "
        "OUTPUT_DIR/rows.jsonl (a rerun skips finished rows, retries failed ones and refuses other settings; "
        "an unreadable or missing video is a failed row); writes OUTPUT_DIR/summary.md and .json, retention "
        "heatmaps (layer x frame) in OUTPUT_DIR/heatmaps and TensorBoard logs in OUTPUT_DIR/tensorboard.",
        {**DTYPE, "annotations": {"required": True}, "format": {"choices": FORMATS},
         "protocols": {"choices": ("progressive", "one-shot")}},
    ),
    Command(
        "video-stats", VideoStatsConfig, run_video_stats,
        "re-collect a NAMM's feature statistics on a video model's attention (unlabelled videos, no "
        "training)",
        "Run the video model over the first LIMIT videos of ANNOTATIONS (any eval-video format; their "
        "answers are not read: take a split you do not evaluate) with the NAMM keeping every token and "
        "collecting its per-bin feature statistics, as its first keep-everything evaluation on text did, "
        "and write the NAMM with those statistics to OUT_DIR (config.json, model.safetensors, "
        "video_stats.json with the statistics before and after). Weights, threshold, floor and cadence are "
        "unchanged, so the NAMM stays zero-shot on the task; pass OUT_DIR to eval-video --namm.",
        {**DTYPE, "annotations": {"required": True}, "format": {"choices": FORMATS}},
    ),
    Command(
        "make-video-qa", VideoQAConfig, make_video_qa,
        "a seeded synthetic long-video QA set (mp4 + generic JSONL) whose answers sit in a few frames",
        "Write OUT_DIR/{train,val,test}.jsonl in the generic video-QA format (video, question, 4 options, "
        "answer letter, task_type, seed, split, key frames; see namm_transfer.pipelines.video.qa_data) and "
        "the mp4 videos (PyAV, H.264) under OUT_DIR/videos/<split>/. Each video is NUM_FRAMES slots of "
        "FRAMES_PER_SLOT identical frames: achromatic scenes held for several slots (some repeated) and, in "
        "one to four slots, a solid coloured shape. Task types: colour (of the one shape), order (colour of "
        "the first of two shapes), count (how many times a shape appeared); options in a fixed order. "
        "Sample i of a split is drawn from seed 1,000,000 * SEED + offset(split) + i, so splits are disjoint "
        "and reruns identical. OUT_DIR/dataset.json records the settings, counts, command and git revision.",
        {"task_types": {"choices": TASK_TYPES}},
    ),
    Command(
        "train-video-model", TrainVideoModelConfig, train_video_model,
        "a small LLaVA-NeXT-Video (frozen SmolLM2-135M, a vision tower trained here) on make-video-qa",
        "Build a LlavaNextVideoForConditionalGeneration whose language model is SmolLM2-135M-Instruct (or "
        "--language-model DIR), frozen, with a CLIP vision tower trained from scratch and the projector. "
        "Stage 1: frame pretraining (each frame's labels: no shape or the shape's colour, and its kind) "
        "through a throw-away linear head. Stage 2: the projector's last layer restarts at zero weight with "
        "the embedding of NEUTRAL_TOKEN as bias, the tower is frozen (unless VISION_LR > 0), and the "
        "projector learns from the cross-entropy of the answer tokens (' B' + EOS) after the prompt "
        "'USER: <video>\\n{question}\\nOptions: A. .. B. .. C. .. D. ..\\nAnswer with the letter. "
        "ASSISTANT:', the gradient flowing through the frozen LM. Stops at STEPS or after MAX_MINUTES. "
        "Scores the val and test splits with the full cache (greedy generation, option letter extracted). "
        "Writes OUT_DIR: config.json, video_model.safetensors (vision tower + projector only; the LM is "
        "referenced), video_model.json (command, git revision, seed, config, time, scores), README.md, "
        "train_log.jsonl, predictions_{val,test}.jsonl, tensorboard/. load_video_model(OUT_DIR) rebuilds "
        "the model.",
    ),
    Command(
        "show-text-task", ShowConfig, lambda cfg, argv: show_example(cfg),
        "print one prompt of a text task (SmolLM2's chat template) with its answer",
        "Build the first prompt of TASK's SPLIT with SmolLM2-135M-Instruct's tokenizer and print it, then "
        "its reference answer, token count and task metadata.",
        {"task": {"positional": True, "choices": (*TASKS, *EXTRA_TASKS)},
         "split": {"choices": tuple(SPLIT_BASE)}},
    ),
    Command(
        "families", FamiliesConfig, run_families,
        "the model families attach supports and refuses (the README's list)",
        "Print the supported decoder families, multimodal wrappers and refused kinds with their reasons, "
        "generated from the descriptors in adapters/families.py; with --write-readme, rewrite that list "
        "in a README between its <!-- families:start --> and <!-- families:end --> markers.",
    ),
    Command(
        "bench overhead", OverheadConfig, run_overhead,
        "time and memory cost of a NAMM on SmolLM2's chunked prefill",
        "Time SmolLM2-135M-Instruct's chunked prefill bare (DynamicCache) and with a NAMM attached, per "
        "prompt length (median of --reps).\nReports the end-to-end overhead ratio, the NAMM's bookkeeping "
        "time as a fraction of the bare forward, KV bytes with and without eviction, bookkeeping bytes and "
        "the attention rows buffered. Writes OUTPUT (.md) and its .json twin.",
        DTYPE,
    ),
    Command(
        "bench engine", EngineBenchConfig, run_engine_bench,
        "member evaluations per second: the old evolution path vs the shared-prefill engine",
        "Score the same random NAMM members on the same prompts with the old path (progressive generate(), "
        "members batched) and the shared-prefill engine (one context prefill, one-shot compression, "
        "teacher-forced answer), with and without the prefill counted. Writes OUTPUT (.md) and its .json "
        "twin.",
        {**DTYPE, "tasks": {"choices": tuple(TASKS)}},
    ),
    Command(
        "bench population", PopulationConfig, run_population,
        "speed-up of evaluating CMA-ES members in one batch vs one at a time",
        "Score POPULATION random NAMMs on one passkey prompt with SmolLM2-135M-Instruct, once one member per "
        "forward and once all members in one batched forward (per-row NAMM parameters); checks the scores "
        "agree and reports the speed-up. Writes OUTPUT (.md) and its .json twin.",
        DTYPE,
    ),
    Command(
        "bench rollout", RolloutSpeedConfig, run_rollout_speed,
        "env steps per second of DT rollouts: the full cache vs the zero-shot NAMM",
        "Roll out each DT's seeded batch of episodes under the full cache, the NAMM uncapped and the NAMM at "
        "each budget (interleaved, --reps times), as eval-rollout does; report the median env steps/s, its "
        "ratio to the full cache's and where the NAMM's own time goes. Writes OUTPUT (.md) and its .json "
        "twin.",
    ),
    Command(
        "bench ablation", AblationConfig, run_ablation,
        "validation fitness reached vs wall time of several shared-prefill evolve runs",
        "Read each run's validation.jsonl and config.json and write a table (OUTPUT), a PNG of validation "
        "fitness against wall-clock minutes and a .json twin.",
        {"runs": {"flags": ("--run",), "action": "append", "metavar": "LABEL=DIR"}},
    ),
    Command(
        "bench oracle", OracleConfig, run_oracle,
        "the one-shot ceiling: the NAMM vs an oracle that keeps what the question attends to",
        "Per test prompt of each text task, prefill the context once, then answer from caches compressed "
        "once before the question, at each kept fraction, by the NAMM (top-k) and by an oracle keeping per "
        "layer and KV head the tokens the question and reference answer attend to most in the full-cache "
        "forward (a ceiling, not a policy). Normalised by the full cache on the same prompts; rows resume "
        "from OUTPUT_DIR/rows.jsonl; writes OUTPUT_DIR/summary.md and .json.",
        {**DTYPE, "tasks": {"choices": tuple(TASKS)}, "model": {"choices": tuple(MODELS)},
         "split": {"choices": ("test", "val")}},
    ),
    Command(
        "bench evidence", EvidenceConfig, run_evidence,
        "do the NAMM's input features tell the facts of a context from its filler?",
        "Prefill training and validation prompts of each text task once; at the one-shot eviction point "
        "(before the question) measure, on the validation prompts, the share of fact tokens in each "
        "layer-head's top-k of the NAMM's scores (and of Recency), and the ROC AUC for fact tokens of the "
        "NAMM's scores and of logistic and MLP probes fitted on the training prompts' features. Writes "
        "OUTPUT_DIR/summary.md and .json.",
        {**DTYPE, "tasks": {"choices": ("passkey", "kv", "docs", "hop")}, "model": {"choices": ("smollm2",)}},
    ),
    Command(
        "bench text-tasks", MeasureConfig, measure_full_cache,
        "full-cache accuracy of the bare SmolLM2 per long-context text task",
        "Run SmolLM2-135M-Instruct with the full cache (greedy, float32) on N seeded prompts of each task "
        "and write its accuracy with standard errors, chance level and seconds per prompt to OUTPUT (.md) "
        "and its .json twin (with every prompt's answer and generation).",
        {"tasks": {"choices": (*TASKS, *EXTRA_TASKS)}, "split": {"choices": tuple(SPLIT_BASE)}},
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``namm-transfer`` argument parser."""
    return _build_parser("namm-transfer", DESCRIPTION, COMMANDS, GROUPS)


def parse(argv: Sequence[str] | None = None) -> tuple[Command, Any]:
    """The subcommand named on the command line and its config; a usage error exits with code 2."""
    args = build_parser().parse_args(argv)
    return args._command, config_from_args(args._parser, args._command.config, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``namm-transfer`` console script."""
    command, config = parse(argv)
    command.run(config, None if argv is None else list(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
