"""The one video-QA schema, reader, prompt and scorer (pipelines/video/qa.py): the extractor's cases, the
reader's option-count rule and error messages, and the agreement of train-video-model's and eval-video's
scoring on the same raw model outputs (a tiny random LLaVA model whose generated tail is scripted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from namm_transfer.pipelines.video.qa import (
    LETTERS,
    MAX_OPTIONS,
    POST_PROMPT,
    VideoQASample,
    extract_option_letter,
    format_question,
    load_video_qa,
    score_output,
    video_qa_prompt,
)

COLOURS = ["red", "green", "blue", "yellow"]


# --- the extractor -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    # bare letters, any case, with or without brackets and punctuation
    ("A", "A"), (" B", "B"), ("b", "B"), ("C.", "C"), ("c.", "C"), ("(c)", "C"), ("(C)", "C"), ("[B]", "B"),
    ("c)", "C"), ("b) green", "B"), ("B) green", "B"), ("D #1", "D"), ("d . white", "D"), ("**A**", "A"),
    ("'B'", "B"), ('"A"\n\nThis is a', "A"), ("\n\n  C\n", "C"), ("\nd", "D"),
    # the first token decides, whatever follows
    ("D\n\nWhat is the capital of", "D"), ("B\nThe answer is C", "B"), ("A. A. A. A.", "A"),
    # the answer stated
    ("Answer: (c)", "C"), ("Answer: C", "C"), ("The answer is C.", "C"), ("The answer is (c).", "C"),
    ("The answer is c.", "C"), ("the answer is:\nD.", "D"), ("The answer would be A.", "A"),
    ("The answer is 'B:", "B"), ("Best option: (A) red", "A"), ("Option B is right", "B"),
    ("I think the answer is C.", "C"), ("Sure! The answer is C", "C"),
    # a letter standing alone elsewhere
    ("I'd say C.", "C"), ("The letter is \"A\"\nThe", "A"),
    # an option's text instead of its letter
    ("blue", "C"), ("Blue", "C"), ("It is yellow.", "D"), ("A red", "A"),
    # ambiguous or absent: None
    ("The answer is B, no, the answer is C", None), ("GREEN C. D.", None), ("Options: A. red B.", None),
    ("it was red or blue", None), ("A gold colour.", None), ("A possible answer = A possible answer =", None),
    ("E", None), ("a dog", None), ("Apple", None), ("I am not sure", None), ("bluish", None), ("* *", None),
    ("", None), (None, None), ("   \n ", None),
])
def test_extract_option_letter(text, letter):
    assert extract_option_letter(text, COLOURS) == letter


def test_only_the_samples_own_letters_count():
    assert extract_option_letter("C", ["yes", "no"]) is None  # two options: A and B
    assert extract_option_letter("The answer is C", ["yes", "no"]) is None
    assert extract_option_letter("E", [*COLOURS, "white"]) == "E"
    assert extract_option_letter("I", [str(i) for i in range(9)]) == "I"  # nine options: I is a letter
    assert extract_option_letter("I think C", [str(i) for i in range(9)]) == "C"  # ... but not here
    assert extract_option_letter("3", ["1", "2", "3", "4"]) == "C"  # a count answered by its number


def test_score_output_is_the_letter_and_its_correctness():
    sample = VideoQASample("s", "v.mp4", "v.mp4", "What colour?", COLOURS, "C")
    assert score_output(" c)", sample) == ("C", True)
    assert score_output("Answer: (b)", sample) == ("B", False)
    assert score_output("no idea", sample) == (None, False)


# --- the schema and the reader ---------------------------------------------------------------------


def _entry(n_options: int = 4, answer: str = "A", **extra) -> dict:
    return {"video": "v.mp4", "question": "Q?", "options": [f"o{i}" for i in range(n_options)],
            "answer": answer, **extra}


def _write(path: Path, entries: list, blank_first: bool = False) -> Path:
    lines = [json.dumps(e) if not isinstance(e, str) else e for e in entries]
    path.write_text(("\n" if blank_first else "") + "\n".join(lines) + "\n")
    return path


def test_one_option_count_rule_two_to_twenty_six(tmp_path):
    for n in (2, 4, 5, MAX_OPTIONS):
        (sample,) = load_video_qa(_write(tmp_path / f"ok{n}.jsonl", [_entry(n, answer=LETTERS[n - 1])]))
        assert len(sample.options) == n and sample.answer_index == n - 1
    for n in (1, MAX_OPTIONS + 1):
        with pytest.raises(ValueError, match=rf"bad{n}\.jsonl:1: .*need 2 to 26 options .*got {n}"):
            load_video_qa(_write(tmp_path / f"bad{n}.jsonl", [_entry(n)]))
    with pytest.raises(ValueError, match="need 2 to 26 options"):
        VideoQASample("s", "v", "v", "Q?", ["only one"], "A")
    with pytest.raises(ValueError, match="need 2 to 26 options"):
        format_question("Q?", ["only one"])


def test_reader_errors_name_the_line(tmp_path):
    cases = [  # (second line, message)
        (_entry(2, answer="C"), r":3: sample qa:1: answer 'C' is not one of the option letters AB"),
        ({k: v for k, v in _entry().items() if k != "answer"}, r":3: missing \['answer'\]"),
        (_entry(options="red green"), r":3: options must be a list of strings, got 'red green'"),
        ("{not json", r":3: not JSON"),
        ("[1, 2]", r":3: expected a JSON object, got list"),
    ]
    for line, message in cases:
        path = _write(tmp_path / "qa.jsonl", [_entry(), line], blank_first=True)  # line 1 is blank
        with pytest.raises(ValueError, match=message):
            load_video_qa(path)
    listed = tmp_path / "qa.json"  # the same objects as a JSON list: errors name the entry
    listed.write_text(json.dumps([_entry(), _entry(2, answer="C")]))
    with pytest.raises(ValueError, match=r"qa\.json entry 1: .*not one of the option letters"):
        load_video_qa(listed)


def test_reader_fields_ids_videos_and_limit(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "b.mp4").write_bytes(b"")
    path = _write(tmp_path / "qa.jsonl", [
        _entry(answer=" b ", id="first", task_type="colour", seed=3, key_frames=[1]),
        {**_entry(), "video": "b.mp4"},
        _entry(),
    ])
    first, second, third = load_video_qa(path)
    assert (first.sample_id, first.answer, first.task_type) == ("first", "B", "colour")
    assert first.meta == {"seed": 3, "key_frames": [1]}
    assert (second.sample_id, second.task_type) == ("qa:1", "all")
    assert first.video_path == str(tmp_path / "v.mp4")  # missing: named where it was looked for
    assert second.video_path == str(tmp_path / "videos" / "b.mp4")  # found in videos/
    elsewhere = tmp_path / "elsewhere"  # a videos folder given: only there
    assert load_video_qa(path, videos=elsewhere)[1].video_path == str(elsewhere / "b.mp4")
    assert [s.sample_id for s in load_video_qa(path, limit=2)] == ["first", "qa:1"]
    assert third.content() == ("v.mp4", "Q?", ("o0", "o1", "o2", "o3"), "A", "all")


# --- prompts -------------------------------------------------------------------------------------


def test_both_prompt_layouts():
    assert format_question(" What colour? ", COLOURS) == (
        "What colour?\nOptions: A. red B. green C. blue D. yellow\nAnswer with the letter.")
    assert format_question("What colour?", COLOURS[:2], POST_PROMPT, one_per_line=True) == (
        "What colour?\nA. red\nB. green\n" + POST_PROMPT)
    assert format_question("What colour?", COLOURS[:2], "") == "What colour?\nOptions: A. red B. green"
    sample = VideoQASample("s", "v", "v", "What colour?", COLOURS, "A")
    expected = ("USER: <video>\nWhat colour?\nOptions: A. red B. green C. blue D. yellow\n"
                "Answer with the letter. ASSISTANT:")
    # a sample, or the mapping eval-video passes to the builder a trained model's video_model.json names
    assert video_qa_prompt(sample) == expected
    assert video_qa_prompt({"question": "What colour?", "options": COLOURS}) == expected


def test_the_shipped_models_builder_path_still_imports():
    from namm_transfer.pipelines.video.loading import import_loader
    from namm_transfer.pipelines.video.models import video_model_meta

    builder = video_model_meta("smollm2-shapes")["prompt"]["builder"]
    assert import_loader(builder) is video_qa_prompt


# --- training-time and evaluation-time scoring agree ------------------------------------------------

# raw outputs as the models produce them (most seen in benchmarks/results/video/rows.jsonl.gz), with the
# letter the unified scorer reads; the gold answer is C (blue)
OUTPUTS = [
    (" C", "C"), ("C", "C"), (" c", "C"), ("b", "B"), ("(c)", "C"), ("c)", "C"), ("Answer: (c)", "C"),
    ("The answer is C.", "C"), ("blue", "C"), ("\n\n D", "D"), ("d . white", "D"), ("D #1", "D"),
    ("D\n\nWhat is the capital of", "D"), ("'B'", "B"), ("A gold colour.", None), ("GREEN C. D.", None),
    ("red or blue", None), ("* *", None), ("", None),
]


class _CharTokenizer:
    """One id per printable ASCII character (2..96), newline 97, EOS 98, BOS 1, pad 0: decoding a
    scripted id sequence gives back exactly the scripted text."""

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 98, 0

    def _id(self, c: str) -> int:
        return 97 if c == "\n" else 2 + ord(c) - 32

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [self._id(c) for c in text]}

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if i == 97 else chr(i - 2 + 32) for i in ids if 2 <= i <= 97)


def test_training_and_evaluation_score_the_same_outputs_alike(tmp_path, monkeypatch):
    """Each raw output goes through train-video-model's scoring (encode_split + generate_answers, the
    reader load_video_qa) and eval-video's (evaluate_sample under the full cache, the reader
    load_annotations), on the same annotation file and a real tiny model whose generated tail is
    replaced by the output: the letters and correctness must be identical, and the expected ones."""
    pytest.importorskip("av")
    from _tiny_llava import build

    from namm_transfer.adapters import video_layout
    from namm_transfer.pipelines.video.annotations import load_annotations
    from namm_transfer.pipelines.video.evaluate import evaluate_sample
    from namm_transfer.pipelines.video.io import write_video
    from namm_transfer.pipelines.video.loading import VideoModel
    from namm_transfer.pipelines.video.train import encode_split, generate_answers
    from namm_transfer.policies import FullCache

    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_video(tmp_path / "videos" / "v.mp4", frames)
    entry = {"id": "q0", "video": "videos/v.mp4", "question": "What colour was it?", "options": COLOURS,
             "answer": "C", "task_type": "colour"}
    annotations = _write(tmp_path / "test.jsonl", [entry])
    model, tokenizer = build("llava_next_video"), _CharTokenizer()
    script = {"text": ""}
    real_generate = type(model).generate

    def scripted_generate(self, *args, **kwargs):  # the real generate (the cache fills), then the script
        prompt = kwargs["input_ids"]
        real_generate(self, *args, **kwargs)
        tail = torch.tensor([tokenizer(script["text"], add_special_tokens=False)["input_ids"]],
                            dtype=prompt.dtype).reshape(1, -1)
        return torch.cat([prompt, tail], dim=1)

    monkeypatch.setattr(type(model), "generate", scripted_generate)
    train_samples = load_video_qa(annotations)
    eval_samples = load_annotations(annotations)
    assert train_samples == eval_samples  # one reader
    split = encode_split(train_samples, tokenizer, video_layout(model), num_frames=2)
    video_model = VideoModel(model, tokenizer)
    for text, letter in OUTPUTS:
        script["text"] = text
        (trained,) = generate_answers(model, tokenizer, split, video_model.preprocessor, "cpu",
                                      max_new_tokens=2)
        evaluated, _ = evaluate_sample(video_model, eval_samples[0], FullCache(), num_frames=2, chunk=16,
                                       max_new_tokens=2)
        assert trained["generated"] == text and evaluated["output"] == text.strip()
        assert (trained["predicted"], trained["correct"]) == (evaluated["predicted"], evaluated["correct"])
        assert (trained["predicted"], trained["correct"]) == (letter, letter == "C"), text
