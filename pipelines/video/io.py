"""Video input for the LLaVA video families without torchvision.

transformers' video processors need torchvision, which must not be installed beside the CPU torch here
(it breaks transformers imports). This module does their job with decord (or PyAV), PIL and numpy:

- :func:`read_frames`: decode a file and sample frames (``num_frames`` uniformly, or at ``fps``);
  any failure (missing, unreadable, truncated) raises :class:`VideoReadError` naming the path and
  the cause, so a caller can record the sample as failed and go on;
- :class:`VideoPreprocessor`: resize / centre-crop / rescale / normalise exactly as each family's
  video processor is configured by default (overridable, e.g. from a checkpoint's
  ``preprocessor_config.json``), producing ``pixel_values_videos`` frames;
- :func:`build_prompt` and :func:`encode_video_prompt`: the family's chat format with one ``<video>``
  placeholder, expanded to the number of video tokens the model expects (see
  :mod:`namm_transfer.adapters.frame_map`), working with any tokenizer (the placeholder id is
  inserted directly, not tokenised).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from namm_transfer.adapters.frame_map import VIDEO_FAMILIES, VideoTokenLayout

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIDEO_PLACEHOLDER = "<video>"


class VideoReadError(RuntimeError):
    """A video could not be read: missing, not a video, truncated or otherwise undecodable.

    Attributes:
        path: the file.
        cause: a short human-readable reason.
    """

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"cannot read video {self.path}: {cause}")


# --- frame sampling ----------------------------------------------------------------------------------


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over ``[0, total - 1]``, first and last included.

    The lmms-eval / LLaVA-NeXT convention ``np.linspace(0, total - 1, n, dtype=int)``; with more frames
    asked than the video has, indices repeat (models with a fixed frame count still get it).
    """
    if total < 1 or num_frames < 1:
        raise ValueError(
            f"need a video with frames and num_frames >= 1 (total={total}, num_frames={num_frames})"
        )
    return np.linspace(0, total - 1, num_frames, dtype=int)


def fps_indices(total: int, native_fps: float, fps: float, num_frames: int | None = None) -> np.ndarray:
    """Indices of the frames shown at times ``0, 1/fps, 2/fps, ...`` (frame ``floor(t * native_fps)``);
    an ``fps`` at or above the video's own rate takes every frame once.

    With ``num_frames`` as well, at most that many of those are kept, spread uniformly over them.
    """
    if fps <= 0 or native_fps <= 0:
        raise ValueError(f"fps must be positive (fps={fps}, native fps={native_fps})")
    count = max(1, math.ceil(total * fps / native_fps - 1e-9))
    indices = np.floor(np.arange(count) * native_fps / fps + 1e-9).astype(int)
    indices = np.unique(indices[indices < total])  # above the native rate, each frame once
    if num_frames is not None and len(indices) > num_frames:
        indices = indices[uniform_indices(len(indices), num_frames)]
    return indices


def sample_indices(
    total: int, native_fps: float, num_frames: int | None = None, fps: float | None = None
) -> np.ndarray:
    """Which frames :func:`read_frames` takes: at ``fps`` (capped at ``num_frames``), else ``num_frames``
    uniformly, else all."""
    if fps is not None:
        return fps_indices(total, native_fps, fps, num_frames)
    if num_frames is not None:
        return uniform_indices(total, num_frames)
    return np.arange(total)


# --- decoding ----------------------------------------------------------------------------------------


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def default_backend() -> str:
    """``"decord"`` if installed, else ``"av"`` (PyAV, e.g. where decord has no wheel)."""
    if _have("decord"):
        return "decord"
    if _have("av"):
        return "av"
    raise ImportError("reading videos needs decord or PyAV: pip install 'namm-transfer[video]'")


def _read_decord(path: str, num_frames, fps) -> tuple[np.ndarray, np.ndarray]:
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    total, native = len(reader), float(reader.get_avg_fps())
    if total < 1:
        raise VideoReadError(path, "the video has no frames")
    indices = sample_indices(total, native, num_frames, fps)
    return reader.get_batch(indices.tolist()).asnumpy(), indices


def _read_av(path: str, num_frames, fps) -> tuple[np.ndarray, np.ndarray]:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        native = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
        declared = int(stream.frames or 0)
    if not frames:
        raise VideoReadError(path, "the video has no frames")
    if declared and len(frames) < declared:
        raise VideoReadError(path, f"truncated: decoded {len(frames)} of {declared} frames")
    indices = sample_indices(len(frames), native, num_frames, fps)
    return np.stack([frames[i] for i in indices]), indices


