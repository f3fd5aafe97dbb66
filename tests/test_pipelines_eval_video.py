"""eval-video: annotation formats, letter extraction, policies at the NAMM's budget, failures, resume,
summary; on tiny random LLaVA models (tests/_tiny_llava.py) and short generated videos."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_llava import FAMILIES, VIDEO_ID, build

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.pipelines.harness import matched_budget as namm_budget
from namm_transfer.pipelines.video.annotations import detect_format, load_annotations
from namm_transfer.pipelines.video.evaluate import (
    UNIFORM,
    EvalVideoConfig,
    key_frame_retention,
    run_eval_video,
    summarise,
    summary_tables,
    uniform_frame_count,
    video_policies,
)
from namm_transfer.pipelines.video.loading import VideoModel, as_video_model, load_video_model
from namm_transfer.policies import BASELINES as TOKEN_BASELINES
from namm_transfer.policies import FULL_CACHE as FULL
from namm_transfer.policies import NAMM_NAME

av = pytest.importorskip("av")
from namm_transfer.pipelines.video.io import write_video  # noqa: E402

FRAMES_IN_VIDEO, SIDE = 8, 32

QUESTIONS = [  # (video, question, options, answer letter, task type)
    ("v0.mp4", "Which colour?", ["red", "blue", "green", "grey"], "B", "colour"),
    ("v1.mp4", "How many?", ["one", "two", "three", "four"], "D", "count"),
    ("v2.mp4", "Which first?", ["ball", "cube", "cone", "ring"], "A", "order"),
]


class CharTokenizer:
    """One id per printable ASCII character (2..97, below the tiny models' video id 100); BOS = 1."""

    pad_token_id, eos_token_id, unk_token_id = 0, None, 0

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (ord(c) - 32) if 32 <= ord(c) < 128 else 2 for c in text]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 2 + 32) for i in ids if 2 <= i < 98)


def tiny_loader(source, device="cpu", dtype=torch.float32):
    """The loader hook: ``source`` names the family of a tiny random model."""
    return build(source), CharTokenizer()


