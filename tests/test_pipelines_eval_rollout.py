"""eval-rollout on a tiny random Decision Transformer and short LunarLander episodes (one thread, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from namm_transfer import NAMM, NAMMConfig
from namm_transfer.pipelines.rl.evaluate import (
    BASELINES,
    KINDS,
    EvalRolloutConfig,
    budget_label,
    rollout_batch,
    rollout_policies,
    run_eval_rollout,
)
from namm_transfer.pipelines.rl.models import available_dts, load_dt, save_dt
from namm_transfer.policies import FullCache, Recency

pytest.importorskip("gymnasium")
pytest.importorskip("Box2D")

ENV = "LunarLanderContinuous-v3"
STEPS, EVERY = 15, 6


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dt_dir(tmp_path_factory):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(0)
    config = DecisionTransformerConfig(
        state_dim=8, act_dim=2, hidden_size=16, n_layer=2, n_head=2, n_inner=32, max_ep_len=1000,
        action_tanh=True, bos_token_id=None, eos_token_id=None,
    )
    model = DecisionTransformerModel(config).eval()
    meta = {"env_id": ENV, "dataset_id": None, "state_mean": [0.0] * 8, "state_std": [1.0] * 8,
            "return_scale": 100.0, "context": 4, "target_return": 200.0,
            "ref_min_score": -200.0, "ref_max_score": 200.0}
    return save_dt(model, tmp_path_factory.mktemp("tiny-dt"), meta)


@pytest.fixture(scope="module")
def namm_dir(tmp_path_factory):
    """A random NAMM that evicts part of the cache (not all of it) on the tiny DT."""
    namm = NAMM.init_random(seed=3, sigma=0.5, config=NAMMConfig(update_every=EVERY))
    return namm.save_pretrained(tmp_path_factory.mktemp("namm"))


def config(tmp_path, dt_dir, namm_dir, **kw) -> EvalRolloutConfig:
    base = dict(dt=str(dt_dir), namm=str(namm_dir), update_every=EVERY, episodes=3, max_steps=STEPS,
                output_dir=str(tmp_path / "out"), threads=1)
    return EvalRolloutConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dt_dir, namm_dir):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = config(tmp, dt_dir, namm_dir)
    summary = run_eval_rollout(cfg, argv=["eval-rollout", "--dt", str(dt_dir)])
    return cfg, summary


def test_keep_all_namm_reproduces_the_full_cache_rollout(dt_dir):
    dt = load_dt(dt_dir)
    seeds = [5, 6, 7]
    full = rollout_batch(dt, "FullCache", FullCache(), ENV, seeds, 200.0, STEPS, plot=True, progress=False)
    keep_all = NAMM(NAMMConfig(update_every=EVERY))  # the keep-everything initialisation
    namm = rollout_batch(dt, "NAMM", keep_all, ENV, seeds, 200.0, STEPS, plot=True, progress=False)
    assert np.array_equal(namm.actions, full.actions)  # exact_output: bit for bit
    assert [r["return"] for r in namm.rows] == [r["return"] for r in full.rows]
    assert all(r["kept_fraction"] == 1.0 for r in namm.rows)
    # the bare DT (no policy attached) takes the same actions
    from namm_transfer.envs import EnvBatch
    from namm_transfer.envs.dt_rollout import CachedDTRollout

    envs, rollout = EnvBatch(ENV, 3), CachedDTRollout(dt.model)
    obs, rtg = envs.reset(seeds=seeds), np.full(3, 200.0)
    for t in range(STEPS):
        with torch.no_grad():
            action = rollout.act(dt.normalise_states(obs), dt.scale_returns(rtg), t).numpy()
        assert np.array_equal(np.clip(action, -1, 1), full.actions[t])
        obs, rewards, _ = envs.step(np.clip(action, -1, 1))
        rtg -= rewards
    # full cache keeps every timestep: the memory map is 1 on and below the diagonal
    recorded = full.memory_map[:STEPS, :STEPS]
    assert np.allclose(recorded[np.tril_indices(STEPS)[::-1]], 1.0)


def test_summary_has_every_policy_and_the_baselines_match_the_namm_budget(evaluated):
    cfg, summary = evaluated
    assert list(summary) == list(rollout_policies())
    out = json.loads((cfg_path(cfg) / "summary.json").read_text())
    budget = out["budget"]
    assert len(budget) == 2 and all(b >= 1 for b in budget)
    namm = summary["NAMM"]
    assert 0.05 < namm["kept_fraction"] < 0.95  # the random NAMM evicts some, not all
    for name in BASELINES:
        s = summary[name]
        # same budget, same cadence: about the NAMM's cache size, never above budget + one update's tokens
        assert s["tokens_mean"] == pytest.approx(namm["tokens_mean"], rel=0.35), name
        assert s["tokens_peak"] <= max(budget) + EVERY
    md = (cfg_path(cfg) / "summary.md").read_text()
    assert all(f"| {p} " in md for p in rollout_policies())
    assert "command: `namm-transfer eval-rollout --dt" in md and str(budget) in md
    assert summary["FullCache"]["kept_fraction"] == 1.0 and summary["FullCache"]["tokens_vs_full"] == 1.0
    assert summary["windowed"]["tokens_peak"] == 3 * 4 - 1  # K = 4 steps, less the pending action
    for name in rollout_policies():
        assert (cfg_path(cfg) / f"memory_{name}.png").is_file()
    assert any((cfg_path(cfg) / "tensorboard").iterdir())


def cfg_path(cfg):
    from pathlib import Path

    return Path(cfg.output_dir)


def test_kept_kind_fractions_are_consistent(evaluated):
    cfg, summary = evaluated
    rows = [json.loads(line) for line in (cfg_path(cfg) / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(rollout_policies()) * cfg.episodes
    for r in rows:
        kept, seen = np.array(r["kept_tokens_by_kind"]), np.array(r["seen_tokens_by_kind"])
        steps = r["length"]
        t = np.arange(steps)
        assert seen.tolist() == [float((t + 1).sum()), float((t + 1).sum()), float(t.sum())]
        assert sum(r["kept_share_by_kind"].values()) == pytest.approx(1.0)
        assert r["kept_fraction"] == pytest.approx(kept.sum() / seen.sum())
        weighted = sum(r["kept_fraction_by_kind"][k] * seen[i] for i, k in enumerate(KINDS)) / seen.sum()
        assert weighted == pytest.approx(r["kept_fraction"])
        assert np.all(kept <= seen + 1e-9)
        assert r["tokens_mean"] <= r["tokens_seen_mean"] + 1e-9
        if r["policy"] == "FullCache":
            assert np.allclose(kept, seen) and r["kv_bytes_peak"] > 0
    for s in summary.values():
        assert sum(s["kept_share_by_kind"].values()) == pytest.approx(1.0)


def test_resume_skips_finished_rows_and_refuses_other_settings(evaluated, dt_dir, namm_dir):
    cfg, _ = evaluated
    rows_path = cfg_path(cfg) / "rows.jsonl"
    lines = rows_path.read_text().splitlines()
    # drop the last policy's rows: a rerun recomputes exactly those, identically
    last = json.loads(lines[-1])["policy"]
    kept = [line for line in lines if json.loads(line)["policy"] != last]
    rows_path.write_text("\n".join(kept) + "\n")
    run_eval_rollout(cfg)
    again = rows_path.read_text().splitlines()
    assert len(again) == len(lines)
    before = {(json.loads(x)["policy"], json.loads(x)["seed"]): json.loads(x)["return"] for x in lines}
    after = {(json.loads(x)["policy"], json.loads(x)["seed"]): json.loads(x)["return"] for x in again}
    assert after == before
    run_eval_rollout(cfg)  # nothing left to do
    assert rows_path.read_text().splitlines() == again
    with pytest.raises(ValueError, match=r"another setting \(update_every: 6 there, 9 now\)"):
        run_eval_rollout(EvalRolloutConfig(**{**cfg.__dict__, "update_every": EVERY + 3}))


def test_clear_errors(tmp_path, dt_dir, namm_dir):
    with pytest.raises(ValueError, match="expects"):  # BipedalWalker's spaces are not the tiny DT's
        run_eval_rollout(config(tmp_path, dt_dir, namm_dir, env="bipedalwalker", policies=["FullCache"]))
    with pytest.raises(ValueError, match="unknown policies"):
        EvalRolloutConfig(policies=["FullCache", "nope"])
    with pytest.raises(ValueError, match="budget"):
        run_eval_rollout(config(tmp_path, dt_dir, namm_dir, policies=["Recency"],
                                output_dir=str(tmp_path / "b")))
    dt = load_dt(dt_dir)
    with torch.no_grad():
        dt.model.predict_action[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite action at step 0"):
        rollout_batch(dt, "FullCache", Recency(8, update_every=EVERY), ENV, [0, 1], 200.0, 3, plot=False,
                      progress=False)


@pytest.mark.parametrize("name, env", [("lunarlander-expert", "lunarlander"),
                                       ("bipedalwalker-expert", "bipedalwalker")])
def test_shipped_dts_load_by_short_name(name, env):
    from namm_transfer.envs import make_env

    assert name in available_dts()
    dt = load_dt(name)
    e = make_env(env)
    dt.check_spaces(e.observation_space, e.action_space)
    assert dt.env_id == e.spec.id and dt.target_return is not None
    assert dt.meta["ref_min_score"] < dt.meta["ref_max_score"]
    e.close()
    with pytest.raises(FileNotFoundError, match="shipped"):
        load_dt("no-such-dt")


def test_fixed_budgets_cap_every_policy_alike_and_the_window_is_set(tmp_path, dt_dir, namm_dir):
    cfg = config(tmp_path, dt_dir, namm_dir, policies=["windowed", "FullCache", "NAMM", "Recency", "TOVA"],
                 budgets=[0.2, 0.5], window=2, plot=False)
    summary = run_eval_rollout(cfg)
    tokens = 3 * STEPS  # the horizon is max_steps here
    assert list(summary) == ["windowed", "FullCache", "NAMM", "Recency", "TOVA",
                             "NAMM @ 20%", "Recency @ 20%", "TOVA @ 20%", "NAMM @ 50%", "Recency @ 50%",
                             "TOVA @ 50%"]
    assert summary["windowed"]["tokens_peak"] == 3 * 2 - 1  # window=2 steps, less the pending action
    for fraction in (0.2, 0.5):
        cap = round(fraction * tokens)
        for name in ("NAMM", "Recency", "TOVA"):
            s = summary[budget_label(name, fraction)]
            assert s["episodes"] == 3
            assert s["tokens_peak"] <= cap + EVERY - 1, (name, fraction)  # the budget guarantee
        assert summary[budget_label("Recency", fraction)]["tokens_peak"] > cap - EVERY
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| NAMM @ 20% " in md and "fixed budgets: 20%, 50%" in md and "windowed: the last 2 steps" in md
    verdicts = json.loads((tmp_path / "out" / "summary.json").read_text())["budget_verdicts"]
    assert list(verdicts) == ["20%", "50%"] and "The NAMM against the best baseline" in md
    assert verdicts["20%"]["best_baseline"] in ("Recency", "TOVA")
    with pytest.raises(ValueError, match="fractions of the episode's tokens"):
        EvalRolloutConfig(budgets=[1.5])


def test_public_format_dt_on_mujoco_with_given_state_statistics(tmp_path):
    """A DT in the public edbeeching format (config and weights only) rolls out on Hopper-v4 (found from
    its name) with state statistics from a JSON file, normalised by D4RL's hopper reference scores."""
    pytest.importorskip("mujoco")
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    from namm_transfer.pipelines.rl.models import state_statistics

    torch.manual_seed(0)
    public = tmp_path / "decision-transformer-gym-hopper-medium"
    DecisionTransformerModel(DecisionTransformerConfig(
        state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, n_inner=32, max_ep_len=1000,
        action_tanh=True, bos_token_id=None, eos_token_id=None)).save_pretrained(public)
    base = dict(dt=str(public), policies=["windowed", "FullCache"], episodes=2, max_steps=8,
                target_return=3600, output_dir=str(tmp_path / "out"), threads=1, plot=False)
    with pytest.raises(ValueError, match="pass state_mean and state_std"):
        run_eval_rollout(EvalRolloutConfig(**base))
    stats = tmp_path / "hopper_stats.json"
    stats.write_text(json.dumps({"state_mean": [0.1] * 11, "state_std": [2.0] * 11}))
    mean, std = state_statistics(stats)
    assert mean.shape == (11,) and float(std[0]) == 2.0
    summary = run_eval_rollout(EvalRolloutConfig(**base, state_stats=str(stats)))
    out = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert out["setting"]["env"] == "Hopper-v4"
    for name in ("windowed", "FullCache"):
        s = summary[name]
        assert s["episodes"] == 2 and np.isfinite(s["normalised_mean"])
        # D4RL's hopper reference scores: random -20.27, expert 3234.3
        expected = 100 * (s["return_mean"] + 20.272305) / (3234.3 + 20.272305)
        assert s["normalised_mean"] == pytest.approx(expected)
    (tmp_path / "bad.json").write_text(json.dumps({"state_mean": [0.0] * 11}))
    with pytest.raises(ValueError, match="lacks \\['state_std'\\]"):
        state_statistics(tmp_path / "bad.json")


