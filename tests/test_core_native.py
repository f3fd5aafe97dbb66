"""The compiled kernels (namm_transfer/native) give the PyTorch path's features and BAM scores, and their
absence falls back cleanly (docs/design.md, "Compiled kernels")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_core_features import causal_rows, numpy_spectrogram_ema

from namm_transfer import native
from namm_transfer.features import POWER_FLOOR, StreamingSpectrogram
from namm_transfer.scorers import ScorerShapes, score_tokens

needs_kernel = pytest.mark.skipif(
    native.library() is None, reason=f"native kernels unavailable: {native.failure()}"
)


def count_calls(mp: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap ``native.<name>`` to count its calls; the count is the returned list's one element."""
    calls, original = [0], getattr(native, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    mp.setattr(native, name, counted)
    return calls


def run(rows: torch.Tensor, chunks: list[int], prefix: int, on: bool, n_fft=32, hop=16, causal=False,
        strided=False) -> tuple[torch.Tensor, int]:
    """The spectrum after feeding ``rows`` chunk by chunk, with the kernel ``on`` or off, and how many
    times the kernel ran."""
    st = StreamingSpectrogram(n_fft, hop, 0.99)
    start = 0
    with native.use(on), pytest.MonkeyPatch.context() as mp:
        calls = count_calls(mp, "spectrogram_ema")
        for size in chunks:
            end = start + size
            part = rows[..., start:end, : prefix + end]
            if strided:  # a non-contiguous chunk takes the path that joins window and chunk
                part = part.transpose(-1, -2).contiguous().transpose(-1, -2)
            st.observe(part, None, causal=causal)
            start = end
    return st.spectrum.clone(), calls[0]


@needs_kernel
@pytest.mark.parametrize(
    ("chunks", "prefix", "causal", "strided"),
    [
        ([64], 5, False, False),  # one chunk, 69 keys (a partial 16-key block)
        ([16, 48, 33, 31], 5, False, False),  # frames reaching back into the window
        ([128, 128], 0, True, False),  # causal chunks: frames before a key arrived are skipped
        ([7, 64, 57], 3, False, True),  # window joined to a non-contiguous chunk
        ([1] * 40 + [3] * 8, 2, False, False),  # decoding / rollout steps: the ring path
    ],
)
def test_kernel_equals_pytorch_path(chunks, prefix, causal, strided):
    rows = causal_rows(batch=2, heads=3, n_rows=sum(chunks), prefix=prefix, seed=1)
    plain, plain_calls = run(rows, chunks, prefix, on=False, causal=causal, strided=strided)
    fused, fused_calls = run(rows, chunks, prefix, on=True, causal=causal, strided=strided)
    assert plain_calls == 0 and fused_calls > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-8)


@needs_kernel
@pytest.mark.parametrize(("n_fft", "hop"), [(16, 8), (64, 16), (32, 32), (8, 2)])
def test_kernel_other_windows(n_fft, hop):
    rows = causal_rows(batch=1, heads=2, n_rows=128, prefix=20, seed=2)
    plain, _ = run(rows, [40, 88], 20, on=False, n_fft=n_fft, hop=hop)
    fused, calls = run(rows, [40, 88], 20, on=True, n_fft=n_fft, hop=hop)
    assert calls > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-8)


@needs_kernel
def test_kernel_equals_independent_reference():
    """The whole series at once, against a float64 numpy STFT (zero-padded start, as the reference)."""
    rows = causal_rows(batch=1, heads=2, n_rows=96, prefix=0, seed=3)
    fused, calls = run(rows, [96], 0, on=True)
    assert calls == 1
    expected = numpy_spectrogram_ema(rows.numpy())  # [B, H, S, bins]
    np.testing.assert_allclose(fused.transpose(-1, -2).numpy(), expected, rtol=2e-5, atol=1e-8)


@needs_kernel
@pytest.mark.parametrize("dim", [1, 8, 24, 25, 32])
def test_bam_kernel_shapes(dim):
    """Every remainder of the kernel's blocking: 3 queries, 16 keys, 48-query and 128-key blocks, value
    dims in registers (24) and past them."""
    g = torch.Generator().manual_seed(dim)
    for slots in (1, 2, 3, 4, 15, 16, 17, 47, 48, 49, 127, 128, 129, 200):
        query, x = torch.randn(2, slots, dim, generator=g), torch.randn(2, slots, dim, generator=g)
        logits = (query.double() @ x.double().transpose(-1, -2)) * np.log(2.0)
        later = torch.ones(slots, slots, dtype=torch.bool).triu()
        expected = torch.softmax(logits.masked_fill(~later, float("-inf")), -1) @ x.double()
        torch.testing.assert_close(native.bam_attention(query, x).double(), expected, rtol=1e-5, atol=2e-6)