def _frames(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (FRAMES_IN_VIDEO, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (FRAMES_IN_VIDEO, SIDE, SIDE, 3)).copy()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same three questions in the three formats, videos laid out as each benchmark publishes them."""
    root = tmp_path_factory.mktemp("videoqa")
    # generic JSONL, videos in videos/
    generic = root / "generic"
    for i, (video, *_rest) in enumerate(QUESTIONS):
        write_video(generic / "videos" / video, _frames(i))
    lines = [
        {"video": v, "question": q, "options": o, "answer": a, "task_type": t, "seed": i, "split": "test"}
        for i, (v, q, o, a, t) in enumerate(QUESTIONS)
    ]
    (generic / "qa.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # MLVU: MLVU/json/<n>_<task>.json, MLVU/video/<n>_<task>/<video>
    mlvu = root / "MLVU"
    for i, (v, q, o, a, t) in enumerate(QUESTIONS):
        stem = f"{i + 1}_{t}"
        write_video(mlvu / "video" / stem / v, _frames(i))
        entry = {"video": v, "duration": 1.0, "question": q, "candidates": o, "answer": o["ABCD".index(a)],
                 "question_type": t}
        (mlvu / "json").mkdir(parents=True, exist_ok=True)
        (mlvu / "json" / f"{stem}.json").write_text(json.dumps([entry]))
    open_ended = {"video": "x.mp4", "question": "Summarise.", "answer": "...", "question_type": "summary"}
    (mlvu / "json" / "9_summary.json").write_text(json.dumps([open_ended]))
    # LongVideoBench: lvb_val.json, videos/<video_path>
    lvb = root / "LongVideoBench"
    for i, (v, *_rest) in enumerate(QUESTIONS):
        write_video(lvb / "videos" / v, _frames(i))
    entries = [
        {"id": f"lvb{i}", "video_id": v[:-4], "video_path": v, "subtitle_path": v[:-4] + "_en.json",
         "question": q, "candidates": o, "correct_choice": "ABCD".index(a), "question_category": t,
         "duration_group": 15, "duration": 1.0}
        for i, (v, q, o, a, t) in enumerate(QUESTIONS)
    ]
    (lvb / "lvb_val.json").write_text(json.dumps(entries))
    return {"jsonl": generic / "qa.jsonl", "mlvu": mlvu / "json", "longvideobench": lvb / "lvb_val.json",
            "root": root}


@pytest.fixture(scope="module")
def broken(data):
    """Generic annotations whose second video is garbage and third is missing."""
    folder = data["root"] / "broken"
    write_video(folder / "ok.mp4", _frames(0))
    (folder / "garbage.mp4").write_bytes(b"not a video\n" * 40)
    entries = [
        {"video": "ok.mp4", "question": "Which colour?", "options": ["a", "b", "c", "d"], "answer": "A",
         "task_type": "colour"},
        {"video": "garbage.mp4", "question": "Which colour?", "options": ["a", "b", "c", "d"], "answer": "B",
         "task_type": "colour"},
        {"video": "missing.mp4", "question": "How many?", "options": ["a", "b", "c", "d"], "answer": "C",
         "task_type": "count"},
        {"video": "ok.mp4", "question": "How many?", "options": ["a", "b", "c", "d"], "answer": "D",
         "task_type": "count"},
    ]
    (folder / "qa.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return folder / "qa.jsonl"


def _config(tmp_path, annotations, **overrides) -> EvalVideoConfig:
    settings = dict(annotations=str(annotations), model="llava_next_video", update_every=16, num_frames=6,
                    max_new_tokens=3, heatmaps=0, output_dir=str(tmp_path / "out"))
    settings.update(overrides)
    return EvalVideoConfig(**settings)


def _rows(cfg) -> list[dict]:
    path = Path(cfg.output_dir) / "rows.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- annotations ---------------------------------------------------------------------------------


def test_three_formats_parse_to_the_same_samples(data):
    parsed = {}
    for kind in ("jsonl", "mlvu", "longvideobench"):
        assert detect_format(data[kind]) == kind
        samples = load_annotations(data[kind])
        assert load_annotations(data[kind], format=kind) == samples
        parsed[kind] = samples
        assert all(os.path.isfile(s.video_path) for s in samples), kind
    contents = {kind: sorted(s.content() for s in samples) for kind, samples in parsed.items()}
    assert contents["jsonl"] == contents["mlvu"] == contents["longvideobench"]
    assert contents["jsonl"] == sorted((v, q, tuple(o), a, t) for v, q, o, a, t in QUESTIONS)
    assert len({s.sample_id for s in parsed["mlvu"]}) == 3  # the open-ended summary file is skipped
    assert parsed["longvideobench"][0].sample_id == "lvb0"
    assert parsed["longvideobench"][0].meta["duration_group"] == 15
    assert parsed["jsonl"][0].meta == {"seed": 0, "split": "test"}


def test_bad_annotations_are_named(tmp_path):
    bad = tmp_path / "1_plotQA.json"
    bad.write_text(json.dumps([{"video": "a.mp4", "question": "Q?", "candidates": ["x", "y"],
                                "answer": "z"}]))
    with pytest.raises(ValueError, match="not one of its candidates"):
        load_annotations(bad)
    dup = tmp_path / "dup.jsonl"
    line = json.dumps({"id": "same", "video": "a.mp4", "question": "Q?", "options": ["x", "y"],
                       "answer": "A"})
    dup.write_text(line + "\n" + line + "\n")
    with pytest.raises(ValueError, match="same id|the id"):
        load_annotations(dup)
    letter = tmp_path / "letter.jsonl"
    letter.write_text(json.dumps({"video": "a.mp4", "question": "Q?", "options": ["x", "y"], "answer": "C"}))
    with pytest.raises(ValueError, match="option letters"):
        load_annotations(letter)


def test_question_format(data):
    from namm_transfer.pipelines.video.evaluate import prompt_ids

    sample = load_annotations(data["jsonl"])[0]
    model, tokenizer = tiny_loader("llava_next_video")
    ids = prompt_ids(VideoModel(model, tokenizer), sample, 2, "Answer directly.", "")
    # the video run and BOS decode to nothing, a newline to a space: one option a line, then post_prompt
    assert tokenizer.decode(ids) == (
        "USER:  Which colour? A. red B. blue C. green D. grey Answer directly. ASSISTANT:")


def test_loader_results_become_video_models():
    model, tok = tiny_loader("video_llava")
    for loaded in ((model, tok), {"model": model, "tokenizer": tok}, VideoModel(model, tok)):
        vm = as_video_model(loaded)
        assert vm.model is model and vm.tokenizer is tok and vm.preprocessor is not None
    vm = load_video_model("video_llava", loader=tiny_loader)
    assert vm.model.config.model_type == "video_llava"
    with pytest.raises(TypeError):
        as_video_model(object())


# --- runs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_namm_answers_like_the_full_cache(tmp_path, data, family):
    cfg = _config(tmp_path, data["jsonl"], model=family, policies=[FULL, NAMM_NAME], max_new_tokens=4,
                  heatmaps=0)
    summary = run_eval_video(cfg, loader=tiny_loader, namm=NAMM(NAMMConfig(update_every=999)))
    rows = _rows(cfg)
    full = {r["sample_id"]: r for r in rows if r["policy"] == FULL}
    namm = {r["sample_id"]: r for r in rows if r["policy"] == NAMM_NAME}
    assert len(full) == len(namm) == 3
    for sid, row in namm.items():
        assert row["output"] == full[sid]["output"] and row["predicted"] == full[sid]["predicted"]
        assert row["evictions"] == 0 and row["kept_video_fraction"] == pytest.approx(1.0)
        assert row["kept_frames"] == 6 and row["frame_retention"] == [1.0] * 6
    assert summary[NAMM_NAME]["accuracy"] == summary[FULL]["accuracy"]


def test_every_policy_baselines_at_the_namm_budget(tmp_path, data):
    """A NAMM capped at 12 tokens per head evicts; the token baselines get its measured per-layer budget,
    UniformFrames as many whole frames as its mean kept video tokens; the summary lists every policy."""
    cfg = _config(tmp_path, data["jsonl"])
    namm = NAMM.init_random(0, config=NAMMConfig(budget=12))
    summary = run_eval_video(cfg, loader=tiny_loader, namm=namm)
    rows = _rows(cfg)
    assert len(rows) == len(video_policies()) * 3 and not any(r["failed"] for r in rows)
    namm_rows = [r for r in rows if r["policy"] == NAMM_NAME]
    budget = namm_budget(namm_rows)
    assert budget == [12, 12]  # the NAMM's cap, less the tokens fed since its last update
    for name in TOKEN_BASELINES:
        for row in (r for r in rows if r["policy"] == name):
            assert row["budget"] == budget
            kept = np.array(row["kept_per_layer"]) - np.array(row["since_update"])
            assert kept.tolist() == pytest.approx(budget)
            assert row["evictions"] > 0
    k = uniform_frame_count(namm_rows, 4, 6)
    uniform = [r for r in rows if r["policy"] == UNIFORM]
    assert 1 <= k < 6
    assert all(r["frames"] == k and len(r["frame_indices"]) == k and r["evictions"] == 0 for r in uniform)
    assert all(r["video_tokens"] == 4 * k and r["kept_video_tokens"] == pytest.approx(4 * k) for r in uniform)
    assert uniform[0]["frame_retention"].count(1.0) == k and uniform[0]["frame_retention"].count(0.0) == 6 - k
    full = [r for r in rows if r["policy"] == FULL]
    for r, u in zip(full, uniform, strict=True):
        assert r["frames"] == 6 and r["stored_kv_bytes"] > u["stored_kv_bytes"]
    # summary: every policy, overall and per task type
    assert list(summary) == list(video_policies())
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(saved["summary"]) == list(video_policies())
    assert saved["budget"] == budget and saved["uniform_frames"] == k
    assert saved["meta"]["command"].startswith("namm-transfer") and "git_revision" in saved["meta"]
    for s in summary.values():
        assert set(s["per_task"]) == {"colour", "count", "order"} and s["samples"] == 3
        assert s["stored_kv_mib"] > 0 and s["seconds_per_sample"] > 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert all(f"| {name}" in md for name in video_policies()) and "colour" in md
    assert any((tmp_path / "out" / "tensorboard").iterdir())


def test_namm_budget_caps_the_namm_it_loads(tmp_path, data):
    """--namm-budget caps a NAMM that keeps everything: 12 tokens per head after each update, recorded
    in the setting and the summary; without it the same NAMM evicts nothing."""
    keep_all = NAMM(NAMMConfig())
    cfg = _config(tmp_path, data["jsonl"], policies=[NAMM_NAME], heatmaps=0, namm_budget=12)
    run_eval_video(cfg, loader=tiny_loader, namm=keep_all)
    rows = _rows(cfg)
    assert namm_budget(rows) == [12, 12] and all(r["evictions"] > 0 for r in rows)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["setting"]["namm_budget"] == 12
    assert "capped at 12 tokens" in (tmp_path / "out" / "summary.md").read_text()
    uncapped = _config(tmp_path / "uncapped", data["jsonl"], policies=[NAMM_NAME], heatmaps=0)
    run_eval_video(uncapped, loader=tiny_loader, namm=keep_all)
    assert all(r["evictions"] == 0 for r in _rows(uncapped))
    with pytest.raises(ValueError, match="namm_budget"):
        EvalVideoConfig(annotations="a.json", namm_budget=0)


def test_a_rank_only_namm_runs_capped_only(tmp_path, data):
    """A NAMM without a threshold (scorer="linear", ranking only) keeps everything uncapped, so eval-video
    runs only its capped rows (each at the cap), and refuses baselines at its own budget."""
    ranker = NAMM.init_random(4, config=NAMMConfig(scorer="linear", threshold=None, recent_tokens=4))
    cfg = _config(tmp_path, data["jsonl"], policies=[NAMM_NAME], budgets=[0.5], own_budget=False)
    run_eval_video(cfg, loader=tiny_loader, namm=ranker)
    rows = _rows(cfg)
    assert rows and {r["policy"] for r in rows} == {"NAMM @ 50%"}
    assert all(r["evictions"] > 0 for r in rows)
    with pytest.raises(ValueError, match="no-own-budget"):
        run_eval_video(_config(tmp_path / "own", data["jsonl"], policies=[NAMM_NAME, "H2O"]),
                       loader=tiny_loader, namm=ranker)


def test_namm_head_mix_is_checked_and_applies_to_a_joint_namm_only(tmp_path, data):
    with pytest.raises(ValueError, match="namm_head_mix"):
        EvalVideoConfig(annotations="a.json", namm_head_mix=-0.5)
    cfg = _config(tmp_path, data["jsonl"], policies=[NAMM_NAME], heatmaps=0, namm_head_mix=0.5)
    with pytest.raises(ValueError, match="joint NAMM only"):
        run_eval_video(cfg, loader=tiny_loader, namm=NAMM(NAMMConfig()))


def test_key_frame_retention_separates_answer_frames_from_redundant_ones():
    rows = [
        {"policy": NAMM_NAME, "sample_id": "a", "task_type": "colour", "correct": True, "failed": False,
         "frame_retention": [1.0, 0.0, 0.5, 0.5]},
        {"policy": NAMM_NAME, "sample_id": "b", "task_type": "colour", "correct": False, "failed": False,
         "frame_retention": [0.0, 0.0, 1.0, 1.0]},
        {"policy": NAMM_NAME, "sample_id": "c", "task_type": "colour", "correct": True, "failed": False,
         "frame_retention": [0.0, 0.0, 0.0, 0.0]},  # no key frames known: left out
    ]
    key, other = key_frame_retention(rows, {"a": [0], "b": [2, 3]})
    assert key == pytest.approx((1.0 + 1.0) / 2) and other == pytest.approx((1 / 3 + 0.0) / 2)
    assert np.isnan(key_frame_retention(rows, {})[0])
    for row in rows:  # the other fields summarise reads
        row.update(frames=4, kept_video_tokens=1.0, kept_video_fraction=0.5, kept_frames=2.0,
                   kept_fraction=0.5, stored_kv_bytes=2**20, seconds=1.0, generate_seconds=0.5, predicted="A")
    summary = summarise(rows, ["colour"], {"a": [0], "b": [2, 3]})
    assert summary[NAMM_NAME]["key_frame_retention"] == pytest.approx(key)
    main, _ = summary_tables(summary, ["colour"])
    assert "key / other frames' tokens kept" in main and "1.000 / 0.167" in main
    assert "key / other" not in summary_tables(summarise(rows, ["colour"]), ["colour"])[0]


def test_retention_heatmaps_for_the_first_samples(tmp_path, data):
    from PIL import Image

    cfg = _config(tmp_path, data["jsonl"], policies=[FULL, NAMM_NAME], heatmaps=1)
    run_eval_video(cfg, loader=tiny_loader, namm=NAMM.init_random(0, config=NAMMConfig(budget=12)))
    pngs = sorted((tmp_path / "out" / "heatmaps").iterdir())
    assert [p.name for p in pngs] == ["FullCache_0_qa_0.png", "NAMM_0_qa_0.png"]
    assert all(Image.open(p).size[0] > 100 for p in pngs)
    events = list((tmp_path / "out" / "tensorboard").glob("events.*"))
    assert events and events[0].stat().st_size > 10_000  # scalars and the two images


def test_unreadable_videos_become_failed_rows(tmp_path, broken):
    cfg = _config(tmp_path, broken, policies=[FULL])
    summary = run_eval_video(cfg, loader=tiny_loader)
    rows = {r["sample_id"]: r for r in _rows(cfg)}
    assert [rows[f"qa:{i}"]["failed"] for i in range(4)] == [False, True, True, False]
    assert "garbage.mp4" in rows["qa:1"]["error"]
    assert "no such file" in rows["qa:2"]["error"]
    assert summary[FULL]["failed"] == 2 and summary[FULL]["samples"] == 4
    assert summary[FULL]["per_task"]["count"]["n"] == 1


def test_resume_skips_finished_rows_retries_failures_and_refuses_other_settings(tmp_path, broken):
    cfg = _config(tmp_path, broken, policies=[FULL, NAMM_NAME])
    namm = NAMM(NAMMConfig())
    run_eval_video(cfg, loader=tiny_loader, namm=namm)
    first = _rows(cfg)
    assert len(first) == 8
    run_eval_video(cfg, loader=tiny_loader, namm=namm)
    second = _rows(cfg)
    assert second[:8] == first  # nothing rewritten
    assert len(second) == 12 and all(r["failed"] for r in second[8:])  # only the failures were retried
    (broken.parent / "missing.mp4").write_bytes((broken.parent / "ok.mp4").read_bytes())
    try:
        summary = run_eval_video(cfg, loader=tiny_loader, namm=namm)
    finally:
        (broken.parent / "missing.mp4").unlink()
    assert summary[FULL]["failed"] == 1 and summary[NAMM_NAME]["failed"] == 1
    for changed in ({"num_frames": 5}, {"update_every": 32}, {"namm": "other"}):
        with pytest.raises(ValueError, match="another setting"):
            run_eval_video(_config(tmp_path, broken, policies=[FULL], **changed), loader=tiny_loader)


def test_baselines_need_the_namm(tmp_path, data):
    cfg = _config(tmp_path, data["jsonl"], policies=[FULL, "Recency"])
    with pytest.raises(ValueError, match="NAMM's budget"):
        run_eval_video(cfg, loader=tiny_loader, namm=NAMM(NAMMConfig()))


def _word_tokenizer():
    """A real (fast) Hugging Face tokenizer over the test questions' words, ids below the video id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>"] + sorted({w for line in QUESTIONS for w in " ".join(
        [line[1], *line[2]]).replace("?", " ?").split()} | set("ABCD.:?") | {"USER", "ASSISTANT", "Answer"})
    vocab = {w: i for i, w in enumerate(words)}
    assert len(vocab) < VIDEO_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>")


