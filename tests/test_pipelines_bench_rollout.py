"""bench rollout on the shipped cue-corridor DT (121-step episodes, two of them, one repetition)."""

from __future__ import annotations

import json

import pytest
import torch

from namm_transfer.pipelines.bench.rollout import RolloutSpeedConfig, run_rollout_speed

pytest.importorskip("gymnasium")


def test_bench_rollout_reports_ratios_to_the_full_cache(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "speed.md"
    try:
        record = run_rollout_speed(RolloutSpeedConfig(dts=["cuecorridor-expert"], budgets=[0.15], episodes=2,
                                                      reps=1, output=str(out)))
    finally:
        torch.set_num_threads(before)
    policies = record["results"]["cuecorridor-expert"]["policies"]
    assert list(policies) == ["FullCache", "NAMM", "NAMM @ 15%"]
    assert policies["FullCache"]["vs_full"] == 1.0
    for s in policies.values():
        assert s["steps_per_second_min"] <= s["steps_per_second_median"] <= s["steps_per_second_max"]
        assert s["vs_full"] == pytest.approx(s["steps_per_second_median"]
                                             / policies["FullCache"]["steps_per_second_median"])
        assert s["paired_ratios"] == [r / f for r, f in zip(s["rates"], policies["FullCache"]["rates"],
                                                             strict=True)]
        assert s["paired_ratio_median"] == pytest.approx(sorted(s["paired_ratios"])[0])  # one repetition
    assert policies["FullCache"]["paired_ratios"] == [1.0]
    # the cap (15% of 3 x 121 tokens = 54 per layer and head) holds up to one cadence of new tokens
    assert policies["NAMM @ 15%"]["tokens_mean"] <= 54 + 30
    assert policies["FullCache"]["tokens_mean"] > policies["NAMM @ 15%"]["tokens_mean"]
    timing = policies["NAMM @ 15%"]["timing_median_rep"]
    assert timing["scoring_s"] > 0 and timing["features_s"] > 0  # the NAMM's own time is measured
    full_timing = policies["FullCache"]["timing_median_rep"]
    assert full_timing.get("features_s", 0.0) == full_timing.get("scoring_s", 0.0) == 0.0
    assert "vs full cache" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["results"]


def test_bench_rollout_times_the_namm_in_each_kv_layout(tmp_path):
    """One row per layout when several are asked for; the layout changes how the kept slots are stored,
    never what the NAMM keeps, so the same episodes hold the same tokens."""
    before = torch.get_num_threads()
    try:
        record = run_rollout_speed(RolloutSpeedConfig(
            dts=["cuecorridor-expert"], budgets=[], episodes=2, reps=1, kv_layouts=["packed", "padded"],
            output=str(tmp_path / "speed.md")))
    finally:
        torch.set_num_threads(before)
    policies = record["results"]["cuecorridor-expert"]["policies"]
    assert list(policies) == ["FullCache", "NAMM [packed]", "NAMM [padded]"]
    assert policies["NAMM [packed]"]["tokens_mean"] == policies["NAMM [padded]"]["tokens_mean"]
    assert policies["NAMM [packed]"]["tokens_mean"] < policies["FullCache"]["tokens_mean"]
    with pytest.raises(ValueError, match="kv_layouts must be one or more of"):
        RolloutSpeedConfig(kv_layouts=["ragged"])