@needs_kernel
def test_kernels_give_the_same_values_on_several_threads():
    """Blocks of keys (features) and sequences (BAM) spread over torch's threads: each is computed as
    on one thread, so the results are identical."""
    g = torch.Generator().manual_seed(9)
    rows = torch.rand(2, 3, 96, 150, generator=g)
    query, x = torch.randn(6, 120, 25, generator=g), torch.randn(6, 120, 25, generator=g)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            state = StreamingSpectrogram()
            state.observe(rows)
            out.append((state.spectrum.clone(), native.bam_attention(query, x)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


@needs_kernel
def test_kernel_checks_its_bounds():
    chunk = torch.rand(1, 1, 40, 20)
    weights = torch.ones(2)
    with pytest.raises(ValueError, match="before the chunk"):
        native.spectrogram_ema(chunk, None, -16, 16, 32, weights, None, POWER_FLOOR, 0.0)
    with pytest.raises(ValueError, match="past the chunk"):
        native.spectrogram_ema(chunk, None, 0, 16, 32, torch.ones(3), None, POWER_FLOOR, 0.0)


def bam_inputs(batch=2, heads=3, slots=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, slots, 25, generator=g)
    positions = torch.arange(slots).expand(batch, heads, slots).contiguous()
    return x, torch.ones(batch, heads, slots, dtype=torch.bool), positions


def bam_params(n=1, seed=1, sigma=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ScorerShapes().n_params, generator=g) * sigma


@needs_kernel
@pytest.mark.parametrize("population", [False, True])
@pytest.mark.parametrize("slots", [1, 7, 70, 301])
def test_bam_kernel_equals_sdpa_path(population, slots):
    """All slots valid and in arrival order (the fused path), one shared vector or one per sample."""
    x, valid, positions = bam_inputs(slots=slots)
    params = bam_params(n=2 if population else 1)
    with native.use(False):
        plain = score_tokens(params, x, valid, positions, ScorerShapes())
    with pytest.MonkeyPatch.context() as mp:
        calls = count_calls(mp, "bam_attention")
        fused = score_tokens(params, x, valid, positions, ScorerShapes())
    assert calls[0] == 1
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=2e-5)


@needs_kernel
def test_bam_kernel_with_heads_of_different_counts():
    """Invalid slots (a threshold left heads uneven): the gathered rows go through the kernel too, and
    invalid slots still score -inf."""
    x, valid, positions = bam_inputs(slots=40, seed=2)
    valid[0, 1, :13] = False
    valid[1, 2, 5:9] = False
    params = bam_params(seed=3)
    with native.use(False):
        plain = score_tokens(params, x, valid, positions, ScorerShapes())
    fused = score_tokens(params, x, valid, positions, ScorerShapes())
    assert torch.isinf(fused[~valid]).all()
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=2e-5)


@needs_kernel
def test_bam_kernel_matches_float64_attention():
    """The kernel alone against an explicit float64 softmax (each slot: itself and the later ones)."""
    g = torch.Generator().manual_seed(5)
    query, x = torch.randn(3, 150, 25, generator=g), torch.randn(3, 150, 25, generator=g)
    out = native.bam_attention(query, x)
    logits = (query.double() @ x.double().transpose(-1, -2)) * np.log(2.0)
    later = torch.ones(150, 150, dtype=torch.bool).triu()
    expected = torch.softmax(logits.masked_fill(~later, float("-inf")), -1) @ x.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-6)


def test_switched_off_or_unsupported_tensors_use_pytorch(monkeypatch):
    rows = torch.rand(1, 1, 32, 8)
    with native.use(False):
        assert not native.applicable(rows, n_fft=32)
        assert native.describe().startswith("off")
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert not native.enabled() and not native.bam_applicable(torch.rand(1, 5, 25))
    with native.use(True):  # the explicit switch wins over the environment
        assert native.enabled()
    assert not native.applicable(rows.double(), n_fft=32)
    assert not native.applicable(rows.transpose(-1, -2), n_fft=32)  # key axis not contiguous
    assert not native.applicable(rows, n_fft=128)
    assert not native.bam_applicable(torch.rand(1, 5, 33))  # wider than the kernel's registers
    assert not native.bam_applicable(torch.rand(1, 5, 25, requires_grad=True))


def test_missing_compiler_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_cpu_supported", lambda: None)
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.warns(RuntimeWarning, match="native kernels are unavailable"):
        assert native.library() is None
    assert "no-such-cc" in native.failure()
    assert native.describe().startswith("unavailable (") and "no-such-cc" in native.describe()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    rows = causal_rows(batch=1, heads=1, n_rows=64, prefix=0, seed=4)
    spectrum, calls = run(rows, [64], 0, on=True)  # falls back: the kernel never runs
    assert calls == 0
    expected = numpy_spectrogram_ema(rows.numpy())
    np.testing.assert_allclose(spectrum.transpose(-1, -2).numpy(), expected, rtol=2e-5, atol=1e-8)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "a"))
    assert native.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NAMM_TRANSFER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert native.cache_dir() == tmp_path / "x" / "namm-transfer"
