"""make-video-qa (synthetic long-video QA) and train-video-model (a small LLaVA-NeXT-Video), on tiny
settings: a 2-layer random Llama with a character tokenizer instead of SmolLM2 (the real model: slow)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from namm_transfer.pipelines.cli import main, parse
from namm_transfer.pipelines.video.io import read_frames
from namm_transfer.pipelines.video.models import (
    LM_PREFIXES,
    META_NAME,
    WEIGHTS_NAME,
    available_video_models,
    load_video_model,
    video_model_dir,
)
from namm_transfer.pipelines.video.qa import LETTERS, load_video_qa
from namm_transfer.pipelines.video.qa_data import (
    COLOURS,
    SPLITS,
    TASK_TYPES,
    VideoQAConfig,
    _shape_mask,
    frame_labels,
    make_video_qa,
    render_sample,
    sample_seed,
)
from namm_transfer.pipelines.video.train import (
    TrainVideoModelConfig,
    _batch,
    answer_forward,
    answer_loss,
    encode_split,
    train_video_model,
)

pytest.importorskip("av")
pytest.importorskip("decord")

TINY_DATA = ["--train", "16", "--val", "6", "--test", "12", "--num-frames", "12", "--frames-per-slot", "2",
             "--size", "32", "--seed", "3", "--task-types", *TASK_TYPES]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video_qa")
    assert main(["make-video-qa", "--out-dir", str(out), *TINY_DATA]) == 0
    return out


def char_tokenizer():
    """A character-level fast tokenizer (ids 2..97), EOS = 1: what the tiny Llama reads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "</s>": 1, **{c: 2 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   pad_token="</s>")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests._tiny_llava import _text

    out = tmp_path_factory.mktemp("tiny_lm")
    torch.manual_seed(0)
    config = _text(LlamaConfig)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = 1, 1, None
    LlamaForCausalLM(config).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def tiny_train_config(dataset: Path, lm: Path, out: Path, **overrides) -> TrainVideoModelConfig:
    settings = dict(
        data_dir=str(dataset), out_dir=str(out), language_model=str(lm), image_size=32, patch_size=8,
        pool_stride=2, vision_hidden=32, vision_layers=1, vision_heads=2, video_token_id=110,
        image_token_id=111, pretrain_steps=3, pretrain_batch=16, steps=16, batch_size=4, lr=3e-3,
        warmup_steps=1, eval_every=8, eval_n=4, val_n=3, test_n=4, max_new_tokens=3, log_every=4, threads=1,
    )
    settings.update(overrides)
    return TrainVideoModelConfig(**settings)


@pytest.fixture(scope="module")
def trained(dataset, tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("video_model")
    cfg = tiny_train_config(dataset, tiny_lm, out)
    return cfg, train_video_model(cfg, argv=["train-video-model", "--steps", "16"])


# --- the generator -----------------------------------------------------------------------------------


def test_render_is_deterministic_and_seeds_matter():
    cfg = VideoQAConfig(num_frames=12, frames_per_slot=2, size=32)
    for task in TASK_TYPES:
        a_frames, a = render_sample(11, task, cfg)
        b_frames, b = render_sample(11, task, cfg)
        assert np.array_equal(a_frames, b_frames) and a == b
        assert a_frames.shape == (24, 32, 32, 3) and a_frames.dtype == np.uint8
        c_frames, _ = render_sample(12, task, cfg)
        assert not np.array_equal(a_frames, c_frames)


def test_rerun_gives_the_same_dataset_and_reuses_videos(dataset, tmp_path):
    again = tmp_path / "again"
    manifest = make_video_qa(parse(["make-video-qa", "--out-dir", str(again), *TINY_DATA])[1])
    assert manifest["videos_written"] == 34
    for split in SPLITS:
        assert (again / f"{split}.jsonl").read_text() == (dataset / f"{split}.jsonl").read_text()
    first = load_video_qa(dataset / "test.jsonl")[0]
    np.testing.assert_array_equal(read_frames(first.video_path), read_frames(again / first.video))
    rerun = make_video_qa(VideoQAConfig(out_dir=str(again), train=16, val=6, test=12, num_frames=12,
                                        frames_per_slot=2, size=32, seed=3, task_types=list(TASK_TYPES)))
    assert rerun["videos_reused"] == 34 and rerun["videos_written"] == 0


def test_splits_are_disjoint_by_seed(dataset):
    seeds = {split: {r.meta["seed"] for r in load_video_qa(dataset / f"{split}.jsonl")} for split in SPLITS}
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]
    assert seeds["test"] == {sample_seed(3, "test", i) for i in range(12)}
    assert sample_seed(0, "train", 299_999) < sample_seed(0, "val", 0) < sample_seed(0, "test", 0)
    with pytest.raises(ValueError):
        sample_seed(0, "train", 300_000)


