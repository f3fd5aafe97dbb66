"""Seeded long-context text tasks with reference answers and scorers (fitness for NAMM evolution).

Four tasks, each a :class:`TextTask` in :data:`TASKS`:

- ``passkey``: one 5-digit pass key hidden in highly redundant filler (wraps :mod:`.passkey`);
  forgetting the filler is free.
- ``kv``: multi-key-value retrieval: many similar facts ("The code for Maria is 30517.") scattered
  in redundant filler; one name is asked.
- ``vartrack``: variable tracking: several chains of assignments ("VAR QKZTW = 53841." ...
  "VAR MBRLE = VAR QKZTW." ...) scattered in filler; the value of one chain's last variable is asked,
  so the model must follow the hops.
- ``docs``: facts ("Irene Walsh was born in 1942.") inserted into real English prose: paragraphs of
  the Python documentation shipped with CPython (``pydoc_data.topics.topics``), so the filler is not
  synthetic; one person's year is asked.

Every prompt uses SmolLM2's chat template and ends inside the assistant turn with an answer prefix
("The code for Maria is"), so the answer is in the first generated tokens (DESIGN.md section 5).
Prompts are sized to the largest that fits in ``prompt_tokens``. Splits are disjoint by seed range
(:func:`split_seeds`). Scoring is exact match of the first number generated (1.0 or 0.0).

``python -m namm_transfer.pipelines.text_tasks --measure`` measures the bare model's full-cache
accuracy per task on validation prompts and writes ``benchmarks/results/text_tasks_full_cache.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import statistics
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from namm_transfer.pipelines import passkey as _passkey
from namm_transfer.pipelines.passkey import Tokenizer, render_chat

T = TypeVar("T")
Split = Literal["train", "val", "test"]
SPLIT_SIZE = 1_000_000_000
SPLIT_BASE: dict[str, int] = {"train": 0, "val": SPLIT_SIZE, "test": 2 * SPLIT_SIZE}

# Redundant filler shared by the synthetic tasks (the passkey module's sentences).
FILLER = _passkey.FILLER

NAMES = (
    "Aaron", "Abigail", "Adrian", "Alice", "Amber", "Andrew", "Angela", "Arthur", "Barbara", "Benjamin",
    "Bianca", "Brandon", "Caleb", "Camila", "Carlos", "Caroline", "Charles", "Chloe", "Claire", "Daniel",
    "Daphne", "David", "Diana", "Dominic", "Dorothy", "Edward", "Eleanor", "Elias", "Emily", "Ethan",
    "Felix", "Fiona", "Frances", "Gabriel", "George", "Gloria", "Gregory", "Hannah", "Harold", "Hazel",
    "Henry", "Hugo", "Isaac", "Isabel", "Ivan", "Jacob", "Jasmine", "Jasper", "Julia", "Justin",
    "Karen", "Kevin", "Laura", "Leonard", "Lillian", "Lucas", "Lydia", "Margaret", "Maria", "Martin",
    "Matthew", "Melissa", "Miles", "Nadia", "Nathan", "Nicole", "Oliver", "Olivia", "Oscar", "Patrick",
    "Paula", "Peter", "Philip", "Rachel", "Raymond", "Rebecca", "Robert", "Rosa", "Samuel", "Sandra",
    "Sophia", "Stanley", "Stella", "Steven", "Teresa", "Thomas", "Tobias", "Ursula", "Valerie", "Victor",
    "Vincent", "Walter", "Wendy", "William", "Xavier", "Yvonne", "Zachary", "Zoe",
)
SURNAMES = (
    "Adams", "Baker", "Bell", "Brooks", "Carter", "Clarke", "Collins", "Cooper", "Dawson", "Ellis",
    "Fisher", "Fleming", "Foster", "Grant", "Hayes", "Holmes", "Hughes", "Jensen", "Keller", "Lambert",
    "Lawson", "Marsh", "Mason", "Morgan", "Murphy", "Nolan", "Palmer", "Porter", "Quinn", "Reed",
    "Russell", "Sawyer", "Shaw", "Stone", "Sutton", "Turner", "Walsh", "Warren", "Webb", "Wright",
)


class Generator(Protocol):
    """A language model whose ``generate`` accepts Hugging Face keyword arguments."""

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TaskExample:
    """One prompt of a text task.

    Attributes:
        task: the task's name (a key of :data:`TASKS`).
        seed: the seed the example was drawn with.
        prompt_ids: token ids of the whole chat prompt, ending with ``answer_prefix`` in the assistant turn.
        answer: the reference answer (a number, as a string).
        answer_prefix: the text the assistant turn starts with.
        text: the prompt as text.
        meta: task details (positions of the evidence as depth fractions, number of keys, hops, ...).
    """

    task: str
    seed: int
    prompt_ids: list[int]
    answer: str
    answer_prefix: str = ""
    text: str = field(default="", repr=False)
    meta: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_ids)


@runtime_checkable
class TextTask(Protocol):
    """A long-context task: seeded prompts with reference answers and a scorer in [0, 1]."""

    name: str

    @property
    def chance(self) -> float:
        """Expected score of a guess among the candidate answers present in the prompt."""
        ...

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample: ...

    def score(self, generated_text: str, example: TaskExample) -> float: ...


# ---------------------------------------------------------------------------------------------------
# shared helpers


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (None when there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def score_first_number(generated_text: str, answer: str) -> float:
    """1.0 iff the first number in the generated text is exactly ``answer``, else 0.0."""
    return float(first_number(generated_text) == answer)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def fit_to_length(
    tokenizer: Tokenizer, prompt_tokens: int, build: Callable[[int], str], min_units: int = 0
) -> tuple[int, str, list[int]]:
    """The largest ``n >= min_units`` whose prompt ``build(n)`` fits in ``prompt_tokens`` tokens.

    ``build`` must give prompts whose length grows with ``n``. Returns ``(n, text, ids)``.

    Raises:
        ValueError: when even ``build(min_units)`` is longer than ``prompt_tokens``.
    """

    @functools.cache
    def encoded(n: int) -> tuple[str, list[int]]:
        text = build(n)
        return text, _encode(tokenizer, text)

    if len(encoded(min_units)[1]) > prompt_tokens:
        raise ValueError(f"prompt_tokens={prompt_tokens} is too short for this task's fixed content "
                         f"({len(encoded(min_units)[1])} tokens)")
    lo, hi = min_units, max(min_units, 1) * 2
    while len(encoded(hi)[1]) <= prompt_tokens:  # exponential search for an upper bound
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # invariant: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(encoded(mid)[1]) <= prompt_tokens else (lo, mid)
    text, ids = encoded(lo)
    return lo, text, ids


def _task_rng(name: str, seed: int) -> random.Random:
    """A RNG per (task, seed): the same seed gives unrelated draws in different tasks."""
    return random.Random(f"{name}:{seed}")


def _place(units: Sequence[T], inserts: Sequence[tuple[float, T]]) -> list[T]:
    """``units`` with each ``(depth, sentence)`` inserted at ``round(depth * len(units))`` (stable order)."""
    n = len(units)
    slots: dict[int, list[T]] = {}
    for depth, sentence in sorted(inserts, key=lambda x: x[0]):
        slots.setdefault(round(depth * n), []).append(sentence)
    out: list[T] = []
    for i in range(n + 1):
        out.extend(slots.get(i, []))
        if i < n:
            out.append(units[i])
    return out


def _redundant_filler(n: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(n)]


def _sorted_depths(rng: random.Random, k: int, lo: float, hi: float) -> list[float]:
    return sorted(rng.uniform(lo, hi) for _ in range(k))


def _full_names(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct "First Last" names with distinct first names."""
    if k > len(NAMES):
        raise ValueError(f"at most {len(NAMES)} names, asked for {k}")
    return [f"{first} {rng.choice(SURNAMES)}" for first in rng.sample(NAMES, k)]


