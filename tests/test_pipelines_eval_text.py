"""eval-text: the baselines' budget, the summary, the CLI, and (slow) a small real run."""

from __future__ import annotations

import json
import math

import pytest

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.pipelines.cli import main
from namm_transfer.pipelines.harness import matched_budget
from namm_transfer.pipelines.text.evaluate import EvalTextConfig, summarise, verdict


def test_budget_is_the_namm_kept_tokens_after_its_last_update():
    rows = [
        {"kept_per_layer": [100.0, 60.0], "since_update": [20.0, 20.0]},
        {"kept_per_layer": [120.0, 40.0], "since_update": [10.0, 10.0]},
    ]
    assert matched_budget(rows) == [95, 35]


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
    from namm_transfer.pipelines.text.evaluate import _check_same_setting

    cfg = EvalTextConfig(namm="a", output_dir=str(tmp_path))
    _check_same_setting(tmp_path, cfg, 256)
    _check_same_setting(tmp_path, EvalTextConfig(namm="b", n=3, output_dir=str(tmp_path)), 256)  # ok
    with pytest.raises(ValueError, match="prompt_tokens: 1024 there, 512 now"):
        _check_same_setting(tmp_path, EvalTextConfig(prompt_tokens=512, output_dir=str(tmp_path)), 256)
    with pytest.raises(ValueError, match="update_every: 256 there, 128 now"):
        _check_same_setting(tmp_path, cfg, 128)
    with pytest.raises(ValueError, match="model: 'smollm2' there, 'gemma3-270m' now"):
        _check_same_setting(tmp_path, EvalTextConfig(model="gemma3-270m", output_dir=str(tmp_path)), 256)


def test_a_setting_file_from_before_the_model_flag_is_smollm2s(tmp_path):
    from namm_transfer.pipelines.text.evaluate import _check_same_setting

    old = {"split": "test", "prompt_tokens": 1024, "max_new_tokens": None, "update_every": 256}
    (tmp_path / "setting.json").write_text(json.dumps(old))
    _check_same_setting(tmp_path, EvalTextConfig(output_dir=str(tmp_path)), 256)
    with pytest.raises(ValueError, match="model: 'smollm2' there, 'gemma3-270m' now"):
        _check_same_setting(tmp_path, EvalTextConfig(model="gemma3-270m", output_dir=str(tmp_path)), 256)


def test_baseline_rows_do_not_depend_on_the_namm():
    from namm_transfer.pipelines.text.evaluate import _expected, depends_on_namm

    full = _expected(EvalTextConfig(budgets=["0.5", "own"], baselines=["H2O"]))
    alone = _expected(EvalTextConfig(budgets=["0.5", "own"], baselines=["H2O"], namm_rows=False))
    assert set(alone) == {("one-shot", "0.5", "FullCache"), ("one-shot", "0.5", "H2O"),
                          ("progressive", "0.5", "FullCache"), ("progressive", "0.5", "H2O")}
    assert set(alone) < set(full)
    assert [x for x in full if x not in alone] == [x for x in full if depends_on_namm(
        {"policy": x[2], "budget": x[1]})]


def test_bad_settings_are_refused_with_their_name():
    with pytest.raises(ValueError, match="protocol"):
        EvalTextConfig(protocols=["streaming"])
    with pytest.raises(ValueError, match="kept fraction"):
        EvalTextConfig(budgets=["1.5"])
    with pytest.raises(ValueError, match="baseline"):
        EvalTextConfig(baselines=["Oracle"])
    with pytest.raises(ValueError, match="K/N"):
        EvalTextConfig(shard="2")
    with pytest.raises(ValueError, match="unknown model 'llama'; choose from smollm2, gemma3-270m"):
        EvalTextConfig(model="llama")


def _rows(policy, scores, task="a"):
    return [{"policy": policy, "task": task, "score": s, "kept_fraction": 0.5, "seed": i}
            for i, s in enumerate(scores)]