def test_jsonl_format(dataset):
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["counts"]["train"]["samples"] == 16 and manifest["command"].startswith("namm-transfer")
    for split in SPLITS:
        lines = (dataset / f"{split}.jsonl").read_text().splitlines()
        samples = load_video_qa(dataset / f"{split}.jsonl")  # the one reader accepts every line
        assert [s.sample_id for s in samples] == [f"{split}-{i:06d}" for i in range(len(lines))]
        for i, line in enumerate(lines):
            record = json.loads(line)
            assert record["id"] == f"{split}-{i:06d}" and record["split"] == split
            assert record["video"] == f"videos/{split}/{record['id']}.mp4"
            assert (dataset / record["video"]).is_file()
            assert len(record["options"]) == 4 and record["answer"] in LETTERS
            types = manifest["settings"]["task_types"]
            assert record["task_type"] == types[i % len(types)]
            assert record["num_frames"] == 12 and record["total_frames"] == 24
            assert all(0 <= k < 12 for k in record["key_frames"])
            assert record["key_video_frames"] == [[2 * k, 2 * k + 2] for k in record["key_frames"]]
            assert isinstance(record["seed"], int)


def _nearest_colour(pixel: np.ndarray) -> str:
    names = list(COLOURS)
    return names[int(np.argmin([np.abs(pixel.astype(int) - np.array(COLOURS[n])).sum() for n in names]))]


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_answers_match_the_decoded_frames(dataset, backend):
    for record in load_video_qa(dataset / "test.jsonl"):
        frames = read_frames(record.video_path, num_frames=record.meta["num_frames"], backend=backend)
        assert frames.shape == (12, 32, 32, 3)
        events = sorted(record.meta["events"], key=lambda e: e["slot"])
        for event in events:
            x0, y0, x1, y1 = event["bbox"]
            pixel = frames[event["slot"], (y0 + y1) // 2, (x0 + x1) // 2]
            assert _nearest_colour(pixel) == event["colour"]
            assert np.abs(pixel.astype(int) - COLOURS[event["colour"]]).max() < 40
            drawn = np.abs(frames[event["slot"]].astype(int) - COLOURS[event["colour"]]).max(-1) < 60
            mask = _shape_mask(event["shape"], 32, x0, y0, x1 - x0)
            assert (drawn & mask).sum() / (drawn | mask).sum() > 0.6  # the named shape is what was drawn
        saturation = frames.max(-1).astype(int) - frames.min(-1).astype(int)  # [T, H, W]
        coloured = (saturation > 80).sum((1, 2))
        labels = frame_labels(record.meta["events"], record.meta["num_frames"])
        assert [bool(c > 20) for c in coloured] == [lab > 0 for lab in labels]  # shapes only in key frames
        chosen = record.options[record.answer_index]
        if record.task_type == "colour":
            assert len(events) == 1 and chosen == events[0]["colour"]
        elif record.task_type == "shape":
            assert len(events) == 1 and chosen == events[0]["shape"]
        elif record.task_type == "missing":
            assert len(events) == 3 and {e["colour"] for e in events} == set(COLOURS) - {chosen}
        elif record.task_type == "majority":
            counts = Counter(e["colour"] for e in events)
            assert len(events) in (3, 5) and counts[chosen] > max(n for c, n in counts.items() if c != chosen)
        elif record.task_type == "order":
            assert len(events) == 2 and chosen == events[0]["colour"] != events[1]["colour"]
        else:
            assert int(chosen) == len(events) and len({e["colour"] for e in events}) == 1


def test_decord_reads_what_pyav_reads(dataset):
    record = load_video_qa(dataset / "val.jsonl")[0]
    full = read_frames(record.video_path, backend="decord")
    assert full.shape[0] == record.meta["total_frames"]
    np.testing.assert_array_equal(full, read_frames(record.video_path, backend="av"))
    np.testing.assert_array_equal(read_frames(record.video_path, num_frames=12), full[::2])  # one per slot


# --- the model ---------------------------------------------------------------------------------------


def test_answer_loss_is_the_target_tokens_cross_entropy(trained, dataset):
    cfg, result = trained
    from namm_transfer.adapters.frame_map import video_layout
    from namm_transfer.pipelines.video.io import VideoPreprocessor

    model, tokenizer = result.model, result.tokenizer
    split = encode_split(load_video_qa(dataset / "val.jsonl")[:3], tokenizer, video_layout(model), 12)
    batch = _batch(split, [0, 1, 2], VideoPreprocessor.for_model(model), tokenizer.eos_token_id, "cpu")
    with torch.no_grad():
        loss = answer_loss(model, batch, answer_forward(model, batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values_videos=batch["pixel_values_videos"]).logits
    picked, wanted = [], []
    for b in range(3):
        p, n = len(split.prompts[b]), len(split.prompts[b]) + len(split.targets[b])
        assert split.targets[b] == tokenizer(" " + split.records[b].answer, add_special_tokens=False)[
            "input_ids"] + [tokenizer.eos_token_id]
        picked.append(logits[b, p - 1 : n - 1])
        wanted += split.targets[b]
    expected = F.cross_entropy(torch.cat(picked), torch.tensor(wanted))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_training_reduces_the_loss_and_writes_its_outputs(trained):
    cfg, result = trained
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4])
    out = Path(cfg.out_dir)
    for name in ("config.json", WEIGHTS_NAME, META_NAME, "README.md", "train_log.jsonl",
                 "predictions_val.jsonl", "predictions_test.jsonl"):
        assert (out / name).is_file(), name
    meta = json.loads((out / META_NAME).read_text())
    assert meta["language_model"] == {"kind": "directory", "path": str(Path(cfg.language_model).resolve())}
    assert meta["num_frames"] == 12 and meta["tokens_per_frame"] == 4 and meta["video_tokens"] == 48
    assert meta["command"].startswith("namm-transfer train-video-model") and meta["seed"] == 0
    assert meta["training"]["steps"] == 16 and meta["scores"]["test"]["overall"]["n"] == 4
    assert meta["prompt"]["builder"] == "namm_transfer.pipelines.video.qa.video_qa_prompt"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"frames", "answers", "eval"}
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith(LM_PREFIXES)]  # the LM is referenced, not copied
    assert any(k.startswith("model.vision_tower.") for k in keys)
    assert any(k.startswith("model.multi_modal_projector.") for k in keys)


