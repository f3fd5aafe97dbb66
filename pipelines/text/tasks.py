"""Seeded long-context text tasks with reference answers and scorers (fitness for NAMM evolution).

Four tasks, each a :class:`TextTask` in :data:`TASKS`:

- ``passkey``: one 5-digit pass key hidden in highly redundant filler (wraps :mod:`.passkey`);
  forgetting the filler is free.
- ``kv``: multi-key-value retrieval: several similar facts ("The ticket number of Maria Reed is
  30517.") scattered in redundant filler; one name is asked.
- ``hop``: a two-hop lookup: "The winner of the race was Maria Reed." plus the ticket numbers of
  several people; the winner's number is asked. The answer prefix ("The winner of the race was") has the model
  write the intermediate name before the number, so ``max_new_tokens`` is 20 for this task.
- ``docs``: facts ("Irene Walsh was born in 1942.") inserted into real English prose: sentences of
  the Python documentation shipped with CPython (``pydoc_data.topics.topics``), so the filler is not
  synthetic; one person's year is asked.

:data:`EXTRA_TASKS` holds two variable-tracking variants SmolLM2-135M cannot do at ~1.5k tokens (its
full-cache accuracy is at or below chance; measured): reassignment tracking (``vartrack``) and
multi-hop assignment chains "B = A." (``alias``). They stay usable for larger models.

Every prompt uses the tokenizer's chat template (SmolLM2's ChatML; Gemma 3's turns for Gemma-3-270M,
whose template starts with ``<bos>``) and ends inside the assistant turn with an answer prefix
("The ticket number of Maria Reed is"), so the answer is in the first generated tokens (without it
SmolLM2 restates the question).
Prompts are the longest that fit in ``prompt_tokens``. Splits are disjoint by seed range
(:func:`split_seeds`); the same seed gives unrelated prompts in different tasks. Scoring is exact
match of the first number generated (``hop``: of the first 5-digit number), 1.0 or 0.0. Generate with
greedy decoding and each task's ``max_new_tokens``.

``namm-transfer bench text-tasks`` measures the bare model's full-cache accuracy per task on
validation prompts and writes ``benchmarks/results/text_tasks_full_cache.md`` and ``.json``;
``namm-transfer show-text-task TASK`` prints one prompt.
"""

from __future__ import annotations

import functools
import random
import re
import statistics
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from namm_transfer.pipelines.text import passkey as _passkey
from namm_transfer.pipelines.text.passkey import Tokenizer, render_chat

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
        task: the task's name (a key of :data:`TASKS` or :data:`EXTRA_TASKS`).
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
    max_new_tokens: int  # greedy tokens to generate so that the scored answer is complete

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
        ValueError: when even ``build(min_units)`` is longer than ``prompt_tokens``, or when the prompt
            does not grow (still fits at ``n`` > 64 ``prompt_tokens``).
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
        if hi > max(prompt_tokens, 1) * 64:
            raise ValueError(f"build({hi}) still fits in {prompt_tokens} tokens: the prompt does not grow")
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
    """``k`` "First Last" names, no first name and no surname used twice."""
    if k > len(SURNAMES):
        raise ValueError(f"at most {len(SURNAMES)} names, asked for {k}")
    firsts, lasts = rng.sample(NAMES, k), rng.sample(SURNAMES, k)
    return [f"{first} {last}" for first, last in zip(firsts, lasts, strict=True)]


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
    max_new_tokens: int = 8

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
    """Multi-key-value retrieval: ``num_keys`` facts "The ticket number of <name> is <5 digits>."

    The facts sit at seeded depths in [0.02, 0.98] of the redundant filler; one name is asked.

    Attributes:
        name: registry name.
        num_keys: facts in the prompt (all with distinct names and numbers).
    """

    name: str = "kv"
    num_keys: int = 8
    max_new_tokens: int = 8

    @property
    def chance(self) -> float:
        return 1 / self.num_keys

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        rng = _task_rng(self.name, seed)
        names = _full_names(rng, self.num_keys)
        codes = [str(c) for c in _distinct_numbers(rng, self.num_keys, 10_000, 99_999)]
        depths = _sorted_depths(rng, self.num_keys, 0.02, 0.98)
        facts = [f"The ticket number of {n} is {c}." for n, c in zip(names, codes, strict=True)]
        asked = rng.randrange(self.num_keys)
        intro = ("Below is a long text with the ticket numbers of many people hidden in it. Read it "
                 "carefully: I will ask you for the ticket number of one person afterwards.")
        question = f"What is the ticket number of {names[asked]}?"
        prefix = f"The ticket number of {names[asked]} is"

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