def test_model_directory_loads_offline(tmp_path, data):
    """from_pretrained directory: AutoModelForImageTextToText + AutoTokenizer, no processor."""
    directory = tmp_path / "model"
    build("llava_next_video").save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    cfg = _config(tmp_path, data["longvideobench"], model=str(directory), policies=[FULL], heatmaps=0)
    summary = run_eval_video(cfg)
    assert summary[FULL]["samples"] == 3 and summary[FULL]["failed"] == 0


def test_trained_video_model_brings_its_frames_preprocessing_and_prompt(tmp_path, data):
    """A model written like train-video-model's (language model referenced by directory) is found by
    its directory; its video_model.json sets the frame count, preprocessing and prompt builder."""
    video_models = pytest.importorskip("namm_transfer.pipelines.video.models")
    pytest.importorskip("namm_transfer.pipelines.video.qa_data")
    from transformers import LlamaConfig, LlamaForCausalLM

    from namm_transfer.pipelines.video.io import VideoPreprocessor

    torch.manual_seed(0)
    lm_dir = tmp_path / "lm"
    LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(lm_dir)
    _word_tokenizer().save_pretrained(lm_dir)
    lm, _ = video_models.load_language_model({"kind": "directory", "path": str(lm_dir)})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    model = video_models.build_video_model(lm, vision, VIDEO_ID, VIDEO_ID + 1, spatial_pool_stride=2)
    pre = dataclasses.asdict(VideoPreprocessor.for_model(model))
    video_models.save_video_model(model, tmp_path / "vm", {
        "language_model": {"kind": "directory", "path": str(lm_dir)}, "num_frames": 4, "preprocessing": pre,
        "prompt": {"builder": "namm_transfer.pipelines.video.qa_data.video_qa_prompt"},
    })
    loaded = load_video_model(str(tmp_path / "vm"))
    assert loaded.num_frames == 4 and loaded.prompt_builder is not None
    sample = load_annotations(data["jsonl"])[0]
    assert "Options: A. red B. blue" in loaded.prompt_builder(sample)
    cfg = _config(tmp_path, data["jsonl"], model=str(tmp_path / "vm"), num_frames=None, policies=[FULL])
    summary = run_eval_video(cfg)
    assert summary[FULL]["frames"] == 4 and summary[FULL]["failed"] == 0
    assert json.loads((tmp_path / "out" / "setting.json").read_text())["num_frames"] == 4


