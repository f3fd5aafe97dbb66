"""BAM and MLP token scorers against an independent re-implementation (docs/design.md, "The NAMM")."""

from __future__ import annotations

import pytest
import torch
from _reference_bam import bam_scores

from namm_transfer import native
from namm_transfer.scorers import ScorerShapes, keep_all_params, score_tokens, unflatten

BAM = ScorerShapes()
MLP = ScorerShapes(kind="mlp")
LINEAR = ScorerShapes(kind="linear")


def make_inputs(batch=2, heads=2, slots=7, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, slots, 25, generator=g)
    valid = torch.rand(batch, heads, slots, generator=g) > 0.25
    valid[..., 0] = True
    if shuffle:  # slots need not be in arrival order after compaction + appends
        positions = torch.stack(
            [torch.randperm(slots * 3, generator=g)[:slots] for _ in range(batch * heads)]
        )
        positions = positions.reshape(batch, heads, slots)
    else:
        positions = torch.arange(slots).expand(batch, heads, slots).clone()
    return x, valid, positions


def random_params(shapes=BAM, n=1, seed=1, scale=0.3):
    return torch.randn(n, shapes.n_params, generator=torch.Generator().manual_seed(seed)) * scale


def test_bam_parameter_count_and_layout():
    assert BAM.n_params == 4172
    assert BAM.layout() == [
        ("qkv_weight", (25, 96)),
        ("qkv_bias", (96,)),
        ("out_weight", (32, 50)),
        ("out_bias", (50,)),
        ("final_weight", (25, 1)),
        ("final_bias", (1,)),
    ]
    flat = torch.arange(4172.0)
    parts = unflatten(flat, BAM)
    assert parts["qkv_weight"].shape == (1, 25, 96)
    assert parts["qkv_weight"][0, 0, 1] == 1 and parts["qkv_weight"][0, 1, 0] == 96  # in x out, row-major
    assert parts["qkv_bias"][0, 0] == 2400 and parts["out_weight"][0, 0, 0] == 2496
    assert parts["out_bias"][0, 0] == 4096 and parts["final_weight"][0, 0, 0] == 4146
    assert parts["final_bias"][0, 0] == 4171


def test_mlp_parameter_count():
    assert MLP.n_params == 25 * 32 + 32 + 32 * 50 + 50 + 25 + 1


@pytest.mark.parametrize("case", ["ordered_all_valid", "ordered_some_invalid", "shuffled_some_invalid"])
def test_bam_matches_independent_reference(case):
    x, valid, positions = make_inputs(shuffle=case.startswith("shuffled"))
    if case == "ordered_all_valid":  # the fused causal-kernel path of score_tokens
        valid[:] = True
    params = random_params()
    got = score_tokens(params, x, valid, positions, BAM)
    expected = bam_scores(params[0], x, valid, positions)
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_sample_params", [False, True])
def test_right_aligned_path_equals_the_masked_path(monkeypatch, per_sample_params):
    """Slots in arrival order with holes (heads keeping different counts, left padding) take the fused
    causal kernel over each row's valid slots gathered to its right end; the scores equal the general
    masked attention's, and invalid slots score -inf."""
    import namm_transfer.scorers as scorers

    x, valid, positions = make_inputs(batch=3, heads=2, slots=11, seed=21, shuffle=False)
    valid[0, 0, 5:] = False  # a head holding fewer slots
    valid[1, :, :4] = False  # left padding
    params = random_params(n=3 if per_sample_params else 1, seed=22)
    fused = score_tokens(params, x, valid, positions, BAM)
    monkeypatch.setattr(scorers, "_valid_in_order", lambda *a: False)
    masked = score_tokens(params, x, valid, positions, BAM)
    torch.testing.assert_close(fused[valid], masked[valid], atol=1e-5, rtol=1e-5)
    assert bool((fused[~valid] == float("-inf")).all())


def test_bam_scores_follow_a_permutation_of_slots():
    """Only positions matter, not slot order (ordered and shuffled slots take different code paths)."""
    x, valid, positions = make_inputs(batch=2, heads=2, slots=9, seed=13, shuffle=False)
    valid[:] = True
    params = random_params(seed=14)
    with native.use(False):  # both through SDPA (the compiled kernel takes only the ordered slots)
        ordered = score_tokens(params, x, valid, positions, BAM)
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(15))
        shuffled = score_tokens(params, x[..., perm, :], valid[..., perm], positions[..., perm], BAM)
    torch.testing.assert_close(shuffled, ordered[..., perm], atol=1e-6, rtol=1e-6)


