"""NAMM construction, our checkpoint format, Hub failures and reference-checkpoint import."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _reference_bam import age_embedding_ref, bam_scores

import namm_transfer
from namm_transfer import NAMM, LayerMemory, NAMMConfig, import_reference_checkpoint
from namm_transfer.features import StreamingSpectrogram
from namm_transfer.policies.base import CacheView
from namm_transfer.scorers import score_tokens


def run_memory(policy, chunks, batch=2, heads=2, seed=0, layer_idx=0):
    """Drive one LayerMemory like an adapter; return the eviction indices and the memory."""
    mem = LayerMemory(policy, layer_idx)
    g = torch.Generator().manual_seed(seed)
    indices = []
    for n_new in chunks:
        mem.append(batch, heads, n_new, torch.device("cpu"))
        mask = mem.attention_mask(n_new)
        logits = torch.randn(mask.shape, generator=g) * 3
        mem.observe(torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1))
        indices.append(mem.maybe_evict())
    return indices, mem


def test_default_namm_keeps_everything():
    namm = NAMM()
    assert namm.config == NAMMConfig() and namm.update_every == 512
    assert namm.params.shape == (1, 4172) and namm.params[0, -1] == 1 and namm.params[0, :-1].abs().sum() == 0
    indices, mem = run_memory(namm, [128] * 5)  # the reference's prompt chunking, crossing 512
    assert mem.stats.updates == 1
    assert indices == [None] * 5
    assert mem.valid.all() and mem.n_slots == 640 and mem.stats.evictions == 0
    assert mem.positions[0, 0].tolist() == list(range(640))


def test_default_namm_keeps_everything_at_short_cadence():
    namm = NAMM(NAMMConfig(update_every=16))
    indices, mem = run_memory(namm, [7, 9, 16, 20, 1])
    assert mem.stats.updates == 3
    assert indices == [None] * 5 and mem.valid.all() and mem.n_slots == 53


def trained_like(tmp_seed=0, **config):
    config = NAMMConfig(update_every=16, **config)
    namm = NAMM.init_random(seed=tmp_seed, sigma=0.3, config=config)
    g = torch.Generator().manual_seed(tmp_seed + 1)
    namm.norm_mean = torch.rand(17, generator=g) * 0.01
    namm.norm_var = torch.rand(17, generator=g) * 1e-4 + 1e-5
    return namm


@pytest.mark.parametrize("config", [{}, {"budget": [6, 9]}, {"scorer": "mlp", "threshold": 0.1},
                                    {"scorer": "linear", "budget": 7, "recent_tokens": 3}])
def test_save_load_roundtrip(tmp_path, config):
    namm = trained_like(**config)
    path = namm.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]  # no temporary files left
    assert json.loads((path / "config.json").read_text())["format"] == "namm-transfer/1"
    loaded = NAMM.from_pretrained(path)
    assert loaded.config == namm.config
    assert torch.equal(loaded.params, namm.params)
    assert torch.equal(loaded.norm_mean, namm.norm_mean) and torch.equal(loaded.norm_var, namm.norm_var)
    chunks = [10, 10, 12, 16, 30, 3]
    for layer in (0, 1):
        ours, mem_a = run_memory(namm, chunks, seed=3, layer_idx=layer)
        theirs, mem_b = run_memory(loaded, chunks, seed=3, layer_idx=layer)
        assert mem_a.stats.evictions > 0  # the comparison below is not vacuous
        for a, b in zip(ours, theirs, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(mem_a.valid, mem_b.valid) and torch.equal(mem_a.positions, mem_b.positions)


def test_save_load_without_statistics(tmp_path):
    namm = NAMM(NAMMConfig(update_every=32, budget=4))
    loaded = NAMM.from_pretrained(namm.save_pretrained(tmp_path))
    assert loaded.norm_mean is None and loaded.norm_var is None and loaded.config.budget == 4


def test_from_pretrained_missing_local_dir(tmp_path):
    missing = tmp_path / "no_such_namm"
    with pytest.raises(FileNotFoundError, match="no_such_namm"):
        NAMM.from_pretrained(missing)


def test_from_pretrained_unknown_hub_id_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(FileNotFoundError, match="'nobody-here/namm-does-not-exist'"):
        NAMM.from_pretrained("nobody-here/namm-does-not-exist")


def test_from_pretrained_incomplete_or_foreign_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        NAMM.from_pretrained(tmp_path)
    NAMM().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["format"] = "something-else"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="expected 'namm-transfer/1'"):
        NAMM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        NAMM.from_pretrained(tmp_path / "config.json")


def write_reference(path, mean, mean_stats=None, var_stats=None, **extra):
    state = {"evolution_state": {"mean": mean, "sigma": 0.065}, "iter_num": 3, **extra}
    if mean_stats is not None:
        state["stored_buffers_to_save"] = {
            "token_embedding_0_output_mean": mean_stats,
            "token_embedding_0_output_var": var_stats,
        }
    torch.save(state, path)
    return path


def test_reference_checkpoint_scores_match_independent_bam(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 0.25, 4172)
    stats = torch.Generator().manual_seed(0)  # not the global generator: other tests move it
    stat_mean = torch.rand(1, 1, 1, 17, generator=stats) * 0.02
    stat_var = torch.rand(1, 1, 1, 17, generator=stats) * 1e-3 + 1e-4
    path = write_reference(tmp_path / "ref.pt", mean, stat_mean, stat_var)
    namm = namm_transfer.import_reference_checkpoint(path)
    assert torch.equal(namm.params[0], torch.as_tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(namm.norm_mean, stat_mean.reshape(-1), atol=0, rtol=0)

    batch, heads, n_slots = 2, 2, 10
    g = torch.Generator().manual_seed(1)
    spectral = torch.rand(batch, heads, n_slots, 17, generator=g) * 0.05
    positions = torch.stack([torch.randperm(20, generator=g)[:n_slots] for _ in range(batch * heads)])
    positions = positions.reshape(batch, heads, n_slots)
    valid = torch.rand(batch, heads, n_slots, generator=g) > 0.2
    state = StreamingSpectrogram()
    state.ema = spectral.clone()
    view = CacheView(0, positions, valid)

    newest = positions.masked_fill(~valid, -1).amax(dim=(1, 2))  # newest valid token of each sample
    age = (newest[:, None, None] - positions).clamp(min=0)
    normed = (spectral.double() - stat_mean.reshape(-1).double()) / stat_var.reshape(-1).double().sqrt()
    ref_features = torch.cat([age_embedding_ref(age), normed], dim=-1)
    feats = namm.features(state, view)
    torch.testing.assert_close(feats[valid].double(), ref_features[valid], atol=1e-4, rtol=1e-5)

    expected = bam_scores(torch.as_tensor(mean), ref_features, valid, positions)
    got = score_tokens(namm.params, feats, valid, positions, namm.config.shapes)
    torch.testing.assert_close(got[valid].double(), expected[valid], atol=1e-4, rtol=1e-4)

    keep = namm.keep(state, view)
    is_newest = valid & (positions == positions.masked_fill(~valid, -1).amax(-1, keepdim=True))
    assert torch.equal(keep, valid & ((expected >= 0) | is_newest))
    assert 0 < int(keep.sum()) < int(valid.sum())  # both decisions occur


def test_reference_checkpoint_without_statistics(tmp_path):
    path = write_reference(tmp_path / "ref.pt", [0.0] * 4171 + [2.0])
    namm = import_reference_checkpoint(path)
    assert namm.norm_mean is None and namm.norm_var is None and namm.params[0, -1] == 2


def test_reference_checkpoint_bad_mean_size(tmp_path):
    path = write_reference(tmp_path / "ref.pt", np.zeros(4000))
    with pytest.raises(ValueError, match="has 4000 values but .* has 4172 parameters"):
        import_reference_checkpoint(path)


def test_reference_checkpoint_bad_statistics_size(tmp_path):
    path = write_reference(
        tmp_path / "ref.pt", np.zeros(4172), torch.zeros(1, 1, 1, 16), torch.ones(1, 1, 1, 17)
    )
    with pytest.raises(ValueError, match="token_embedding_0_output_mean has 16 values, expected 17"):
        import_reference_checkpoint(path)


def test_reference_checkpoint_without_evolution_state(tmp_path):
    path = tmp_path / "ref.pt"
    torch.save({"iter_num": 3, "model": {}}, path)
    with pytest.raises(ValueError, match=r"no 'evolution_state' \(found \['iter_num', 'model'\]\)"):
        import_reference_checkpoint(path)


@pytest.mark.parametrize("params", [torch.zeros(10), torch.zeros(2, 3, 4172), torch.zeros(4173)])
def test_namm_bad_params_shape(params):
    with pytest.raises(ValueError, match=r"must be \[4172\] or \[P, 4172\]"):
        NAMM(params=params)


@pytest.mark.parametrize("name", ["norm_mean", "norm_var"])
@pytest.mark.parametrize("value", [torch.zeros(16), [0.0] * 18])
def test_namm_bad_statistics_shape(name, value):
    with pytest.raises(ValueError, match=f"{name} must hold 17 values"):
        NAMM(**{name: value})


def test_population_parameters_must_match_batch():
    namm = NAMM(NAMMConfig(update_every=8), params=torch.zeros(3, 4172))
    with pytest.raises(ValueError, match="holds 3 parameter vectors but the batch has 2 samples"):
        run_memory(namm, [8])


def test_collecting_statistics_freezes_mean_and_var():
    namm = NAMM(NAMMConfig(update_every=16))
    seen = []
    original = namm._accumulate

    def spy(spectral, valid):
        seen.append(spectral[valid].double().clone())
        original(spectral, valid)

    namm._accumulate = spy
    with namm.collecting_statistics():
        _, mem = run_memory(namm, [16, 16, 16])
    assert mem.valid.all() and len(seen) == 3
    values = torch.cat(seen)
    torch.testing.assert_close(namm.norm_mean.double(), values.mean(0), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(namm.norm_var.double(), values.var(0, unbiased=False), atol=1e-7, rtol=1e-3)


class _Unlisted:
    """An object outside the safe allow-list (unpickling a class can run its code)."""


def test_reference_checkpoint_loads_safely_unless_trusted(tmp_path):
    path = write_reference(tmp_path / "ref.pt", np.zeros(4172), extra_object=_Unlisted())
    with pytest.raises(ValueError, match=r"outside the safe allow-list.*pass trust_pickle=True"):
        import_reference_checkpoint(path)
    namm = import_reference_checkpoint(path, trust_pickle=True)  # the explicit opt-in
    assert namm.params.shape == (1, 4172)