def test_cli_runs_eval_video(tmp_path, data):
    from namm_transfer.pipelines.cli import main

    out = tmp_path / "cli"
    assert main(["eval-video", "--annotations", str(data["mlvu"]), "--model", "video_llava",
                 "--loader", "test_pipelines_eval_video:tiny_loader", "--policies", "FullCache",
                 "--num-frames", "3", "--update-every", "16", "--max-new-tokens", "2", "--limit", "2",
                 "--output-dir", str(out), "--threads", "1"]) == 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["summary"]["FullCache"]["samples"] == 2
    assert saved["meta"]["command"].startswith("namm-transfer eval-video --annotations")


def test_budgets_cap_every_policy_alike_in_both_protocols(tmp_path, data):
    """--budgets 0.5 --protocols progressive one-shot: each token policy holds exactly its cap (half the
    video tokens plus the text tokens) after its last update; one-shot updates once, at the video's end
    (everything fed after it is still there); UniformFrames gets half the frames; one table per
    protocol and budget."""
    names = [FULL, NAMM_NAME, "Recency", "H2O", UNIFORM]
    cfg = _config(tmp_path, data["jsonl"], policies=names, budgets=[0.5],
                  protocols=["progressive", "one-shot"])
    summary = run_eval_video(cfg, loader=tiny_loader, namm=NAMM.init_random(0))
    rows = {(r["policy"], r["sample_id"]): r for r in _rows(cfg)}
    video_tokens, sample_ids = 24, {r["sample_id"] for r in rows.values()}
    for name in (NAMM_NAME, "Recency", "H2O"):
        for sid in sample_ids:
            progressive, one_shot = rows[(f"{name} @ 50%", sid)], rows[(f"{name} @ 50% one-shot", sid)]
            assert progressive["cap"] == 12 + progressive["prompt_tokens"] - video_tokens
            assert one_shot["cap"] == 12 + one_shot["video_end"] - video_tokens
            for row in (progressive, one_shot):
                kept = np.array(row["kept_per_layer"]) - np.array(row["since_update"])
                assert kept.tolist() == pytest.approx([row["cap"]] * len(kept)) and row["evictions"] > 0
            fed = one_shot["prompt_tokens"] + cfg.max_new_tokens - 1  # the last token is never fed
            assert one_shot["since_update"] == [fed - one_shot["video_end"]] * len(one_shot["since_update"])
            assert one_shot["kept_video_tokens"] <= one_shot["cap"]
    uniform = [r for (label, _), r in rows.items() if label == f"{UNIFORM} @ 50%"]
    assert len(uniform) == 3 and all(r["frames"] == 3 and r["evictions"] == 0 for r in uniform)
    assert {"NAMM @ 50%", "H2O @ 50% one-shot", f"{UNIFORM} @ 50%"} <= set(summary)
    assert summary["H2O @ 50% one-shot"]["protocol"] == "one-shot"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "### progressive, 50% of the video tokens" in md and "### one-shot, 50% of the video tokens" in md
    budget_section = md.split("## Matched budgets")[1].split("Accuracy per task type")[0]
    assert budget_section.count(f"| {UNIFORM} @ 50%") == 2  # in both protocols' tables
    assert budget_section.count("NAMM above every baseline: ") == 2  # a verdict under each table
    with pytest.raises(ValueError, match="fractions of the video tokens"):
        EvalVideoConfig(annotations="a.json", budgets=[1.5])
    with pytest.raises(ValueError, match="unknown protocol"):
        EvalVideoConfig(annotations="a.json", protocols=["sometimes"])


