"""Text tasks: determinism, disjoint splits, answers in the prompt, scorers (stand-in tokenizer)."""

from __future__ import annotations

import pytest
from test_pipelines_passkey import WordTokenizer

from namm_transfer.pipelines.text_tasks import TASKS, make_split, split_of_seed, split_seeds


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_per_seed_and_different_across_seeds(name):
    tok = WordTokenizer()
    a, b = TASKS[name].make(tok, 7, 400), TASKS[name].make(tok, 7, 400)
    c = TASKS[name].make(tok, 8, 400)
    assert a.prompt_ids == b.prompt_ids and a.answer == b.answer
    assert a.prompt_ids != c.prompt_ids


@pytest.mark.parametrize("name", sorted(TASKS))
def test_scorer_accepts_the_answer_and_rejects_others(name):
    example = TASKS[name].make(WordTokenizer(), 3, 400)
    assert TASKS[name].score(f" {example.answer}. And more text", example) == 1.0
    assert TASKS[name].score("no number here", example) == 0.0


def test_splits_are_disjoint():
    train, val, test = (set(split_seeds(s, 50)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert {split_of_seed(s) for s in test} == {"test"}
    examples = make_split("passkey", WordTokenizer(), "test", 3, 300)
    assert [split_of_seed(e.seed) for e in examples] == ["test"] * 3