def test_budget_verdicts_name_the_best_baseline_and_the_combined_standard_error():
    """Per fixed budget: the NAMM against every baseline capped alike, by the normalised score and the
    combined standard error; the verdict table reads the same numbers."""
    from namm_transfer.pipelines.rl.evaluate import budget_verdicts, verdict_table

    def entry(mean: float, se: float) -> dict:
        return {"normalised_mean": mean, "normalised_se": se}

    summary = {
        "FullCache": entry(100.0, 0.0),
        "NAMM @ 10%": entry(100.0, 0.0), "H2O @ 10%": entry(10.0, 9.0), "L2Norm @ 10%": entry(40.0, 8.0),
        "NAMM @ 30%": entry(100.0, 0.0), "H2O @ 30%": entry(10.0, 9.0), "L2Norm @ 30%": entry(100.0, 0.0),
        "NAMM @ 50%": entry(90.0, 3.0), "H2O @ 50%": entry(85.0, 4.0), "L2Norm @ 50%": entry(20.0, 9.0),
    }
    verdicts = budget_verdicts(summary, [0.1, 0.3, 0.5, 0.7], ["NAMM", "H2O", "L2Norm"])
    assert list(verdicts) == ["10%", "30%", "50%"]  # nothing was run at 70%
    ten = verdicts["10%"]
    assert ten["best_baseline"] == "L2Norm" and ten["margins"]["L2Norm"]["margin"] == pytest.approx(60.0)
    assert ten["margins"]["L2Norm"]["combined_se"] == pytest.approx(8.0)
    assert ten["above_every_baseline"] and ten["above_every_baseline_by_combined_se"]
    assert not verdicts["30%"]["above_every_baseline"]  # a tie at 100
    fifty = verdicts["50%"]  # ahead of H2O by 5.0, equal to their combined s.e. hypot(3, 4): not more
    assert fifty["best_baseline"] == "H2O" and fifty["above_every_baseline"]
    assert fifty["margins"]["H2O"]["combined_se"] == pytest.approx(5.0)
    assert not fifty["above_every_baseline_by_combined_se"]
    table = verdict_table(summary, verdicts)
    assert "| 10%" in table and "L2Norm 40.0 ± 8.0" in table and "+60.0 (8.0)" in table