def test_verdict_compares_with_the_combined_standard_error():
    rows = _rows("FullCache", [1, 1, 1, 1]) + _rows("NAMM", [1, 1, 1, 0]) + _rows("H2O", [0, 0, 0, 1])
    v = verdict(summarise(rows, ["a"]))
    se = 0.5 / 2  # std([1, 1, 1, 0], ddof=1) / sqrt(4) in normalised units (full cache mean 1)
    assert v["margins"]["H2O"]["margin"] == pytest.approx(0.5)
    assert v["margins"]["H2O"]["combined_se"] == pytest.approx(math.hypot(se, se))
    assert v["above_every_baseline"] and v["above_every_baseline_by_combined_se"]
    close = rows + _rows("TOVA", [1, 1, 0, 1])
    v = verdict(summarise(close, ["a"]))
    assert not v["above_every_baseline"]  # TOVA ties the NAMM
    assert verdict(summarise(_rows("FullCache", [1]) + _rows("NAMM", [1]), ["a"])) == {}  # nothing to beat


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["bam", "joint"])
def test_eval_text_small_run_and_resume(tmp_path, scorer):
    namm_dir = tmp_path / "namm"
    # joint: SmolLM2-135M's 30 layers x 3 KV heads, evicted all together by the cache
    config = NAMMConfig(update_every=128, scorer=scorer, joint_rows=90 if scorer == "joint" else 0)
    NAMM.init_random(seed=0, config=config).save_pretrained(namm_dir)
    argv = ["eval-text", "--namm", str(namm_dir), "--tasks", "passkey", "--n", "1",
            "--prompt-tokens", "300", "--budgets", "0.5", "own", "--baselines", "Recency", "SnapKV",
            "--threads", "1", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 0
    rows = [json.loads(r) for r in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    # one-shot: full + NAMM + 2 baselines at 50%, NAMM + 2 baselines at its own; progressive: 4 + 1
    assert len(rows) == 4 + 3 + 4 + 1
    tables = json.loads((tmp_path / "out" / "summary.json").read_text())["tables"]
    assert set(tables) == {"one-shot/0.5", "one-shot/own", "progressive/0.5", "progressive/own"}
    one_shot = tables["one-shot/0.5"]["summary"]
    for name in ("NAMM", "Recency", "SnapKV"):  # matched cache size
        assert one_shot[name]["kept_fraction"] == pytest.approx(0.5, abs=0.01)
    own = tables["one-shot/own"]["summary"]
    assert own["Recency"]["kept_fraction"] == pytest.approx(own["NAMM"]["kept_fraction"], abs=0.01)
    assert main(argv) == 0  # resume: nothing left to run, nothing duplicated
    assert len((tmp_path / "out" / "rows.jsonl").read_text().splitlines()) == len(rows)


def test_ablation_table_reads_each_runs_validation(tmp_path):
    from namm_transfer.pipelines.bench.ablation import AblationConfig, run_ablation

    for name, fits in (("a", [0.4, 0.6, 0.5]), ("b", [0.3, 0.35])):
        run = tmp_path / name
        run.mkdir()
        config = {"warm_start_steps": 0} if name == "a" else {
            "warm_start_steps": 400, "budgets": [0.15, 0.25], "prompt_tokens": 1024,
            "prompt_lengths": [1024, 1536]}
        (run / "config.json").write_text(json.dumps(config))
        (run / "validation.jsonl").write_text("\n".join(json.dumps(
            {"generation": 3 * i, "val_fitness": f, "val_exact_normalised": f / 2, "seconds": 60.0 * (i + 1)})
            for i, f in enumerate(fits)))
    out = tmp_path / "ablation.md"
    rows = run_ablation(AblationConfig(runs=[f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"], output=str(out)))
    assert [(r["best_val_fitness"], r["best_generation"], r["start_val_fitness"]) for r in rows] == [
        (0.6, 3, 0.4), (0.35, 3, 0.3)]
    assert out.with_suffix(".png").is_file() and "| A " in out.read_text()
    # each run's validation setting is in its row (a run without the fields had the defaults)
    assert [(r["budgets"], r["prompt_tokens"]) for r in rows] == [
        ([0.25, 0.5, 0.75], [1024]), ([0.15, 0.25], [1024, 1536])]
    assert "| 15% / 25% " in out.read_text() and "| 1024 / 1536 " in out.read_text()
    with pytest.raises(ValueError, match="LABEL=DIR"):
        run_ablation(AblationConfig(runs=["nolabel"], output=str(out)))


def test_a_progressive_run_of_the_namms_own_threshold_alone_also_runs_the_full_cache(monkeypatch):
    """The full cache normalises every score: a run with ``--budgets own`` only must run it too."""
    from types import SimpleNamespace

    from namm_transfer.pipelines.text import evaluate

    ran = []
    monkeypatch.setattr(evaluate, "evaluate_prompt", lambda model, tok, policy, *a: ran.append(policy) or {})
    cfg = EvalTextConfig(budgets=["own"], protocols=["progressive"])
    example, task = SimpleNamespace(prompt_ids=list(range(40)), seed=3), SimpleNamespace(name="kv")
    todo = {(p, b, name, "kv", 3) for p, b, name in evaluate._expected(cfg)}
    namm = NAMM(NAMMConfig(update_every=16))
    rows = evaluate._progressive_prompt(None, None, namm, example, task, cfg, todo, 4, 16)
    assert sorted(r["policy"] for r in rows) == ["FullCache", "NAMM"]
    assert ran[1] is namm  # the NAMM in its own threshold mode