def test_shards_split_the_samples_and_the_last_summary_covers_them_all(tmp_path, data):
    """--shard 0/2 and 1/2 answer disjoint samples into their own rows files; a 0/1 rerun finds every
    row done and summarises all three samples, with the answers of a single process."""
    names = [FULL, "Recency"]
    single = _config(tmp_path / "single", data["jsonl"], policies=names, budgets=[0.5], own_budget=False)
    run_eval_video(single, loader=tiny_loader, namm=NAMM(NAMMConfig()))
    shared = tmp_path / "shared"
    for shard in ("0/2", "1/2"):
        cfg = _config(shared, data["jsonl"], policies=names, budgets=[0.5], shard=shard, own_budget=False)
        run_eval_video(cfg, loader=tiny_loader, namm=NAMM(NAMMConfig()))
    files = sorted(p.name for p in (shared / "out").glob("rows*.jsonl"))
    assert files == ["rows.shard0of2.jsonl", "rows.shard1of2.jsonl"]
    ids = [{json.loads(line)["sample_id"] for line in (shared / "out" / f).read_text().splitlines()}
           for f in files]
    assert len(ids[0]) == 2 and len(ids[1]) == 1 and not ids[0] & ids[1]
    summary = run_eval_video(_config(shared, data["jsonl"], policies=names, budgets=[0.5], own_budget=False),
                             loader=tiny_loader, namm=NAMM(NAMMConfig()))
    assert "Recency" not in summary  # not at the NAMM's own budget: the NAMM is not run
    assert not (shared / "out" / "rows.jsonl").exists()  # nothing left to do
    assert summary[FULL]["samples"] == 3 and summary["Recency @ 50%"]["samples"] == 3
    answers = {(r["policy"], r["sample_id"]): r["output"] for r in _rows(single)}
    sharded = {}
    for f in files:
        for line in (shared / "out" / f).read_text().splitlines():
            row = json.loads(line)
            sharded[(row["policy"], row["sample_id"])] = row["output"]
    assert sharded == answers
    with pytest.raises(ValueError, match="0 <= K < N"):
        EvalVideoConfig(annotations="a.json", shard="2/2")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_shot_shared_prefill_answers_like_feeding_each_prompt(tmp_path, data, family):
    """One prefill up to the video's end shared by every policy, then one fork each, gives the rows of
    feeding each policy's prompt in two chunks: same answers, same kept tokens per layer, same frames."""
    names = [NAMM_NAME, "Recency", "H2O", "SnapKV"]
    rows = {}
    for shared in (True, False):
        cfg = _config(tmp_path / str(shared), data["jsonl"], model=family, policies=names, budgets=[0.5],
                      protocols=["one-shot"], own_budget=False, shared_prefill=shared, max_new_tokens=4)
        run_eval_video(cfg, loader=tiny_loader, namm=NAMM.init_random(0))
        rows[shared] = {(r["policy"], r["sample_id"]): r for r in _rows(cfg) if "one-shot" in r["policy"]}
    assert rows[True].keys() == rows[False].keys() and len(rows[True]) == 3 * len(names)
    for key, a in rows[True].items():
        b = rows[False][key]
        assert a["shared_prefill"] and "shared_prefill" not in b
        assert a["output"] == b["output"], key
        assert a["kept_per_layer"] == pytest.approx(b["kept_per_layer"]), key
        assert a["frame_retention"] == pytest.approx(b["frame_retention"]), key
        assert a["cap"] == b["cap"] and a["evictions"] == b["evictions"] > 0


