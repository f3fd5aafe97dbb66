"""The model ``eval-video`` runs: :class:`VideoModel` (a LLaVA video model, its tokenizer, frame
preprocessing and prompt format) from a loader callable, a ``train-video-model`` output or a
``from_pretrained`` directory (:func:`load_video_model`)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from namm_transfer.pipelines.video.qa import (
    VideoQASample,
)


@dataclass
class VideoModel:
    """A LLaVA video model ready for evaluation.

    Attributes:
        model: the ``...ForConditionalGeneration`` model (eval mode, on its device).
        tokenizer: its tokenizer (``__call__`` and ``decode``).
        preprocessor: frames -> ``pixel_values_videos`` (default: the family's, at the tower's size).
        format_question: sample -> the user question text (default: the question with one option a
            line and ``post_prompt``, :func:`~namm_transfer.pipelines.video.qa.format_question`); a model
            trained with another prompt format brings its own.
        prompt_builder: sample -> the whole prompt with one ``<video>`` placeholder (overrides
            ``format_question``, ``answer_prefix`` and ``system``).
        answer_prefix: appended after the assistant marker (see ``video_io.build_prompt``).
        system: optional system prompt.
        num_frames: frames per video the model was trained with (the default of ``num_frames``).
    """

    model: Any
    tokenizer: Any
    preprocessor: Any = None
    format_question: Callable[[VideoQASample], str] | None = None
    prompt_builder: Callable[[VideoQASample], str] | None = None
    answer_prefix: str | None = None
    system: str | None = None
    num_frames: int | None = None

    def __post_init__(self) -> None:
        from namm_transfer.pipelines.video.io import VideoPreprocessor

        if self.preprocessor is None:
            self.preprocessor = VideoPreprocessor.for_model(self.model)


def as_video_model(loaded: Any) -> VideoModel:
    """A loader's result as a :class:`VideoModel`: a VideoModel, a ``(model, tokenizer[, preprocessor])``
    tuple, a dict with those keys, or an object with ``model`` and ``tokenizer`` attributes."""
    if isinstance(loaded, VideoModel):
        return loaded
    if isinstance(loaded, (tuple, list)):
        return VideoModel(*loaded)
    if isinstance(loaded, dict):
        known = {f.name for f in dataclasses.fields(VideoModel)}
        return VideoModel(**{k: v for k, v in loaded.items() if k in known})
    if hasattr(loaded, "model") and hasattr(loaded, "tokenizer"):
        names = [f.name for f in dataclasses.fields(VideoModel)][2:]
        extra = {k: getattr(loaded, k) for k in names if getattr(loaded, k, None) is not None}
        return VideoModel(loaded.model, loaded.tokenizer, **extra)
    raise TypeError(
        f"a video model loader returned {type(loaded).__name__}; expected a VideoModel, a (model, tokenizer) "
        "tuple, a dict or an object with .model and .tokenizer"
    )


def load_model_dir(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> VideoModel:
    """A LLaVA video model directory (``config.json`` + weights + tokenizer files), offline.

    Frames are prepared as its ``video_preprocessor_config.json`` / ``preprocessor_config.json`` says
    when it has one, else with the family's defaults at the vision tower's size.
    """
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from namm_transfer.pipelines.video.io import VideoPreprocessor

    path = Path(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    preprocessor = None
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            settings = json.loads((path / name).read_text())
            preprocessor = VideoPreprocessor.from_dict(model.config.model_type, settings)
            break
    return VideoModel(model, tokenizer, preprocessor)


def _call_loader(loader: Callable, source: str, device: str, dtype: torch.dtype) -> Any:
    """Call ``loader(source, device=..., dtype=...)``, passing only the keywords it accepts."""
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if accepts_any or k in params}
    return loader(source, **kwargs)


def import_loader(spec: str) -> Callable:
    """``"package.module:function"`` (or ``package.module.function``) -> the function."""
    module, _, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module or not name:
        raise ValueError(f"a loader must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def load_trained_video_model(source: str, device: str = "cpu",
                             dtype: torch.dtype = torch.float32) -> VideoModel | None:
    """A video model written by ``train-video-model`` (a shipped short name or its directory) with the
    frame count, preprocessing and prompt builder of its ``video_model.json``; None if ``source`` is not
    one."""
    from namm_transfer.pipelines.video import models as video_models
    from namm_transfer.pipelines.video.io import VideoPreprocessor

    try:
        directory = video_models.video_model_dir(source)
    except FileNotFoundError:
        return None
    meta = video_models.video_model_meta(directory)
    model, tokenizer = video_models.load_video_model(directory, device=device, dtype=dtype)
    preprocessor = None
    if meta.get("preprocessing"):
        known = {f.name for f in dataclasses.fields(VideoPreprocessor)}
        settings = {k: v for k, v in meta["preprocessing"].items() if k in known}
        for key in ("image_mean", "image_std"):
            if key in settings:
                settings[key] = tuple(settings[key])
        preprocessor = VideoPreprocessor(**settings)
    prompt_builder = None
    builder = (meta.get("prompt") or {}).get("builder")
    if builder:
        build = import_loader(builder)
        family = model.config.model_type

        def prompt_builder(sample: VideoQASample) -> str:
            return build({"question": sample.question, "options": sample.options}, family)

    return VideoModel(model, tokenizer, preprocessor, prompt_builder=prompt_builder,
                      num_frames=meta.get("num_frames"))


def load_video_model(source: str, loader: Callable | str | None = None, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> VideoModel:
    """The model to evaluate, the first of: ``loader(source)`` when a loader is given; a video model
    trained by ``train-video-model`` (:func:`load_trained_video_model`); a ``from_pretrained`` directory
    (:func:`load_model_dir`).

    Raises:
        ValueError: ``source`` is none of these and no loader was given.
    """
    if isinstance(loader, str):
        loader = import_loader(loader)
    if loader is not None:
        video_model = as_video_model(_call_loader(loader, source, device, dtype))
    else:
        video_model = load_trained_video_model(source, device, dtype)
        if video_model is None and Path(source).is_dir():
            video_model = load_model_dir(source, device, dtype)
        if video_model is None:
            raise ValueError(
                f"{source!r} is neither a from_pretrained model directory nor a video model trained by "
                "train-video-model; pass one, or --loader package.module:function"
            )
    video_model.model.to(device=device, dtype=dtype).eval()
    return video_model
