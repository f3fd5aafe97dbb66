"""Adding a baseline is one class plus one registry line: it then runs, at the NAMM's measured budget,
in the rollout, video and text comparisons and appears in their summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_pipelines_eval_rollout import config as rollout_config
from test_pipelines_eval_rollout import dt_dir, namm_dir  # noqa: F401 (fixtures)
from test_pipelines_eval_video import _config as video_config
from test_pipelines_eval_video import data, tiny_loader  # noqa: F401 (data is a fixture)

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.policies import BASELINES, CacheView, ScoredPolicy, build_policy, policy_names


class EvenFirst(ScoredPolicy):
    """A toy baseline: tokens at even positions outrank odd ones, newer before older."""

    def score(self, state, view: CacheView) -> torch.Tensor:
        return view.positions.float() - 1e6 * (view.positions % 2).float()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(BASELINES, "EvenFirst", EvenFirst)  # the one registry line
    return "EvenFirst"


def test_registered_policy_is_built_by_name(registered):
    assert registered in policy_names()
    policy = build_policy(registered, budget=[3, 4], update_every=8)
    assert isinstance(policy, EvenFirst) and policy.budget == [3, 4] and policy.update_every == 8


def test_unknown_policy_names_the_registered_ones(registered):
    with pytest.raises(ValueError, match="unknown baseline 'Nope'.*EvenFirst"):
        build_policy("Nope", budget=4)


def test_toy_policy_in_the_rollout_summary(tmp_path, dt_dir, namm_dir, registered):  # noqa: F811
    from namm_transfer.pipelines.rl.evaluate import run_eval_rollout

    cfg = rollout_config(tmp_path, dt_dir, namm_dir, policies=["NAMM", registered], plot=False)
    summary = run_eval_rollout(cfg)
    assert list(summary) == ["NAMM", registered]
    budget = json.loads((tmp_path / "out" / "summary.json").read_text())["budget"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    toy = [r for r in rows if r["policy"] == registered]
    assert len(toy) == cfg.episodes
    # at the NAMM's budget: never more per layer than the budget plus the tokens since its last update
    for row in toy:
        for kept, since, cap in zip(row["kept_per_layer"], row["since_update"], budget, strict=True):
            assert kept <= cap + since + 1e-9
    assert f"| {registered} " in (tmp_path / "out" / "summary.md").read_text()


def test_toy_policy_in_the_video_summary(tmp_path, data, registered):  # noqa: F811
    from namm_transfer.pipelines.video.evaluate import run_eval_video

    namm = NAMM.init_random(seed=1, sigma=0.5, config=NAMMConfig(update_every=16))
    cfg = video_config(tmp_path, data["jsonl"], policies=["FullCache", "NAMM", registered])
    summary = run_eval_video(cfg, loader=tiny_loader, namm=namm)
    assert list(summary) == ["FullCache", "NAMM", registered]
    rows = [json.loads(line) for line in Path(cfg.output_dir, "rows.jsonl").read_text().splitlines()]
    budget = json.loads(Path(cfg.output_dir, "summary.json").read_text())["budget"]
    assert all(r["budget"] == budget for r in rows if r["policy"] == registered)
    assert f"| {registered} " in Path(cfg.output_dir, "summary.md").read_text()


@pytest.mark.slow
def test_toy_policy_in_the_text_summary(tmp_path, registered):
    from namm_transfer.pipelines.text.evaluate import EvalTextConfig, run_eval_text

    text_namm = tmp_path / "namm"
    NAMM.init_random(seed=0, config=NAMMConfig(update_every=128)).save_pretrained(text_namm)
    cfg = EvalTextConfig(namm=str(text_namm), tasks=["passkey"], n=1, prompt_tokens=300, budgets=["0.5"],
                         protocols=["one-shot"], baselines=[registered], threads=1,
                         output_dir=str(tmp_path / "out"))
    tables = run_eval_text(cfg)
    summary = tables["one-shot/0.5"]["summary"]
    assert set(summary) == {"FullCache", "NAMM", registered}
    assert summary[registered]["kept_fraction"] == pytest.approx(0.5, abs=0.01)  # the same fixed budget
    assert f"| {registered} " in (tmp_path / "out" / "summary.md").read_text()
