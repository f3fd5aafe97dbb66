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
import threading

import torch
import torch.nn.functional as F

from namm_transfer import native
from namm_transfer.capacity import grown_capacity, widened


def hann_window(n_fft: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Periodic Hann window, as ``torch.hann_window(n_fft, periodic=True)``."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float32, device=device)


def dft_basis(n_fft: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Windowed real-DFT basis ``[n_fft, n_fft]``: the cosine rows of bins 0 .. n_fft/2, then the minus-sine
    rows of bins 1 .. n_fft/2 - 1 (the sine rows of DC and Nyquist are identically zero).

    ``basis @ x`` for a window ``x`` of ``n_fft`` samples gives the real parts, then the non-trivial
    imaginary parts, of ``torch.stft(x, window=hann, onesided=True)`` for that frame.
    """
    n_bins = n_fft // 2 + 1
    t = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_bins, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * k * t / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle[1 : n_bins - 1])]) * window
    return basis.to(dtype=torch.float32, device=device)


def paired_dft_basis(n_fft: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Windowed real-DFT basis ``[2 * n_bins, n_fft]``: the cosine rows of bins 0 .. n_fft/2, then the
    minus-sine rows of the same bins (those of DC and Nyquist are exactly zero), so the real and the
    imaginary parts of bin k sit ``n_bins`` rows apart and the magnitude is two slices away."""
    n_bins = n_fft // 2 + 1
    t = torch.arange(n_fft, dtype=torch.float64)
    k = torch.arange(n_bins, dtype=torch.float64)[:, None]
    angle = 2 * math.pi * k * t / n_fft
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    sine = -torch.sin(angle)
    sine[0], sine[-1] = 0.0, 0.0
    return (torch.cat([torch.cos(angle), sine]) * window).to(dtype=torch.float32, device=device)


# The magnitude is taken as sqrt(power + POWER_FLOOR) - sqrt(POWER_FLOOR): zero stays exactly zero, any
# other value moves by less than 1e-15, and exact zeros and subnormal powers (the square of a tiny
# attention weight; slots not attended yet) stay off the slow path of the CPU's vectorised sqrt, which
# costs 5-30x more on them (docs/design.md, "Features").
POWER_FLOOR = 1e-30
_ROOT_FLOOR = float(torch.tensor(POWER_FLOOR).sqrt())  # float32 arithmetic, as the tensors'


def _root_(power: torch.Tensor) -> torch.Tensor:
    """In place: ``power`` (>= 0) -> its square root, through the fast path (see POWER_FLOOR)."""
    return power.add_(POWER_FLOOR).sqrt_().sub_(_ROOT_FLOOR)

# Bytes of basis output one block of frames may take: small enough to stay in the last-level cache
# while it is squared, summed, square-rooted and reduced.
FRAME_BLOCK_BYTES = 2 << 20

_SCRATCH = threading.local()


def _scratch(name: str, numel: int, device: torch.device) -> torch.Tensor:
    """float32 scratch memory of at least ``numel`` elements, reused from call to call (per thread and
    device): the frame blocks are written and read within one call, and fresh pages for every block
    cost more than the arithmetic on them."""
    blocks = getattr(_SCRATCH, "blocks", None)
    if blocks is None:
        blocks = _SCRATCH.blocks = {}
    key = (name, str(device))
    block = blocks.get(key)
    if block is None or block.numel() < numel:
        blocks.pop(key, None)  # free the old block before taking a larger one
        block = blocks[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return block


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
      ``ema``: the reduced spectrogram ``[B, H, S, n_bins]`` (stored as ``spectrum`` ``[B, H, n_bins, S]``),
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
        # Storage: both buffers have ``capacity >= n_keys`` key columns, zero beyond ``n_keys``, so a new
        # key costs nothing until the capacity runs out. ``_ring`` holds the last n_fft rows with the
        # oldest at row ``_ring_start`` (a ring: a chunk of a few queries overwrites its rows in place).
        self._ring: torch.Tensor | None = None  # [B, H, n_fft, capacity]
        self._ring_start = 0
        self._spec: torch.Tensor | None = None  # [B, H, n_bins, capacity]
        self.n_keys = 0
        # id() of the object each buffer belongs to: a shallow copy (a forked state) shares or expands
        # them, and copies one before it first writes into it (:meth:`_own`)
        self._ring_owner = self._spec_owner = 0
        self.rows_seen: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None
        self._paired: torch.Tensor | None = None
        self._frame_weight: torch.Tensor | None = None

    @property
    def window(self) -> torch.Tensor | None:
        """``[B, H, n_fft, S]`` the last ``n_fft`` attention rows, oldest first."""
        if self._ring is None:
            return None
        ring = self._ring[..., : self.n_keys]
        return ring if self._ring_start == 0 else ring.roll(-self._ring_start, dims=-2)

    @window.setter
    def window(self, value: torch.Tensor) -> None:
        self._ring, self._ring_start, self._ring_owner = value, 0, id(self)
        self.n_keys = value.shape[-1]

    @property
    def spectrum(self) -> torch.Tensor | None:
        """``[B, H, n_bins, S]`` reduced spectrogram of every key slot (a view of the storage)."""
        return None if self._spec is None else self._spec[..., : self.n_keys]

    @spectrum.setter
    def spectrum(self, value: torch.Tensor) -> None:
        if self._ring is None:  # features set directly (a test, a restored state): no rows seen yet
            self._init(value.shape[0], value.shape[1], value.device)
        if value.shape[-1] > self.n_keys:
            self.grow(value.shape[-1])
        if value.shape[-1] != self.n_keys:
            raise ValueError(f"spectrum has {value.shape[-1]} key slots, the window {self.n_keys}")
        self._spec, self._spec_owner = value, id(self)

    @property
    def ema(self) -> torch.Tensor | None:
        """``[B, H, S, n_bins]`` reduced spectrogram of every key slot (a view)."""
        return None if self._spec is None else self.spectrum.transpose(-1, -2)

    @ema.setter
    def ema(self, value: torch.Tensor) -> None:
        self.spectrum = value.transpose(-1, -2).contiguous()

    @property
    def frame_decay(self) -> float:
        return self.decay**self.hop

    def emitted_weight(self, age: torch.Tensor) -> torch.Tensor:
        """``[B, H, S]`` the total EMA weight of the frames emitted since each key arrived (``age``: rows
        before each sample's newest, ``[B, H, S]``): a frame is emitted each time ``rows_seen`` reaches a
        multiple of ``hop``, a key ``age`` rows before the newest arrived at row ``rows_seen - 1 - age``,
        and frames before it hold none of its attention. At least one frame's weight, so a key no frame
        has read yet keeps its zero EMA. ``ema`` over it is the weighted mean of the key's frames."""
        seen = self.rows_seen.to(age.device)[:, None, None]
        frames = seen // self.hop - (seen - 1 - age.clamp_min(0)) // self.hop
        return (1 - self.frame_decay ** frames.clamp_min(1).double()).float()

    def _init(self, batch: int, heads: int, device: torch.device) -> None:
        self._ring = torch.zeros(batch, heads, self.n_fft, 0, device=device)
        self._spec = torch.zeros(batch, heads, self.n_bins, 0, device=device)
        self._ring_start, self.n_keys = 0, 0
        self._ring_owner = self._spec_owner = id(self)
        self.rows_seen = torch.zeros(batch, dtype=torch.long, device=device)
        self._basis = dft_basis(self.n_fft, device)
        self._paired = paired_dft_basis(self.n_fft, device)

    def grow(self, n_keys: int) -> None:
        """Extend the key axis to ``n_keys`` slots (new keys: no attention so far). Growing by a few keys
        takes spare columns (:func:`~namm_transfer.capacity.grown_capacity`), so token-by-token decoding
        reallocates rarely."""
        if n_keys <= self.n_keys:
            return
        if n_keys > min(self._ring.shape[-1], self._spec.shape[-1]):
            capacity = grown_capacity(n_keys, n_keys - self.n_keys)
            self._ring = widened(self._ring[..., : self.n_keys], capacity)
            self._spec = widened(self._spec[..., : self.n_keys], capacity)
            self._ring_owner = self._spec_owner = id(self)
        self.n_keys = n_keys

    def _own(self) -> None:
        """Copy the buffers this object does not own before writing into them in place."""
        if self._ring_owner != id(self):
            self._ring, self._ring_owner = self._ring.clone(), id(self)
        if self._spec_owner != id(self):
            self._spec, self._spec_owner = self._spec.clone(), id(self)

    def observe(self, rows: torch.Tensor, row_valid: torch.Tensor | None = None, causal: bool = False) -> int:
        """Consume the attention rows of a chunk of queries.

        Args:
            rows: ``[B, H, q, S]`` attention of the chunk's queries to the S current key slots.
            row_valid: ``[B, q]`` bool, False for padding queries (left padding only).
            causal: the last q slots are the chunk's own tokens in order (slot ``S - q + i`` arrives with
                query i) and attention is causal, so a slot has received nothing before it arrived: the
                frames before it are zero and are not computed (same result, less work).

        Returns:
            The largest number of frames emitted for a sample.
        """
        batch, heads, n_q, n_keys = rows.shape
        if self._spec is None:
            self._init(batch, heads, rows.device)
        self.grow(n_keys)
        rows = rows.float()
        if row_valid is not None and bool(row_valid.all()):
            row_valid = None
        if row_valid is not None:
            rows = rows * row_valid[:, None, :, None]
        aligned = row_valid is None and bool((self.rows_seen == self.rows_seen[0]).all())
        if aligned and n_q < self.n_fft:
            return self._observe_ring(rows)
        if aligned and rows.is_contiguous():
            return self._observe_aligned(rows, causal=causal)
        combined = torch.cat([self.window, rows], dim=-2).contiguous()  # [B, H, n_fft + q, S]
        # A copy, not a view: a view would keep the whole chunk's rows alive between forwards.
        self.window = combined[..., -self.n_fft :, :].clone()
        if aligned:
            return self._observe_aligned(combined, with_window=True)
        return self._observe_per_sample(combined, row_valid)

    def _observe_ring(self, rows: torch.Tensor) -> int:
        """A chunk of fewer than ``n_fft`` queries, every sample in the same frame phase (decoding, a
        rollout's step): its rows overwrite the oldest rows of the ring, and each frame it completes is
        one basis product over the ring (the basis columns rotated to the ring's order), so nothing is
        concatenated or copied per query."""
        self._own()
        n_q, seen = rows.shape[-2], int(self.rows_seen[0])
        self.rows_seen += n_q
        n_frames, done = 0, 0
        while done < n_q:
            stop = min(n_q, done + self.hop - (seen + done) % self.hop)  # one past the next frame's end
            for r in range(done, stop):  # usually one or two rows
                self._ring[..., self._ring_start, : self.n_keys] = rows[..., r, :]
                self._ring_start = (self._ring_start + 1) % self.n_fft
            done = stop
            if (seen + done) % self.hop == 0:
                self._ring_frame()
                n_frames += 1
        return n_frames

    def _ring_frame(self) -> None:
        """Emit the frame of the ring's rows: ``spectrum = fd * spectrum + (1 - fd) * |STFT|``."""
        fd = self.frame_decay
        ring = self._ring[..., : self.n_keys]
        if native.applicable(ring, n_fft=self.n_fft):
            # the frame's oldest rows (ring rows start ..) are the kernel's window, the rest its chunk
            start = self._ring_start
            if self._frame_weight is None:  # one frame's EMA weight, made once (this runs every hop)
                self._frame_weight = torch.tensor([1 - fd], dtype=torch.float32)
            mag = native.spectrogram_ema(
                ring, ring[..., start:, :], start - self.n_fft, self.hop, self.n_fft, self._frame_weight,
                None, POWER_FLOOR, _ROOT_FLOOR,
            )
            self.spectrum.mul_(fd).add_(mag)
            return
        paired = self._paired.roll(self._ring_start, dims=1)  # column j reads ring row j
        spec = torch.matmul(paired, ring).square_()
        mag = _root_(spec[..., : self.n_bins, :].add_(spec[..., self.n_bins :, :]))
        self.spectrum.mul_(fd).add_(mag, alpha=1 - fd)

    def _observe_aligned(self, rows: torch.Tensor, with_window: bool = False, causal: bool = False) -> int:
        """All samples share a frame phase: frames are evenly spaced windows of the series.

        ``rows`` is the chunk ``[B, H, q, S]`` (then the window of earlier rows is read only for the
        few frames that reach back into it, and no copy of the chunk is made), or with ``with_window``
        the window followed by the chunk.
        """
        lead = self.n_fft if with_window else 0
        n_q = rows.shape[-2] - lead
        seen = int(self.rows_seen[0])
        self.rows_seen += n_q
        first_end = (self.hop - 1 - seen % self.hop) % self.hop  # chunk row completing the first frame
        if first_end >= n_q:
            return 0
        n_frames = (n_q - 1 - first_end) // self.hop + 1
        fd = self.frame_decay
        decay = (1 - fd) * fd ** torch.arange(n_frames - 1, -1, -1, device=rows.device, dtype=torch.float32)
        first_start = first_end + 1 - self.n_fft  # chunk row where frame 0 starts (< 0: in the window)
        if native.applicable(rows, n_fft=self.n_fft):
            # one fused pass over every frame (:mod:`namm_transfer.native`); the window is read in place
            if with_window:
                update = native.spectrogram_ema(
                    rows, None, first_start + lead, self.hop, self.n_fft, decay, None,
                    POWER_FLOOR, _ROOT_FLOOR,
                )
            else:
                arrival = rows.shape[-1] - n_q if causal else None
                window = self.window if first_start < 0 else None
                update = native.spectrogram_ema(
                    rows, window, first_start, self.hop, self.n_fft, decay, arrival, POWER_FLOOR, _ROOT_FLOOR
                )
                self.window = rows[..., -self.n_fft :, :].clone()
        elif with_window:
            update = self._weighted_frames(rows, first_start + lead, decay)
        else:
            # frames starting before the chunk take their first rows from the window
            reaching = min(n_frames, -(first_start // self.hop)) if first_start < 0 else 0
            n_old = rows.shape[-1] - n_q if causal else None  # slot arriving with the chunk's first row
            update = self._weighted_frames(rows, first_start + self.hop * reaching, decay[reaching:], n_old)
            if reaching:
                update = update + self._head_frames(rows, first_start, decay[:reaching], n_old)
            self.window = rows[..., -self.n_fft :, :].clone()
        # out of place on the old state: forked states (shared prefill) may hold it as an expanded view
        self.spectrum = update.add_(self.spectrum, alpha=fd**n_frames)
        return n_frames

    def _head_frames(
        self, rows: torch.Tensor, first_start: int, weights: torch.Tensor, arrival: int | None
    ) -> torch.Tensor:
        """``sum_f weights[f] * |STFT frame f|`` ``[B, H, n_bins, S]`` for the frames that start before the
        chunk ``rows`` ``[B, H, q, S]`` (frame f at chunk row ``first_start + f * hop < 0``): the basis
        columns of a frame's first rows read the window, the others the chunk, and the two products are
        summed (the STFT is linear until the magnitude), so the window and the chunk are never joined.
        ``arrival`` as in :meth:`_weighted_frames` (slot ``arrival + r`` arrives with chunk row r)."""
        n_keys, n_bins = rows.shape[-1], self.n_bins
        total = rows.new_zeros(*rows.shape[:2], n_bins, n_keys)
        for f in range(weights.shape[0]):
            early = -(first_start + f * self.hop)  # rows of the frame that are in the window
            width = n_keys if arrival is None else max(1, min(n_keys, arrival + self.n_fft - early))
            spec = torch.matmul(self._paired[:, :early], self.window[..., self.n_fft - early :, :width])
            spec += torch.matmul(self._paired[:, early:], rows[..., : self.n_fft - early, :width])
            spec.square_()
            mag = _root_(spec[..., :n_bins, :].add_(spec[..., n_bins:, :]))
            total[..., :width].add_(mag, alpha=float(weights[f]))
        return total

    def _weighted_frames(
        self, series: torch.Tensor, start: int, weights: torch.Tensor, arrival: int | None = None
    ) -> torch.Tensor:
        """``sum_f weights[f] * |STFT frame f|`` ``[B, H, n_bins, S]`` for the frames of ``series``
        ``[B, H, T, S]`` (contiguous) starting at rows ``start + f * hop``.

        ``arrival``: slot ``arrival + r`` arrives with series row r and has zero attention before it
        (None: no such structure is assumed); a frame then skips the slots that arrive after it."""
        batch, heads, total, n_keys = series.shape
        n_frames = weights.shape[0]
        if not n_frames:
            return series.new_zeros(batch, heads, self.n_bins, n_keys)
        if total % self.hop == 0:
            return self._frames_flat(series, start, weights, arrival)
        # Frame f covers series[start + f*hop : start + f*hop + n_fft]: an overlapping strided view, so
        # one batched matmul computes every frame.
        batch_stride, head_stride, row_stride = series.stride(0), series.stride(1), series.stride(2)
        windows = series.as_strided(
            (batch, heads, n_frames, self.n_fft, n_keys),
            (batch_stride, head_stride, self.hop * row_stride, row_stride, 1),
            series.storage_offset() + start * row_stride,
        )
        mag = self._magnitude(torch.matmul(self._basis, windows))  # [B, H, F, bins, S]
        return torch.einsum("f,bhfks->bhks", weights, mag)

    def _frames_flat(
        self, series: torch.Tensor, start: int, weights: torch.Tensor, arrival: int | None = None
    ) -> torch.Tensor:
        """:meth:`_weighted_frames` when every (sample, head) series has a multiple of ``hop`` rows.

        The series of all (sample, head) pairs are laid end to end (``[B*H*T, S]``, a view): then
        (b, h)'s frame f is window ``(b*H + h) * T/hop + f`` of one evenly strided sequence of windows,
        which one batched matmul reads in place (windows that straddle two series are not real frames
        and are left out of the sums). The basis is the square one (:func:`dft_basis`: the 17 cosine
        rows, then the 15 sine rows that are not identically zero): 32 rows instead of 34 keep the
        matrix product on whole register blocks (~12% faster here). The windows go through in blocks
        whose basis output stays in cache: the matmul writes into reused scratch memory (fresh pages
        cost more than the arithmetic on them), the squared cosine rows are written into a second
        scratch block and the squared sine rows added onto bins 1 .. 15 in one pass, its square root
        is taken in place, and each series' frames of the block are reduced by one vector-matrix
        product with their weights. With ``arrival``, a block reads only the slots that exist by the
        end of its latest frame.
        """
        batch, heads, total, n_keys = series.shape
        n_frames = weights.shape[0]
        n_series, per_series = batch * heads, total // self.hop
        n_windows = (n_series - 1) * per_series + n_frames
        device = series.device
        flat = series.view(n_series * total, n_keys)
        basis, n_bins = self._basis, self.n_bins
        n_rows = basis.shape[0]
        update = torch.zeros(n_series, n_bins, n_keys, device=device)
        block = max(1, FRAME_BLOCK_BYTES // (n_rows * n_keys * 4))
        block = min(block, n_windows)
        spec_memory = _scratch("spec", block * n_rows * n_keys, device)
        mag_memory = _scratch("mag", block * n_bins * n_keys, device)
        row = n_keys  # flat's row stride
        for j0 in range(0, n_windows, block):
            j1 = min(n_windows, j0 + block)
            n = j1 - j0
            width = n_keys
            if arrival is not None:  # the latest real frame of the block (frame index < n_frames)
                latest = max(min(j % per_series, n_frames - 1) for j in range(j0, j1))
                width = max(1, min(n_keys, arrival + start + self.hop * latest + self.n_fft))
            windows = flat.as_strided(
                (n, self.n_fft, width),
                (self.hop * row, row, 1),
                flat.storage_offset() + (start + self.hop * j0) * row,
            )
            spec = spec_memory[: n * n_rows * width].view(n, n_rows, width)
            torch.matmul(basis, windows, out=spec)
            mag = self._magnitude(spec, out=mag_memory[: n * n_bins * width].view(n, n_bins, width))
            for sid in range(j0 // per_series, (j1 - 1) // per_series + 1):
                first = sid * per_series  # window of the series' frame 0
                a, b = max(j0, first), min(j1, first + n_frames)
                if a >= b:
                    continue  # only straddling windows of this series in the block
                own = mag[a - j0 : b - j0].view(b - a, -1)
                reduced = torch.matmul(weights[a - first : b - first][None], own)
                update[sid, :, :width] += reduced.view(n_bins, width)
        return update.view(batch, heads, n_bins, n_keys)

    def _observe_per_sample(self, combined: torch.Tensor, row_valid: torch.Tensor | None) -> int:
        """General case (left padding shifts each sample's frame phase): gather each frame's window."""
        batch, _, total, _ = combined.shape
        n_q = total - self.n_fft
        if row_valid is None:
            row_valid = torch.ones(batch, n_q, dtype=torch.bool, device=combined.device)
        # Row j of the chunk completes a frame for sample b when b's real-row count hits a multiple of hop.
        counts = self.rows_seen[:, None] + torch.cumsum(row_valid.long(), dim=1)  # [B, q]
        ends = row_valid & (counts % self.hop == 0)
        n_frames = ends.sum(1)  # [B]
        max_frames = int(n_frames.max()) if n_q else 0
        if n_q:
            self.rows_seen = counts[:, -1]
        if not max_frames:
            return 0
        # End positions per sample, left-aligned; unused slots point at some row and get weight 0.
        order = torch.argsort((~ends).to(torch.int8), dim=1, stable=True)[:, :max_frames]
        end_pos = order + self.n_fft + 1  # one past the frame's last row in `combined`
        idx = end_pos[:, :, None] + torch.arange(-self.n_fft, 0, device=combined.device)  # [B, F, n_fft]
        b_idx = torch.arange(batch, device=combined.device)[:, None, None]
        windows = combined.permute(0, 2, 1, 3)[b_idx, idx]  # [B, F, n_fft, H, S]
        mag = self._magnitude(torch.einsum("kt,bfths->bhfks", self._basis, windows))  # [B, H, F, bins, S]
        fd = self.frame_decay
        age = n_frames[:, None] - 1 - torch.arange(max_frames, device=combined.device)  # frames after it
        w = ((1 - fd) * fd ** age.clamp(min=0).float()).masked_fill(age < 0, 0.0)
        self.spectrum = self.spectrum * (fd ** n_frames.float())[:, None, None, None]
        self.spectrum = self.spectrum + torch.einsum("bf,bhfks->bhks", w, mag)
        return max_frames

    def _magnitude(self, spec: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``|STFT|`` ``[..., n_bins, S]`` from the basis outputs ``[..., n_fft, S]`` (cos rows, then sin rows
        of bins 1 .. n_bins - 2; the sine rows of DC and Nyquist are identically zero), written into
        ``out`` when given: the squared cosines, then the squared sines added in the same pass."""
        cosine, sine = spec[..., : self.n_bins, :], spec[..., self.n_bins :, :]
        power = torch.mul(cosine, cosine, out=out)
        power[..., 1 : self.n_bins - 1, :].addcmul_(sine, sine)
        return _root_(power)

    def select(self, index: torch.Tensor) -> None:
        """Keep only key slots ``index`` ``[B, H, K]`` (after an eviction)."""
        if self._spec is None:
            return
        spectrum = self.spectrum.gather(-1, index[:, :, None, :].expand(-1, -1, self.n_bins, -1))
        self.window = self.window.gather(-1, index[:, :, None, :].expand(-1, -1, self.n_fft, -1))
        self.spectrum = spectrum

    def nbytes(self) -> int:
        """Bytes held, spare capacity included."""
        if self._spec is None:
            return 0
        return (self._ring.numel() + self._spec.numel()) * self._ring.element_size()


def age_embedding(age: torch.Tensor, dim: int = 8, base: float = 50_000.0) -> torch.Tensor:
    """Sinusoidal age embedding (0 = newest): ``[..., dim]``, sin then cos of ``age / base**(2i/dim)``."""
    if dim % 2:
        raise ValueError(f"age embedding dim must be even, got {dim}")
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=age.device) / dim)
    angle = age.float()[..., None] * freqs
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)
