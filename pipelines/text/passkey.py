"""Seeded passkey-retrieval prompts for chat LMs (SmolLM2's ChatML template).

A prompt is highly redundant filler text with one sentence carrying a 5-digit pass key inserted at a
chosen depth, followed by a question. The assistant turn already starts with an answer prefix
("The pass key is") so the key is in the first few generated tokens: small models otherwise restate
the question and the answer falls outside a short generation (measured on SmolLM2-135M).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about it afterwards."
)
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. The pass key is {key}."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
# SmolLM2-Instruct's chat template, used when the tokenizer carries none (e.g. a stand-in in tests).
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the generator uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class PasskeyExample:
    """One passkey prompt.

    Attributes:
        prompt_ids: token ids of the whole chat prompt, ending with the answer prefix.
        answer: the 5-digit pass key as a string.
        depth: where the key sentence sits in the filler, as a fraction (0 = start, 1 = end).
        seed: the seed the example was drawn with.
        needle_span: ``(start, end)`` token indices of the key sentence within ``prompt_ids``
            (approximate to one token at the boundaries).
        text: the prompt as text.
    """

    prompt_ids: list[int]
    answer: str
    depth: float
    seed: int
    needle_span: tuple[int, int] = (0, 0)
    text: str = field(default="", repr=False)

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_ids)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def render_chat(tokenizer: Any, user: str, assistant_prefix: str = ANSWER_PREFIX) -> str:
    """The chat prompt text: the user turn, then an open assistant turn starting with ``assistant_prefix``."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    else:
        head = (
            f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
    return head + assistant_prefix


def _user_message(filler: Sequence[str], needle: str, position: int) -> tuple[str, str, str]:
    """(text before the needle, needle, text after) of the user message."""
    before = " ".join([INSTRUCTION, *filler[:position]])
    after = " ".join(filler[position:])
    return before + " ", needle, (" " + after if after else "") + "\n\n" + QUESTION


def make_passkey_example(
    tokenizer: Tokenizer,
    seed: int,
    prompt_tokens: int = 2000,
    depth: float | None = None,
) -> PasskeyExample:
    """Build one passkey prompt of at most ``prompt_tokens`` tokens (the largest that fits).

    Args:
        tokenizer: a Hugging Face tokenizer (its chat template is used when present).
        seed: determines the pass key, and the depth when ``depth`` is None.
        prompt_tokens: target prompt length in tokens, chat template and answer prefix included.
        depth: fraction of the filler placed before the key sentence, in [0, 1]; None draws it
            uniformly from [0.1, 0.9] with the seed.
    """
    rng = random.Random(seed)
    key = f"{rng.randint(10_000, 99_999)}"
    if depth is None:
        depth = rng.uniform(0.1, 0.9)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key)

    def build(n: int) -> tuple[str, list[int], int, str]:
        filler = [FILLER[i % len(FILLER)] for i in range(n)]
        before, mid, after = _user_message(filler, needle, round(depth * n))
        full = render_chat(tokenizer, before + mid + after)
        return full, _encode(tokenizer, full), len(before), before

    lo, hi = 0, 1
    while len(build(hi)[1]) <= prompt_tokens:  # exponential search for an upper bound
        lo, hi = hi, hi * 2
    if lo == 0 and len(build(0)[1]) > prompt_tokens:
        raise ValueError(f"prompt_tokens={prompt_tokens} is too short for the template and question")
    while hi - lo > 1:  # largest n whose prompt fits
        mid_n = (lo + hi) // 2
        lo, hi = (mid_n, hi) if len(build(mid_n)[1]) <= prompt_tokens else (lo, mid_n)
    text, ids, _, before = build(lo)
    user_start = text.index(before)
    start = len(_encode(tokenizer, text[: user_start + len(before)].rstrip(" ")))
    end = len(_encode(tokenizer, text[: user_start + len(before) + len(needle)]))
    return PasskeyExample(ids, key, float(depth), seed, (start, end), text)


def make_passkey_dataset(
    tokenizer: Tokenizer,
    seeds: Sequence[int],
    prompt_tokens: int = 2000,
    depth: float | None = None,
) -> list[PasskeyExample]:
    """One example per seed (see :func:`make_passkey_example`)."""
    return [make_passkey_example(tokenizer, s, prompt_tokens, depth) for s in seeds]


def score(generated_text: str, answer: str) -> bool:
    """True iff the first number in the generated text is exactly the pass key."""
    match = re.search(r"\d+", generated_text)
    return match is not None and match.group(0) == answer
