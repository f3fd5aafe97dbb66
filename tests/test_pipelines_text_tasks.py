"""Fast tests of the long-context text tasks: generation, splits, scoring (no model is loaded)."""

from __future__ import annotations

import re

import pytest
import torch

from namm_transfer.pipelines.text import tasks as tt
from namm_transfer.pipelines.text.passkey import NEEDLE
from namm_transfer.pipelines.text.tasks import (
    EXTRA_TASKS,
    SPLIT_BASE,
    TASKS,
    DocsFactTask,
    KeyValueTask,
    MultiHopTask,
    TaskExample,
    TextTask,
    fit_to_length,
    make_split,
    split_of_seed,
    split_seeds,
)

ALL_TASKS = {**TASKS, **EXTRA_TASKS}


class WordTokenizer:
    """Stand-in tokenizer: special tokens, words and punctuation (with their leading space) are tokens."""

    chat_template = None
    pad_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"<pad>": 0}
        self.inverse: dict[int, str] = {0: ""}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        pieces = re.findall(r"<\|\w+\|>|\s?\w+|\s?[^\w\s]|\s+", text)
        ids = []
        for piece in pieces:
            if piece not in self.vocab:
                self.vocab[piece] = len(self.vocab)
                self.inverse[self.vocab[piece]] = piece
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.inverse[int(i)] for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        ids = self.encode(text, add_special_tokens)
        offsets, at = [], 0
        for i in ids:
            piece = self.inverse[i]
            offsets.append((at, at + len(piece)))
            at += len(piece)
        return {"input_ids": ids, "offset_mapping": offsets}


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer()


@pytest.fixture(scope="module")
def examples(tok) -> dict[str, list[TaskExample]]:
    """Six validation examples of every task at 800 tokens (built once)."""
    return {name: make_split(task, tok, "val", 6, 800) for name, task in ALL_TASKS.items()}


def test_registry_and_protocol():
    assert set(TASKS) == {"passkey", "kv", "hop", "docs"}
    assert not set(TASKS) & set(EXTRA_TASKS)
    for name, task in ALL_TASKS.items():
        assert isinstance(task, TextTask) and task.name == name
        assert 0 < task.chance <= 1 and task.max_new_tokens >= 8
    assert tt.get_task("vartrack") is EXTRA_TASKS["vartrack"]
    with pytest.raises(KeyError):
        tt.get_task("nope")


@pytest.mark.parametrize("name", list(ALL_TASKS))
def test_deterministic_per_seed(name):
    a = ALL_TASKS[name].make(WordTokenizer(), 7, 600)
    b = ALL_TASKS[name].make(WordTokenizer(), 7, 600)
    assert (a.prompt_ids, a.answer, a.text, a.meta) == (b.prompt_ids, b.answer, b.text, b.meta)
    assert a.task == name and a.seed == 7


@pytest.mark.parametrize("name", list(ALL_TASKS))
def test_seeds_differ(name, examples):
    exs = examples[name]
    assert len({e.text for e in exs}) == len(exs)
    assert len({e.answer for e in exs}) >= len(exs) - 1  # 4-digit years may collide by chance
    assert [e.seed for e in exs] == split_seeds("val", 6)


def test_same_seed_differs_across_tasks(tok):
    kv, hop = TASKS["kv"].make(tok, 3, 600), TASKS["hop"].make(tok, 3, 600)
    assert kv.meta["keys"] != hop.meta["keys"]


