"""Attention-spectrogram token features (Cetin et al. 2024, arXiv 2410.13166, section 3.1).

Each cached key token is described by the series of attention it received from the recent queries.
That series goes through an STFT (periodic Hann window of ``n_fft``, hop ``hop``, no centring,
onesided, magnitude), frames are reduced with an exponential moving average, and the result is
z-scored per frequency bin. An age embedding is prepended by :mod:`namm_transfer.namm`.

The STFT is linear in the attention rows until the magnitude, so it is computed **streaming**:
:class:`StreamingSpectrogram` keeps only the last ``n_fft`` attention rows of a layer and emits one
frame every ``hop`` queries, instead of buffering every row since the previous cache update.
:func:`batch_spectrogram_ema` is the whole-series reference it must equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hann_window(n_fft: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Periodic Hann window, as ``torch.hann_window(n_fft, periodic=True)``."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=device)


def dft_basis(n_fft: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Windowed real-DFT basis ``[2 * (n_fft // 2 + 1), n_fft]``: cosine rows, then minus-sine rows.

    ``basis @ x`` for a window ``x`` of ``n_fft`` samples gives the real and imaginary parts of
    ``torch.stft(x, window=hann, onesided=True)`` for that frame.
    """
    n_bins = n_fft // 2 + 1
    t = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_bins, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * k * t / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
    return basis.to(dtype=torch.float32, device=device)


def batch_spectrogram_ema(
    rows: torch.Tensor, n_fft: int = 32, hop: int = 16, decay: float = 0.99
) -> torch.Tensor:
    """Reference (non-streaming) features of a whole attention-row series.

    Args:
        rows: ``[..., T, S]`` attention of T consecutive queries to S keys (zeros where a key did not
            exist yet). T must be a multiple of ``hop``.
        n_fft, hop: STFT window and hop.
        decay: per-query EMA decay; one frame decays by ``decay ** hop``.

    Returns:
        ``[..., S, n_fft // 2 + 1]`` EMA of the STFT magnitudes, the series left-padded with
        ``n_fft - hop`` zero rows (the reference's first update).
    """
    *lead, n_rows, n_keys = rows.shape
    if n_rows % hop:
        raise ValueError(f"batch_spectrogram_ema needs a multiple of hop={hop} rows, got {n_rows}")
    series = rows.float().transpose(-1, -2).reshape(-1, n_rows)
    series = F.pad(series, (n_fft - hop, 0))
    spec = torch.stft(
        series,
        n_fft=n_fft,
        hop_length=hop,
        window=hann_window(n_fft, rows.device),
        center=False,
        onesided=True,
        return_complex=True,
    ).abs()  # [N, bins, frames]
    n_frames = spec.shape[-1]
    frame_decay = decay**hop
    weights = frame_decay ** torch.arange(n_frames - 1, -1, -1, dtype=torch.float32, device=rows.device)
    reduced = (spec * weights * (1 - frame_decay)).sum(-1)  # [N, bins]
    return reduced.reshape(*lead, n_keys, -1)


