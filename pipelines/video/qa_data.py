"""``namm-transfer make-video-qa``: a seeded synthetic long-video QA set where a few frames hold the answer.

Each video is a sequence of ``num_frames`` *slots*, every slot held for ``frames_per_slot`` identical
frames (so uniform sampling of ``num_frames`` frames, as :func:`~namm_transfer.pipelines.video.io.read_frames`
does, takes exactly one frame of every slot). Most slots are redundant: plain achromatic *scenes*
(a grey level plus a black, white or grey decoration) held for several slots, some of them repeated
later in the video. The answer depends only on a few *key* slots, where a solid coloured shape (red,
green, blue or yellow; square, circle, triangle or diamond) is drawn over the scene for that one slot:

==========  ==========================================================  ==================
task_type   what happens / question                                     options (fixed order)
==========  ==========================================================  ==================
colour      one shape flashes once; "What colour was it?"               red green blue yellow
shape       one shape flashes once; "What shape was it?"                square circle triangle diamond
majority    3 or 5 shapes flash, one colour 2 or 3 times, the others     red green blue yellow
            once; "Which colour appeared most often?"
missing     3 shapes flash, each of a different colour; "Which colour   red green blue yellow
            did not appear?"
order       two shapes of different colours flash at different times;   red green blue yellow
            "What colour was the first one?"
count       the same shape flashes 1-4 times; "How many times?"        1 2 3 4
==========  ==========================================================  ==================

Options are always listed in that canonical order (palette order, shape list, ascending counts), so
the answer letter is a function of the video's content: a frozen 135M language model cannot match a
described colour to a shuffled option list (measured: chance level), and the reference model trained
on this set (``train-video-model``) keeps its language model frozen. The task types asked for
(default: colour, majority) cycle through the samples and the answer is drawn uniformly, so
every split is balanced in task type and close to uniform in answer letter. ``key_frames`` hold every
slot with a shape: one for colour / shape, three or five for majority, three for missing, two for
order, one to four for count.

Generic video-QA JSONL format
-----------------------------
``OUT_DIR/{train,val,test}.jsonl``, one JSON object per line, videos under ``OUT_DIR/videos/<split>/``::

    {"id": "test-000007",
     "video": "videos/test/test-000007.mp4",     # relative to the folder holding the JSONL file
     "question": "A coloured shape appeared briefly. What colour was it?",
     "options": ["red", "green", "blue", "yellow"],   # always 4 here (the reader takes 2 to 26)
     "answer": "C",                                  # letter of the correct option
     "task_type": "colour",
     "seed": 2000007,                                # the sample's seed (see below)
     "split": "test",
     # metadata (readers may ignore it):
     "num_frames": 32,          # frames to sample uniformly (one per slot)
     "fps": 8.0, "total_frames": 128, "frames_per_slot": 4,
     "key_frames": [13],        # indices among the num_frames sampled frames that hold the answer
     "key_video_frames": [[52, 56]],   # [start, end) frame ranges of those slots in the file
     "events": [{"slot": 13, "colour": "blue", "shape": "circle", "bbox": [x0, y0, x1, y1]}]}

The required fields are ``video``, ``question``, ``options`` and ``answer``; ``task_type`` groups the
accuracy. The schema (``VideoQASample``), its reader (``load_video_qa``), the prompt (``video_qa_prompt``)
and the scorer (``score_output``) are :mod:`~namm_transfer.pipelines.video.qa`'s, shared with
``train-video-model`` and ``eval-video``. The prompt a model trained here sees, e.g. for
LLaVA-NeXT-Video::

    USER: <video>
    A coloured shape appeared briefly. What colour was it?
    Options: A. red B. green C. blue D. yellow
    Answer with the letter. ASSISTANT:

Seeds and splits: sample ``i`` of a split has seed ``1_000_000 * seed + SPLIT_OFFSETS[split] + i``
(train 0, val 400,000, test 700,000; at most 300,000 samples per split), and everything about it is
drawn from ``numpy.random.default_rng(that seed)``: splits never share a seed, and the same
settings give the same videos. ``OUT_DIR/dataset.json`` records the settings, counts per task and
answer, the command and the git revision.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from namm_transfer.pipelines.common import log, run_metadata, write_json
from namm_transfer.pipelines.video.qa import (
    LETTERS,
    video_qa_prompt,  # noqa: F401  (the prompt builder smollm2-shapes' video_model.json names by this path)
)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 210, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("square", "circle", "triangle", "diamond")
TASK_TYPES = ("colour", "shape", "majority", "missing", "order", "count")
# what the shipped reference model is trained on: the questions a frozen 135M language model learnt to
# read from the video tokens within the training budget (the others: see train_video_model)
DEFAULT_TASK_TYPES = ("colour", "majority")
COUNT_OPTIONS = ("1", "2", "3", "4")
QUESTIONS = {
    "colour": "A coloured shape appeared briefly. What colour was it?",
    "shape": "A coloured shape appeared briefly. What shape was it?",
    "majority": "Shapes of several colours appeared briefly. Which colour appeared most often?",
    "missing": "Shapes of three different colours appeared briefly. Which colour did not appear?",
    "order": "Two shapes of different colours appeared at different times. What colour was the first one?",
    "count": "A coloured shape appeared several times. How many times did it appear?",
}
SPLITS = ("train", "val", "test")
SPLIT_OFFSETS = {"train": 0, "val": 400_000, "test": 700_000}
MAX_PER_SPLIT = 300_000
# scene backgrounds and decorations are achromatic, so no scene can be mistaken for a shape's colour
BACKGROUND_LEVELS = (25, 60, 95, 130, 165, 200, 230)
DECORATIONS = ("none", "bar", "border", "quadrant", "stripes")
MANIFEST = "dataset.json"


@dataclass
class VideoQAConfig:
    """Settings of :func:`make_video_qa`.

    Attributes:
        out_dir: dataset folder (JSONL files, ``videos/``, ``dataset.json``).
        train, val, test: samples per split.
        num_frames: slots per video = frames a model samples uniformly.
        frames_per_slot: identical frames per slot in the file (video length = product of the two).
        fps: frame rate written in the mp4.
        size: frame height and width in pixels (even).
        task_types: which of :data:`TASK_TYPES` to generate, cycled through the samples (default:
            :data:`DEFAULT_TASK_TYPES`).
        seed: base seed (see the module docstring).
        crf: H.264 constant rate factor (lower = higher quality).
        overwrite: rewrite videos that already exist (else a rerun with the same settings reuses them).
    """

    out_dir: str = "runs/video_qa"
    train: int = 3000
    val: int = 150
    test: int = 300
    num_frames: int = 32
    frames_per_slot: int = 4
    fps: float = 8.0
    size: int = 64
    task_types: list[str] = field(default_factory=lambda: list(DEFAULT_TASK_TYPES))
    seed: int = 0
    crf: int = 18
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in SPLITS:
            n = getattr(self, name)
            if not 0 <= n <= MAX_PER_SPLIT:
                raise ValueError(f"{name} must be in [0, {MAX_PER_SPLIT}], got {n}")
        if self.num_frames < 12:
            raise ValueError(f"num_frames must be >= 12 (room for 4 separate flashes), got {self.num_frames}")
        if self.frames_per_slot < 1:
            raise ValueError(f"frames_per_slot must be >= 1, got {self.frames_per_slot}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be even and >= 32, got {self.size}")
        unknown = [t for t in self.task_types if t not in TASK_TYPES]
        if unknown or not self.task_types:
            raise ValueError(f"task_types must be a non-empty subset of {TASK_TYPES}, got {self.task_types}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def sample_seed(base_seed: int, split: str, index: int) -> int:
    """The seed of sample ``index`` of ``split`` (disjoint across splits for ``index < MAX_PER_SPLIT``)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if not 0 <= index < MAX_PER_SPLIT:
        raise ValueError(f"index must be in [0, {MAX_PER_SPLIT}), got {index}")
    return 1_000_000 * base_seed + SPLIT_OFFSETS[split] + index


