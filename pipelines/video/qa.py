"""Multiple-choice video QA: the one sample schema, reader, prompt and scorer.

``make-video-qa`` writes this format, ``train-video-model`` trains and scores on it, and ``eval-video``
reads it (and normalises MLVU / LongVideoBench into the same :class:`VideoQASample`); every model output
is scored by :func:`score_output`, so a model's training-time accuracy and its ``eval-video`` full-cache
accuracy are measured the same way.

Generic JSONL format (one JSON object a line; a ``.json`` file may hold the same objects as a list)::

    {"video": "videos/test/test-000007.mp4",   # relative to VIDEOS (default: the file's folder)
     "question": "A coloured shape appeared briefly. What colour was it?",
     "options": ["red", "green", "blue", "yellow"],   # 2 to 26 strings, without letters
     "answer": "C",                                   # the letter of the right option (any case)
     "task_type": "colour",                           # optional (default "all"): accuracy per type
     "id": "test-000007",                             # optional (default "<file stem>:<index>")
     ...}                                             # anything else goes to ``meta``

Option ``i`` is letter ``"ABC..."[i]``; one rule for the option count everywhere: 2 to 26, one letter
each (:data:`MIN_OPTIONS`, :data:`MAX_OPTIONS`).
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LETTERS = string.ascii_uppercase
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)
REQUIRED_FIELDS = ("video", "question", "options", "answer")
# the instruction train-video-model's models learnt (after "Options: A. .. B. .." on one line)
ANSWER_WITH_LETTER = "Answer with the letter."
# the lmms-eval / LongVideoBench multiple-choice instruction (after one option a line)
POST_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class VideoQASample:
    """One multiple-choice question about one video, whatever the annotation format.

    Attributes:
        sample_id: unique within the annotation set (rows are keyed by it).
        video: the video as the annotation names it.
        video_path: where it is read from (resolved against the videos folder; may not exist).
        question: the question text.
        options: the candidate answers, in order (option ``i`` is letter ``LETTERS[i]``), 2 to 26.
        answer: the gold option letter.
        task_type: the benchmark's task / question category (accuracy is also reported per type).
        meta: everything else the annotation carries (duration, split, seed, key frames, events, ...).

    Raises:
        ValueError: an option count outside 2..26 or an answer that is not one of the option letters.
    """

    sample_id: str
    video: str
    video_path: str
    question: str
    options: list[str]
    answer: str
    task_type: str = "all"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not MIN_OPTIONS <= len(self.options) <= MAX_OPTIONS:
            raise ValueError(
                f"sample {self.sample_id}: need {MIN_OPTIONS} to {MAX_OPTIONS} options (one letter each), "
                f"got {len(self.options)}"
            )
        if self.answer not in LETTERS[: len(self.options)]:
            raise ValueError(
                f"sample {self.sample_id}: answer {self.answer!r} is not one of the option letters "
                f"{LETTERS[: len(self.options)]}"
            )

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    def content(self) -> tuple:
        """What the question is, independent of the annotation format (video, question, options,
        answer, task type)."""
        return (self.video, self.question, tuple(self.options), self.answer, self.task_type)


# --- reading -----------------------------------------------------------------------------------------


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """A JSON file's list of objects (a dict holding exactly one list, as some copies wrap it, too)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a JSON list of questions")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ValueError(f"{path}: expected a JSON list of question objects")
    return data