def test_only_the_vision_side_was_trained(trained, tiny_lm):
    from transformers import LlamaForCausalLM

    _, result = trained
    original = LlamaForCausalLM.from_pretrained(tiny_lm)
    for name, tensor in original.model.state_dict().items():
        assert torch.equal(result.model.model.language_model.state_dict()[name], tensor), name


def test_saved_model_reloads_with_identical_outputs(trained, dataset):
    cfg, result = trained
    model, tokenizer = load_video_model(cfg.out_dir)
    assert not model.training
    from namm_transfer.adapters.frame_map import video_layout
    from namm_transfer.pipelines.video.io import VideoPreprocessor

    split = encode_split(load_video_qa(dataset / "test.jsonl")[:2], tokenizer, video_layout(model), 12)
    batch = _batch(split, [0, 1], VideoPreprocessor.for_model(model), tokenizer.eos_token_id, "cpu",
                   with_targets=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, result.model(**inputs).logits)
    predictions = [json.loads(line) for line in (Path(cfg.out_dir) / "predictions_test.jsonl").open()]
    first = split.records[0]
    ids = torch.tensor([split.prompts[0]])
    pixels = VideoPreprocessor.for_model(model)(split.frames[0])[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                         max_new_tokens=3, do_sample=False, eos_token_id=1, pad_token_id=1)
    assert predictions[0]["id"] == first.sample_id
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == predictions[0]["generated"]