def test_joint_probe_rows_keep_the_cap_with_one_ranking_for_every_layer_head(tmp_path, data):
    """--joint-probe adds 'JointProbe @ 50% one-shot' rows: the cap of every other one-shot policy,
    from the shared prefill, the same tokens in every layer and KV head."""
    from namm_transfer.pipelines.joint_probe import JOINT, JointProbe

    text = build("llava_next_video").config.text_config
    rows_per_token = text.num_hidden_layers * text.num_key_value_heads
    gen = torch.Generator().manual_seed(0)
    dim = rows_per_token * 17 + 8
    probe = JointProbe(torch.randn(dim, generator=gen), 0.0, torch.zeros(dim), torch.ones(dim), 8)
    probe.save(tmp_path / "probe.pt")
    cfg = _config(tmp_path, data["jsonl"], policies=[FULL, "Recency"], budgets=[0.5], protocols=["one-shot"],
                  own_budget=False, joint_probe=[str(tmp_path / "probe.pt")], heatmaps=3)
    summary = run_eval_video(cfg, loader=tiny_loader, namm=NAMM.init_random(0))
    label = f"{JOINT} @ 50% one-shot"
    rows = {(r["policy"], r["sample_id"]): r for r in _rows(cfg)}
    joint = [r for (name, _), r in rows.items() if name == label]
    assert len(joint) == 3 and summary[label]["policy"] == JOINT
    for row in joint:
        recency = rows[("Recency @ 50% one-shot", row["sample_id"])]
        assert row["cap"] == recency["cap"] and row["joint_probe"] == str(tmp_path / "probe.pt")
        kept = np.array(row["kept_per_layer"]) - np.array(row["since_update"])
        assert kept.tolist() == pytest.approx([row["cap"]] * len(kept))
    heatmaps = sorted((tmp_path / "out" / "heatmaps").glob("JointProbe*.png"))
    assert heatmaps  # one retention map per sample
    # one ranking: every layer keeps the same share of each frame
    from namm_transfer.pipelines.video.evaluate import one_shot_sample

    video_model = load_video_model("llava_next_video", tiny_loader)
    sample = load_annotations(data["jsonl"])[0]
    [(_, row, retention)] = one_shot_sample(video_model, sample, [(label, JOINT, 0.5)], NAMM.init_random(0),
                                            6, 3, probes={JOINT: probe})
    assert np.allclose(retention, retention[:1]) and 0 < retention.mean() < 1
    with pytest.raises(ValueError, match="need those probes"):
        one_shot_sample(video_model, sample, [(label, JOINT, 0.5)], NAMM.init_random(0), 6, 3)
    with pytest.raises(ValueError, match="one probe of each kind"):
        run_eval_video(dataclasses.replace(cfg, joint_probe=[str(tmp_path / "probe.pt")] * 2),
                       loader=tiny_loader, namm=NAMM.init_random(0))
    with pytest.raises(ValueError, match="joint_probe runs one-shot"):
        EvalVideoConfig(annotations="a.json", joint_probe=["p.pt"], budgets=[0.5])


