"""``namm-transfer video-stats``: a NAMM's feature statistics re-collected on a video model's own attention.

A NAMM z-scores its spectrogram features with per-bin statistics frozen after its first keep-everything
evaluation (docs/design.md, "The NAMM"). A NAMM evolved on text froze them on text; a video model's
attention has other statistics (on ``smollm2-shapes-128`` the upper bins vary 5-40x less than on
SmolLM2's text prompts), so on video every token's upper-bin features sit near the text mean and the
scorer reads them as alike. This job runs the video model over unlabelled videos with the NAMM keeping
everything and collecting statistics, as its first evaluation on text did, and saves the NAMM with those
statistics. Weights, threshold, floor and cadence stay as they were: no answer is read and nothing is
trained, so the NAMM stays zero-shot on the task. Use videos of a split that is not evaluated.

    namm-transfer video-stats --namm smollm2-text-joint --model smollm2-shapes-128 \
        --annotations runs/video_qa_128/val.jsonl --num-frames 128 --out-dir runs/namm_joint_videostats
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from namm_transfer import NAMM
from namm_transfer.pipelines.common import log, parse_dtype, run_metadata, set_threads
from namm_transfer.pipelines.video.annotations import FORMATS, load_annotations
from namm_transfer.pipelines.video.loading import load_video_model


@dataclass
class VideoStatsConfig:
    """Settings of :func:`run_video_stats`.

    Attributes:
        namm: the NAMM (shipped name, directory or Hub id) whose statistics are re-collected.
        model: the video model (a shipped name, a ``train-video-model`` output or a LLaVA directory).
        loader: ``package.module:function`` returning ``(model, tokenizer)`` or a ``VideoModel``.
        annotations: the videos to read, in any ``eval-video`` format (their answers are not read); take
            them from a split that is not evaluated.
        videos: the videos folder (default: per format).
        format: ``auto``, ``mlvu``, ``longvideobench`` or ``jsonl``.
        num_frames: frames sampled uniformly from each video (None: the model's own count, else 32).
        update_every: the NAMM's cadence and the prefill chunk while collecting (``eval-video``'s).
        limit: read at most this many videos (None: all).
        out_dir: where the NAMM is written (``config.json``, ``model.safetensors``, ``video_stats.json``).
        device: torch device.
        dtype: model dtype (the features stay float32).
        threads: torch intra-op threads.
    """

    namm: str = "smollm2-text-joint"
    model: str | None = None
    loader: str | None = None
    annotations: str = ""
    videos: str | None = None
    format: str = "auto"
    num_frames: int | None = None
    update_every: int = 256
    limit: int | None = 24
    out_dir: str = "runs/namm_video_stats"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown annotation format {self.format!r}; choose from {FORMATS}")
        if self.update_every < 1 or (self.num_frames or 1) < 1 or (self.limit or 1) < 1:
            raise ValueError("update_every, num_frames and limit must be >= 1")


def collect_video_statistics(namm: NAMM, video_model, samples, num_frames: int, update_every: int,
                             progress: Callable = iter) -> tuple[NAMM, dict]:
    """``namm`` with per-bin feature statistics collected over ``samples``' prompts (video and question,
    as ``eval-video`` feeds them) and its other settings unchanged, and what was read."""
    from namm_transfer.pipelines.video.evaluate import evaluate_sample
    from namm_transfer.pipelines.video.io import VideoReadError

    probe = namm.replace(update_every=update_every)  # a copy: ``namm`` keeps its statistics
    read, skipped = [], []
    with probe.collecting_statistics():
        for sample in progress(samples):
            try:  # one answer token: the statistics come from the prompt's updates
                evaluate_sample(video_model, sample, probe, num_frames, update_every, max_new_tokens=1)
            except VideoReadError as error:
                skipped.append({"sample_id": sample.sample_id, "error": str(error)})
                continue
            read.append(sample.sample_id)
        count = int(probe._collect[0])
    if not read:
        raise ValueError(f"none of the {len(samples)} videos could be read: {skipped[:3]}")
    adapted = NAMM(namm.config, namm.params, probe.norm_mean, probe.norm_var)
    return adapted, {"videos_read": read, "videos_skipped": skipped, "tokens_counted": count}


def run_video_stats(cfg: VideoStatsConfig, argv: list[str] | None = None,
                    loader: Callable | None = None) -> NAMM:
    from tqdm.auto import tqdm

    if not cfg.annotations:
        raise ValueError("pass the videos (--annotations): an MLVU JSON / folder, lvb_val.json or JSONL")
    if cfg.model is None and loader is None and cfg.loader is None:
        raise ValueError("pass the model (--model): a shipped video model, a directory or a loader's name")
    set_threads(cfg.threads)
    samples = load_annotations(cfg.annotations, cfg.videos, cfg.format)[: cfg.limit]
    if not samples:
        raise ValueError(f"{cfg.annotations}: no samples")
    namm = NAMM.from_pretrained(cfg.namm)
    video_model = load_video_model(cfg.model or "", loader if loader is not None else cfg.loader,
                                   cfg.device, parse_dtype(cfg.dtype))
    num_frames = cfg.num_frames or video_model.num_frames or 32
    adapted, record = collect_video_statistics(
        namm, video_model, samples, num_frames, cfg.update_every,
        progress=lambda s: tqdm(s, desc="video-stats", unit="video"),
    )
    out = Path(cfg.out_dir)
    adapted.save_pretrained(out)
    record = {
        **run_metadata(argv),
        "config": asdict(cfg),
        "num_frames": num_frames,
        **record,
        "norm_mean_before": _listed(namm.norm_mean),
        "norm_var_before": _listed(namm.norm_var),
        "norm_mean_after": _listed(adapted.norm_mean),
        "norm_var_after": _listed(adapted.norm_var),
    }
    (out / "video_stats.json").write_text(json.dumps(record, indent=2))
    ratio = (namm.norm_var / adapted.norm_var).tolist() if namm.norm_var is not None else None
    log(f"statistics from {len(record['videos_read'])} videos ({record['tokens_counted']} token updates)"
        + (f"; per-bin variance text / video: {', '.join(f'{r:.1f}' for r in ratio)}" if ratio else "")
        + f"; NAMM in {out}")
    return adapted


def _listed(values: torch.Tensor | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]