ROLES = (
    "winner of the race", "captain of the team", "host of the party", "judge of the contest",
    "author of the report", "owner of the boat", "leader of the expedition", "chair of the committee",
)


@dataclass(frozen=True)
class MultiHopTask:
    """Two-hop lookup: "The <role> was <name>." plus ``num_keys`` facts "The ticket number of <name> is <n>.".

    The question asks the ticket number of the person holding one role ("... what is the ticket number
    of the winner?"), so the model must resolve the role to a name, then the name to a number; both facts
    sit at independent seeded depths of the redundant filler, among the other people's numbers and
    ``num_roles - 1`` other roles held by other people. The answer prefix ("The winner of the race
    was") makes the model write the intermediate hop (the name) before the number, which SmolLM2-135M
    needs: asked for the number directly, or to follow assignment chains (:class:`AliasChainTask`), it is
    at chance. The number therefore comes ~10 tokens after the prefix: generate ``max_new_tokens`` (20).
    Score: the first 5-digit number generated is the answer (names hold no digits).

    Attributes:
        name: registry name.
        num_keys: people with ticket numbers (all distinct names and numbers).
        num_roles: role facts (one asked; each role held by a different person).
    """

    name: str = "hop"
    num_keys: int = 6
    num_roles: int = 1
    max_new_tokens: int = 20

    @property
    def chance(self) -> float:
        return 1 / self.num_keys

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        if not 1 <= self.num_roles <= min(len(ROLES), self.num_keys):
            raise ValueError(f"num_roles must be in [1, {min(len(ROLES), self.num_keys)}]")
        rng = _task_rng(self.name, seed)
        names = _full_names(rng, self.num_keys)
        codes = [str(c) for c in _distinct_numbers(rng, self.num_keys, 10_000, 99_999)]
        roles = rng.sample(ROLES, self.num_roles)
        holders = rng.sample(range(self.num_keys), self.num_roles)
        code_depths = [rng.uniform(0.02, 0.98) for _ in names]
        role_depths = [rng.uniform(0.02, 0.98) for _ in roles]
        inserts = [(d, f"The ticket number of {n} is {c}.")
                   for d, n, c in zip(code_depths, names, codes, strict=True)]
        inserts += [(d, f"The {r} was {names[h]}.")
                    for d, r, h in zip(role_depths, roles, holders, strict=True)]
        asked = rng.randrange(self.num_roles)
        role, person = roles[asked], holders[asked]
        intro = ("Below is a long text with the ticket numbers of several people and some facts about them "
                 "hidden in it. Read it carefully.")
        question = f"Who was the {role}, and what is the ticket number of the {role.split(' of ')[0]}?"
        prefix = f"The {role} was"

        def build(n: int) -> str:
            body = " ".join(_place(_redundant_filler(n), inserts))
            return render_chat(tokenizer, f"{intro}\n\n{body}\n\n{question}", prefix)

        n, text, ids = fit_to_length(tokenizer, prompt_tokens, build)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ids, answer=codes[person], answer_prefix=prefix, text=text,
            meta={"num_keys": self.num_keys, "num_roles": self.num_roles, "role": role,
                  "person": names[person], "depths": [role_depths[asked], code_depths[person]],
                  "keys": dict(zip(names, codes, strict=True)),
                  "roles": {r: names[h] for r, h in zip(roles, holders, strict=True)}, "filler_sentences": n},
        )

    def score(self, generated_text: str, example: TaskExample) -> float:
        match = re.search(r"(?<!\d)\d{5}(?!\d)", generated_text)
        return float(match is not None and match.group(0) == example.answer)