# --- video-stats: feature statistics re-collected on the video model ------------------------------


def _text_namm(tmp_path) -> Path:
    """A random NAMM with made-up 'text' statistics, saved as a directory."""
    base = NAMM.init_random(3, config=NAMMConfig(update_every=512))
    bins = base.config.n_bins
    namm = NAMM(base.config, base.params, torch.full((bins,), 0.5), torch.full((bins,), 2.0))
    folder = tmp_path / "text_namm"
    namm.save_pretrained(folder)
    return folder


def test_video_stats_are_the_mean_and_variance_of_the_features_the_namm_reads(tmp_path, data, monkeypatch):
    from namm_transfer.pipelines.video.evaluate import evaluate_sample
    from namm_transfer.pipelines.video.stats import VideoStatsConfig, run_video_stats

    source = _text_namm(tmp_path)
    cfg = VideoStatsConfig(namm=str(source), model="llava_next_video", annotations=str(data["jsonl"]),
                           num_frames=6, update_every=16, out_dir=str(tmp_path / "adapted"))
    adapted = run_video_stats(cfg, loader=tiny_loader)

    # reference: every valid slot's spectral features at every update of the same prompts, recorded
    # by hand from a keep-everything NAMM with the same cadence
    seen = []
    original_keep = NAMM.keep

    def spy(self, state, view):
        if state.ema is not None:
            state.grow(view.positions.shape[-1])
            seen.append(state.ema[view.valid].double())
        return view.valid.clone()

    monkeypatch.setattr(NAMM, "keep", spy)
    probe = NAMM.from_pretrained(source).replace(update_every=16)
    model = tiny_loader("llava_next_video")
    from namm_transfer.pipelines.video.loading import as_video_model

    video_model = as_video_model(model)
    for sample in load_annotations(data["jsonl"]):
        evaluate_sample(video_model, sample, probe, 6, 16, max_new_tokens=1)
    monkeypatch.setattr(NAMM, "keep", original_keep)
    features = torch.cat(seen)
    assert features.shape[0] > 100
    torch.testing.assert_close(adapted.norm_mean, features.mean(0).float(), rtol=1e-4, atol=1e-7)
    variance = features.var(0, unbiased=False).float()
    torch.testing.assert_close(adapted.norm_var, variance, rtol=1e-3, atol=1e-9)

    # weights and settings unchanged; the source keeps its text statistics; the record says what was read
    loaded, text = NAMM.from_pretrained(tmp_path / "adapted"), NAMM.from_pretrained(source)
    assert torch.equal(loaded.params, text.params) and loaded.config == text.config
    assert loaded.config.update_every == 512
    assert torch.equal(text.norm_mean, torch.full_like(text.norm_mean, 0.5))
    torch.testing.assert_close(loaded.norm_mean, adapted.norm_mean)
    record = json.loads((tmp_path / "adapted" / "video_stats.json").read_text())
    assert len(record["videos_read"]) == 3 and record["videos_skipped"] == []
    assert record["norm_var_before"] == [2.0] * text.config.n_bins


def test_video_stats_skip_unreadable_videos_and_refuse_when_none_read(tmp_path, broken):
    from namm_transfer.pipelines.video.stats import VideoStatsConfig, run_video_stats

    source = _text_namm(tmp_path)
    cfg = VideoStatsConfig(namm=str(source), model="llava_next_video", annotations=str(broken),
                           num_frames=6, update_every=16, out_dir=str(tmp_path / "adapted"))
    run_video_stats(cfg, loader=tiny_loader)
    record = json.loads((tmp_path / "adapted" / "video_stats.json").read_text())
    assert len(record["videos_read"]) == 2
    skipped = record["videos_skipped"]
    assert len(skipped) == 2 and "garbage.mp4" in skipped[0]["error"] and "missing.mp4" in skipped[1]["error"]
    bad = broken.parent / "only_bad.jsonl"
    bad.write_text("".join(line + "\n" for line in broken.read_text().splitlines()[1:3]))
    with pytest.raises(ValueError, match="none of the 2 videos could be read"):
        run_video_stats(dataclasses.replace(cfg, annotations=str(bad), out_dir=str(tmp_path / "x")),
                        loader=tiny_loader)


