"""Which cached tokens belong to which video frame, and how much of each frame a policy kept.

In transformers 5.23 the three LLaVA video families put all of a video's visual tokens in one run of
``video_token_id`` placeholders, frame-major (read from ``get_video_features`` and the processors):

==================  ===============================================  =========================
family              tokens per frame (P = image_size // patch_size)  after the last frame
==================  ===============================================  =========================
llava_next_video    ``(P // s)**2`` (``s = spatial_pool_stride``,    nothing
                    average/max/conv pooling, CLS dropped)
llava_onevision     ``ceil(P / 2)**2`` (bilinear 2x downscaling)     one ``image_newline`` token
video_llava         ``P**2 + 1`` (CLS kept, no pooling)               nothing
==================  ===============================================  =========================

So position ``k`` of a video's run belongs to frame ``k // tokens_per_frame``, except OneVision's
final newline token, which belongs to no frame. A frame map gives, for every position of the input
(padding included: arrival indices count padding), its frame index or -1 (text, padding, separators);
frames are numbered per sample across all the videos of a prompt. Cache slots keep their absolute
arrival index (:attr:`~namm_transfer.memory.LayerMemory.positions`), so the retention of a frame
after any number of evictions is the share of its positions still held by valid slots.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

VIDEO_FAMILIES = ("llava_next_video", "llava_onevision", "video_llava")


@dataclass(frozen=True)
class VideoTokenLayout:
    """How one family lays out a video's tokens in the language model's input.

    Attributes:
        family: ``model_type`` of the LLaVA model.
        video_token_id: the placeholder id repeated once per visual token.
        tokens_per_frame: visual tokens of one frame.
        tokens_after_video: tokens after the last frame inside the placeholder run (OneVision's
            newline: 1; otherwise 0). They belong to no frame.
    """

    family: str
    video_token_id: int
    tokens_per_frame: int
    tokens_after_video: int = 0

    def video_tokens(self, num_frames: int) -> int:
        """Placeholders one video of ``num_frames`` frames needs."""
        return num_frames * self.tokens_per_frame + self.tokens_after_video

    def frames_in_run(self, run_length: int) -> int:
        """Frames of a video whose placeholder run has ``run_length`` tokens (ValueError if none fits)."""
        frames, rest = divmod(run_length - self.tokens_after_video, self.tokens_per_frame)
        if rest or frames < 1:
            raise ValueError(
                f"a run of {run_length} video tokens is not a whole {self.family} video "
                f"({self.tokens_per_frame} tokens per frame + {self.tokens_after_video})"
            )
        return frames


def video_layout(model_or_config: Any) -> VideoTokenLayout:
    """The :class:`VideoTokenLayout` of a LLaVA video model (or its config), from its config alone."""
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", None)
    if family not in VIDEO_FAMILIES:
        raise NotImplementedError(f"no video token layout for model_type={family!r}; known: {VIDEO_FAMILIES}")
    vision = config.vision_config
    patches = vision.image_size // vision.patch_size
    if family == "llava_next_video":
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise NotImplementedError(
                "LLaVA-NeXT-Video pools video features only with the 'default' strategy"
            )
        side = patches // config.spatial_pool_stride
        per_frame, after = side * side, 0
    elif family == "llava_onevision":
        side = math.ceil(patches / 2)
        per_frame, after = side * side, 1
    else:  # video_llava: CLS token kept for videos whatever the select strategy
        per_frame, after = patches * patches + 1, 0
    return VideoTokenLayout(family, int(config.video_token_id), per_frame, after)


def frame_map(input_ids: torch.Tensor, layout: VideoTokenLayout) -> torch.Tensor:
    """``[B, L]`` long: frame index of every input position, -1 where it belongs to no frame.

    Each contiguous run of ``layout.video_token_id`` is one video; frame numbers continue across the
    videos of a sample. ``input_ids`` may be ``[L]`` (one sample) and left-padded.
    """
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    out = torch.full(ids.shape, -1, dtype=torch.long)
    is_video = (ids == layout.video_token_id).cpu()
    for b in range(ids.shape[0]):
        where = torch.nonzero(is_video[b]).flatten().tolist()
        frame0, start = 0, 0
        while start < len(where):
            end = start
            while end + 1 < len(where) and where[end + 1] == where[end] + 1:
                end += 1
            first, length = where[start], end - start + 1
            frames = layout.frames_in_run(length)
            k = torch.arange(frames * layout.tokens_per_frame)
            out[b, first : first + len(k)] = frame0 + k // layout.tokens_per_frame
            frame0, start = frame0 + frames, end + 1
    return out


def _memories(source: Any) -> list:
    """The LayerMemory of every layer of a handle (its latest cache), a cache, or a list of memories."""
    cache = getattr(source, "cache", source) if not isinstance(source, (list, tuple)) else source
    if cache is None:
        raise RuntimeError("no cache yet: run a forward or generate() with the policy attached first")
    layers = getattr(cache, "layers", cache)
    return [getattr(layer, "memory", layer) for layer in layers]


def frame_retention(source: Any, frames: torch.Tensor, num_frames: int | None = None) -> np.ndarray:
    """``[layers, frames]`` float: per layer, the share of each frame's tokens still cached.

    Args:
        source: an :class:`~namm_transfer.adapters.AttachedPolicy` (its latest cache), an
            :class:`~namm_transfer.adapters.EvictingCache`, or a list of ``LayerMemory``.
        frames: the frame map ``[B, L]`` (or ``[L]``) from :func:`frame_map` for the fed input;
            cache positions beyond ``L`` (generated tokens) belong to no frame.
        num_frames: columns of the result (default: the largest frame index + 1).

    Each entry is the fraction of (frame token, KV head) pairs whose slot is still valid, averaged
    over KV heads and then over the samples that have that frame; NaN where no sample has it or the
    layer has no cache yet.
    """
    frames = torch.as_tensor(frames).long()
    if frames.ndim == 1:
        frames = frames[None]
    n_frames = int(frames.max()) + 1 if num_frames is None else num_frames
    n_frames = max(n_frames, 0)
    memories = _memories(source)
    result = np.full((len(memories), n_frames), np.nan)
    if n_frames == 0:
        return result
    frames = frames.cpu()
    counts = torch.stack([torch.bincount(f[f >= 0], minlength=n_frames)[:n_frames] for f in frames])  # [B, F]
    for i, memory in enumerate(memories):
        if memory.positions is None:
            continue
        positions, valid = memory.positions.cpu(), memory.valid.cpu()  # [B, H, S]
        if positions.shape[0] != frames.shape[0]:
            raise ValueError(f"frame map has {frames.shape[0]} samples, the cache {positions.shape[0]}")
        inside = positions < frames.shape[1]
        slot_frame = torch.where(
            inside,
            frames.gather(1, positions.clamp(max=frames.shape[1] - 1).flatten(1)).view_as(positions),
            -1,
        )
        kept = valid & (slot_frame >= 0)
        onehot = torch.zeros(*positions.shape[:2], n_frames + 1, dtype=torch.long)
        onehot.scatter_add_(2, torch.where(kept, slot_frame, n_frames), kept.long())
        per_head = onehot[..., :n_frames].float() / counts[:, None, :].clamp(min=1).float()  # [B, H, F]
        per_sample = per_head.mean(1)
        has = counts > 0
        total = (per_sample * has).sum(0)
        n = has.sum(0)
        row = torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))
        result[i] = row.numpy()
    return result


def _figure(retention: np.ndarray, title: str | None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    retention = np.asarray(retention, dtype=float)
    layers, frames = retention.shape
    fig = Figure(figsize=(max(3.0, 0.35 * frames + 1.8), max(2.2, 0.25 * layers + 1.2)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(retention, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel("frame")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the frame's tokens kept")
    fig.tight_layout()
    return fig


def save_retention_heatmap(retention: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Draw a ``[layers, frames]`` retention array as a heatmap PNG (colour scale fixed to 0..1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _figure(retention, title).savefig(path, format="png")
    return path


def retention_image(retention: np.ndarray, title: str | None = None) -> np.ndarray:
    """The heatmap as an ``[H, W, 3]`` uint8 RGB array (for TensorBoard or any image sink)."""
    from PIL import Image

    buffer = io.BytesIO()
    _figure(retention, title).savefig(buffer, format="png")
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))

