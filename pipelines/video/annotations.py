"""Video-QA benchmark annotation formats (MLVU, LongVideoBench, the generic JSONL), read into
:class:`~namm_transfer.pipelines.video.qa.VideoQASample` (the formats are described in
:mod:`namm_transfer.pipelines.video.evaluate`)."""

from __future__ import annotations

import re
from pathlib import Path

from namm_transfer.pipelines.video.qa import (
    LETTERS,
    VideoQASample,
    load_video_qa,
    read_json_list,
    resolve_video,
)

FORMATS = ("auto", "mlvu", "longvideobench", "jsonl")


def detect_format(path: str | Path) -> str:
    """``"mlvu"``, ``"longvideobench"`` or ``"jsonl"`` for an annotation file or folder."""
    path = Path(path)
    if path.is_dir():
        return "mlvu"
    if path.suffix == ".jsonl":
        return "jsonl"
    entries = read_json_list(path)
    keys = set(entries[0]) if entries else set()
    if "correct_choice" in keys:
        return "longvideobench"
    if "candidates" in keys:
        return "mlvu"
    if "options" in keys:
        return "jsonl"  # the generic fields, as a JSON list
    raise ValueError(
        f"{path}: cannot tell the annotation format from the keys {sorted(keys)}; pass format= one of "
        f"{FORMATS[1:]}"
    )


def _mlvu_task(stem: str) -> str:
    return re.sub(r"^\d+_", "", stem)


def _load_mlvu(path: Path, videos: str | None) -> list[VideoQASample]:
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no MLVU *.json annotation files")
    json_dir = path if path.is_dir() else path.parent
    root = Path(videos) if videos else json_dir.parent / "video"
    samples = []
    for file in files:
        for i, entry in enumerate(read_json_list(file)):
            if "candidates" not in entry:  # open-ended generation tasks (sub-scene captioning, summary)
                continue
            candidates = [str(c) for c in entry["candidates"]]
            answer = str(entry["answer"])
            if answer not in candidates:
                raise ValueError(f"{file} entry {i}: answer {answer!r} is not one of its candidates")
            task = str(entry.get("question_type") or _mlvu_task(file.stem))
            video = str(entry["video"])
            meta = {k: v for k, v in entry.items()
                    if k not in ("video", "question", "candidates", "answer", "question_type")}
            samples.append(VideoQASample(
                sample_id=f"{file.stem}:{i}",
                video=video,
                video_path=resolve_video(root, [f"{file.stem}/{video}", f"{task}/{video}", video]),
                question=str(entry["question"]),
                options=candidates,
                answer=LETTERS[candidates.index(answer)],
                task_type=task,
                meta=meta,
            ))
    return samples


def _load_longvideobench(path: Path, videos: str | None) -> list[VideoQASample]:
    root = Path(videos) if videos else path.parent / "videos"
    samples = []
    for i, entry in enumerate(read_json_list(path)):
        if "correct_choice" not in entry:
            raise ValueError(f"{path} entry {i}: no correct_choice (the test split has no answers)")
        candidates = [str(c) for c in entry["candidates"]]
        choice = int(entry["correct_choice"])
        if not 0 <= choice < len(candidates):
            raise ValueError(
                f"{path} entry {i}: correct_choice {choice} outside its {len(candidates)} candidates"
            )
        video = str(entry["video_path"])
        meta = {k: v for k, v in entry.items()
                if k not in ("video_path", "question", "candidates", "correct_choice", "question_category")}
        samples.append(VideoQASample(
            sample_id=str(entry.get("id", f"{path.stem}:{i}")),
            video=video,
            video_path=resolve_video(root, [video]),
            question=str(entry["question"]),
            options=candidates,
            answer=LETTERS[choice],
            task_type=str(entry.get("question_category", "all")),
            meta=meta,
        ))
    return samples


def load_annotations(
    path: str | Path, videos: str | None = None, format: str = "auto"
) -> list[VideoQASample]:
    """Read multiple-choice video-QA annotations (MLVU, LongVideoBench or generic JSONL; see the module
    doc) into :class:`VideoQASample` objects, video paths resolved against ``videos``.

    Raises:
        ValueError: unknown format, malformed entries, or two samples with the same id.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no annotation file or folder {path}")
    if format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; choose from {FORMATS}")
    kind = detect_format(path) if format == "auto" else format
    loader = {"mlvu": _load_mlvu, "longvideobench": _load_longvideobench, "jsonl": load_video_qa}[kind]
    samples = loader(path, videos)
    seen: set[str] = set()
    for s in samples:
        if s.sample_id in seen:
            raise ValueError(f"{path}: two samples have the id {s.sample_id!r}; ids must be unique")
        seen.add(s.sample_id)
    return samples