def test_video_keep_calibration_finds_the_largest_bias_within_the_share():
    """Bisection on the final bias against a monotone kept share (a logistic curve standing in for the
    video runs): the result keeps at most ``keep`` and a bias one bisection step larger keeps more."""
    import math

    from namm_transfer.pipelines.video.stats import calibrate_video_keep

    namm = NAMM.init_random(0)
    share = lambda n: 1 / (1 + math.exp(-2 * float(n.params[0, -1])))  # noqa: E731
    for keep in (0.1, 0.45, 0.9):
        calibrated, tried = calibrate_video_keep(namm, share, keep, steps=10)
        bias = float(calibrated.params[0, -1])
        assert share(calibrated) <= keep
        target = math.log(keep / (1 - keep)) / 2  # where the share equals keep
        assert target - 0.01 <= bias <= target
        assert {"bias": bias, "kept": share(calibrated)} in tried
        assert torch.equal(calibrated.params[0, :-1], namm.params[0, :-1])
    with pytest.raises(ValueError, match="keeps more than 50%"):
        calibrate_video_keep(namm, lambda n: 0.9, 0.5, steps=2)


@pytest.mark.parametrize("rank_only", [False, True])
def test_video_stats_with_keep_sets_a_threshold_that_keeps_at_most_that_share(tmp_path, data, rank_only):
    """--keep bisects the final bias; a NAMM that only ranks (threshold None) is given the threshold 0."""
    from namm_transfer.pipelines.video.stats import VideoStatsConfig, kept_video_share, run_video_stats

    source = _text_namm(tmp_path)
    if rank_only:
        NAMM.from_pretrained(source).replace(threshold=None).save_pretrained(source)
    cfg = VideoStatsConfig(namm=str(source), model="llava_next_video", annotations=str(data["jsonl"]),
                           num_frames=6, update_every=16, keep=0.5, bisection_steps=3,
                           out_dir=str(tmp_path / "adapted"))
    adapted = run_video_stats(cfg, loader=tiny_loader)
    record = json.loads((tmp_path / "adapted" / "video_stats.json").read_text())["threshold_calibration"]
    assert record["bias_after"] == pytest.approx(float(adapted.params[0, -1]))
    from namm_transfer.pipelines.video.loading import as_video_model

    video_model = as_video_model(tiny_loader("llava_next_video"))
    kept = kept_video_share(adapted, video_model, load_annotations(data["jsonl"]), 6, 16)
    assert kept == pytest.approx(record["kept_after"]) and kept <= 0.5
    assert any(t["kept"] > 0.5 for t in record["tried"])  # the bracket's other end keeps more
    assert NAMM.from_pretrained(tmp_path / "adapted").config.threshold == 0.0


@pytest.mark.parametrize("bad", [{"limit": 0}, {"num_frames": 0}, {"update_every": 0}, {"keep": 1.0},
                                 {"bisection_steps": 0}, {"format": "csv"}])
def test_video_stats_config_names_bad_settings(bad):
    from namm_transfer.pipelines.video.stats import VideoStatsConfig

    with pytest.raises(ValueError, match="must be|unknown annotation format|keep must be"):
        VideoStatsConfig(annotations="a.jsonl", **bad)


def test_verdict_line_names_the_best_baseline_and_leaves_probes_out():
    from namm_transfer.pipelines.video.evaluate import verdict_line

    def entry(accuracy: float, se: float) -> dict:
        return {"accuracy": accuracy, "accuracy_se": se}

    table = {NAMM_NAME: entry(0.9, 0.03), "H2O": entry(0.8, 0.04), UNIFORM: entry(0.5, 0.05),
             "JointProbe": entry(0.95, 0.02)}
    line = verdict_line(table)
    assert "above every baseline: yes; by more than the combined standard error: yes" in line
    assert "best baseline H2O 0.800; NAMM lead +0.100, combined s.e. 0.050" in line
    table["H2O"] = entry(0.88, 0.04)  # ahead by 0.02, within hypot(0.03, 0.04)
    assert "yes; by more than the combined standard error: no" in verdict_line(table)
    assert verdict_line({"H2O": entry(0.8, 0.04)}) == ""  # no NAMM row


def test_prompt_options_a_model_would_ignore_are_refused(tmp_path, data):
    """A model that builds its own prompts (a train-video-model model) would silently drop an answer
    prefix or another post-prompt: eval-video refuses them, naming which; the defaults pass."""
    from namm_transfer.pipelines.video.evaluate import check_prompt_options
    from namm_transfer.pipelines.video.qa import POST_PROMPT

    model, tokenizer = build("llava_next_video"), CharTokenizer()
    own = VideoModel(model, tokenizer, prompt_builder=lambda sample: "<video> " + sample.question)
    check_prompt_options(own, POST_PROMPT, "")  # the defaults: nothing ignored
    with pytest.raises(ValueError, match="so answer_prefix would be ignored"):
        check_prompt_options(own, POST_PROMPT, "Best option: (")
    with pytest.raises(ValueError, match="answer_prefix and post_prompt would be ignored"):
        check_prompt_options(own, "Answer directly.", "(")
    check_prompt_options(VideoModel(model, tokenizer), "Answer directly.", "(")  # builds from the options

    def own_loader(source, device="cpu", dtype=torch.float32):
        return VideoModel(build("llava_next_video"), CharTokenizer(), prompt_builder=lambda sample: "x")

    cfg = _config(tmp_path, data["jsonl"], policies=[FULL], answer_prefix="(")
    with pytest.raises(ValueError, match="builds its own prompts"):
        run_eval_video(cfg, loader=own_loader)
