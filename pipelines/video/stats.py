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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
        keep: also set the NAMM's threshold operating point for this model: its final bias is bisected so
            that, uncapped (its own threshold and floor, evicting every ``update_every`` tokens as
            ``eval-video`` runs it), it keeps at most this share of the video tokens on the same videos.
            Only the kept share is measured, no answer. A NAMM that only ranks (threshold None) is given
            the threshold 0 first. None: the bias stays as evolved.
        bisection_steps: bias bisection steps for ``keep`` (each answers every video once).
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
    keep: float | None = None
    bisection_steps: int = 6
    out_dir: str = "runs/namm_video_stats"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown annotation format {self.format!r}; choose from {FORMATS}")
        if self.update_every < 1 or any(v is not None and v < 1 for v in (self.num_frames, self.limit)):
            raise ValueError("update_every, num_frames and limit must be >= 1")
        if self.keep is not None and not 0 < self.keep < 1:
            raise ValueError(f"keep must be a share of the video tokens in (0, 1), got {self.keep}")
        if self.bisection_steps < 1:
            raise ValueError(f"bisection_steps must be >= 1, got {self.bisection_steps}")


def _prompt_each(namm: NAMM, video_model, samples, num_frames: int, update_every: int,
                 progress: Callable = iter) -> Iterator[tuple[Any, dict | None, str | None]]:
    """``(sample, row, error)`` per sample: ``namm`` (at ``update_every``, also the prefill chunk, as
    ``eval-video`` runs it) over the sample's prompt and one answer token; an unreadable video gives
    ``row`` None and its error."""
    from namm_transfer.pipelines.video.evaluate import evaluate_sample
    from namm_transfer.pipelines.video.io import VideoReadError

    for sample in progress(samples):
        try:
            row, _ = evaluate_sample(video_model, sample, namm, num_frames, update_every, max_new_tokens=1)
        except VideoReadError as error:
            yield sample, None, str(error)
            continue
        yield sample, row, None


def collect_video_statistics(namm: NAMM, video_model, samples, num_frames: int, update_every: int,
                             progress: Callable = iter) -> tuple[NAMM, dict]:
    """``namm`` with per-bin feature statistics collected over ``samples``' prompts (video and question,
    as ``eval-video`` feeds them) and its other settings unchanged, and what was read."""
    probe = namm.replace(update_every=update_every)  # a copy: ``namm`` keeps its statistics
    read, skipped = [], []
    with probe.collecting_statistics():
        runs = _prompt_each(probe, video_model, samples, num_frames, update_every, progress)
        for sample, row, error in runs:
            if row is None:
                skipped.append({"sample_id": sample.sample_id, "error": error})
            else:
                read.append(sample.sample_id)
        count = int(probe._collect[0])
    if not read:
        raise ValueError(f"none of the {len(samples)} videos could be read: {skipped[:3]}")
    adapted = NAMM(namm.config, namm.params, probe.norm_mean, probe.norm_var)
    return adapted, {"videos_read": read, "videos_skipped": skipped, "tokens_counted": count}


def kept_video_share(namm: NAMM, video_model, samples, num_frames: int, update_every: int) -> float:
    """Mean share of the video tokens ``namm`` keeps, uncapped, over ``samples`` (prompts fed in chunks of
    ``update_every``, one answer token; unreadable videos are left out)."""
    namm = namm.replace(update_every=update_every)
    shares = [row["kept_video_fraction"]
              for _, row, _ in _prompt_each(namm, video_model, samples, num_frames, update_every) if row]
    if not shares:
        raise ValueError("none of the videos could be read")
    return sum(shares) / len(shares)


def final_bias(namm: NAMM) -> float:
    """The read-out's bias (the last parameter; that of the first vector when there are several)."""
    return float(namm.params[..., -1].flatten()[0])


def with_bias(namm: NAMM, bias: float) -> NAMM:
    """``namm`` with its final bias (the read-out's, the last parameter) set to ``bias``."""
    params = namm.params.clone()
    params[..., -1] = bias
    return NAMM(namm.config, params, namm.norm_mean, namm.norm_var)


def calibrate_video_keep(namm: NAMM, share: Callable[[NAMM], float], keep: float, steps: int,
                         log_step: Callable[[float, float], None] = lambda bias, kept: None
                         ) -> tuple[NAMM, list[dict[str, float]]]:
    """The largest final bias, to bisection precision, at which ``share(namm)`` (the kept share, which
    grows with the bias) is at most ``keep``; returns that NAMM and every ``{bias, kept}`` tried."""
    tried: list[dict[str, float]] = []

    def measure(bias: float) -> float:
        kept = share(with_bias(namm, bias))
        tried.append({"bias": bias, "kept": kept})
        log_step(bias, kept)
        return kept

    start = final_bias(namm)
    low, high, step = start, start, 1.0
    if measure(start) > keep:  # bracket [low: keeps <= keep, high: keeps more]
        while True:
            low = start - step
            if measure(low) <= keep:
                break
            high, step = low, step * 2
            if step > 64:
                raise ValueError(f"even a bias of {low:.2f} keeps more than {keep:.0%} of the video tokens")
    else:
        while True:
            high = start + step
            if measure(high) > keep:
                break
            low, step = high, step * 2
            if step > 64:
                return with_bias(namm, low), tried  # keeps less than ``keep`` whatever the bias
    for _ in range(steps):
        middle = (low + high) / 2
        if measure(middle) <= keep:
            low = middle
        else:
            high = middle
    return with_bias(namm, low), tried


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
    if cfg.keep is not None and namm.config.threshold is None:
        # a NAMM that only ranks gets a threshold (0, as `calibrate` sets it), the bias its operating point
        log(f"{cfg.namm} ranks only (threshold None): --keep gives it the threshold 0 and bisects its bias")
        namm = namm.replace(threshold=0.0)
    video_model = load_video_model(cfg.model or "", loader if loader is not None else cfg.loader,
                                   cfg.device, parse_dtype(cfg.dtype))
    num_frames = cfg.num_frames or video_model.num_frames or 32
    adapted, record = collect_video_statistics(
        namm, video_model, samples, num_frames, cfg.update_every,
        progress=lambda s: tqdm(s, desc="video-stats", unit="video"),
    )
    calibration = None
    if cfg.keep is not None:
        adapted, tried = calibrate_video_keep(
            adapted, lambda n: kept_video_share(n, video_model, samples, num_frames, cfg.update_every),
            cfg.keep, cfg.bisection_steps,
            lambda b, k: log(f"bias {b:+.4f}: keeps {k:.1%} of the video tokens"),
        )
        final = final_bias(adapted)
        calibration = {"keep": cfg.keep, "bias_before": final_bias(namm),
                       "bias_after": final, "tried": tried,
                       "kept_after": next((t["kept"] for t in tried if t["bias"] == final), None)}
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
        "threshold_calibration": calibration,
    }
    (out / "video_stats.json").write_text(json.dumps(record, indent=2))
    ratio = (namm.norm_var / adapted.norm_var).tolist() if namm.norm_var is not None else None
    log(f"statistics from {len(record['videos_read'])} videos ({record['tokens_counted']} token updates)"
        + (f"; per-bin variance text / video: {', '.join(f'{r:.1f}' for r in ratio)}" if ratio else "")
        + f"; NAMM in {out}")
    return adapted


def _listed(values: torch.Tensor | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]
