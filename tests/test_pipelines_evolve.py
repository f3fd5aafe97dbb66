"""Evolution on a tiny random Llama: logging, batching, fitness, and exact resume."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from namm_transfer import NAMM
from namm_transfer.pipelines.text.evolve import (
    EvolveConfig,
    LocalEvaluator,
    load_state,
    run_evolve,
    task_fitness,
)

VOCAB = 40


class CharTokenizer:
    """Token i <-> letter chr(ord('a') + i % 26); enough for generate() + batch_decode()."""

    pad_token_id = 0

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(ord("a") + int(t) % 26) for t in row) for row in ids]


@dataclass
class Example:
    prompt_ids: list[int]
    answer: str


class ToyTask:
    """Random prompts; the score is the share of distinct letters in the generation, so it moves
    whenever eviction changes what the model writes."""

    def __init__(self, name: str):
        self.name = name

    def make(self, tokenizer, seed: int, prompt_tokens: int) -> Example:
        rng = random.Random(f"{self.name}-{seed}")
        return Example([rng.randrange(1, VOCAB) for _ in range(prompt_tokens)], "")

    def score(self, generated_text: str, example: Example) -> float:
        return len(set(generated_text)) / max(len(generated_text), 1)


TASKS = {"a": ToyTask("a"), "b": ToyTask("b")}


def tiny_model_and_tokenizer():
    """The same tiny random Llama in every process (fixed seed), and the stand-in tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval(), CharTokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model_and_tokenizer()[0]


def config(tmp_path, **overrides) -> EvolveConfig:
    base = EvolveConfig(
        stages=[["a"], ["a", "b"]], generations=2, population=4, sigma=0.5, prompts_per_task=1,
        prompt_tokens=48, max_new_tokens=6, members_per_batch=4, update_every=16, out_dir=str(tmp_path),
    )
    return replace(base, **overrides)


