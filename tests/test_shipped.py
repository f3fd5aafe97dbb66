"""The NAMMs shipped as package data: short-name loading and their training records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import namm_transfer
from namm_transfer import NAMM
from namm_transfer.shipped import available, pretrained_dir, training_record


def test_unknown_short_name_lists_what_ships():
    with pytest.raises(KeyError, match="smollm2-text"):
        pretrained_dir("no-such-namm")


def test_smollm2_text_loads_by_short_name_with_its_record():
    assert "smollm2-text" in available()
    namm = namm_transfer.pretrained("smollm2-text")
    same = NAMM.from_pretrained("smollm2-text")
    assert torch.equal(namm.params, same.params) and namm.params.shape == (1, namm.config.n_params)
    assert namm.norm_mean is not None and namm.norm_var.shape == (namm.config.n_bins,)
    assert torch.isfinite(namm.params).all() and (namm.norm_var > 0).all()
    record = training_record("smollm2-text")
    assert record["command"].startswith("namm-transfer evolve") and record["git_revision"]
    assert record["config"]["seed"] == record["seed"]
    assert record["config"]["update_every"] == namm.update_every
    assert record["config"]["engine"] == "shared-prefill"  # CMA-ES from the keep-all start (see the ablation)
    folder = pretrained_dir("smollm2-text")
    curve = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(curve) == record["generations"] == curve[-1]["generation"]
    validation = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]
    assert validation[0]["generation"] == 0  # the start, before CMA-ES
    best = max(validation, key=lambda v: v["val_fitness"])
    assert best["generation"] == record["best_generation"]  # shipped: the best mean by validation
    assert best["val_fitness"] == record["best_validation_fitness"]
    assert (folder / "curves.png").is_file() and (folder / "fitness_curve.md").is_file()


def test_the_previous_namm_stays_loadable_under_a_versioned_name():
    old = namm_transfer.pretrained("smollm2-text-v1")
    record = training_record("smollm2-text-v1")
    assert record["config"]["population"] == 8 and record["generations"] == 18
    assert not torch.equal(old.params, namm_transfer.pretrained("smollm2-text").params)


def test_the_sink_keeping_namm_ships_with_its_sinks_and_its_record():
    namm = namm_transfer.pretrained("smollm2-text-sinks4")
    assert namm.config.sink_tokens == 4 and namm.norm_mean is not None
    record = training_record("smollm2-text-sinks4")
    assert "--sink-tokens 4" in record["command"] and record["config"]["sink_tokens"] == 4
    assert not torch.equal(namm.params, namm_transfer.pretrained("smollm2-text").params)


def test_the_joint_namm_ships_tied_to_smollm2_with_its_record():
    namm = namm_transfer.pretrained("smollm2-text-joint")
    assert namm.joint and namm.config.joint_rows == 30 * 3 and namm.config.sink_tokens == 4
    # one threshold for both protocols: scores measured from the fresh tokens' median (calibrate), a floor
    assert namm.config.threshold == 0.0 and namm.config.joint_reference == "fresh-median"
    assert namm.config.min_tokens == 384
    assert namm.params.shape == (1, 30 * 3 * 17 + 8 + 1) and namm.norm_mean is not None
    record = training_record("smollm2-text-joint")
    assert "--scorer joint" in record["command"] and record["config"]["scorer"] == "joint"
    assert record["config"]["prompt_lengths"] == [1024, 1536]  # trained on both lengths it is evaluated at
    folder = pretrained_dir("smollm2-text-joint")
    validation = [json.loads(line) for line in (folder / "validation.jsonl").read_text().splitlines()]
    best = max(validation, key=lambda v: v["val_fitness"])
    assert best["generation"] == record["best_generation"]
    assert best["val_fitness"] > validation[0]["val_fitness"]  # CMA-ES improved on the warm start
    calibration = json.loads((folder / "calibration.json").read_text())
    # its operating point, chosen on the validation split: 35% of a training context, >= 384 per KV head
    assert calibration["command"].startswith("namm-transfer calibrate --namm smollm2-text-joint --keep 0.35")
    assert calibration["config"]["min_tokens"] == 384 and calibration["config"]["keep"] == 0.35
    assert calibration["bias_after"] == pytest.approx(float(namm.params[0, -1]))
    # the features' EMA decay it was evolved with (chosen by validation over 0.99 and 0.9999)
    assert namm.config.ema_decay == 0.999 and record["config"]["ema_decay"] == 0.999


def test_the_previous_joint_namms_stay_loadable_under_versioned_names():
    shipped = namm_transfer.pretrained("smollm2-text-joint")
    v4 = namm_transfer.pretrained("smollm2-text-joint-v4")  # the same weights at the first operating point
    assert v4.config.min_tokens == 256 and v4.config.ema_decay == 0.999
    assert torch.equal(v4.params[0, :-1], shipped.params[0, :-1]) and v4.params[0, -1] > shipped.params[0, -1]
    calibration = json.loads((pretrained_dir("smollm2-text-joint-v4") / "calibration.json").read_text())
    assert calibration["command"].startswith(
        "namm-transfer calibrate --namm runs/evolve-joint-mixed-hard-ema999/namm")
    assert calibration["config"]["keep"] == 0.4
    assert calibration["bias_after"] == pytest.approx(float(v4.params[0, -1]))
    v3 = namm_transfer.pretrained("smollm2-text-joint-v3")  # the same recipe with the features' EMA at 0.99
    assert v3.config.ema_decay == 0.99 and v3.config.min_tokens == 256
    calibration = json.loads((pretrained_dir("smollm2-text-joint-v3") / "calibration.json").read_text())
    assert calibration["command"].startswith(
        "namm-transfer calibrate --namm runs/evolve-joint-mixed-hard/namm ")
    assert not torch.equal(v3.params, shipped.params)
    v2 = namm_transfer.pretrained("smollm2-text-joint-v2")
    assert v2.config.threshold == 0.0 and v2.config.joint_reference == "fresh-median"
    assert v2.config.min_tokens == 0
    calibration = json.loads((pretrained_dir("smollm2-text-joint-v2") / "calibration.json").read_text())
    assert calibration["command"].startswith("namm-transfer calibrate --namm smollm2-text-joint-v1")
    assert calibration["bias_after"] == pytest.approx(float(v2.params[0, -1]))
    # v2 is v1 with a recalibrated final bias and reference
    v1 = namm_transfer.pretrained("smollm2-text-joint-v1")
    assert v1.config.joint_reference == "absolute" and v1.config.threshold == -3.0
    assert torch.equal(v1.params[0, :-1], v2.params[0, :-1])
    assert torch.equal(v1.norm_mean, v2.norm_mean) and torch.equal(v1.norm_var, v2.norm_var)
    assert not torch.equal(v2.params, shipped.params)


def test_one_resolver_for_every_kind_of_shipped_artefact(tmp_path):
    from namm_transfer.shipped import KINDS, available, pretrained_dir, resolve

    for kind, name in (("namm", "smollm2-text"), ("dt", "lunarlander-expert"), ("video", "smollm2-shapes")):
        assert name in available(kind)
        assert resolve(name, kind) == pretrained_dir(name, kind)
        assert (resolve(name, kind) / KINDS[kind][1]).is_file()
    assert resolve(tmp_path, "dt") == tmp_path  # a local directory is taken as it is
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        resolve(tmp_path / "file.json", "namm")
    with pytest.raises(FileNotFoundError, match=r"neither a video model directory nor a shipped video model "
                                                r"\(smollm2-shapes, smollm2-shapes-128\)"):
        resolve("nope", "video", hub=False)
    with pytest.raises(FileNotFoundError, match="nor a Hub id"):
        resolve("nope", "dt")
    with pytest.raises(KeyError, match="no shipped Decision Transformer named 'nope'"):
        pretrained_dir("nope", "dt")
    with pytest.raises(ValueError, match="unknown artefact kind 'weights'"):
        available("weights")


def test_the_linear_namm_ships_as_fitted_with_its_record():
    """smollm2-text-linear is the read-out the video tables used (benchmarks/results/video_128_linear/)."""
    namm = namm_transfer.pretrained("smollm2-text-linear")
    cfg = namm.config
    assert (cfg.scorer, cfg.threshold, cfg.recent_tokens, cfg.sink_tokens) == ("linear", None, 61, 4)
    assert namm.params.shape == (1, 26)
    assert torch.equal(namm.params[0, : cfg.age_dim], torch.zeros(cfg.age_dim))  # no age weights
    record = training_record("smollm2-text-linear")
    assert "joint_readouts.py fit-heads --shared" in record["command"] and record["seed"] == 0
    assert record["reference_losses"]["fitted"] < record["reference_losses"]["equal scores"]
    # the same parameters and statistics as the copy the benchmark tables read
    used = NAMM.from_pretrained(Path(__file__).parents[1] / "benchmarks/results/video_128_linear/namm_text")
    assert torch.equal(used.params, namm.params) and torch.equal(used.norm_var, namm.norm_var)