# --- rendering ---------------------------------------------------------------------------------------


def _scene(rng: np.random.Generator) -> dict[str, Any]:
    level = int(rng.choice(BACKGROUND_LEVELS))
    decoration = str(rng.choice(DECORATIONS))
    # the decoration contrasts with the background: black, white or a far grey
    shade = int(rng.choice([v for v in (0, 90, 160, 255) if abs(v - level) >= 60]))
    return {"level": level, "decoration": decoration, "shade": shade, "offset": int(rng.integers(0, 1000))}


def _draw_scene(scene: dict[str, Any], size: int) -> np.ndarray:
    frame = np.full((size, size, 3), scene["level"], dtype=np.uint8)
    shade, off, dec = scene["shade"], scene["offset"], scene["decoration"]
    if dec == "bar":
        top = 4 + off % (size - 12)
        frame[top : top + 6] = shade
    elif dec == "border":
        width = 3 + off % 3
        frame[:width], frame[-width:], frame[:, :width], frame[:, -width:] = shade, shade, shade, shade
    elif dec == "quadrant":
        half = size // 2
        rows = slice(0, half) if off % 2 else slice(half, size)
        cols = slice(0, half) if (off // 2) % 2 else slice(half, size)
        frame[rows, cols] = shade
    elif dec == "stripes":
        period = 8 + 4 * (off % 3)
        for x in range(0, size, period):
            frame[:, x : x + period // 2] = shade
    return frame


def _shape_mask(shape: str, size: int, x0: int, y0: int, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy, r = x0 + side / 2 - 0.5, y0 + side / 2 - 0.5, side / 2
    if shape == "square":
        return (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    if shape == "diamond":
        return np.abs(xx - cx) + np.abs(yy - cy) <= r
    if shape == "triangle":  # apex up
        inside_y = (yy >= y0) & (yy < y0 + side)
        return inside_y & (np.abs(xx - cx) <= (yy - y0 + 1) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _flash(rng: np.random.Generator, slot: int, colour: str, shape: str, size: int) -> dict[str, Any]:
    side = int(rng.integers(size * 3 // 8, size // 2 + 1))
    x0, y0 = (int(v) for v in rng.integers(2, size - side - 1, size=2))
    return {"slot": slot, "colour": colour, "shape": shape, "bbox": [x0, y0, x0 + side, y0 + side]}


def _flash_slots(rng: np.random.Generator, n: int, num_slots: int, min_gap: int = 2) -> list[int]:
    """``n`` sorted slots in ``[1, num_slots - 2]`` at least ``min_gap`` apart (rejection sampling)."""
    candidates = np.arange(1, num_slots - 1)
    while True:
        slots = np.sort(rng.choice(candidates, size=n, replace=False))
        if n < 2 or np.diff(slots).min() >= min_gap:
            return [int(s) for s in slots]


def _scenes(rng: np.random.Generator, num_slots: int) -> list[dict[str, Any]]:
    """One scene per slot: scenes held 4-10 slots, a third of them repeating an earlier scene."""
    per_slot: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    while len(per_slot) < num_slots:
        if seen and rng.random() < 1 / 3:
            scene = seen[int(rng.integers(len(seen)))]
        else:
            scene = _scene(rng)
            seen.append(scene)
        per_slot += [scene] * int(rng.integers(4, 11))
    return per_slot[:num_slots]


def render_sample(seed: int, task_type: str, cfg: VideoQAConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one sample from ``seed``: its frames ``uint8 [num_frames * frames_per_slot, size, size, 3]``
    and its record (question, options, answer and metadata; no ``id``/``video``/``split`` yet)."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; known: {TASK_TYPES}")
    rng = np.random.default_rng(seed)
    n_slots, size = cfg.num_frames, cfg.size
    scenes = _scenes(rng, n_slots)
    answer = int(rng.integers(4))
    shape = str(rng.choice(SHAPES))
    if task_type == "colour":
        slots = _flash_slots(rng, 1, n_slots)
        events = [_flash(rng, slots[0], COLOUR_NAMES[answer], shape, size)]
        options = list(COLOUR_NAMES)
    elif task_type == "shape":
        slots = _flash_slots(rng, 1, n_slots)
        events = [_flash(rng, slots[0], COLOUR_NAMES[int(rng.integers(4))], SHAPES[answer], size)]
        options = list(SHAPES)
    elif task_type == "majority":  # the answer's colour 2 or 3 times, 1 or 2 other colours once each
        repeats = int(rng.integers(2, 4))
        others = [int(c) for c in rng.choice([c for c in range(4) if c != answer], size=repeats - 1,
                                             replace=False)]
        colours = [answer] * repeats + others
        rng.shuffle(colours)
        slots = _flash_slots(rng, len(colours), n_slots)
        events = [_flash(rng, slot, COLOUR_NAMES[c], str(rng.choice(SHAPES)), size)
                  for slot, c in zip(slots, colours, strict=True)]
        options = list(COLOUR_NAMES)
    elif task_type == "missing":  # the three other colours once each
        colours = [int(c) for c in rng.permutation([c for c in range(4) if c != answer])]
        slots = _flash_slots(rng, 3, n_slots)
        events = [_flash(rng, slot, COLOUR_NAMES[c], str(rng.choice(SHAPES)), size)
                  for slot, c in zip(slots, colours, strict=True)]
        options = list(COLOUR_NAMES)
    elif task_type == "order":
        other = int(rng.choice([c for c in range(4) if c != answer]))
        slots = _flash_slots(rng, 2, n_slots, min_gap=3)
        second_shape = str(rng.choice(SHAPES))
        events = [
            _flash(rng, slots[0], COLOUR_NAMES[answer], shape, size),
            _flash(rng, slots[1], COLOUR_NAMES[other], second_shape, size),
        ]
        options = list(COLOUR_NAMES)
    else:  # count: the same shape and colour, answer + 1 times
        colour = COLOUR_NAMES[int(rng.integers(4))]
        slots = _flash_slots(rng, answer + 1, n_slots)
        events = [_flash(rng, s, colour, shape, size) for s in slots]
        options = list(COUNT_OPTIONS)
    slot_frames = [_draw_scene(scene, size) for scene in scenes]
    for event in events:
        x0, y0, x1, _ = event["bbox"]
        mask = _shape_mask(event["shape"], size, x0, y0, x1 - x0)
        frame = slot_frames[event["slot"]].copy()
        frame[mask] = COLOURS[event["colour"]]
        slot_frames[event["slot"]] = frame
    frames = np.repeat(np.stack(slot_frames), cfg.frames_per_slot, axis=0)
    r = cfg.frames_per_slot
    record = {
        "question": QUESTIONS[task_type],
        "options": options,
        "answer": LETTERS[answer],
        "task_type": task_type,
        "seed": int(seed),
        "num_frames": n_slots,
        "fps": float(cfg.fps),
        "total_frames": n_slots * r,
        "frames_per_slot": r,
        "key_frames": [e["slot"] for e in events],
        "key_video_frames": [[e["slot"] * r, (e["slot"] + 1) * r] for e in events],
        "events": events,
    }
    return frames, record


def frame_labels(events: Sequence[Mapping[str, Any]], num_frames: int, kind: str = "colour") -> list[int]:
    """Per sampled frame: 0 if no shape, else 1 + the index of the shape's ``kind`` (``"colour"``: in
    :data:`COLOUR_NAMES`, ``"shape"``: in :data:`SHAPES`); ``events`` as a record's ``"events"``."""
    names = {"colour": COLOUR_NAMES, "shape": SHAPES}[kind]
    labels = [0] * int(num_frames)
    for event in events:
        labels[event["slot"]] = 1 + names.index(event[kind])
    return labels


# --- the job -----------------------------------------------------------------------------------------


def _write_video_atomic(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    from namm_transfer.pipelines.video.io import write_video

    tmp = path.with_name(f".{path.stem}.tmp.mp4")
    write_video(tmp, frames, fps=fps, crf=crf)
    os.replace(tmp, path)


def _settings(cfg: VideoQAConfig) -> dict[str, Any]:
    """What determines the videos' content (a rerun with other settings must rewrite them)."""
    keys = ("num_frames", "frames_per_slot", "fps", "size", "task_types", "seed", "crf")
    return {k: getattr(cfg, k) for k in keys}


def make_video_qa(cfg: VideoQAConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Generate the splits into ``cfg.out_dir``; returns the manifest written to ``dataset.json``.

    Videos are written one by one (temporary name, then renamed); each split's JSONL is written at
    the end of the split, atomically. A rerun with the same settings keeps existing videos.
    """
    from tqdm.auto import tqdm

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / MANIFEST
    reuse = not cfg.overwrite
    if reuse and previous.is_file():
        old = json.loads(previous.read_text())
        reuse = old.get("settings") == _settings(cfg)
        if not reuse:
            log(f"{out} holds a dataset made with other settings: rewriting its videos")
    started = time.perf_counter()
    counts: dict[str, Any] = {}
    written = reused = 0
    for split in SPLITS:
        n = getattr(cfg, split)
        records = []
        video_dir = out / "videos" / split
        video_dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(n), desc=f"make-video-qa {split}", unit="video", disable=n == 0):
            task = cfg.task_types[i % len(cfg.task_types)]
            seed = sample_seed(cfg.seed, split, i)
            frames, record = render_sample(seed, task, cfg)
            sample_id = f"{split}-{i:06d}"
            rel = f"videos/{split}/{sample_id}.mp4"
            if reuse and (out / rel).is_file():
                reused += 1
            else:
                _write_video_atomic(out / rel, frames, cfg.fps, cfg.crf)
                written += 1
            records.append({"id": sample_id, "video": rel, **record, "split": split})
        tmp = out / f".{split}.jsonl.tmp"
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, out / f"{split}.jsonl")
        counts[split] = {
            "samples": len(records),
            "task_types": dict(Counter(r["task_type"] for r in records)),
            "answers": dict(sorted(Counter(r["answer"] for r in records).items())),
        }
    manifest = {
        "format": "namm-transfer video-qa jsonl v1",
        "settings": _settings(cfg),
        "config": asdict(cfg),
        "counts": counts,
        "seconds": time.perf_counter() - started,
        "videos_written": written,
        "videos_reused": reused,
        **run_metadata(argv),
    }
    write_json(previous, manifest)
    log(f"wrote {sum(c['samples'] for c in counts.values())} samples to {out} "
        f"({written} videos encoded, {reused} reused) in {manifest['seconds']:.0f} s")
    return manifest