def records(path) -> list[dict]:
    lines = (path / "results.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_evolution_logs_checkpoints_and_saves_the_cma_mean(tmp_path, model):
    cfg = config(tmp_path)
    state = run_evolve(cfg, TASKS, model, CharTokenizer())
    rows = records(tmp_path)
    assert [(r["stage"], r["generation"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[2]["tasks"] == ["a", "b"]
    assert all(0.0 <= r["mean_kept_fraction"] <= 1.0 and len(r["kept_per_layer"]) == 2 for r in rows)
    assert state.norm_mean is not None and state.norm_var.shape == (17,)
    assert len(state.full_cache) == 2 + 2 * 2  # stage 0: 1 prompt x 2 gens; stage 1: 2 prompts x 2 gens
    saved = NAMM.from_pretrained(tmp_path / "namm")
    np.testing.assert_allclose(saved.params[0].numpy(), state.mean.astype(np.float32))
    assert saved.norm_mean is not None
    assert (tmp_path / "tensorboard").is_dir()


def test_memory_weight_adds_the_evicted_fraction_and_init_bias_sets_the_start(tmp_path, model):
    cfg = config(tmp_path, stages=[["a"]], generations=1, memory_weight=0.5, init_keep_bias=0.2)
    state = run_evolve(cfg, TASKS, model, CharTokenizer(), argv=["evolve", "--memory-weight", "0.5"])
    (row,) = records(tmp_path)
    bonus = 0.5 * (1 - row["mean_kept_fraction"])
    assert row["mean_fitness"] == pytest.approx(row["mean_score_ratio"] + bonus)
    assert not np.isclose(row["fitness_mean"], row["population_score_ratio"])  # members do evict
    assert state.optimizer is None  # the single stage finished
    start = NAMM(cfg.namm_config()).params[0]
    assert start[-1] == pytest.approx(0.2) and torch.count_nonzero(start[:-1]) == 0
    (run,) = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert run["command"] == "namm-transfer evolve --memory-weight 0.5" and "git_revision" in run
    with pytest.raises(ValueError, match="memory_weight"):
        EvolveConfig(memory_weight=-1.0)


def test_sink_tokens_reach_every_member_and_the_saved_namm(tmp_path, model):
    cfg = config(tmp_path, sink_tokens=3, generations=1)
    run_evolve(cfg, TASKS, model, CharTokenizer())
    saved = NAMM.from_pretrained(tmp_path / "namm")
    assert saved.config.sink_tokens == cfg.namm_config().sink_tokens == 3
    # a member that would evict everything old still keeps the first 3 tokens of every layer and head
    from namm_transfer.adapters import attach

    harsh = saved.with_budget(5, keep_threshold=False)
    with torch.no_grad(), attach(model, harsh, prefill_chunk=8) as handle:
        model.generate(torch.arange(1, 41)[None] % 20 + 1, max_new_tokens=2, do_sample=False)
        for i in range(len(handle.cache.layers)):
            memory = handle.cache.memory(i)
            kept = memory.positions[memory.valid].reshape(-1).tolist()
            assert {0, 1, 2} <= set(kept)


def test_resume_after_a_kill_follows_the_uninterrupted_trajectory(tmp_path, model):
    straight = run_evolve(config(tmp_path / "straight"), TASKS, model, CharTokenizer())
    killed_dir = tmp_path / "killed"
    run_evolve(config(killed_dir), TASKS, model, CharTokenizer(), max_total_generations=3)
    assert load_state(killed_dir).total_generations == 3
    resumed = run_evolve(config(killed_dir, resume=True), TASKS, model, CharTokenizer())
    np.testing.assert_array_equal(resumed.mean, straight.mean)
    assert records(killed_dir) == records(tmp_path / "straight")


def test_resume_without_state_is_a_clear_error(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no saved state"):
        run_evolve(config(tmp_path, resume=True), TASKS, model, CharTokenizer())


def test_unknown_task_is_a_clear_error(tmp_path, model):
    with pytest.raises(ValueError, match="unknown task"):
        run_evolve(config(tmp_path, stages=[["nope"]]), TASKS, model, CharTokenizer())


@torch.no_grad()
def test_population_batch_equals_one_member_at_a_time(tmp_path, model):
    params = np.stack([NAMM.init_random(seed=s, sigma=0.5).params[0].numpy() for s in range(4)])
    examples = [TASKS["a"].make(None, 3, 64)]
    results = []
    for per_batch in (4, 1):
        evaluator = LocalEvaluator(model, CharTokenizer(), config(tmp_path, members_per_batch=per_batch))
        cfg = evaluator.cfg.namm_config()
        results.append(evaluator.run(lambda block, c=cfg: NAMM(c, block), params, examples, [TASKS["a"]]))
    np.testing.assert_array_equal(results[0].scores, results[1].scores)
    np.testing.assert_allclose(results[0].kept, results[1].kept)
    assert results[0].retention.shape[0] == 2  # layers x tokens


def test_task_fitness_normalises_per_task_and_skips_uninformative_tasks():
    scores = np.array([[1.0, 0.5, 0.0], [0.5, 0.5, 1.0]])
    full = np.array([1.0, 1.0, 0.0])  # task "y" has full-cache score 0: skipped
    fitness = task_fitness(scores, full, ["x", "x", "y"])
    np.testing.assert_allclose(fitness, [0.75, 0.5])
    np.testing.assert_allclose(task_fitness(scores, np.zeros(3), ["x", "x", "y"]), [0.0, 0.0])


def test_export_ships_the_cma_mean_with_its_records(tmp_path, model):
    from namm_transfer.pipelines.cli import main
    from namm_transfer.pipelines.text.export import export_namm

    run_dir = tmp_path / "run"
    run_evolve(config(run_dir), TASKS, model, CharTokenizer(), max_total_generations=3, argv=["evolve"])
    with pytest.raises(ValueError, match="--resume"):  # unfinished: stage 2, generation 1
        export_namm(run_dir, "tiny", tmp_path / "ship")
    resume = config(run_dir, resume=True)
    state = run_evolve(resume, TASKS, model, CharTokenizer(), argv=["evolve", "--resume"])
    assert main(["export-namm", str(run_dir), "--name", "tiny", "--destination", str(tmp_path / "ship")]) == 0
    shipped = NAMM.from_pretrained(tmp_path / "ship" / "tiny")
    np.testing.assert_allclose(shipped.params[0].numpy(), state.mean.astype(np.float32))
    record = json.loads((tmp_path / "ship" / "tiny" / "training.json").read_text())
    assert record["command"] == "namm-transfer evolve" and len(record["runs"]) == 2
    assert record["generations"] == 4 and record["seed"] == 0 and record["final_generation"]["stage"] == 1
    curve = (tmp_path / "ship" / "tiny" / "fitness_curve.md").read_text()
    assert curve.count("\n| ") == 1 + 4  # header + one row per generation