def _entries(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, entry) of a JSONL file (``path:line``) or a JSON list (``path entry i``)."""
    if path.suffix != ".jsonl":
        return [(f"{path} entry {i}", entry) for i, entry in enumerate(read_json_list(path))]
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(entry).__name__}")
        entries.append((f"{path}:{number}", entry))
    return entries


def resolve_video(root: Path, candidates: Sequence[str]) -> str:
    """The first candidate (relative to ``root``) that exists, else the first (reading it fails there)."""
    for name in candidates:
        if (root / name).is_file():
            return str(root / name)
    return str(root / candidates[0])


def sample_from_entry(entry: Mapping[str, Any], default_id: str, root: Path,
                      subfolder: bool = True) -> VideoQASample:
    """One generic-format entry as a sample, its video resolved against ``root`` (and, with
    ``subfolder``, ``root/videos`` where it is found there).

    Raises:
        ValueError: a required field is missing, ``options`` is not a list, or the sample is invalid.
    """
    missing = [k for k in REQUIRED_FIELDS if k not in entry]
    if missing:
        raise ValueError(f"missing {missing} (required: {list(REQUIRED_FIELDS)})")
    options = entry["options"]
    if not isinstance(options, list):
        raise ValueError(f"options must be a list of strings, got {options!r}")
    video = str(entry["video"])
    return VideoQASample(
        sample_id=str(entry.get("id", default_id)),
        video=video,
        video_path=resolve_video(root, [video, f"videos/{video}"] if subfolder else [video]),
        question=str(entry["question"]),
        options=[str(o) for o in options],
        answer=str(entry["answer"]).strip().upper(),
        task_type=str(entry.get("task_type", "all")),
        meta={k: v for k, v in entry.items() if k not in (*REQUIRED_FIELDS, "id", "task_type")},
    )


def load_video_qa(path: str | os.PathLike, videos: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[VideoQASample]:
    """The samples of a generic video-QA file (JSONL, or a JSON list of the same objects).

    Videos resolve against ``videos`` when given, else against the file's folder (or its ``videos/``
    subfolder, where the video is found there). ``limit`` keeps the first samples.

    Raises:
        ValueError: a malformed line or entry, named by ``path:line`` (``path entry i`` in a JSON list).
    """
    path = Path(path)
    root = Path(videos) if videos else path.parent
    samples = []
    for index, (where, entry) in enumerate(_entries(path)):
        try:
            samples.append(sample_from_entry(entry, f"{path.stem}:{index}", root, subfolder=not videos))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if limit is not None and len(samples) >= limit:
            break
    return samples


# --- prompts -----------------------------------------------------------------------------------------


def format_question(question: str, options: Sequence[str], post_prompt: str = ANSWER_WITH_LETTER,
                    one_per_line: bool = False) -> str:
    """The question, its lettered options and the answer instruction (the text after ``<video>``).

    Default (what ``train-video-model`` trains on)::

        {question}
        Options: A. {o1} B. {o2} ...
        Answer with the letter.

    ``one_per_line=True`` (with :data:`POST_PROMPT`: the lmms-eval / LongVideoBench convention that
    ``eval-video`` gives other models) writes ``A. {o1}``, ``B. {o2}``, ... on lines of their own.
    """
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise ValueError(f"need {MIN_OPTIONS} to {MAX_OPTIONS} options, got {len(options)}")
    lettered = [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    lines = [question.strip(), *(lettered if one_per_line else ["Options: " + " ".join(lettered)])]
    if post_prompt:
        lines.append(post_prompt)
    return "\n".join(lines)


def video_qa_prompt(sample: VideoQASample | Mapping[str, Any], family: str = "llava_next_video") -> str:
    """The full prompt of a sample (or a mapping with ``question`` and ``options``, which is how
    ``eval-video`` calls the builder a trained model's ``video_model.json`` names) in ``family``'s chat
    format, one ``<video>`` placeholder, ending at the assistant marker, e.g.
    ``"USER: <video>\\n...\\nAnswer with the letter. ASSISTANT:"``."""
    from namm_transfer.pipelines.video.io import build_prompt

    if isinstance(sample, VideoQASample):
        question, options = sample.question, sample.options
    else:
        question, options = sample["question"], sample["options"]
    return build_prompt(family, format_question(question, options))


# --- scoring -----------------------------------------------------------------------------------------

# skip what may precede a leading letter: whitespace, quotes, markdown, brackets
_LEADING = re.compile(r"[\W_]*")
# "answer is C", "Answer: (c)", "the answer would be 'B'", "Best option: (A)", "choice D"; singular only,
# since "Options: A. red B. green" is the prompt's option list echoed back, not an answer
_STATED = re.compile(
    r"\b(?i:answer|option|choice)\b"
    r"(?:\s+(?i:is|was|would\s+be|should\s+be|must\s+be))?"
    r"\s*[:=\-]?\s*[\"'*(\[]*\s*"
    r"(?:([A-Z])(?!\w|'\w)|([a-z])(?=[)\]\"'*]|[ \t]*[.)\]]?[ \t]*(?:\n|$)))"
)
# a capital standing alone, or any letter in brackets, anywhere ("'B'" counts, "O'Neil" and "I'd" do not)
_ANYWHERE = re.compile(r"(?<!\w)(?<!\w')([A-Z])(?!\w|'\w)|[(\[]([a-z])[)\]]")
# a lower-case letter counts only as a label: alone on its line or before ".", ")", "]", ":" or ","
_LOWER_LABEL = re.compile(r"[ \t]*(?:[.)\]:,]|\n|$)")


def _is_english_word(text: str, end: int, letter: str, options: Sequence[str]) -> bool:
    """Whether the capital ``letter`` ending at ``end`` is the article "A" or the pronoun "I" ("A gold
    colour", "I think C"): followed by a lower-case word that does not open its own option's text."""
    if letter not in "AI":
        return False
    follow = re.match(r"[ \t]+([a-z][\w-]*)", text[end:])
    if not follow:
        return False
    index = LETTERS.index(letter)
    own = options[index].strip().lower() if index < len(options) else ""
    return not (own and text[end:].lstrip(" \t").lower().startswith(own))


def extract_option_letter(text: str | None, options: Sequence[str]) -> str | None:
    """The option letter a model's answer names, or None when it names none or several.

    ``options`` are the sample's options: only their letters count (``"E"`` with four options names
    nothing), and their texts are the last resort. Tried in order, the first rule that finds a letter
    decides:

    1. a letter opening the answer (the model's first token), after whitespace, quotes, markdown or
       brackets: a capital not followed by a letter (``"B"``, ``"C."``, ``"(D)"``, ``"D #1"``,
       ``"B) blue"``), except the article / pronoun in ``"A gold colour"`` or ``"I think C"``; a
       lower-case letter alone or before ``.`` ``)`` ``]`` ``:`` ``,`` (``"b"``, ``"c)"``, ``"d . white"``);
    2. a letter stated as the answer anywhere (``"Answer: (c)"``, ``"The answer is C."``, ``"Best
       option: (A) red"``): the one letter all such statements name, None if they disagree;
    3. capitals standing alone or letters in brackets anywhere (``"I'd say C."``): the one letter they
       name, None if several (``"GREEN C. D."``: ambiguous);
    4. the text of exactly one option, as a whole word, any case (``"blue"``, ``"It is blue"``); None
       if several (``"red or blue"``) or none.
    """
    if not text:
        return None
    valid = LETTERS[: len(options)]
    body = text.strip()
    start = _LEADING.match(body).end()
    if start < len(body):
        first = body[start]
        after = body[start + 1 :]
        if first.isupper() and first in valid and not re.match(r"\w|'\w", after):
            if not _is_english_word(body, start + 1, first, options):
                return first
        elif first.islower() and first.upper() in valid and _LOWER_LABEL.match(after):
            return first.upper()
    for pattern in (_STATED, _ANYWHERE):
        named = set()
        for match in pattern.finditer(body):
            upper, lower = match.groups()
            if upper and _is_english_word(body, match.end(1), upper, options):
                continue
            letter = (upper or lower).upper()
            if letter in valid:
                named.add(letter)
        if named:
            return named.pop() if len(named) == 1 else None
    lowered = body.lower()
    hits = [i for i, option in enumerate(options)
            if option.strip() and re.search(rf"(?<!\w){re.escape(option.strip().lower())}(?!\w)", lowered)]
    return valid[hits[0]] if len(hits) == 1 else None


def score_output(text: str | None, sample: VideoQASample) -> tuple[str | None, bool]:
    """The letter a model's output names (:func:`extract_option_letter`) and whether it is the answer:
    how ``train-video-model`` and ``eval-video`` both score a generated answer."""
    predicted = extract_option_letter(text, sample.options)
    return predicted, predicted == sample.answer