def _distinct_numbers(rng: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return rng.sample(range(lo, hi + 1), k)


# ---------------------------------------------------------------------------------------------------
# tasks


@dataclass(frozen=True)
class PasskeyTask:
    """Passkey retrieval in highly redundant filler (wraps :func:`.passkey.make_passkey_example`).

    Attributes:
        name: registry name.
        depth: key position as a fraction of the filler; None draws it from [0.1, 0.9] with the seed.
    """

    name: str = "passkey"
    depth: float | None = None

    @property
    def chance(self) -> float:
        return 1 / 90_000  # a uniform 5-digit guess; the prompt holds a single candidate

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        ex = _passkey.make_passkey_example(tokenizer, seed, prompt_tokens, self.depth)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ex.prompt_ids, answer=ex.answer,
            answer_prefix=_passkey.ANSWER_PREFIX, text=ex.text,
            meta={"depth": ex.depth, "needle_span": list(ex.needle_span)},
        )

    def score(self, generated_text: str, example: TaskExample) -> float:
        return float(_passkey.score(generated_text, example.answer))


@dataclass(frozen=True)
class KeyValueTask:
    """Multi-key-value retrieval: ``num_keys`` facts "The code for <name> is <5 digits>." in filler.

    The facts sit at seeded depths in [0.02, 0.98] of the redundant filler; one name is asked.

    Attributes:
        name: registry name.
        num_keys: facts in the prompt (all with distinct names and codes).
    """

    name: str = "kv"
    num_keys: int = 16

    @property
    def chance(self) -> float:
        return 1 / self.num_keys

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        rng = _task_rng(self.name, seed)
        names = _full_names(rng, self.num_keys)
        codes = [str(c) for c in _distinct_numbers(rng, self.num_keys, 10_000, 99_999)]
        depths = _sorted_depths(rng, self.num_keys, 0.02, 0.98)
        facts = [f"The code for {n} is {c}." for n, c in zip(names, codes, strict=True)]
        asked = rng.randrange(self.num_keys)
        intro = ("Below is a long text with the secret codes of many people hidden in it. "
                 "Read it carefully: I will ask you for the code of one person afterwards.")
        question = f"What is the code for {names[asked]}?"
        prefix = f"The code for {names[asked]} is"

        def build(n: int) -> str:
            body = " ".join(_place(_redundant_filler(n), list(zip(depths, facts, strict=True))))
            return render_chat(tokenizer, f"{intro}\n\n{body}\n\n{question}", prefix)

        n, text, ids = fit_to_length(tokenizer, prompt_tokens, build)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ids, answer=codes[asked], answer_prefix=prefix, text=text,
            meta={"num_keys": self.num_keys, "asked": names[asked], "depth": depths[asked],
                  "keys": dict(zip(names, codes, strict=True)), "filler_sentences": n},
        )

    def score(self, generated_text: str, example: TaskExample) -> float:
        return score_first_number(generated_text, example.answer)


