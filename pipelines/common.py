"""Small helpers shared by the pipelines: progress logging, run metadata, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from namm_transfer import native

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    """A progress message on stderr (stdout is kept for results)."""
    print(f"[namm-transfer] {msg}", file=sys.stderr, flush=True)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when given (one thread is fastest beside another busy process)."""
    if threads is not None:
        torch.set_num_threads(threads)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line that started this run, shell-quoted."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["namm-transfer", *args])


def package_data_dir(subdir: str) -> Path:
    """``namm_transfer/<subdir>`` of this installation (the source tree for an editable install): where
    the export commands write shipped artifacts."""
    import namm_transfer

    return Path(namm_transfer.__file__).resolve().parent / subdir


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    """The git commit of the checkout holding ``path`` (default: this package), with ``-dirty`` when
    tracked files are modified; None outside a git checkout or without git."""
    import subprocess

    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def run_metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command, date, git revision and library versions, to store next to results."""
    import transformers

    return {
        "command": command_line(argv),
        "git_revision": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "native_kernels": native.describe(),
    }


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file, then rename), creating parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table with columns padded for reading in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def open_tensorboard(out_dir: str | Path):
    """A TensorBoard ``SummaryWriter`` logging under ``out_dir/tensorboard``, or None (with a note) when
    the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        log("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    return SummaryWriter(str(Path(out_dir) / "tensorboard"))
