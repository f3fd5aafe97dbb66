"""The NAMMs shipped as package data: short-name loading and their training records."""

from __future__ import annotations

import json

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
    lines = (pretrained_dir("smollm2-text") / "results.jsonl").read_text().splitlines()
    curve = [json.loads(line) for line in lines]
    assert len(curve) == record["generations"]
    # the shipped parameters are the CMA mean after the last generation
    assert curve[-1]["total_generation"] == record["generations"] - 1