class StreamingSpectrogram:
    """Streaming STFT-magnitude EMA of the attention each key receives, for one layer.

    State (per sample b, KV head h, key slot s):
      ``window``: the last ``n_fft`` attention rows ``[B, H, n_fft, S]`` (zeros before the first query),
      ``ema``: the reduced spectrogram ``[B, H, S, n_bins]``,
      ``rows_seen``: real (non-padding) rows seen per sample, which fixes each sample's frame phase so a
      left-padded sample gets exactly the features it would get alone.

    A frame is emitted for sample b each time ``rows_seen[b]`` reaches a multiple of ``hop``; the EMA
    then decays by ``decay ** hop`` and adds ``(1 - decay ** hop) * |STFT frame|``. Keys that did not
    exist during a frame received zero attention, so they get zero magnitude without a mask.
    """

    def __init__(self, n_fft: int = 32, hop: int = 16, decay: float = 0.99):
        if n_fft % 2 or hop <= 0 or hop > n_fft:
            raise ValueError(f"need an even n_fft >= hop > 0, got n_fft={n_fft}, hop={hop}")
        self.n_fft, self.hop, self.decay = n_fft, hop, decay
        self.n_bins = n_fft // 2 + 1
        self.window: torch.Tensor | None = None
        self.ema: torch.Tensor | None = None
        self.rows_seen: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None

    @property
    def frame_decay(self) -> float:
        return self.decay**self.hop

    def _init(self, batch: int, heads: int, device: torch.device) -> None:
        self.window = torch.zeros(batch, heads, self.n_fft, 0, device=device)
        self.ema = torch.zeros(batch, heads, 0, self.n_bins, device=device)
        self.rows_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self._basis = dft_basis(self.n_fft, device)

    def grow(self, n_keys: int) -> None:
        """Extend the key axis to ``n_keys`` slots (new keys: no attention so far)."""
        extra = n_keys - self.ema.shape[-2]
        if extra > 0:
            self.window = F.pad(self.window, (0, extra))
            self.ema = F.pad(self.ema, (0, 0, 0, extra))

    def observe(self, rows: torch.Tensor, row_valid: torch.Tensor | None = None) -> int:
        """Consume the attention rows of a chunk of queries.

        Args:
            rows: ``[B, H, q, S]`` attention of the chunk's queries to the S current key slots.
            row_valid: ``[B, q]`` bool, False for padding queries (left padding only).

        Returns:
            The largest number of frames emitted for a sample.
        """
        batch, heads, n_q, n_keys = rows.shape
        if self.ema is None:
            self._init(batch, heads, rows.device)
        self.grow(n_keys)
        rows = rows.float()
        if row_valid is None:
            row_valid = torch.ones(batch, n_q, dtype=torch.bool, device=rows.device)
        else:
            rows = rows * row_valid[:, None, :, None]
        combined = torch.cat([self.window, rows], dim=-2)  # [B, H, n_fft + q, S]

        # Row j of the chunk completes a frame for sample b when b's real-row count hits a multiple of hop.
        counts = self.rows_seen[:, None] + torch.cumsum(row_valid.long(), dim=1)  # [B, q]
        ends = row_valid & (counts % self.hop == 0)
        n_frames = ends.sum(1)  # [B]
        max_frames = int(n_frames.max()) if n_q else 0
        if max_frames:
            # End positions per sample, left-aligned; unused slots point at the last row with weight 0.
            order = torch.argsort((~ends).to(torch.int8), dim=1, stable=True)[:, :max_frames]
            end_pos = order + self.n_fft + 1  # one past the frame's last row in `combined`
            offsets = torch.arange(-self.n_fft, 0, device=rows.device)
            idx = end_pos[:, :, None] + offsets  # [B, F, n_fft]
            b_idx = torch.arange(batch, device=rows.device)[:, None, None]
            windows = combined.permute(0, 2, 1, 3)[b_idx, idx]  # [B, F, n_fft, H, S]
            spec = torch.einsum("kt,bfths->bfhsk", self._basis, windows)
            real, imag = spec.split(self.n_bins, dim=-1)
            mag = torch.sqrt(real.square() + imag.square())  # [B, F, H, S, bins]
            fd = self.frame_decay
            frame_idx = torch.arange(max_frames, device=rows.device)
            age = n_frames[:, None] - 1 - frame_idx  # frames after this one
            w = torch.where(age >= 0, (1 - fd) * fd ** age.clamp(min=0).float(), torch.zeros(()))
            self.ema = self.ema * (fd ** n_frames.float())[:, None, None, None]
            self.ema = self.ema + torch.einsum("bf,bfhsk->bhsk", w, mag)
        self.window = combined[..., -self.n_fft :, :]
        self.rows_seen = counts[:, -1] if n_q else self.rows_seen
        return max_frames

    def select(self, index: torch.Tensor) -> None:
        """Keep only key slots ``index`` ``[B, H, K]`` (after an eviction)."""
        if self.ema is None:
            return
        self.window = self.window.gather(-1, index[:, :, None, :].expand(-1, -1, self.n_fft, -1))
        self.ema = self.ema.gather(-2, index[..., None].expand(-1, -1, -1, self.n_bins))

    def nbytes(self) -> int:
        if self.ema is None:
            return 0
        return self.window.numel() * self.window.element_size() + self.ema.numel() * self.ema.element_size()


def age_embedding(age: torch.Tensor, dim: int = 8, base: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal age embedding (0 = newest): ``[..., dim]``, sin then cos of ``age / base**(2i/dim)``."""
    if dim % 2:
        raise ValueError(f"age embedding dim must be even, got {dim}")
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=age.device) / dim)
    angle = age.float()[..., None] * freqs
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