def read_frames(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    backend: str | None = None,
) -> np.ndarray:
    """Decode ``path`` and return the sampled frames, ``uint8 [T, H, W, 3]`` RGB.

    Args:
        num_frames: take this many frames uniformly (:func:`uniform_indices`); with ``fps``, the cap.
        fps: take one frame every ``1 / fps`` seconds of the video (:func:`fps_indices`).
        backend: ``"decord"`` or ``"av"`` (default: :func:`default_backend`).

    Raises:
        VideoReadError: missing file, not a video, truncated or undecodable data (any decoder error).
    """
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    backend = backend or default_backend()
    if backend not in ("decord", "av"):
        raise ValueError(f"unknown video backend {backend!r}: use 'decord' or 'av'")
    path = str(path)
    if not os.path.isfile(path):
        raise VideoReadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file")
    read = _read_decord if backend == "decord" else _read_av
    try:
        frames, indices = read(path, num_frames, fps)
    except VideoReadError:
        raise
    except Exception as error:  # decoders raise their own types (DECORDError, av.InvalidDataError, ...)
        raise VideoReadError(path, f"{type(error).__name__}: {_first_line(error)}") from error
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise VideoReadError(path, f"decoder returned {frames.shape} for {len(indices)} frames")
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else "decoder error"


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> Path:
    """Encode ``uint8 [T, H, W, 3]`` frames as H.264 mp4 with PyAV (even H and W; index at the front)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] with even H and W, got {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from fractions import Fraction

    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


# --- preprocessing -----------------------------------------------------------------------------------


@dataclass
class VideoPreprocessor:
    """Frames ``uint8 [T, H, W, 3]`` -> ``float32 [T, 3, h, w]`` as the family's video processor does.

    Defaults (transformers 5.23 ``video_processing_*.py``): all three use bicubic resampling, rescale
    by 1/255 and OpenAI-CLIP mean/std. LLaVA-NeXT-Video and Video-LLaVA resize the shortest edge to
    224 (long edge ``int(224 * long / short)``) and centre-crop 224x224; LLaVA-OneVision resizes to
    384x384 without cropping. Real checkpoints override some of these in their
    ``preprocessor_config.json`` (e.g. 336 px for LLaVA-NeXT-Video-7B, mean/std 0.5 for OneVision):
    use :meth:`from_dict` with that file's contents, or :meth:`for_model` to follow the vision
    tower's ``image_size``. Resizing uses PIL (bicubic, on uint8) instead of torchvision, so resized
    pixels may differ from the transformers processor by a grey level or so; crop offsets follow
    torchvision (``round((H - h) / 2)``).
    """

    family: str = "llava_next_video"
    size: dict = field(default_factory=lambda: {"shortest_edge": 224})
    crop_size: dict | None = field(default_factory=lambda: {"height": 224, "width": 224})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    resample: int = 3  # PIL.Image.BICUBIC

    @classmethod
    def for_family(cls, family: str) -> VideoPreprocessor:
        """The defaults of ``family``'s video processor."""
        if family not in VIDEO_FAMILIES:
            raise ValueError(f"unknown video family {family!r}; known: {VIDEO_FAMILIES}")
        if family == "llava_onevision":
            return cls(family, size={"height": 384, "width": 384}, crop_size=None, do_center_crop=False)
        return cls(family)

    @classmethod
    def for_model(cls, model_or_config: Any) -> VideoPreprocessor:
        """Family defaults with the output side set to the vision tower's ``image_size``."""
        config = getattr(model_or_config, "config", model_or_config)
        side = int(config.vision_config.image_size)
        base = cls.for_family(config.model_type)
        if base.do_center_crop:
            return replace(base, size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return replace(base, size={"height": side, "width": side})

    @classmethod
    def from_dict(cls, family: str, settings: dict) -> VideoPreprocessor:
        """Family defaults overridden by a ``preprocessor_config.json``-style dict (unknown keys ignored)."""
        base = cls.for_family(family)
        known = {f for f in cls.__dataclass_fields__ if f != "family"}
        updates = {k: v for k, v in settings.items() if k in known and v is not None}
        for key in ("image_mean", "image_std"):
            if key in updates:
                updates[key] = tuple(updates[key])
        if isinstance(updates.get("crop_size"), int):
            updates["crop_size"] = {"height": updates["crop_size"], "width": updates["crop_size"]}
        return replace(base, **updates)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of a processed ``height x width`` frame."""
        if self.do_resize:
            height, width = self._resize_size(height, width)
        if self.do_center_crop and self.crop_size:
            height, width = self.crop_size["height"], self.crop_size["width"]
        return height, width

    def _resize_size(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            short_target = int(self.size["shortest_edge"])
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = short_target, int(short_target * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        return int(self.size["height"]), int(self.size["width"])

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """``uint8 [T, H, W, 3]`` (or one ``[H, W, 3]`` frame) -> ``float32 [T, 3, h, w]``."""
        from PIL import Image

        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3] RGB, got {frames.shape}")
        frames = frames.astype(np.uint8, copy=False)
        height, width = frames.shape[1:3]
        if self.do_resize:
            new_h, new_w = self._resize_size(height, width)
            if (new_h, new_w) != (height, width):
                frames = np.stack(
                    [
                        np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=self.resample))
                        for f in frames
                    ]
                )
                height, width = new_h, new_w
        if self.do_center_crop and self.crop_size:
            crop_h, crop_w = self.crop_size["height"], self.crop_size["width"]
            if crop_h > height or crop_w > width:  # torchvision pads with zeros first
                pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
                frames = np.pad(
                    frames, ((0, 0), (pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
                )
                height, width = frames.shape[1:3]
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
            frames = frames[:, top : top + crop_h, left : left + crop_w]
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
        if self.do_rescale:
            pixels = pixels * self.rescale_factor
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
            std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels.contiguous()


# --- prompts -----------------------------------------------------------------------------------------

# One user turn with the video first, then the question, then the assistant prefix. LLaVA-NeXT-Video
# and Video-LLaVA: the llava-hf chat format ("USER: <video>\n... ASSISTANT:"); LLaVA-OneVision: the
# Qwen2 ChatML turns it was trained with. ``{system}`` is the family's system block (or empty).
PROMPT_TEMPLATES = {
    "llava_next_video": "{system}USER: <video>\n{question} ASSISTANT:",
    "video_llava": "{system}USER: <video>\n{question} ASSISTANT:",
    "llava_onevision": "{system}<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n",
}
SYSTEM_TEMPLATES = {
    "llava_next_video": "{system} ",
    "video_llava": "{system} ",
    "llava_onevision": "<|im_start|>system\n{system}<|im_end|>\n",
}


def build_prompt(family: str, question: str, system: str | None = None, answer_prefix: str = "") -> str:
    """The family's single-turn prompt with one ``<video>`` placeholder, ending where the answer starts.

    ``answer_prefix`` (e.g. ``"Answer:"`` or ``"The answer is"``) is appended after the assistant
    marker, separated by a space for the ``ASSISTANT:`` formats.
    """
    if family not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown video family {family!r}; known: {tuple(PROMPT_TEMPLATES)}")
    system_block = SYSTEM_TEMPLATES[family].format(system=system) if system else ""
    text = PROMPT_TEMPLATES[family].format(system=system_block, question=question.strip())
    if answer_prefix:
        text += (" " if text.endswith(":") else "") + answer_prefix
    return text


def encode_video_prompt(
    tokenizer: Any,
    prompt: str,
    layout: VideoTokenLayout,
    num_frames: int | list[int],
    placeholder: str = VIDEO_PLACEHOLDER,
    add_special_tokens: bool = True,
) -> list[int]:
    """Token ids of ``prompt`` with each ``placeholder`` replaced by the video's run of video-token ids.

    The text around the placeholders is tokenised piece by piece (special tokens only before the
    first piece), so the tokenizer needs no ``<video>`` token; ``num_frames`` is one count per
    placeholder (or one for all). The run has ``layout.video_tokens(num_frames)`` ids.
    """
    pieces = prompt.split(placeholder)
    n_videos = len(pieces) - 1
    counts = [num_frames] * n_videos if isinstance(num_frames, int) else list(num_frames)
    if len(counts) != n_videos:
        raise ValueError(f"prompt has {n_videos} {placeholder!r} placeholders but {len(counts)} frame counts")
    runs = [[layout.video_token_id] * layout.video_tokens(n) for n in counts]
    known = _token_id(tokenizer, placeholder)
    if known is not None and known == layout.video_token_id:
        # the tokenizer has the placeholder as one token: tokenise the whole text (as the processors
        # do after repeating the placeholder) and expand each occurrence
        ids, videos = [], iter(runs)
        for token in tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]:
            ids += next(videos) if token == known else [token]
        return ids
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece or (i == 0 and add_special_tokens):
            ids += tokenizer(piece, add_special_tokens=add_special_tokens and i == 0)["input_ids"]
        if i < n_videos:
            ids += runs[i]
    return ids


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if the tokenizer has it as a single (added) token, else None."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return None
    found = convert(token)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if found is None or found == unknown:
        return None
    return int(found) if tokenizer(token, add_special_tokens=False)["input_ids"] == [found] else None