def test_bam_is_counter_causal():
    x, valid, positions = make_inputs(batch=1, heads=1, slots=8, shuffle=False)
    valid[:] = True
    params = random_params(seed=2, scale=0.1)
    base = score_tokens(params, x, valid, positions, BAM)
    for t in range(8):
        x2 = x.clone()
        x2[..., t, :] += torch.randn(25, generator=torch.Generator().manual_seed(t))
        new = score_tokens(params, x2, valid, positions, BAM)
        changed = (new - base).abs()[0, 0] > 1e-6
        # newer tokens (position > t) never see an older token; older ones (and t itself) do see it
        assert not changed[t + 1 :].any(), (t, changed)
        assert changed[: t + 1].all(), (t, changed)


def test_bam_counter_causal_uses_positions_not_slots():
    x, valid, _ = make_inputs(batch=1, heads=1, slots=6)
    valid[:] = True
    positions = torch.tensor([[[10, 3, 7, 0, 12, 5]]])
    params = random_params(seed=3, scale=0.5)
    base = score_tokens(params, x, valid, positions, BAM)
    x2 = x.clone()
    x2[..., 2, :] += 1.0  # position 7: changes positions <= 7 (slots 1, 2, 3, 5), not 10 or 12
    changed = ((score_tokens(params, x2, valid, positions, BAM) - base).abs() > 1e-6)[0, 0]
    assert changed.tolist() == [False, True, True, True, False, True]


def test_invalid_slots_never_influence_valid_scores():
    x, valid, positions = make_inputs(slots=9, seed=4)
    params = random_params(seed=5)
    base = score_tokens(params, x, valid, positions, BAM)
    x2 = x.clone()
    x2[~valid] = torch.randn(int((~valid).sum()), 25) * 100
    new = score_tokens(params, x2, valid, positions, BAM)
    torch.testing.assert_close(new[valid], base[valid], atol=0, rtol=0)
    assert torch.isfinite(base[valid]).all()


def test_nonfinite_invalid_slots_never_poison_valid_scores():
    """Garbage (NaN/inf) features in empty or padding slots must not leak through 0-weight attention."""
    x, valid, positions = make_inputs(slots=9, seed=4)
    params = random_params(seed=5)
    base = score_tokens(params, x, valid, positions, BAM)
    for bad in (float("nan"), float("inf")):
        x2 = x.clone()
        x2[~valid] = bad
        new = score_tokens(params, x2, valid, positions, BAM)
        torch.testing.assert_close(new[valid], base[valid], atol=0, rtol=0)


def test_population_equals_each_sample_alone():
    batch = 3
    x, valid, positions = make_inputs(batch=batch, seed=6)
    for shapes in (BAM, MLP):
        params = random_params(shapes, n=batch, seed=7)
        together = score_tokens(params, x, valid, positions, shapes)
        for b in range(batch):
            alone = score_tokens(params[b], x[b : b + 1], valid[b : b + 1], positions[b : b + 1], shapes)
            # one vector takes the folded read-out, a population the plain one: same up to rounding
            torch.testing.assert_close(together[b : b + 1], alone, atol=1e-5, rtol=1e-5)
    params = random_params(n=batch, seed=7)
    expected = bam_scores(params, x, valid, positions)
    torch.testing.assert_close(
        score_tokens(params, x, valid, positions, BAM)[valid].double(), expected[valid], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("shapes", [BAM, MLP], ids=["bam", "mlp"])
@pytest.mark.parametrize("case", ["ordered_all_valid", "ordered_some_invalid", "shuffled_some_invalid"])
def test_folded_readout_equals_the_plain_one(monkeypatch, shapes, case):
    """One parameter vector without gradient folds the output projection into the final one
    (``_folded_readout``); with gradient the plain read-out runs: the scores agree to float rounding."""
    import namm_transfer.scorers as scorers

    calls = []
    original = scorers._folded_readout
    monkeypatch.setattr(scorers, "_folded_readout", lambda *a: calls.append(1) or original(*a))
    shuffle = case.startswith("shuffled")
    x, valid, positions = make_inputs(batch=3, heads=2, slots=40, seed=31, shuffle=shuffle)
    if case == "ordered_all_valid":
        valid[:] = True
    params = random_params(shapes, seed=32)
    folded = score_tokens(params, x, valid, positions, shapes)
    assert len(calls) == 1
    plain = score_tokens(params.clone().requires_grad_(), x, valid, positions, shapes).detach()
    assert len(calls) == 1  # the plain read-out ran
    assert torch.isfinite(folded[valid]).all()
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)  # empty slots too (-inf or not)