@dataclass(frozen=True)
class VariableTrackingTask:
    """Variable tracking through reassignments: ``num_vars`` people's codes, each changed ``updates`` times.

    Each person's code is stated ("The code for Maria Reed is 30517.") and later changed, possibly
    several times ("The code for Maria Reed is changed to 71046."), at increasing seeded depths of the
    redundant filler; the statements of different people interleave. The latest code of one person is
    asked, so the model must track the variable to its last assignment rather than retrieve any match.

    Attributes:
        name: registry name.
        num_vars: people (variables) in the prompt.
        updates: reassignments per person (the answer is the last of ``updates + 1`` values).
    """

    name: str = "vartrack"
    num_vars: int = 2
    updates: int = 1
    style: str = "changed"
    window_start: float = 0.02
    spread: float = 0.96

    @property
    def chance(self) -> float:
        return 1 / (self.updates + 1)  # the right person found, one of its values picked at random

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        rng = _task_rng(self.name, seed)
        names = _full_names(rng, self.num_vars)
        values = _distinct_numbers(rng, self.num_vars * (self.updates + 1), 10_000, 99_999)
        history = {n: [str(v) for v in values[i * (self.updates + 1) : (i + 1) * (self.updates + 1)]]
                   for i, n in enumerate(names)}
        statements: list[tuple[float, str]] = []
        last_depth = {}
        st = VT_STYLES[self.style]
        for person, vals in history.items():
            depths = _sorted_depths(rng, len(vals), self.window_start, self.window_start + self.spread)
            statements.append((depths[0], st["first"].format(p=person, v=vals[0])))
            statements += [(d, st["update"].format(p=person, v=v))
                           for d, v in zip(depths[1:], vals[1:], strict=True)]
            last_depth[person] = depths[-1]
        # never ask the person whose last statement is the last one in the text: "copy the last code
        # in the text" must not solve the task
        final = max(last_depth, key=last_depth.__getitem__)
        asked = rng.choice([p for p in names if p != final]) if self.num_vars > 1 else names[0]
        intro = ("Below is a long text with the secret codes of several people hidden in it. Codes can be "
                 "changed; remember the latest code of each person.")
        question = st["question"].format(p=asked)
        prefix = st["prefix"].format(p=asked)

        def build(n: int) -> str:
            body = " ".join(_place(_redundant_filler(n), statements))
            return render_chat(tokenizer, f"{intro}\n\n{body}\n\n{question}", prefix)

        n, text, ids = fit_to_length(tokenizer, prompt_tokens, build)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ids, answer=history[asked][-1], answer_prefix=prefix,
            text=text, meta={"num_vars": self.num_vars, "updates": self.updates, "asked": asked,
                             "history": history, "filler_sentences": n},
        )

    def score(self, generated_text: str, example: TaskExample) -> float:
        return score_first_number(generated_text, example.answer)


