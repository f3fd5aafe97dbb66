"""Optional compiled CPU kernels for the NAMM's own arithmetic (``spectrogram.c``, ``bam.c``).

On an x86-64 CPU with AVX2 and FMA:

- the streaming STFT-magnitude EMA of :class:`~namm_transfer.features.StreamingSpectrogram` runs as one
  fused loop: each block of 16 keys goes through every frame's windowed DFT (even/odd split: about half
  the multiply-adds of the basis product), magnitude and weighted sum in registers and L1, so no frame
  is written to memory;
- the BAM scorer's counter-causal attention runs on the token features themselves (keys and values are
  the 25 features; the key and value projections are folded into the query and into the product after
  it, see :func:`namm_transfer.scorers.score_tokens`), three queries at a time against blocks of 128
  keys with an online base-2 softmax.

Both are single loops over memory that stays in cache; per call they take 0.28-0.45 (features) and
0.60-0.70 (BAM) of the PyTorch path's time at 512-4,096 slots (``benchmarks/results/native_kernels.md``).

The C sources are compiled on first use with the machine's C compiler (``$CC``, else ``cc`` or ``gcc``)
into a cache directory (``$NAMM_TRANSFER_CACHE``, else ``$XDG_CACHE_HOME/namm-transfer``, else
``~/.cache/namm-transfer``), once per source version, and loaded with :mod:`ctypes`: no build step at
install time, no Python headers. Without a compiler, on another CPU, on a GPU, with gradients, or with
``NAMM_TRANSFER_NATIVE=0``, the PyTorch path runs; both give the same values up to float rounding
(tests compare them).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("spectrogram.c", "bam.c")]
ENV_SWITCH = "NAMM_TRANSFER_NATIVE"  # "0" keeps the PyTorch path
MAX_N_FFT = 64  # the spectrogram kernel's register blocking holds windows of up to 64 rows
MAX_BAM_DIM = 32  # the BAM kernel's widest feature vector
BASE_FLAGS = ["-O3", "-std=c11", "-mavx2", "-mfma", "-shared", "-fPIC"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None  # why the kernel is unavailable (None: not tried yet, or loaded)
_tried = False
_override: bool | None = None  # set by :func:`use`
_I, _P, _F = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("NAMM_TRANSFER_CACHE"):
        return Path(os.environ["NAMM_TRANSFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "namm-transfer"


def _cpu_supported() -> str | None:
    """None if this CPU runs the AVX2 + FMA kernel, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX2", "AVX512")):
        return f"the CPU lacks AVX2 (PyTorch reports {capability})"
    return None


