"""eval-text: the baselines' budget, the summary, the CLI, and (slow) a small real run."""

from __future__ import annotations

import json
import math

import pytest

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.pipelines.cli import _fields, build_parser, main
from namm_transfer.pipelines.eval_text import EvalTextConfig, namm_budget, summarise


def test_budget_is_the_namm_kept_tokens_after_its_last_update():
    rows = [
        {"kept_per_layer": [100.0, 60.0], "since_update": [20.0, 20.0]},
        {"kept_per_layer": [120.0, 40.0], "since_update": [10.0, 10.0]},
    ]
    assert namm_budget(rows) == [95, 35]


def test_summary_normalises_by_the_full_cache_on_the_same_task():
    rows = [
        {"policy": "FullCache", "task": "a", "score": 1.0, "kept_fraction": 1.0},
        {"policy": "FullCache", "task": "a", "score": 0.5, "kept_fraction": 1.0},
        {"policy": "FullCache", "task": "b", "score": 0.0, "kept_fraction": 1.0},
        {"policy": "NAMM", "task": "a", "score": 1.0, "kept_fraction": 0.6},
        {"policy": "NAMM", "task": "a", "score": 1.0, "kept_fraction": 0.4},
        {"policy": "NAMM", "task": "b", "score": 1.0, "kept_fraction": 0.5},
    ]
    summary = summarise(rows, ["a", "b"])
    assert summary["NAMM"]["normalised"]["a"] == pytest.approx(1.0 / 0.75)
    assert math.isnan(summary["NAMM"]["normalised"]["b"])  # full cache scored 0: undefined, not counted
    assert summary["NAMM"]["mean_normalised"] == pytest.approx(1.0 / 0.75)
    assert summary["NAMM"]["kept_fraction"] == pytest.approx(0.5)
    assert summary["FullCache"]["mean_normalised"] == pytest.approx(1.0)
    # standard error over prompts in normalised units: std([1, 0.5], ddof=1) / sqrt(2) / 0.75
    assert summary["FullCache"]["normalised_se"]["a"] == pytest.approx(0.25 / 0.75)
    assert summary["NAMM"]["normalised_se"]["a"] == 0.0
    assert summary["NAMM"]["mean_normalised_se"] == 0.0


def test_resuming_into_a_directory_of_another_setting_is_refused(tmp_path):
    from namm_transfer.pipelines.eval_text import _check_same_setting

    cfg = EvalTextConfig(namm="a", output_dir=str(tmp_path))
    _check_same_setting(tmp_path, cfg)
    _check_same_setting(tmp_path, EvalTextConfig(namm="a", n=3, output_dir=str(tmp_path)))  # more prompts: ok
    with pytest.raises(ValueError, match="another --output-dir"):
        _check_same_setting(tmp_path, EvalTextConfig(namm="b", output_dir=str(tmp_path)))


def test_cli_mirrors_the_config():
    args = build_parser().parse_args(["eval-text"])
    assert EvalTextConfig(**_fields(args, EvalTextConfig)) == EvalTextConfig()


@pytest.mark.slow
def test_eval_text_small_run_and_resume(tmp_path):
    namm_dir = tmp_path / "namm"
    NAMM.init_random(seed=0, config=NAMMConfig(update_every=128, budget=200)).save_pretrained(namm_dir)
    argv = ["eval-text", "--namm", str(namm_dir), "--tasks", "passkey", "kv", "--n", "1",
            "--prompt-tokens", "400", "--threads", "1", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    rows = (tmp_path / "out" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 6 * 2  # 6 policies x 2 prompts
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    assert set(summary) == {"FullCache", "NAMM", "Recency", "H2O", "L2Norm", "RandomEviction"}
    namm_kept = summary["NAMM"]["kept_fraction"]
    assert namm_kept < 1.0
    for name in ("Recency", "H2O", "L2Norm", "RandomEviction"):  # matched cache size
        assert summary[name]["kept_fraction"] == pytest.approx(namm_kept, abs=0.03)
    assert main(argv) == 0  # resume: nothing left to run, nothing duplicated
    assert len((tmp_path / "out" / "rows.jsonl").read_text().splitlines()) == 12
