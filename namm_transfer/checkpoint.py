"""NAMM checkpoints: our ``config.json`` + ``model.safetensors`` format, the Hub, and reference imports."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from namm_transfer.namm import NAMM, NAMMConfig

FORMAT = "namm-transfer/1"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_namm(namm: NAMM, directory: Path) -> Path:
    """Write the NAMM atomically (temporary files, then rename) and return the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"params": namm.params.detach().cpu().contiguous()}
    if namm.norm_mean is not None:
        tensors["norm_mean"] = namm.norm_mean.cpu().contiguous()
        tensors["norm_var"] = namm.norm_var.cpu().contiguous()
    config = {"format": FORMAT, **asdict(namm.config)}
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
        save_file(tensors, tmp.name, metadata={"format": FORMAT})
    os.replace(tmp.name, directory / WEIGHTS_NAME)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as tmp:
        json.dump(config, tmp, indent=2)
    os.replace(tmp.name, directory / CONFIG_NAME)
    return directory


def _resolve(name_or_path: str | Path, **hub_kwargs) -> Path:
    from namm_transfer.shipped import resolve

    return resolve(name_or_path, "namm", allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], **hub_kwargs)


def load_namm(cls: type[NAMM], name_or_path: str | Path, **hub_kwargs) -> NAMM:
    """Load a NAMM saved by :func:`save_namm` from a directory or a Hub repo id."""
    from namm_transfer.namm import NAMMConfig

    directory = _resolve(name_or_path, **hub_kwargs)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not a NAMM checkpoint: missing {', '.join(missing)}")
    config_data = json.loads((directory / CONFIG_NAME).read_text())
    fmt = config_data.pop("format", None)
    if fmt != FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME} has format {fmt!r}, expected {FORMAT!r}")
    config = NAMMConfig.from_dict(config_data)
    tensors = load_file(str(directory / WEIGHTS_NAME))
    if "params" not in tensors:
        raise ValueError(f"{directory / WEIGHTS_NAME} holds no 'params' tensor (found {sorted(tensors)})")
    return cls(config, tensors["params"], tensors.get("norm_mean"), tensors.get("norm_var"))


def _safe_numpy_globals() -> list:
    """numpy's array reconstructors and dtypes: what a reference checkpoint's CMA-ES state may hold
    besides tensors. Nothing here runs code when unpickled."""
    import numpy as np

    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct  # numpy 2 moved it
    dtypes = [type(np.dtype(t)) for t in (np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [reconstruct, np.ndarray, np.dtype, *dtypes]


def import_reference_checkpoint(path: str | Path, config: NAMMConfig | None = None,
                                trust_pickle: bool = False) -> NAMM:
    """Load a checkpoint saved by the reference implementation (evo-memory).

    It is a ``torch.save`` dict with ``evolution_state['mean']`` (the CMA-ES mean, the parameters that
    are evaluated and shipped) and, under ``stored_buffers_to_save``, the spectrogram normalisation
    ``token_embedding_0_output_mean`` / ``token_embedding_0_output_var`` of shape (1, 1, 1, n_bins).

    The file is read with ``torch.load(weights_only=True)`` (tensors, containers, numbers and numpy
    arrays only), so a file from the internet cannot run code. ``trust_pickle=True`` unpickles anything:
    only for a file you made yourself, since unpickling an arbitrary file can execute arbitrary code.
    """
    import pickle

    from namm_transfer.namm import NAMM, NAMMConfig

    config = config or NAMMConfig()
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects outside the safe allow-list (tensors, containers, numbers, numpy "
            f"arrays): {str(error).splitlines()[0]}. If you trust this file, pass trust_pickle=True "
            "(unpickling can run arbitrary code)"
        ) from error
    if not isinstance(state, dict) or "evolution_state" not in state:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a reference NAMM checkpoint: no 'evolution_state' (found {found})")
    mean = torch.as_tensor(state["evolution_state"]["mean"], dtype=torch.float32).reshape(-1)
    if mean.numel() != config.n_params:
        raise ValueError(
            f"{path}: evolution_state['mean'] has {mean.numel()} values but a {config.scorer} NAMM with "
            f"in_dim={config.shapes.in_dim}, hidden={config.hidden} has {config.n_params} parameters"
        )
    buffers = state.get("stored_buffers_to_save", {}) or {}
    stats = {}
    for key in ("output_mean", "output_var"):
        value = buffers.get(f"token_embedding_0_{key}")
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if value.numel() != config.n_bins:
                raise ValueError(
                    f"{path}: token_embedding_0_{key} has {value.numel()} values, expected {config.n_bins}"
                )
        stats[key] = value
    if (stats["output_mean"] is None) != (stats["output_var"] is None):
        raise ValueError(f"{path}: stored_buffers_to_save has only one of output_mean / output_var")
    return NAMM(config, mean, stats["output_mean"], stats["output_var"])