def _compile(compiler: str, target: Path) -> None:
    """Build the shared library into ``target`` (atomically: concurrent processes may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (["-fopenmp"], []):  # OpenMP only spreads a call over torch's threads; optional
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [compiler, *BASE_FLAGS, *extra, "-o", tmp, *map(str, SOURCES)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        message = done.stderr.strip().splitlines()
        errors.append(message[-1] if message else f"{compiler} exited with {done.returncode}")
    raise RuntimeError("; ".join(errors))


def _load() -> ctypes.CDLL:
    reason = _cpu_supported()
    if reason:
        raise RuntimeError(reason)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    digest = hashlib.sha256(" ".join([compiler, *BASE_FLAGS]).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    target = cache_dir() / f"kernels-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        _compile(compiler, target)
    lib = ctypes.CDLL(str(target))
    fn = lib.namm_spectrogram_ema
    fn.argtypes = [_P, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _I, _P, _I, _P, _P, _F, _F,
                   _P, _I, _I, _I, _I]
    fn.restype = ctypes.c_int
    bam = lib.namm_bam_attention
    bam.argtypes = [_P, _P, _P, _I, _I, _I, _I]
    bam.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first call; None (and one warning) if it cannot be built."""
    global _library, _failure, _tried
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _load()
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _failure = str(exc)
                warnings.warn(
                    f"namm-transfer: the native kernels are unavailable ({_failure}); the features and "
                    "the BAM run on the PyTorch path (same values up to float rounding, 1.4-3.6x slower "
                    "on CPU)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _library


def failure() -> str | None:
    """Why the kernel could not be loaded (None if it loaded or was not tried)."""
    return _failure


def describe() -> str:
    """One line for results' metadata: whether the kernels run, and if not, why."""
    if not enabled():
        return f"off ({ENV_SWITCH}=0 or native.use(False)): PyTorch path"
    if library() is None:
        return f"unavailable ({failure()}): PyTorch path"
    return "on (AVX2 + FMA, on CPU float32 without gradient)"


def enabled() -> bool:
    """True when the kernel is switched on (:func:`use`, else ``NAMM_TRANSFER_NATIVE`` != "0")."""
    if _override is not None:
        return _override
    return os.environ.get(ENV_SWITCH, "1") != "0"


@contextlib.contextmanager
def use(on: bool) -> Iterator[None]:
    """Switch the kernel on or off within a block (tests compare the two paths)."""
    global _override
    before, _override = _override, on
    try:
        yield
    finally:
        _override = before


def applicable(rows: torch.Tensor, n_fft: int) -> bool:
    """Whether the spectrogram kernel may compute features from ``rows``: on, loadable, a CPU float32
    tensor with a contiguous key axis and no gradient, and a window of at most :data:`MAX_N_FFT` rows."""
    if not enabled() or n_fft > MAX_N_FFT or n_fft % 2 or n_fft < 4:
        return False
    return _cpu_float32(rows) and library() is not None


def _cpu_float32(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 and not t.requires_grad


def bam_applicable(features: torch.Tensor) -> bool:
    """Whether the BAM kernel may score ``features`` ``[..., S, d]``: on, loadable, a CPU float32 tensor
    without gradient, d <= :data:`MAX_BAM_DIM`."""
    if not enabled() or not 1 <= features.shape[-1] <= MAX_BAM_DIM:
        return False
    return _cpu_float32(features) and library() is not None


def bam_attention(query: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``z_i = sum_{j >= i} softmax_j(query_i . x_j) x_j`` over the slot axis of ``features`` ``[..., S, d]``
    (x), with ``query`` ``[..., S, d]`` giving base-2 logits (scaled by log2(e)): each slot attends to
    itself and the later slots (counter-causal). Call only where :func:`bam_applicable` holds."""
    if query.shape != features.shape:
        raise ValueError(f"query {tuple(query.shape)} and features {tuple(features.shape)} differ")
    query, features = query.contiguous(), features.contiguous()
    n_slots, dim = features.shape[-2], features.shape[-1]
    out = torch.empty_like(features)
    n_seq = features.numel() // max(1, n_slots * dim)
    status = library().namm_bam_attention(
        query.data_ptr(), features.data_ptr(), out.data_ptr(), n_seq, n_slots, dim, torch.get_num_threads()
    )
    if status == 2:
        raise MemoryError("BAM kernel: out of memory for its copies of the features")
    if status:
        raise ValueError(f"BAM kernel: features {dim} wide, at most {MAX_BAM_DIM}")
    return out


_TABLES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-window coefficients: ``cosw[k, t] = w(t) cos(2 pi k t / n)`` for t = 0 .. n/2 and
    ``sinw[k, t] = -w(t) sin(2 pi k t / n)`` for t = 0 .. n/2 - 1 (periodic Hann ``w``), as the windowed
    DFT basis of :func:`~namm_transfer.features.dft_basis` (float64, then rounded)."""
    if n_fft not in _TABLES:
        half = n_fft // 2
        t = torch.arange(half + 1, dtype=torch.float64)
        k = torch.arange(half + 1, dtype=torch.float64)[:, None]
        window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)[: half + 1]
        angle = 2 * math.pi * k * t / n_fft
        cosw = (torch.cos(angle) * window).float().contiguous()
        sinw = (-torch.sin(angle[:, :half]) * window[:half]).float().contiguous()
        _TABLES[n_fft] = (cosw, sinw)
    return _TABLES[n_fft]


def spectrogram_ema(
    chunk: torch.Tensor,
    window: torch.Tensor | None,
    first_start: int,
    hop: int,
    n_fft: int,
    weights: torch.Tensor,
    arrival: int | None,
    power_floor: float,
    root_floor: float,
) -> torch.Tensor:
    """``[B, H, n_bins, S]``: ``sum_f weights[f] * |STFT frame f|`` of every key's attention series.

    Frame f covers rows ``first_start + f * hop .. + n_fft - 1`` of ``chunk`` ``[B, H, q, S]``; a row
    ``r < 0`` is row ``n_window + r`` of ``window`` ``[B, H, n_window, S]`` (the rows before the chunk).
    ``arrival``: slot ``arrival + r`` arrives with chunk row r (causal rows: its earlier frames are zero
    and skipped); None assumes nothing. Call only where :func:`applicable` holds.
    """
    lib = library()
    batch, heads, n_rows, n_keys = chunk.shape
    n_frames = int(weights.shape[0])
    n_bins = n_fft // 2 + 1
    out = torch.empty(batch, heads, n_bins, n_keys, dtype=torch.float32)
    weights = weights.to(torch.float32).contiguous()
    cosw, sinw = _tables(n_fft)
    if window is None:
        w_ptr, w_strides, n_window = None, (0, 0, 0), 0
    else:
        if window.shape[-1] < n_keys:
            raise ValueError(f"window has {window.shape[-1]} key slots, the chunk {n_keys}")
        w_ptr, w_strides, n_window = window.data_ptr(), window.stride()[:3], window.shape[2]
    status = lib.namm_spectrogram_ema(
        chunk.data_ptr(), *chunk.stride()[:3], n_rows,
        w_ptr, *w_strides, n_window,
        batch, heads, n_keys,
        first_start, hop, n_fft, n_frames, weights.data_ptr(),
        -1 if arrival is None else arrival, cosw.data_ptr(), sinw.data_ptr(), power_floor, root_floor,
        out.data_ptr(), *out.stride()[:3], torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise ValueError(
            {1: f"n_fft={n_fft} must be even and within 4 .. {MAX_N_FFT}",
             2: f"frames reach {-first_start} rows before the chunk, the window holds {n_window}",
             3: f"frames reach past the chunk's {n_rows} rows"}.get(status, f"kernel status {status}")
        )  # fmt: skip
    return out