def test_splits_disjoint(tok):
    seeds = {s: set(split_seeds(s, 1000)) for s in SPLIT_BASE}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]
    for split, ss in seeds.items():
        assert {split_of_seed(x) for x in ss} == {split}
    assert split_of_seed(split_seeds("test", 1, first=tt.SPLIT_SIZE - 1)[0]) == "test"
    assert split_seeds("train", 3, first=10) == [10, 11, 12]
    with pytest.raises(ValueError):
        split_seeds("dev", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        split_seeds("val", 2, first=tt.SPLIT_SIZE - 1)
    with pytest.raises(ValueError):
        split_of_seed(-1)
    train = make_split("kv", tok, "train", 4, 400)
    val = make_split("kv", tok, "val", 4, 400)
    test = make_split(TASKS["kv"], tok, "test", 4, 400)
    texts = [{e.text for e in exs} for exs in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert {split_of_seed(e.seed) for e in train + val + test} == {"train", "val", "test"}


@pytest.mark.parametrize("name", list(ALL_TASKS))
def test_prompt_ends_with_answer_prefix(name, tok, examples):
    for ex in examples[name]:
        assert ex.answer_prefix and ex.text.endswith("<|im_start|>assistant\n" + ex.answer_prefix)
        assert tok.decode(ex.prompt_ids) == ex.text
        assert ex.text.count("<|im_start|>user") == 1


def _user_body(ex: TaskExample) -> str:
    return ex.text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_answers_in_prompt(examples):
    for ex in examples["passkey"]:
        assert NEEDLE.format(key=ex.answer) in ex.text
    for ex in examples["kv"]:
        assert f"The ticket number of {ex.meta['asked']} is {ex.answer}." in ex.text
        facts = re.findall(r"The ticket number of [A-Z]\w+ [A-Z]\w+ is \d{5}\.", ex.text)
        assert len(facts) == ex.meta["num_keys"]
        assert ex.answer_prefix == f"The ticket number of {ex.meta['asked']} is"
    for ex in examples["docs"]:
        assert f"{ex.meta['asked']} was born in {ex.answer}." in ex.text
        assert len(re.findall(r"\b(?:19\d\d)\b", _user_body(ex))) == ex.meta["num_facts"]


def test_hop_answer_derivable(examples):
    for ex in examples["hop"]:
        body = _user_body(ex)
        role = re.search(r"Who was the (.+?),", body).group(1)
        person = re.search(rf"The {role} was ([A-Z]\w+ [A-Z]\w+)\.", body).group(1)
        code = re.search(rf"The ticket number of {person} is (\d{{5}})\.", body).group(1)
        assert code == ex.answer and person == ex.meta["person"]
        assert ex.answer_prefix == f"The {role} was"
        assert body.count(f"The ticket number of {person}") == 1  # the answer is not next to the question


def test_vartrack_answer_is_latest_assignment(examples):
    for ex in examples["vartrack"]:
        body = _user_body(ex)
        asked = re.search(r"latest ticket number of (.+?)\?", body).group(1)
        values = re.findall(rf"The ticket number of {asked} is (?:changed to )?(\d{{5}})\.", body)
        assert len(values) == ex.meta["updates"] + 1 and values[-1] == ex.answer
        assert re.findall(r"\d{5}", body)[-1] != ex.answer  # "copy the last code" does not solve it


def test_alias_answer_derivable(examples):
    for ex in examples["alias"]:
        body = _user_body(ex)
        assign = dict(re.findall(r"\b([A-Z]{3}) = (\w+)\.", body))
        var = re.search(r"What is the value of ([A-Z]{3})\?", body).group(1)
        for _ in range(ex.meta["hops"]):
            var = assign[var]
        assert assign[var] == ex.answer


@pytest.mark.parametrize("name", list(ALL_TASKS))
@pytest.mark.parametrize("n", [400, 1000, 1536])
def test_requested_length(name, n):
    ex = ALL_TASKS[name].make(WordTokenizer(), 1, n)
    tolerance = 0.12 * n if name == "docs" else 16  # docs prose is added a sentence at a time
    assert n - tolerance <= ex.num_tokens <= n


@pytest.mark.parametrize("name", list(ALL_TASKS))
def test_too_short_raises(name, tok):
    with pytest.raises(ValueError):
        ALL_TASKS[name].make(tok, 0, 20)


def test_fit_to_length(tok):
    def build(n: int) -> str:
        return "x" * 3 + " y" * n

    n, text, ids = fit_to_length(tok, 50, build)
    assert len(ids) <= 50 and len(tok.encode(build(n + 1))) > 50 and text == build(n)
    assert fit_to_length(tok, 1, lambda n: " a" * n)[0] == 1
    with pytest.raises(ValueError, match="too short"):
        fit_to_length(tok, 0, build)
    with pytest.raises(ValueError, match="does not grow"):
        fit_to_length(tok, 10, lambda n: "a" * (n + 1))


def test_evidence_spread_over_the_context(tok):
    depths = [e.meta["depth"] for e in make_split("kv", tok, "train", 40, 300)]
    assert min(depths) < 0.3 and max(depths) > 0.7 and all(0.02 <= d <= 0.98 for d in depths)


@pytest.mark.parametrize("name", ["kv", "docs", "hop"])
def test_evidence_mask_marks_every_fact_and_nothing_else(name, tok, examples):
    for ex in examples[name]:
        mask = tt.evidence_mask(ex, tok)
        assert len(mask) == ex.num_tokens
        marked = tok.decode([i for i, m in zip(ex.prompt_ids, mask, strict=True) if m])
        facts = tt.evidence_sentences(ex)
        assert len(facts) == {"kv": 8, "docs": 4, "hop": 7}[name]
        for fact in facts:
            assert fact in marked
        # the marked tokens are exactly the facts' tokens
        assert sum(mask) == sum(len(tok.encode(f)) for f in facts)
        assert ex.answer in marked


def test_evidence_mask_of_passkey_is_the_needle(tok, examples):
    ex = examples["passkey"][0]
    start, end = ex.meta["needle_span"]
    assert tt.evidence_mask(ex, tok) == [start <= i < end for i in range(ex.num_tokens)]


def test_evidence_mask_errors(tok, examples):
    with pytest.raises(ValueError, match="no evidence sentences"):
        tt.evidence_mask(examples["vartrack"][0], tok)
    ex = examples["kv"][0]
    broken = TaskExample(ex.task, ex.seed, ex.prompt_ids, ex.answer, ex.answer_prefix,
                         ex.text.replace("The ticket number of", "The ticket code of", 1), ex.meta)
    with pytest.raises(ValueError, match="differs from its prompt_ids|is not in the prompt"):
        tt.evidence_mask(broken, tok)


def test_docs_filler_is_stdlib_documentation(examples):
    from pydoc_data.topics import topics

    corpus = re.sub(r"\s+", " ", " ".join(topics.values()))
    pool = {s for s, _ in tt.docs_sentences()}
    assert len(pool) > 800
    for ex in examples["docs"]:
        assert ex.meta["source"] == "pydoc_data.topics.topics"
        body = _user_body(ex).split("\n\n", 1)[1].rsplit("\n\n", 1)[0]  # drop the instruction and question
        for fact in (f"{p} was born in {y}." for p, y in ex.meta["facts"].items()):
            assert body.count(fact) == 1
            body = body.replace(fact, "\n\n")
        prose = [p.strip() for p in re.split(r"\n\n", body) if p.strip()]
        assert sum(len(p) for p in prose) > 2000
        for paragraph in prose:
            assert paragraph in corpus  # contiguous runs of real documentation text
        sentences = [s for p in prose for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z\"“(])", p)]
        assert sum(s in pool for s in sentences) >= 0.95 * len(sentences)


def test_docs_paragraphs_are_prose():
    paras = tt.docs_paragraphs()
    assert len(paras) > 200
    assert all(len(p) >= 150 and "\n" not in p and not re.search(r"\d{4}", p) for p in paras)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (" 60494. It", True),
        ("60494", True),
        (" **60494**", True),
        (" 60494 is the code, not 12345", True),
        (" 6049", False),
        (" 604945", False),
        (" 12345 or 60494", False),
        (" the code is", False),
        ("", False),
    ],
)
def test_score_first_number(text, ok):
    ex = TaskExample(task="kv", seed=0, prompt_ids=[], answer="60494")
    for name in ("passkey", "kv", "docs", "vartrack", "alias"):
        assert ALL_TASKS[name].score(text, ex) == float(ok)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (" Maria Reed. The code for Maria Reed is 60494.", True),
        (" Maria Reed, who won in 2019. The code for the winner is 60494. The code for", True),
        (" Maria Reed. The code for the winner was 60494", True),
        (" Maria Reed. The code for Maria Reed is 12345. Or 60494.", False),
        (" Maria Reed. The code is 604941.", False),
        (" Maria Reed.", False),
    ],
)
def test_score_hop(text, ok):
    ex = TaskExample(task="hop", seed=0, prompt_ids=[], answer="60494")
    assert TASKS["hop"].score(text, ex) == float(ok)