VT_STYLES = {
    "changed": {"first": "The code for {p} is {v}.", "update": "The code for {p} is changed to {v}.",
                "question": "What is the latest code for {p}?", "prefix": "The latest code for {p} is"},
    "now": {"first": "The code for {p} is {v}.", "update": "The code for {p} is now {v}.",
            "question": "What is the code for {p} now?", "prefix": "The code for {p} is now"},
    "new": {"first": "The old code for {p} was {v}.", "update": "The new code for {p} is {v}.",
            "question": "What is the new code for {p}?", "prefix": "The new code for {p} is"},
}


def _alias_name(rng: random.Random, letters: bool = False) -> str:
    if letters:
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(3))
    return rng.choice(string.ascii_uppercase) + str(rng.randint(1, 99))


@dataclass(frozen=True)
class AliasChainTask:
    """Multi-hop variable tracking: ``num_chains`` chains "K7 = 53841.", "B12 = K7.", ... (``hops`` copies).

    The statements of all chains are interleaved, in order within each chain, at seeded depths of the
    redundant filler; the value of one chain's last variable is asked, so the model must follow the hops.
    Not in :data:`TASKS`: SmolLM2-135M does it at short length but is at or below chance at ~1.5k tokens
    (see ``benchmarks/results/text_tasks_full_cache.md``); it is kept for larger models.

    Attributes:
        name: registry name.
        hops: copy statements per chain.
        num_chains: chains in the prompt (the others are distractors with their own numbers).
    """

    name: str = "alias"
    hops: int = 1
    num_chains: int = 2
    window_start: float = 0.02
    spread: float = 0.96
    cot: bool = False

    @property
    def chance(self) -> float:
        return 1 / self.num_chains

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        rng = _task_rng(self.name, seed)
        names: list[str] = []
        while len(names) < self.num_chains * (self.hops + 1):
            v = _alias_name(rng, self.cot)
            if v not in names:
                names.append(v)
        values = [str(v) for v in _distinct_numbers(rng, self.num_chains, 10_000, 99_999)]
        chains = [names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)] for c in range(self.num_chains)]
        statements: list[tuple[float, str]] = []
        chain_depths = []
        for chain, value in zip(chains, values, strict=True):
            depths = _sorted_depths(rng, len(chain), self.window_start, self.window_start + self.spread)
            chain_depths.append(depths)
            statements.append((depths[0], f"{chain[0]} = {value}."))
            statements += [(depths[i], f"{chain[i]} = {chain[i - 1]}.") for i in range(1, len(chain))]
        asked = rng.randrange(self.num_chains)
        target = chains[asked][-1]
        intro = ("Memorize and track the chains of variable assignments hidden in the following text. "
                 "A variable assigned another variable takes that variable's value.")
        question = f"What is the value of {target}?"
        prefix = f"The value of {target} is"
        if self.cot:
            question += " Follow the chain of assignments back to the number, one variable at a time."
            prefix = f"{target} ="

        def build(n: int) -> str:
            body = " ".join(_place(_redundant_filler(n), statements))
            return render_chat(tokenizer, f"{intro}\n\n{body}\n\n{question}", prefix)

        n, text, ids = fit_to_length(tokenizer, prompt_tokens, build)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ids, answer=values[asked], answer_prefix=prefix, text=text,
            meta={"hops": self.hops, "num_chains": self.num_chains, "asked": target, "chain": chains[asked],
                  "depths": chain_depths[asked], "values": values,
                  "asked_is_last_chain": max(chain_depths[asked]) == max(map(max, chain_depths)),
                  "filler_sentences": n},
        )

    def score(self, generated_text: str, example: TaskExample) -> float:
        return score_first_number(generated_text, example.answer)