@dataclass(frozen=True)
class VariableTrackingTask:
    """Variable tracking through reassignments (not in :data:`TASKS`: SmolLM2-135M fails it).

    ``num_vars`` people's ticket numbers are stated ("The ticket number of Maria Reed is 30517.") and
    later changed ``updates`` times ("The ticket number of Maria Reed is changed to 71046."), at
    increasing seeded depths of the filler; the latest number of one person is asked. The person whose
    change is the last statement of the text is never asked, so copying the last number in the text
    scores 0. SmolLM2-135M does exactly that at ~1.5k tokens (mostly answering the other person's latest
    number): below chance.

    Attributes:
        name: task name.
        num_vars: people (variables) in the prompt (at least 2).
        updates: reassignments per person (the answer is the last of ``updates + 1`` values).
    """

    name: str = "vartrack"
    num_vars: int = 2
    updates: int = 1
    max_new_tokens: int = 8

    @property
    def chance(self) -> float:
        return 1 / (self.updates + 1)  # the right person found, one of its values picked at random

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        if self.num_vars < 2:
            raise ValueError("num_vars must be at least 2")
        rng = _task_rng(self.name, seed)
        names = _full_names(rng, self.num_vars)
        values = _distinct_numbers(rng, self.num_vars * (self.updates + 1), 10_000, 99_999)
        history = {n: [str(v) for v in values[i * (self.updates + 1) : (i + 1) * (self.updates + 1)]]
                   for i, n in enumerate(names)}
        statements: list[tuple[float, str]] = []
        last_depth = {}
        for person, vals in history.items():
            depths = _sorted_depths(rng, len(vals), 0.02, 0.98)
            statements.append((depths[0], f"The ticket number of {person} is {vals[0]}."))
            statements += [(d, f"The ticket number of {person} is changed to {v}.")
                           for d, v in zip(depths[1:], vals[1:], strict=True)]
            last_depth[person] = depths[-1]
        final = max(last_depth, key=last_depth.__getitem__)
        asked = rng.choice([p for p in names if p != final])
        intro = ("Below is a long text with the ticket numbers of several people hidden in it. They can be "
                 "changed; remember the latest ticket number of each person.")
        question = f"What is the latest ticket number of {asked}?"
        prefix = f"The latest ticket number of {asked} is"

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


