"""NAMMs shipped with the package, loaded by short name.

Each lives in ``namm_transfer/pretrained/<name>/`` with its ``config.json`` and ``model.safetensors``
(what :meth:`NAMM.from_pretrained` reads) plus how it was made: ``training.json`` (command, seed,
config, git revision, run time), ``results.jsonl`` (the fitness curve, one line per generation) and a
``README.md`` with the evaluation table.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from namm_transfer.namm import NAMM

PACKAGE_DIR = "pretrained"


def available() -> list[str]:
    """Short names of the shipped NAMMs."""
    root = resources.files("namm_transfer") / PACKAGE_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def pretrained_dir(name: str) -> Path:
    """The directory of the shipped NAMM ``name``.

    Raises:
        KeyError: ``name`` is not shipped (the message lists what is).
    """
    if name not in available():
        raise KeyError(f"no shipped NAMM named {name!r}; available: {available()}")
    return Path(str(resources.files("namm_transfer") / PACKAGE_DIR / name))


def pretrained(name: str = "smollm2-text") -> NAMM:
    """Load a shipped NAMM by short name, e.g. ``pretrained("smollm2-text")``."""
    from namm_transfer.namm import NAMM

    return NAMM.from_pretrained(pretrained_dir(name))


def training_record(name: str) -> dict[str, Any]:
    """How the shipped NAMM ``name`` was produced (``training.json``)."""
    return json.loads((pretrained_dir(name) / "training.json").read_text())
