"""The lmms-eval plugin, run through lmms-eval's own ``simple_evaluate`` on a local task made here: a
tiny random LLaVA-NeXT-Video with a keep-all NAMM answers exactly as with the full cache."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("av")

from _tiny_llava import VIDEO_ID, build  # noqa: E402

from namm_transfer import NAMM, NAMMConfig  # noqa: E402
from namm_transfer.pipelines.video.io import write_video  # noqa: E402

QUESTIONS = [
    ("What colour is the ball ?", ["red", "green", "blue", "white"], "A"),
    ("How many balls are there ?", ["one", "two", "three", "four"], "C"),
    ("Which way does it move ?", ["left", "right", "up", "down"], "B"),
]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w for q, options, _ in QUESTIONS for w in [*q.split(), *options]}
    words |= set("ABCD.:?") | {"USER", "ASSISTANT", "Answer", "with", "the", "letter"}
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", *sorted(words)])}
    assert len(vocab) < VIDEO_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    model_dir = root / "model"
    build("llava_next_video").save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    namm_dir = NAMM(NAMMConfig()).save_pretrained(root / "keep_all_namm")
    rng = np.random.default_rng(0)
    docs = []
    for i, (question, options, answer) in enumerate(QUESTIONS):
        frames = np.broadcast_to(rng.integers(0, 256, (8, 1, 1, 3), dtype=np.uint8), (8, 32, 32, 3)).copy()
        video = write_video(root / "videos" / f"v{i}.mp4", frames)
        docs.append({"video_path": str(video), "question": question, "options": options, "answer": answer})
    (root / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(textwrap.dedent("""
        def doc_to_visual(doc):
            return [doc["video_path"]]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            options = " ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(doc["options"]))
            return f"{doc['question']}\\n{options}\\nAnswer with the letter."

        def process_results(doc, results):
            return {"accuracy": float(results[0].strip()[:1] == doc["answer"])}
    """))
    (tasks / "tiny_video_qa.yaml").write_text(textwrap.dedent(f"""
        task: tiny_video_qa
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {root / "test.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: accuracy
            aggregation: mean
            higher_is_better: true
    """))
    return {"root": root, "model": model_dir, "namm": namm_dir, "tasks": tasks}


def _evaluate(setup, model_args: str) -> tuple[list[str], dict]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    results = simple_evaluate(
        model="namm_transfer",  # found through the lmms_eval.models entry point
        model_args=f"model={setup['model']},num_frames=4,update_every=8,{model_args}",
        tasks=["tiny_video_qa"], task_manager=TaskManager(include_path=str(setup["tasks"])),
        log_samples=True, batch_size=1, device="cpu",
    )
    samples = sorted(results["samples"]["tiny_video_qa"], key=lambda s: s["doc_id"])
    answers = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples]
    return answers, results["results"]["tiny_video_qa"]


def test_keep_all_namm_answers_as_the_full_cache(setup):
    full, full_metrics = _evaluate(setup, "policy=FullCache")
    namm, namm_metrics = _evaluate(setup, f"policy=NAMM,namm={setup['namm']}")
    assert len(full) == len(QUESTIONS) and all(isinstance(a, str) for a in full)
    assert namm == full
    assert namm_metrics["accuracy,none"] == full_metrics["accuracy,none"]


def test_plugin_errors_name_the_problem(setup):
    from lmms_eval.models import get_model

    cls = get_model("namm_transfer")
    with pytest.raises(ValueError, match="needs model="):
        cls()
    with pytest.raises(ValueError, match="'H2O' needs budget="):
        cls(model=str(setup["model"]), policy="H2O")
    with pytest.raises(ValueError, match="batch_size must be 1"):
        cls(model=str(setup["model"]), policy="FullCache", batch_size=4)
    with pytest.raises(ValueError, match="joint NAMM only"):  # the setup's NAMM scores each head alone
        cls(model=str(setup["model"]), policy="NAMM", namm=str(setup["namm"]), head_mix="0.5")