DOCS_SOURCE = "pydoc_data.topics.topics"


def _is_prose(paragraph: str) -> bool:
    """Keep running English text: no indented code/grammar blocks, mostly letters, a full sentence."""
    lines = paragraph.split("\n")
    if any(line.startswith("   ") for line in lines):
        return False
    text = " ".join(line.strip() for line in lines)
    if len(text) < 150 or text[-1] not in ".:":
        return False
    return sum(c.isalpha() or c == " " for c in text) / len(text) > 0.9 and not re.search(r"\d{4}", text)


@functools.lru_cache(maxsize=1)
def docs_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of the Python documentation shipped with CPython (``pydoc_data.topics``).

    In document order (topics sorted by name), whitespace collapsed to single spaces; paragraphs holding
    4-digit numbers are dropped so the inserted years are the only ones. The pool depends on the Python
    version.
    """
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if _is_prose(para):
                out.append(re.sub(r"\s+", " ", para.strip()))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def docs_sentences() -> tuple[tuple[str, bool], ...]:
    """:func:`docs_paragraphs` split into sentences: ``(sentence, ends_its_paragraph)`` in order."""
    out = []
    for para in docs_paragraphs():
        sentences = re.split(r"(?<=[.!?:])\s+(?=[A-Z\"“(])", para)
        out.extend((sent, i == len(sentences) - 1) for i, sent in enumerate(sentences))
    return tuple(out)


def _join_prose(units: Sequence[tuple[str, bool]]) -> str:
    """Sentences joined by spaces, with a blank line after each paragraph's last sentence."""
    parts = []
    for i, (sent, ends) in enumerate(units):
        parts.append(sent)
        if i < len(units) - 1:
            parts.append("\n\n" if ends else " ")
    return "".join(parts)


@dataclass(frozen=True)
class DocsFactTask:
    """Facts "<First Last> was born in <year>." inserted into prose of the Python docs; one person asked.

    The prose is a contiguous run of sentences of ``pydoc_data.topics`` (paragraph breaks kept) starting
    at a seeded paragraph and wrapping around; each fact is one more sentence placed at a seeded depth
    in [0.02, 0.98] of the prose.

    Attributes:
        name: registry name.
        num_facts: people (with distinct names and years in 1900-1999) inserted into the prose.
    """

    name: str = "docs"
    num_facts: int = 4

    @property
    def chance(self) -> float:
        return 1 / self.num_facts

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        rng = _task_rng(self.name, seed)
        pool = docs_sentences()
        starts = [0] + [i + 1 for i, (_, ends) in enumerate(pool[:-1]) if ends]  # paragraph starts
        start = rng.choice(starts)
        people = _full_names(rng, self.num_facts)
        years = [str(y) for y in _distinct_numbers(rng, self.num_facts, 1900, 1999)]
        depths = _sorted_depths(rng, self.num_facts, 0.02, 0.98)
        facts = [f"{p} was born in {y}." for p, y in zip(people, years, strict=True)]
        asked = rng.randrange(self.num_facts)
        intro = ("Read the following documentation. A few sentences about people are hidden in it; "
                 "I will ask you about one of them afterwards.")
        question = f"In which year was {people[asked]} born?"
        prefix = f"{people[asked]} was born in"

        def build(n: int) -> str:
            if n > len(pool):
                raise ValueError("the documentation pool is too small for this prompt length")
            prose = [pool[(start + i) % len(pool)] for i in range(n)]
            body = _join_prose(_place(prose, [(d, (f, False)) for d, f in zip(depths, facts, strict=True)]))
            return render_chat(tokenizer, f"{intro}\n\n{body}\n\n{question}", prefix)

        n, text, ids = fit_to_length(tokenizer, prompt_tokens, build)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ids, answer=years[asked], answer_prefix=prefix, text=text,
            meta={"num_facts": self.num_facts, "asked": people[asked], "depth": depths[asked],
                  "facts": dict(zip(people, years, strict=True)), "sentences": n,
                  "first_sentence": start, "source": DOCS_SOURCE},
        )

    def score(self, generated_text: str, example: TaskExample) -> float:
        return score_first_number(generated_text, example.answer)