def test_score_years():
    ex = TaskExample(task="docs", seed=0, prompt_ids=[], answer="1942")
    assert TASKS["docs"].score(" 1942.", ex) == 1.0
    assert TASKS["docs"].score(" 1942, in London. He died in 1990.", ex) == 1.0
    assert TASKS["docs"].score(" 1943.", ex) == 0.0
    assert TASKS["docs"].score(" the year 19420", ex) == 0.0


def test_difficulty_knobs(tok):
    ex = KeyValueTask(num_keys=32).make(tok, 0, 1200)
    assert len(ex.meta["keys"]) == 32 and KeyValueTask(num_keys=32).chance == 1 / 32
    ex = MultiHopTask(num_keys=8, num_roles=3).make(tok, 0, 1000)
    assert len(ex.meta["roles"]) == 3 and len(set(ex.meta["roles"].values())) == 3
    assert ex.meta["roles"][ex.meta["role"]] == ex.meta["person"]
    with pytest.raises(ValueError):
        MultiHopTask(num_keys=2, num_roles=3).make(tok, 0, 1000)
    ex = DocsFactTask(num_facts=8).make(tok, 0, 1000)
    assert len(ex.meta["facts"]) == 8


class _EchoModel:
    """Stand-in LM: ``generate`` appends a fixed continuation to the prompt."""

    def __init__(self, continuation: list[int]) -> None:
        self.continuation = continuation
        self.kwargs: dict = {}

    def generate(self, input_ids, **kwargs):
        self.kwargs = kwargs
        extra = torch.tensor([self.continuation[: kwargs["max_new_tokens"]]])
        return torch.cat([input_ids, extra], dim=1)