def test_export_ships_what_loads_back_the_same(trained, tmp_path):
    cfg, result = trained
    assert main(["export-video-model", cfg.out_dir, "--name", "tiny", "--destination", str(tmp_path)]) == 0
    shipped = tmp_path / "tiny"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(
        ["config.json", WEIGHTS_NAME, META_NAME, "README.md", "train_log.jsonl", "predictions_test.jsonl"])
    assert json.loads((shipped / META_NAME).read_text())["scores"] == result.meta["scores"]
    model, _ = load_video_model(shipped)
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=META_NAME):
        main(["export-video-model", str(tmp_path / "empty"), "--name", "x", "--destination", str(tmp_path)])


def test_unknown_video_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        video_model_dir("no-such-model")
    with pytest.raises(FileNotFoundError, match=META_NAME):
        video_model_dir(tmp_path)


def test_train_cli_parses_into_the_config(dataset, tiny_lm, tmp_path):
    argv = ["train-video-model", "--data-dir", str(dataset), "--language-model", str(tiny_lm), "--out-dir",
            str(tmp_path), "--image-size", "32", "--patch-size", "8", "--pool-stride", "2", "--steps", "7",
            "--batch-size", "2", "--lr", "0.01", "--max-minutes", "3", "--threads", "1", "--test-n", "5"]
    cfg = parse(argv)[1]
    assert (cfg.image_size, cfg.patch_size, cfg.pool_stride, cfg.steps, cfg.batch_size) == (32, 8, 2, 7, 2)
    assert (cfg.lr, cfg.max_minutes, cfg.test_n, cfg.tokens_per_frame) == (0.01, 3.0, 5, 4)
    with pytest.raises(ValueError, match="pool_stride"):
        TrainVideoModelConfig(image_size=64, patch_size=16, pool_stride=3)


def test_config_validation():
    with pytest.raises(ValueError, match="task_types"):
        VideoQAConfig(task_types=["colour", "size"])
    with pytest.raises(ValueError, match="size"):
        VideoQAConfig(size=33)
    with pytest.raises(ValueError, match="num_frames"):
        VideoQAConfig(num_frames=8)


# --- the shipped model (real SmolLM2) ----------------------------------------------------------------


@pytest.mark.slow
def test_shipped_video_model_answers_the_test_split(tmp_path):
    from namm_transfer.pipelines.video.io import VideoPreprocessor
    from namm_transfer.pipelines.video.models import video_model_meta
    from namm_transfer.pipelines.video.train import generate_answers, summarise

    assert "smollm2-shapes" in available_video_models()  # package data
    meta = video_model_meta("smollm2-shapes")
    settings = meta["data"]["settings"]
    make_video_qa(VideoQAConfig(out_dir=str(tmp_path), train=0, val=0, test=24, **settings))
    model, tokenizer = load_video_model("smollm2-shapes")
    from namm_transfer.adapters.frame_map import video_layout

    split = encode_split(load_video_qa(tmp_path / "test.jsonl"), tokenizer, video_layout(model),
                         meta["num_frames"])
    rows = generate_answers(model, tokenizer, split, VideoPreprocessor.for_model(model), "cpu")
    assert summarise(rows)["overall"]["accuracy"] >= 0.7  # the test split's first 24 samples


def test_init_from_warm_starts_the_trained_part(trained, dataset, tiny_lm, tmp_path):
    """init_from loads the vision tower and projector and keeps them (no pretraining, no projector
    re-initialisation): with a zero learning rate the result equals the model it started from."""
    from safetensors.torch import load_file

    first_cfg, _ = trained
    warm = dict(init_from=first_cfg.out_dir, pretrain_steps=0, steps=1, eval_every=0, val_n=0, test_n=0)
    cfg = tiny_train_config(dataset, tiny_lm, tmp_path / "warm", lr=0.0, **warm)
    train_video_model(cfg)
    before = load_file(str(Path(first_cfg.out_dir) / "video_model.safetensors"))
    after = load_file(str(tmp_path / "warm" / "video_model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    other = tiny_train_config(dataset, tiny_lm, tmp_path / "bad", vision_hidden=16, vision_heads=2, **warm)
    with pytest.raises(ValueError, match="does not fit the model"):
        train_video_model(other)
