"""Artefacts shipped with the package (NAMMs, Decision Transformers, video models), found by short
name, and the one resolver of "a short name, a local directory or a Hub id" every loader uses.

A NAMM lives in ``namm_transfer/pretrained/<name>/`` with its ``config.json`` and ``model.safetensors``
(what :meth:`NAMM.from_pretrained` reads) plus how it was made: ``training.json`` (command, seed,
config, git revision, run time), ``results.jsonl`` (the fitness curve, one line per generation) and a
``README.md`` with the evaluation table. Decision Transformers live in ``pretrained_dt/``, video models
in ``pretrained_video/``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from namm_transfer.namm import NAMM

PACKAGE_DIR = "pretrained"
# kind -> (package folder, the file that marks an artefact of that kind, its name in messages)
KINDS = {
    "namm": (PACKAGE_DIR, "config.json", "NAMM"),
    "dt": ("pretrained_dt", "config.json", "Decision Transformer"),
    "video": ("pretrained_video", "video_model.json", "video model"),
}


def _kind(kind: str) -> tuple[str, str, str]:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown artefact kind {kind!r}; choose from {', '.join(KINDS)}") from None


def available(kind: str = "namm") -> list[str]:
    """Short names of the shipped artefacts of ``kind`` (``namm``, ``dt`` or ``video``)."""
    folder, marker, _ = _kind(kind)
    root = resources.files("namm_transfer") / folder
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / marker).is_file())


def pretrained_dir(name: str, kind: str = "namm") -> Path:
    """The directory of the shipped artefact ``name`` of ``kind``.

    Raises:
        KeyError: ``name`` is not shipped (the message lists what is).
    """
    folder, _, label = _kind(kind)
    if name not in available(kind):
        raise KeyError(f"no shipped {label} named {name!r}; available: {available(kind)}")
    return Path(str(resources.files("namm_transfer") / folder / name))


def resolve(source: str | Path, kind: str = "namm", hub: bool = True,
            allow_patterns: list[str] | None = None, **hub_kwargs: Any) -> Path:
    """The directory ``source`` names: a local directory, a shipped short name of ``kind``, or (with
    ``hub``) a Hugging Face Hub repo id (``owner/name``) downloaded with ``allow_patterns``.

    Raises:
        ValueError: ``source`` is a file, not a directory.
        FileNotFoundError: none of these; the message says which was tried and why it failed.
    """
    _, marker, label = _kind(kind)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if str(source) in available(kind):
        return pretrained_dir(str(source), kind)
    shipped = ", ".join(available(kind)) or "none installed"
    if path.exists():
        raise ValueError(f"{path} is a file; pass the directory holding {marker}")
    if not hub or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        what = (f"is not a {label} directory, a shipped {label} ({shipped}) nor a Hub id (owner/name)"
                if hub else f"is neither a {label} directory nor a shipped {label} ({shipped})")
        raise FileNotFoundError(f"{str(source)!r} {what}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns, **hub_kwargs))
    except Exception as err:  # offline, unknown repo, no network: say which id failed and why
        raise FileNotFoundError(
            f"could not find the {label} {str(source)!r}: not a local directory or a shipped {label} "
            f"({shipped}), and the Hub lookup failed ({type(err).__name__}: {err}); without network "
            "(HF_HUB_OFFLINE=1) pass a local directory of the same format"
        ) from err


def pretrained(name: str = "smollm2-text") -> NAMM:
    """Load a shipped NAMM by short name, e.g. ``pretrained("smollm2-text")``."""
    from namm_transfer.namm import NAMM

    return NAMM.from_pretrained(pretrained_dir(name))


def training_record(name: str) -> dict[str, Any]:
    """How the shipped NAMM ``name`` was produced (``training.json``)."""
    return json.loads((pretrained_dir(name) / "training.json").read_text())