@pytest.mark.parametrize("shapes", [BAM, MLP, LINEAR], ids=["bam", "mlp", "linear"])
def test_keep_all_params_give_bias(shapes):
    x, valid, positions = make_inputs(seed=8)
    params = keep_all_params(shapes, bias=0.75)
    assert params.shape == (shapes.n_params,) and params[:-1].abs().sum() == 0
    scores = score_tokens(params, x, valid, positions, shapes)
    assert torch.all(scores == 0.75)


def test_mlp_scores_tokens_independently():
    x, valid, positions = make_inputs(batch=1, heads=1, slots=6, seed=9)
    params = random_params(MLP, seed=10, scale=0.5)
    base = score_tokens(params, x, valid, positions, MLP)
    for t in range(6):
        x2 = x.clone()
        x2[..., t, :] += 1.0
        changed = ((score_tokens(params, x2, valid, positions, MLP) - base).abs() > 1e-6)[0, 0]
        assert changed.tolist() == [i == t for i in range(6)]


def test_mlp_matches_manual_formula():
    x, valid, positions = make_inputs(batch=1, heads=1, slots=4, seed=11)
    flat = random_params(MLP, seed=12)[0].double()
    sizes = [25 * 32, 32, 32 * 50, 50, 25, 1]
    pw, pb, ow, ob, fw, fb = torch.split(flat, sizes)
    xd = x[0, 0].double()
    out = torch.relu(xd @ pw.reshape(25, 32) + pb) @ ow.reshape(32, 50) + ob
    expected = (xd * (1 + out[:, 25:]) + out[:, :25]) @ fw + fb
    got = score_tokens(flat.float(), x, valid, positions, MLP)[0, 0]
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_linear_scores_are_features_times_weights_plus_bias():
    """kind="linear": in_dim weights and a bias; each token's score reads its own features only, and one
    parameter vector per sample scores its own sample."""
    assert LINEAR.n_params == 26 and LINEAR.layout() == [("final_weight", (25, 1)), ("final_bias", (1,))]
    x, valid, positions = make_inputs(batch=2, heads=3, slots=5, seed=13)
    params = random_params(LINEAR, n=2, seed=14)
    got = score_tokens(params, x, valid, positions, LINEAR)
    expected = torch.einsum("bhsd,bd->bhs", x.double(), params[:, :25].double()) + params[:, 25, None, None]
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-5, rtol=1e-5)
    shared = score_tokens(params[:1], x, valid, positions, LINEAR)
    torch.testing.assert_close(shared[0], got[0])


@pytest.mark.parametrize("shapes", [BAM, MLP, LINEAR], ids=["bam", "mlp", "linear"])
def test_wrong_parameter_count_raises(shapes):
    x, valid, positions = make_inputs()
    with pytest.raises(ValueError, match=f"needs {shapes.n_params} parameters, got a vector of 4000"):
        score_tokens(torch.zeros(4000), x, valid, positions, shapes)
    with pytest.raises(ValueError, match=str(shapes.n_params)):
        unflatten(torch.zeros(2, shapes.n_params + 1), shapes)


def test_unknown_kind_raises():
    shapes = ScorerShapes(kind="transformer")
    x, valid, positions = make_inputs()
    with pytest.raises(ValueError, match="unknown scorer kind 'transformer'"):
        score_tokens(torch.zeros(shapes.n_params), x, valid, positions, shapes)


@pytest.mark.parametrize("shapes", [BAM, MLP], ids=["bam", "mlp"])
@pytest.mark.parametrize("ordered", [True, False], ids=["fused-causal", "masked"])
def test_in_place_path_equals_autograd_path(shapes, ordered):
    """Without gradients the output product is finished in place, its bias folded into the in-place steps
    and the final bias; with them out of place: the same scores up to float32 rounding of the reordered
    sums, and the in-place path never writes into the caller's features."""
    x, valid, positions = make_inputs(shuffle=not ordered, slots=9, seed=4)
    if ordered:
        valid[:] = True
    params = random_params(shapes, n=2, seed=5)
    before = x.clone()
    with torch.no_grad(), native.use(False):  # the PyTorch paths (tests/test_core_native.py: the kernel)
        fast = score_tokens(params, x, valid, positions, shapes)
    tracked = score_tokens(params.clone().requires_grad_(True), x, valid, positions, shapes)
    torch.testing.assert_close(fast, tracked.detach(), atol=1e-6, rtol=1e-6)
    assert torch.equal(x, before)