def test_generate_answer_greedy_continuation(tok):
    ex = TASKS["kv"].make(tok, 0, 300)
    model = _EchoModel(tok.encode(f" {ex.answer}. The end of the text"))
    text = tt.generate_answer(model, tok, ex, max_new_tokens=4)
    assert model.kwargs["do_sample"] is False and model.kwargs["max_new_tokens"] == 4
    assert text == f" {ex.answer}. The end"  # the continuation only, cut at max_new_tokens
    assert TASKS["kv"].score(text, ex) == 1.0


def test_cli_measures_and_shows_the_tasks(tok, capsys, monkeypatch):
    from namm_transfer.pipelines import models
    from namm_transfer.pipelines.cli import main, parse

    _, cfg = parse(["bench", "text-tasks", "--tasks", "kv", "hop", "--n", "3"])
    assert cfg == tt.MeasureConfig(tasks=["kv", "hop"], n=3) and cfg.max_new_tokens is None
    monkeypatch.setattr(models, "load_smollm2", lambda cache_dir=None: (None, tok))
    assert main(["show-text-task", "hop", "--split", "test", "--prompt-tokens", "300"]) == 0
    ex = TASKS["hop"].make(tok, SPLIT_BASE["test"], 300)
    assert capsys.readouterr().out == f"{ex.text}\n\n--- answer: {ex.answer}  tokens: {ex.num_tokens}  " \
                                      f"meta: {ex.meta}\n"
