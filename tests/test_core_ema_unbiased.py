"""``NAMMConfig.ema_unbiased``: each token's spectrogram EMA over the weight of its frames so far."""

from __future__ import annotations

import pytest
import torch

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.features import StreamingSpectrogram
from namm_transfer.policies.base import CacheView

N_FFT, HOP = 32, 16


def causal_rows(n: int, value: float = 0.01) -> torch.Tensor:
    """``[1, 1, n, n]`` attention rows in which every query pays ``value`` to every key it can see."""
    return torch.tril(torch.full((n, n), value))[None, None]


def view_of(n: int) -> CacheView:
    positions = torch.arange(n)[None, None]
    return CacheView(0, positions, torch.ones(1, 1, n, dtype=torch.bool))


@pytest.mark.parametrize("rows_seen", [16, 37, 160, 203])
@pytest.mark.parametrize("decay", [0.99, 0.9999])
def test_emitted_weight_is_the_ema_weight_of_the_frames_since_arrival(rows_seen, decay):
    state = StreamingSpectrogram(N_FFT, HOP, decay)
    state.observe(causal_rows(rows_seen), causal=True)
    age = torch.arange(rows_seen)[None, None]  # every token, newest (age 0) to the first
    got = state.emitted_weight(age)[0, 0]
    fd = decay**HOP
    emitted = range(HOP, rows_seen + 1, HOP)  # a frame at each multiple of hop
    for a in range(rows_seen):
        arrival = rows_seen - 1 - a
        k = sum(r - 1 >= arrival for r in emitted)  # frames whose rows include the token's
        expected = sum((1 - fd) * fd**i for i in range(max(k, 1)))  # newest frame weighs (1 - fd)
        assert got[a].item() == pytest.approx(expected, rel=1e-5), (a, k)


def test_unbiased_features_are_the_ema_divided_by_that_weight():
    n = 150
    biased, unbiased = NAMM(NAMMConfig(ema_decay=0.999)), NAMM(NAMMConfig(ema_decay=0.999, ema_unbiased=True))
    state = StreamingSpectrogram(N_FFT, HOP, 0.999)
    state.observe(causal_rows(n), causal=True)
    view = view_of(n)
    age_dim = biased.config.age_dim
    plain = biased.features(state, view)[..., age_dim:]
    mean = unbiased.features(state, view)[..., age_dim:]
    torch.testing.assert_close(mean, plain / state.emitted_weight(view.age)[..., None])
    # the age embedding is untouched
    ages = [namm.features(state, view)[..., :age_dim] for namm in (unbiased, biased)]
    torch.testing.assert_close(*ages)


def test_an_old_and_a_new_token_read_alike_get_alike_features():
    """Every query pays every key it sees the same attention. The EMA sums it, so the first token
    (10 frames) outweighs one that arrived 64 rows later (6 frames) by ~1.7x; the mean does not."""
    n, late = 160, 64
    state = StreamingSpectrogram(N_FFT, HOP, 0.9999)
    state.observe(causal_rows(n), causal=True)
    view = view_of(n)
    for unbiased, lo, hi in ((False, 1.5, 2.0), (True, 0.97, 1.05)):
        namm = NAMM(NAMMConfig(ema_decay=0.9999, ema_unbiased=unbiased))
        bin0 = namm.features(state, view)[0, 0, :, namm.config.age_dim]
        assert lo < (bin0[0] / bin0[late]).item() < hi, unbiased


def test_off_by_default_and_kept_by_save_and_load(tmp_path):
    assert NAMMConfig().ema_unbiased is False  # the reference's features
    namm = NAMM(NAMMConfig(scorer="linear", ema_unbiased=True))
    namm.save_pretrained(tmp_path / "namm")
    assert NAMM.from_pretrained(tmp_path / "namm").config.ema_unbiased is True


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.5])
def test_an_ema_decay_outside_0_1_is_refused(decay):
    # 1 would weight every frame by 1 - decay ** hop = 0: all-zero features, not a never-forgetting sum
    with pytest.raises(ValueError, match="ema_decay must be in \\(0, 1\\)"):
        NAMMConfig(ema_decay=decay)
