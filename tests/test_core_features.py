"""Streaming attention-spectrogram features equal the whole-series reference (docs/design.md, "The NAMM")."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _reference_bam import age_embedding_ref

from namm_transfer import features
from namm_transfer.capacity import max_spare
from namm_transfer.features import (
    StreamingSpectrogram,
    age_embedding,
    batch_spectrogram_ema,
    dft_basis,
    paired_dft_basis,
)

N_FFT, HOP, DECAY = 32, 16, 0.99


def causal_rows(batch=2, heads=3, n_rows=64, prefix=5, seed=0) -> torch.Tensor:
    """``[B, H, T, prefix + T]`` softmax rows: query t sees the prefix keys and keys prefix..prefix+t."""
    g = torch.Generator().manual_seed(seed)
    n_keys = prefix + n_rows
    logits = torch.randn(batch, heads, n_rows, n_keys, generator=g) * 2
    key = torch.arange(n_keys)
    visible = key[None, :] <= prefix + torch.arange(n_rows)[:, None]
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def stream(rows: torch.Tensor, chunks: list[int], prefix: int, row_valid=None) -> StreamingSpectrogram:
    """Feed ``rows`` chunk by chunk, each chunk seeing only the keys that exist at its last query."""
    st = StreamingSpectrogram(N_FFT, HOP, DECAY)
    assert sum(chunks) == rows.shape[-2]
    start = 0
    for size in chunks:
        end = start + size
        rv = None if row_valid is None else row_valid[:, start:end]
        st.observe(rows[..., start:end, : prefix + end], rv)
        assert st.window.shape[-2] == N_FFT
        start = end
    return st


def numpy_spectrogram_ema(rows: np.ndarray) -> np.ndarray:
    """Independent reference: explicit periodic Hann, frame loop, |rfft|, EMA over frames."""
    *lead, n_rows, n_keys = rows.shape
    series = np.moveaxis(rows.astype(np.float64), -1, -2).reshape(-1, n_rows)
    series = np.concatenate([np.zeros((series.shape[0], N_FFT - HOP)), series], axis=1)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    n_frames = (series.shape[1] - N_FFT) // HOP + 1
    d = DECAY**16
    out = np.zeros((series.shape[0], N_FFT // 2 + 1))
    for f in range(n_frames):
        frame = series[:, f * HOP : f * HOP + N_FFT] * window
        out += (1 - d) * d ** (n_frames - 1 - f) * np.abs(np.fft.rfft(frame, axis=-1))
    return out.reshape(*lead, n_keys, N_FFT // 2 + 1)


def test_batch_matches_numpy_reference():
    rows = causal_rows(n_rows=80, prefix=3)
    got = batch_spectrogram_ema(rows, N_FFT, HOP, DECAY)
    assert got.shape == (2, 3, 83, 17) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), numpy_spectrogram_ema(rows.numpy()), atol=1e-6, rtol=1e-5)


def test_batch_rejects_non_multiple_of_hop():
    with pytest.raises(ValueError, match="multiple of hop=16"):
        batch_spectrogram_ema(torch.zeros(1, 1, 20, 4))


def test_dft_basis_matches_torch_stft():
    x = torch.randn(5, N_FFT, generator=torch.Generator().manual_seed(1))
    spec = torch.stft(
        x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=False, onesided=True, return_complex=True
    )[..., 0]
    real, imag = (x @ dft_basis(N_FFT).T).split([17, 15], dim=-1)
    torch.testing.assert_close(real, spec.real, atol=1e-5, rtol=0)
    torch.testing.assert_close(imag, spec.imag[:, 1:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(spec.imag[:, [0, 16]], torch.zeros(5, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "chunks",
    [[96], [16] * 6, [1] * 96, [5, 11, 1, 30, 17, 32], [33, 63], [15, 17, 16, 48]],
    ids=["all", "hop", "single", "irregular", "two", "offhop"],
)
def test_streaming_equals_batch(chunks):
    prefix = 4
    rows = causal_rows(n_rows=96, prefix=prefix, seed=2)
    st = stream(rows, chunks, prefix)
    expected = batch_spectrogram_ema(rows, N_FFT, HOP, DECAY)
    torch.testing.assert_close(st.ema, expected, atol=1e-5, rtol=0)
    assert st.rows_seen.tolist() == [96, 96]


@pytest.mark.parametrize(
    "chunks",
    [[96], [32] * 3, [48, 48], [40, 56], [7, 41, 48], [33, 63], [17, 32, 47]],
    ids=["all", "n_fft", "hop-multiples", "off-phase", "short-then-long", "two", "odd"],
)
def test_streaming_contiguous_chunks_equal_reference(chunks):
    """Contiguous chunks take the copy-free path (frames reaching back into the window computed apart,
    every (sample, head) series laid end to end): same features as the numpy reference."""
    prefix = 4
    rows = causal_rows(n_rows=96, prefix=prefix, seed=5)
    st = StreamingSpectrogram(N_FFT, HOP, DECAY)
    start = 0
    for size in chunks:
        end = start + size
        st.observe(rows[..., start:end, : prefix + end].contiguous())
        start = end
    expected = torch.from_numpy(numpy_spectrogram_ema(rows.numpy())).float()
    torch.testing.assert_close(st.ema, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(st.window, rows[..., -N_FFT:, :])


@pytest.mark.parametrize("chunks", [[96], [32] * 3, [40, 56], [7, 41, 48], [17, 32, 47]])
@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 30], ids=["window", "few", "all"])
def test_causal_skip_gives_the_same_features(monkeypatch, chunks, block_bytes):
    """``causal=True`` skips each slot's frames before it arrived: identical features on causal rows
    (small frame blocks, so blocks really read fewer slots)."""
    monkeypatch.setattr(features, "FRAME_BLOCK_BYTES", block_bytes)
    prefix = 4
    rows = causal_rows(batch=2, heads=2, n_rows=96, prefix=prefix, seed=6)
    plain, causal = StreamingSpectrogram(N_FFT, HOP, DECAY), StreamingSpectrogram(N_FFT, HOP, DECAY)
    start = 0
    for size in chunks:
        end = start + size
        chunk = rows[..., start:end, : prefix + end].contiguous()
        assert plain.observe(chunk) == causal.observe(chunk, causal=True)
        start = end
    torch.testing.assert_close(causal.ema, plain.ema, atol=1e-6, rtol=0)
    torch.testing.assert_close(causal.window, plain.window)


def test_paired_basis_is_the_dft_basis_regrouped():
    """Cosine rows of every bin, then minus-sine rows of every bin (zero for DC and Nyquist)."""
    basis, paired = dft_basis(N_FFT), paired_dft_basis(N_FFT)
    bins = N_FFT // 2 + 1
    torch.testing.assert_close(paired[:bins], basis[:bins])
    torch.testing.assert_close(paired[bins + 1 : 2 * bins - 1], basis[bins:])
    assert not paired[bins].any() and not paired[2 * bins - 1].any()


def test_streaming_partial_frame_is_pending():
    """Rows past the last full hop do not change the EMA until their frame completes."""
    rows = causal_rows(n_rows=40, prefix=2, seed=3)
    st = stream(rows, [7, 13, 20], prefix=2)
    torch.testing.assert_close(
        st.ema[..., :34, :], batch_spectrogram_ema(rows[..., :32, :34]), atol=1e-5, rtol=0
    )
    assert torch.all(st.ema[..., 34:, :] == 0)  # keys that arrived after the last complete frame


def test_observe_returns_frames_emitted():
    st = StreamingSpectrogram()
    assert st.observe(torch.rand(1, 1, 10, 3)) == 0
    assert st.observe(torch.rand(1, 1, 40, 3)) == 3  # rows 16, 32, 48
    assert st.observe(torch.rand(1, 1, 0, 3)) == 0


@pytest.mark.parametrize("chunks", [[1] * 53, [53], [10, 20, 23]])
def test_left_padding_matches_running_alone(chunks):
    pad, n_real, prefix = 5, 48, 3
    alone = causal_rows(batch=1, n_rows=n_real, prefix=prefix, seed=4)
    other = causal_rows(batch=1, n_rows=n_real + pad, prefix=prefix, seed=5)
    garbage = torch.rand(1, 3, pad, pad + prefix + n_real + pad)  # padding queries' rows: must be ignored
    padded = torch.zeros(1, 3, pad + n_real, pad + prefix + n_real)
    padded[..., :pad, :] = garbage[..., : pad + prefix + n_real]
    padded[..., pad:, pad:] = alone  # real rows never attend to padding keys
    rows = torch.cat([padded, other], dim=0)
    row_valid = torch.ones(2, pad + n_real, dtype=torch.bool)
    row_valid[0, :pad] = False
    # prefix keys of the batch: pad + prefix (sample 0 has pad padding keys in front)
    st = stream(rows, chunks, prefix=pad + prefix, row_valid=row_valid)
    assert st.rows_seen.tolist() == [n_real, n_real + pad]
    alone_ema = batch_spectrogram_ema(alone, N_FFT, HOP, DECAY)
    torch.testing.assert_close(st.ema[0, :, pad:], alone_ema[0], atol=1e-5, rtol=0)
    assert torch.all(st.ema[0, :, :pad] == 0)
    # the unpadded neighbour: 53 rows = 3 complete frames, its last 5 rows still pending
    torch.testing.assert_close(st.ema[1], batch_spectrogram_ema(other[..., :48, :])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("split", [16, 23, 40])
def test_select_then_continue_equals_kept_columns_from_start(split):
    prefix, n_rows = 6, 64
    rows = causal_rows(batch=2, heads=2, n_rows=n_rows, prefix=prefix, seed=6)
    st = stream(rows[..., :split, :], [split], prefix)
    n_old = prefix + split
    g = torch.Generator().manual_seed(split)
    # a different subset per (sample, head), ragged: the shorter rows padded with slot 0 like compact_index
    kept = [
        [sorted(torch.randperm(n_old, generator=g)[: n_old // 2 + 3 * (b + h)].tolist()) for h in range(2)]
        for b in range(2)
    ]
    width = max(len(k) for per_b in kept for k in per_b)
    index = torch.tensor([[k + [0] * (width - len(k)) for k in per_b] for per_b in kept])
    st.select(index)
    assert st.window.shape == (2, 2, N_FFT, width) and st.ema.shape == (2, 2, width, 17)
    # continue with the remaining rows restricted to the kept columns, then the keys that arrive later
    full_index = torch.cat([index, torch.arange(n_old, prefix + n_rows).expand(2, 2, -1)], dim=-1)
    rest = rows[..., split:, :].gather(-1, full_index[:, :, None, :].expand(-1, -1, n_rows - split, -1))
    for start in range(0, n_rows - split, 7):
        end = min(start + 7, n_rows - split)
        st.observe(rest[..., start:end, : width + split + end])
    expected = batch_spectrogram_ema(rows, N_FFT, HOP, DECAY).gather(
        2, full_index[..., None].expand(-1, -1, -1, 17)
    )
    torch.testing.assert_close(st.ema, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [1, 7, 16, 31, 32, 33, 100])
def test_window_never_exceeds_n_fft_rows(size):
    st = StreamingSpectrogram()
    for step in range(3):
        st.observe(torch.rand(2, 2, size, 5 + step))
        assert st.window.shape == (2, 2, N_FFT, 5 + step)
    # n_fft rows and the spectrum per key slot, for 7 slots plus their spare room
    per_slot = (2 * 2 * N_FFT + 2 * 2 * 17) * 4
    assert 7 * per_slot <= st.nbytes() <= (7 + max_spare(7)) * per_slot


def test_window_holds_last_rows_zero_padded():
    st = StreamingSpectrogram()
    rows = torch.rand(1, 1, 10, 4)
    st.observe(rows)
    assert torch.all(st.window[..., :22, :] == 0)
    torch.testing.assert_close(st.window[..., 22:, :], rows)


def test_invalid_sizes_rejected():
    with pytest.raises(ValueError, match="n_fft"):
        StreamingSpectrogram(n_fft=31)
    with pytest.raises(ValueError, match="hop"):
        StreamingSpectrogram(n_fft=32, hop=33)


def test_age_embedding_formula():
    age = torch.tensor([[0, 1, 5], [17, 300, 4095]])
    got = age_embedding(age)
    assert got.shape == (2, 3, 8)
    manual = torch.empty(2, 3, 8, dtype=torch.float64)
    for idx in np.ndindex(2, 3):
        a = float(age[idx])
        for i in range(4):
            manual[idx][i] = math.sin(a / 50_000 ** (2 * i / 8))
            manual[idx][4 + i] = math.cos(a / 50_000 ** (2 * i / 8))
    torch.testing.assert_close(got.double(), manual, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.double(), age_embedding_ref(age), atol=1e-5, rtol=0)
    zero = age_embedding(torch.zeros(3, dtype=torch.long))
    assert torch.all(zero[:, :4] == 0) and torch.all(zero[:, 4:] == 1)


def test_age_embedding_odd_dim_rejected():
    with pytest.raises(ValueError, match="even"):
        age_embedding(torch.zeros(2), dim=7)


def test_window_does_not_pin_the_chunk_rows():
    """The persistent window must own its 32 rows, not view a larger chunk buffer."""
    stream = StreamingSpectrogram()
    stream.observe(torch.rand(1, 2, 200, 210))
    assert stream.window.shape[-2] == 32
    assert stream.window.untyped_storage().nbytes() == stream.window.numel() * 4


@pytest.mark.parametrize("batch", [1, 3])
def test_shallow_copy_never_writes_the_original_state(batch):
    """A forked state (a shallow copy whose buffers are shared, or expanded to a larger batch, as the
    shared prefill forks them) copies a buffer before its first in-place write; both then continue
    exactly as a state fed the same rows from the start."""
    rows = causal_rows(n_rows=96, prefix=4, seed=5)[:1]
    original = stream(rows[..., :48, :52], [48], 4)
    before = (original.window.clone(), original.ema.clone())
    fork = copy.copy(original)
    if batch > 1:
        fork._ring = fork._ring.expand(batch, *fork._ring.shape[1:])
        fork._spec = fork._spec.expand(batch, *fork._spec.shape[1:])
        fork.rows_seen = fork.rows_seen.expand(batch).clone()
    more = rows[..., 48:, :].expand(batch, -1, -1, -1)
    for start in range(0, 48, 3):  # chunks shorter than n_fft: the ring's in-place path
        fork.observe(more[..., start : start + 3, : 55 + start])
    torch.testing.assert_close(original.window, before[0], atol=0, rtol=0)
    torch.testing.assert_close(original.ema, before[1], atol=0, rtol=0)
    expected = batch_spectrogram_ema(rows, N_FFT, HOP, DECAY).expand(batch, -1, -1, -1)
    torch.testing.assert_close(fork.ema, expected, atol=1e-5, rtol=0)


def test_magnitude_root_keeps_zero_exact_and_moves_nothing_else_by_more_than_1e_15():
    """The fast-path square root (features.POWER_FLOOR): 0 and subnormal powers give exactly 0, every other
    power its float32 square root to within 1e-15 (plus one rounding)."""
    from namm_transfer.features import _root_

    power = torch.tensor([0.0, 1e-44, 1e-39, 1e-30, 1e-20, 1e-8, 0.25, 7.0])
    root = _root_(power.clone())
    assert root[:3].eq(0).all()
    torch.testing.assert_close(root, power.sqrt(), atol=1e-15, rtol=2**-23)
    assert not torch.equal(root[3], power[3].sqrt())  # the floor is really there