@dataclass(frozen=True)
class AliasChainTask:
    """Multi-hop variable chains "QKZ = 53841.", "MBR = QKZ.", ... (not in :data:`TASKS`: at chance).

    ``num_chains`` chains of ``hops`` copy statements each are interleaved, in order within each chain,
    at seeded depths of the filler; the value of one chain's last variable is asked, with an answer
    prefix ("MBR =") that lets the model write the hops out. SmolLM2-135M is at chance at ~1.5k tokens
    (and at 512), whether the hops are written out or the value asked directly.

    Attributes:
        name: task name.
        hops: copy statements per chain.
        num_chains: chains in the prompt (the others are distractors with their own numbers).
    """

    name: str = "alias"
    hops: int = 1
    num_chains: int = 2
    max_new_tokens: int = 16

    @property
    def chance(self) -> float:
        return 1 / self.num_chains

    def make(self, tokenizer: Tokenizer, seed: int, prompt_tokens: int) -> TaskExample:
        rng = _task_rng(self.name, seed)
        names: list[str] = []
        while len(names) < self.num_chains * (self.hops + 1):
            v = "".join(rng.choice(string.ascii_uppercase) for _ in range(3))
            if v not in names:
                names.append(v)
        values = [str(v) for v in _distinct_numbers(rng, self.num_chains, 10_000, 99_999)]
        chains = [names[c * (self.hops + 1) : (c + 1) * (self.hops + 1)] for c in range(self.num_chains)]
        statements: list[tuple[float, str]] = []
        for chain, value in zip(chains, values, strict=True):
            depths = _sorted_depths(rng, len(chain), 0.02, 0.98)
            statements.append((depths[0], f"{chain[0]} = {value}."))
            statements += [(depths[i], f"{chain[i]} = {chain[i - 1]}.") for i in range(1, len(chain))]
        asked = rng.randrange(self.num_chains)
        target = chains[asked][-1]
        intro = ("Memorize and track the chains of variable assignments hidden in the following text. "
                 "A variable assigned another variable takes that variable's value.")
        question = (f"What is the value of {target}? Follow the chain of assignments back to the number, "
                    "one variable at a time.")
        prefix = f"{target} ="

        def build(n: int) -> str:
            body = " ".join(_place(_redundant_filler(n), statements))
            return render_chat(tokenizer, f"{intro}\n\n{body}\n\n{question}", prefix)

        n, text, ids = fit_to_length(tokenizer, prompt_tokens, build)
        return TaskExample(
            task=self.name, seed=seed, prompt_ids=ids, answer=values[asked], answer_prefix=prefix, text=text,
            meta={"hops": self.hops, "num_chains": self.num_chains, "asked": target, "chain": chains[asked],
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
    max_new_tokens: int = 8

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
    t.name: t for t in (PasskeyTask(), KeyValueTask(), MultiHopTask(), DocsFactTask())
}
# Variants SmolLM2-135M cannot do at ~1.5k tokens (measured; kept for larger models and the record).
EXTRA_TASKS: dict[str, TextTask] = {t.name: t for t in (VariableTrackingTask(), AliasChainTask())}


# ---------------------------------------------------------------------------------------------------
# evidence

SINKS = 4  # first tokens every evidence keep-set includes: the attention sink (StreamingLLM's 4)


def evidence_sentences(example: TaskExample) -> list[str]:
    """Every fact sentence of ``example`` that some question about its context could need (all keys,
    roles or people, not only the asked one), as written in the prompt. Passkey prompts use their
    ``needle_span`` instead (see :func:`evidence_mask`)."""
    meta = example.meta
    if example.task in ("kv", "hop"):
        out = [f"The ticket number of {n} is {c}." for n, c in meta["keys"].items()]
        return out + [f"The {r} was {n}." for r, n in meta.get("roles", {}).items()]
    if example.task == "docs":
        return [f"{p} was born in {y}." for p, y in meta["facts"].items()]
    raise ValueError(f"no evidence sentences are defined for task {example.task!r}")


def evidence_mask(example: TaskExample, tokenizer: Tokenizer) -> list[bool]:
    """Per prompt token: does it overlap a fact sentence (:func:`evidence_sentences`; for ``passkey``
    the needle's tokens). Question-agnostic: it marks what any question could ask for.

    Raises:
        ValueError: when a fact sentence is not found in the prompt's text, or the tokenizer's offsets
            do not reproduce the prompt's ids.
    """
    n = example.num_tokens
    if example.task == "passkey":
        start, end = example.meta["needle_span"]
        return [start <= i < end for i in range(n)]
    enc = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(example.prompt_ids):
        raise ValueError("the tokenizer's encoding of the prompt text differs from its prompt_ids")
    spans = []
    for sentence in evidence_sentences(example):
        at = example.text.find(sentence)
        if at < 0:
            raise ValueError(f"fact {sentence!r} is not in the prompt of {example.task} seed {example.seed}")
        spans.append((at, at + len(sentence)))
    return [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]


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


def get_task(name: str) -> TextTask:
    """The task called ``name`` in :data:`TASKS` or :data:`EXTRA_TASKS`."""
    try:
        return TASKS[name] if name in TASKS else EXTRA_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; choose from {', '.join([*TASKS, *EXTRA_TASKS])}") from None


def make_split(
    task: TextTask | str,
    tokenizer: Tokenizer,
    split: Split,
    n: int,
    prompt_tokens: int = 1536,
    first: int = 0,
) -> list[TaskExample]:
    """``n`` examples of ``task`` (a :class:`TextTask` or a task name) from ``split``.

    ``first`` offsets into the split's seed range (e.g. to draw fresh training prompts each generation).
    """
    t = get_task(task) if isinstance(task, str) else task
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
    """Settings of :func:`measure_full_cache`.

    Attributes:
        tasks: task names (from :data:`TASKS` and :data:`EXTRA_TASKS`).
        n: prompts per task.
        split: seed split the prompts come from.
        prompt_tokens: prompt length in tokens (each prompt is the longest that fits).
        max_new_tokens: greedy tokens generated; None uses each task's ``max_new_tokens``.
        threads: torch intra-op threads.
        cache_dir: converted SmolLM2 cache (None: the default).
        output: markdown result path; the JSON goes beside it.
    """

    tasks: Sequence[str] = field(default_factory=lambda: [*TASKS, *EXTRA_TASKS])
    n: int = 16
    split: str = "val"
    prompt_tokens: int = 1536
    max_new_tokens: int | None = None
    threads: int | None = 1
    cache_dir: str | None = None
    output: str = "benchmarks/results/text_tasks_full_cache.md"


def _settings(task: TextTask) -> dict[str, Any]:
    return {k: v for k, v in asdict(task).items() if k not in ("name", "max_new_tokens")}  # type: ignore


def measure_full_cache(cfg: MeasureConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Full-cache accuracy of the bare SmolLM2 per task (one greedy ``generate`` per prompt, fp32)."""
    from namm_transfer.pipelines.common import log, markdown_table, run_metadata, set_threads, write_json
    from namm_transfer.pipelines.models import load_smollm2

    set_threads(cfg.threads)
    model, tokenizer = load_smollm2(cache_dir=cfg.cache_dir)
    meta = run_metadata(argv)
    rows, details = [], []
    for name in cfg.tasks:
        task = get_task(name)
        new_tokens = cfg.max_new_tokens or task.max_new_tokens
        examples = make_split(task, tokenizer, cfg.split, cfg.n, cfg.prompt_tokens)  # type: ignore[arg-type]
        scores, seconds = [], []
        for ex in examples:
            t0 = time.perf_counter()
            text = generate_answer(model, tokenizer, ex, new_tokens)
            seconds.append(time.perf_counter() - t0)
            s = task.score(text, ex)
            scores.append(s)
            details.append({"task": name, "seed": ex.seed, "tokens": ex.num_tokens, "answer": ex.answer,
                            "generated": text, "score": s, "seconds": seconds[-1], "meta": ex.meta})
            log(f"{name} seed={ex.seed} tokens={ex.num_tokens} answer={ex.answer} "
                f"generated={text!r} score={s} ({seconds[-1]:.1f} s)")
        acc = statistics.fmean(scores)
        rows.append({
            "task": name, "in_registry": name in TASKS, "settings": _settings(task),
            "max_new_tokens": new_tokens, "n": len(examples),
            "prompt_tokens_mean": statistics.fmean(e.num_tokens for e in examples),
            "prompt_tokens_min": min(e.num_tokens for e in examples),
            "accuracy": acc, "accuracy_se": (acc * (1 - acc) / len(scores)) ** 0.5, "chance": task.chance,
            "seconds_per_prompt_mean": statistics.fmean(seconds),
        })
    result = {"config": {**asdict(cfg), "tasks": list(cfg.tasks)}, "meta": meta, "rows": rows,
              "examples": details}
    out = Path(cfg.output)
    write_json(out.with_suffix(".json"), result)
    table = markdown_table(
        ["task", "in TASKS", "settings", "n", "tokens (mean)", "new tokens", "accuracy", "± se", "chance",
         "s / prompt"],
        [[r["task"], "yes" if r["in_registry"] else "no",
          ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "-", r["n"],
          f"{r['prompt_tokens_mean']:.0f}", r["max_new_tokens"], f"{r['accuracy']:.3f}",
          f"{r['accuracy_se']:.3f}", f"{r['chance']:.3g}", f"{r['seconds_per_prompt_mean']:.2f}"]
         for r in rows],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# Full-cache accuracy of SmolLM2-135M-Instruct on the long-context text tasks\n\n"
        f"- command: `{meta['command']}`\n"
        f"- date: {meta['date']}\n"
        f"- torch {meta['torch']}, transformers {meta['transformers']}, python {meta['python']}, "
        f"torch threads: {meta['torch_threads']}, CPU shared with another busy process\n"
        f"- bare model, full cache, float32, greedy, one `model.generate` per prompt; split `{cfg.split}` "
        f"(seeds {SPLIT_BASE[cfg.split]}..{SPLIT_BASE[cfg.split] + cfg.n - 1}), each prompt the longest "
        f"that fits in {cfg.prompt_tokens} tokens\n"
        "- score: exact match of the first number generated after the answer prefix (`hop`: the first "
        "5-digit number, after the model names the intermediate person)\n"
        "- chance: a guess among the prompt's candidates for the asked item: passkey a uniform 5-digit "
        "guess, kv/hop 1/keys, docs 1/facts, vartrack 1/(updates+1) (the asked person's values), alias "
        "1/chains\n"
        "- `in TASKS`: `no` rows are variants kept out of the registry because the model cannot do them\n"
        "- `± se`: binomial standard error; `s / prompt`: wall time of one `generate` "
        "(prefill + decoding)\n\n"
        f"{table}\n"
    )
    log(f"wrote {out} and {out.with_suffix('.json')}")
    print(table)
    return result


@dataclass
class ShowConfig:
    """Settings of :func:`show_example`.

    Attributes:
        task: task name (from :data:`TASKS` and :data:`EXTRA_TASKS`).
        split: seed split the prompt comes from (its first seed).
        prompt_tokens: prompt length in tokens (the prompt is the longest that fits).
        cache_dir: converted SmolLM2 cache (None: the default).
    """

    task: str
    split: str = "val"
    prompt_tokens: int = 1536
    cache_dir: str | None = None


def show_example(cfg: ShowConfig) -> str:
    """Print (and return) one prompt of a task in SmolLM2's chat template, with its answer."""
    from namm_transfer.pipelines.models import load_smollm2

    _, tokenizer = load_smollm2(cache_dir=cfg.cache_dir)
    ex = get_task(cfg.task).make(tokenizer, SPLIT_BASE[cfg.split], cfg.prompt_tokens)
    text = f"{ex.text}\n\n--- answer: {ex.answer}  tokens: {ex.num_tokens}  meta: {ex.meta}"
    print(text)
    return text
