"""Fast tests of the passkey generator, scoring and demo helpers (no model is loaded)."""

from __future__ import annotations

import re

import pytest

from namm_transfer.pipelines.common import markdown_table
from namm_transfer.pipelines.models import smollm2_cache_dir
from namm_transfer.pipelines.text.passkey import (
    ANSWER_PREFIX,
    NEEDLE,
    make_passkey_dataset,
    make_passkey_example,
    render_chat,
    score,
)


class WordTokenizer:
    """Stand-in tokenizer: special tokens, words and punctuation (with their leading space) are tokens."""

    chat_template = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.inverse: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = re.findall(r"<\|\w+\|>|\s?\w+|\s?[^\w\s]|\s+", text)
        ids = []
        for piece in pieces:
            if piece not in self.vocab:
                self.vocab[piece] = len(self.vocab)
                self.inverse[self.vocab[piece]] = piece
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.inverse[i] for i in ids)


@pytest.fixture(scope="module")
def real_tokenizer():
    """SmolLM2's tokenizer from the converted-model cache; skipped when that cache does not exist yet."""
    path = smollm2_cache_dir()
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"no converted SmolLM2 at {path} (run `namm-transfer demo` once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_deterministic_per_seed():
    a = make_passkey_example(WordTokenizer(), seed=3, prompt_tokens=800)
    b = make_passkey_example(WordTokenizer(), seed=3, prompt_tokens=800)
    assert a.prompt_ids == b.prompt_ids and a.answer == b.answer and a.depth == b.depth and a.text == b.text


def test_differs_across_seeds():
    tok = WordTokenizer()
    examples = make_passkey_dataset(tok, range(8), prompt_tokens=600)
    assert len({e.answer for e in examples}) == 8
    assert len({e.text for e in examples}) == 8
    assert all(re.fullmatch(r"\d{5}", e.answer) for e in examples)
    assert [e.seed for e in examples] == list(range(8))
    assert all(0.1 <= e.depth <= 0.9 for e in examples)  # depth drawn from the seed when not given


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_key_at_requested_depth(depth):
    tok = WordTokenizer()
    ex = make_passkey_example(tok, seed=1, prompt_tokens=2000, depth=depth)
    assert ex.depth == depth
    needle = NEEDLE.format(key=ex.answer)
    assert ex.text.count(ex.answer) == 2 and needle in ex.text
    start, end = ex.needle_span
    assert tok.decode(ex.prompt_ids[start:end]).strip() == needle
    assert abs(start / ex.num_tokens - depth) < 0.06  # template and question are ~3% of the prompt


def test_requested_length_stand_in():
    tok = WordTokenizer()
    for n in (300, 1000, 2000):
        ex = make_passkey_example(tok, seed=0, prompt_tokens=n, depth=0.5)
        assert n - 16 <= ex.num_tokens <= n
    with pytest.raises(ValueError):
        make_passkey_example(tok, seed=0, prompt_tokens=20)
    with pytest.raises(ValueError):
        make_passkey_example(tok, seed=0, prompt_tokens=500, depth=1.5)


def test_prompt_ends_with_answer_prefix():
    tok = WordTokenizer()
    ex = make_passkey_example(tok, seed=0, prompt_tokens=500)
    assert ex.text.endswith("<|im_start|>assistant\n" + ANSWER_PREFIX)
    assert tok.decode(ex.prompt_ids) == ex.text


def test_real_tokenizer_length_and_template(real_tokenizer):
    for n in (1000, 2000):
        ex = make_passkey_example(real_tokenizer, seed=0, prompt_tokens=n, depth=0.5)
        assert n - 16 <= ex.num_tokens <= n
        assert ex.prompt_ids == real_tokenizer.encode(ex.text, add_special_tokens=False)
        start, end = ex.needle_span
        assert ex.answer in real_tokenizer.decode(ex.prompt_ids[start:end])
    # the built-in ChatML fallback is SmolLM2's own template
    fallback = render_chat(WordTokenizer(), "hello")
    assert render_chat(real_tokenizer, "hello") == fallback


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (" 60494. It", True),
        ("60494", True),
        (" **60494**", True),
        (" 60494 is the key, not 12345", True),
        (" 6049", False),
        (" 604945", False),
        (" 12345 or 60494", False),
        (" the pass key is", False),
        ("", False),
    ],
)
def test_score(text, ok):
    assert score(text, "60494") is ok


def test_markdown_table():
    table = markdown_table(["a", "bb"], [[1, "x"], ["long", 2]])
    lines = table.splitlines()
    assert lines[0].startswith("| a ") and set(lines[1]) <= {"|", "-"} and len(lines) == 4
    assert len({len(line) for line in lines}) == 1