TASKS: dict[str, TextTask] = {
    t.name: t for t in (PasskeyTask(), KeyValueTask(), VariableTrackingTask(), DocsFactTask())
}


# ---------------------------------------------------------------------------------------------------
# splits


def split_seeds(split: Split, n: int, first: int = 0) -> list[int]:
    """Seeds ``first .. first + n - 1`` of ``split``'s range; the three ranges are disjoint."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLIT_BASE)}")
    if first < 0 or n < 0 or first + n > SPLIT_SIZE:
        raise ValueError(f"seed indices must lie in [0, {SPLIT_SIZE})")
    base = SPLIT_BASE[split]
    return list(range(base + first, base + first + n))


def split_of_seed(seed: int) -> str:
    """The split a seed belongs to."""
    for name, base in SPLIT_BASE.items():
        if base <= seed < base + SPLIT_SIZE:
            return name
    raise ValueError(f"seed {seed} is in no split")


def make_split(
    task: TextTask | str,
    tokenizer: Tokenizer,
    split: Split,
    n: int,
    prompt_tokens: int = 1536,
    first: int = 0,
) -> list[TaskExample]:
    """``n`` examples of ``task`` (a :class:`TextTask` or a name in :data:`TASKS`) from ``split``.

    ``first`` offsets into the split's seed range (e.g. to draw fresh training prompts each generation).
    """
    t = TASKS[task] if isinstance(task, str) else task
    return [t.make(tokenizer, s, prompt_tokens) for s in split_seeds(split, n, first)]


# ---------------------------------------------------------------------------------------------------
# full-cache evaluation


def generate_answer(model: Generator, tokenizer: Any, example: TaskExample, max_new_tokens: int = 8) -> str:
    """Greedy continuation of the example's prompt (after its answer prefix), decoded."""
    import torch

    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    ids = torch.tensor([example.prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@dataclass
class MeasureConfig:
    """Settings of :func:`measure_full_cache`."""

    tasks: Sequence[str] = field(default_factory=lambda: list(TASKS))
    n: int = 16
    split: str = "val"
    prompt_tokens: int = 1536
    max_new_tokens: int = 8
    threads: int | None = 1
    cache_dir: str | None = None
    output: str = "benchmarks/results/text_tasks_full_cache.md"


def measure_full_cache(cfg: MeasureConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Full-cache accuracy of the bare SmolLM2 per task (one greedy ``generate`` per prompt, fp32)."""
    from namm_transfer.pipelines.common import log, markdown_table, run_metadata, set_threads, write_json
    from namm_transfer.pipelines.models import load_smollm2

    set_threads(cfg.threads)
    model, tokenizer = load_smollm2(cache_dir=cfg.cache_dir)
    meta = run_metadata(argv)
    meta["command"] = "python -m namm_transfer.pipelines.text_tasks " + " ".join(
        sys.argv[1:] if argv is None else argv)
    rows, details = [], []
    for name in cfg.tasks:
        task = TASKS[name]
        examples = make_split(task, tokenizer, cfg.split, cfg.n, cfg.prompt_tokens)  # type: ignore[arg-type]
        scores, seconds = [], []
        for ex in examples:
            t0 = time.perf_counter()
            text = generate_answer(model, tokenizer, ex, cfg.max_new_tokens)
            seconds.append(time.perf_counter() - t0)
            s = task.score(text, ex)
            scores.append(s)
            details.append({"task": name, "seed": ex.seed, "tokens": ex.num_tokens, "answer": ex.answer,
                            "generated": text, "score": s, "seconds": seconds[-1]})
            log(f"{name} seed={ex.seed} tokens={ex.num_tokens} answer={ex.answer} "
                f"generated={text!r} score={s} ({seconds[-1]:.1f} s)")
        rows.append({
            "task": name, "settings": {k: v for k, v in asdict(task).items() if k != "name"},  # type: ignore
            "n": len(examples), "prompt_tokens_mean": statistics.fmean(e.num_tokens for e in examples),
            "accuracy": statistics.fmean(scores), "chance": task.chance,
            "seconds_per_prompt_mean": statistics.fmean(seconds),
        })
    result = {"config": {**asdict(cfg), "tasks": list(cfg.tasks)}, "meta": meta, "rows": rows,
              "examples": details}
    out = Path(cfg.output)
    write_json(out.with_suffix(".json"), result)
    table = markdown_table(
        ["task", "settings", "n", "tokens (mean)", "accuracy", "chance", "s / prompt"],
        [[r["task"], ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-", r["n"],
          f"{r['prompt_tokens_mean']:.0f}", f"{r['accuracy']:.3f}", f"{r['chance']:.3g}",
          f"{r['seconds_per_prompt_mean']:.2f}"] for r in rows],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Full-cache accuracy of SmolLM2-135M-Instruct on the long-context text tasks\n\n"
        f"- command: `{meta['command']}`\n"
        f"- date: {meta['date']}\n"
        f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}, "
        f"torch threads: {meta['torch_threads']}\n"
        f"- bare model, full cache, float32, greedy, one `model.generate` per prompt, "
        f"max_new_tokens={cfg.max_new_tokens}; split `{cfg.split}` (seeds {SPLIT_BASE[cfg.split]}..), "
        f"prompts fitted to <= {cfg.prompt_tokens} tokens\n"
        "- score: exact match of the first number generated after the answer prefix; chance: a guess among "
        "the candidate numbers in the prompt (passkey: a uniform 5-digit guess)\n"
        "- `s / prompt`: wall time of one `generate` (prefill + decoding) on CPU\n\n"
        f"{table}\n"
    )
    log(f"wrote {out} and {out.with_suffix('.json')}")
    print(table)
    return result


def build_parser() -> argparse.ArgumentParser:
    d = MeasureConfig()
    p = argparse.ArgumentParser(
        prog="python -m namm_transfer.pipelines.text_tasks",
        description="Long-context text tasks. --measure: full-cache accuracy of the bare "
                    "SmolLM2-135M-Instruct per task on seeded prompts, written as markdown and JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--measure", action="store_true", help="run the full-cache measurement")
    p.add_argument("--show", metavar="TASK", help="print one example prompt of TASK and exit")
    p.add_argument("--tasks", nargs="+", default=list(d.tasks), choices=list(TASKS), help="tasks to measure")
    p.add_argument("--n", type=int, default=d.n, help="prompts per task")
    p.add_argument("--split", default=d.split, choices=list(SPLIT_BASE), help="seed split of the prompts")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="prompt length in tokens")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="greedy tokens generated")
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    p.add_argument("--cache-dir", default=d.cache_dir, help="converted SmolLM2 cache (None: the default)")
    p.add_argument("--output", default=d.output, help="markdown result path; the JSON goes beside it")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show:
        from namm_transfer.pipelines.models import load_smollm2

        _, tokenizer = load_smollm2(cache_dir=args.cache_dir)
        ex = TASKS[args.show].make(tokenizer, SPLIT_BASE[args.split], args.prompt_tokens)
        print(ex.text)
        print(f"\n--- answer: {ex.answer}  tokens: {ex.num_tokens}  meta: {ex.meta}")
        return 0
    if not args.measure:
        build_parser().print_help()
        return 0
    cfg = MeasureConfig(**{k: v for k, v in vars(args).items() if k in MeasureConfig.__dataclass_fields__})
    measure_full_cache(cfg, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
