"""train-dt and the Decision Transformer loader, on tiny local datasets and tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from namm_transfer.envs import datasets, generate
from namm_transfer.pipelines.cli import main
from namm_transfer.pipelines.rl.models import load_dt
from namm_transfer.pipelines.rl.train import SubsequenceSampler, TrainDTConfig, action_loss, train_dt

LUNAR_ID = "namm/lunarlandercontinuous/expert-v0"
TINY = dict(hidden=32, layers=1, heads=1, context=5, batch_size=16, dropout=0.0, warmup_steps=1, threads=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("minari")
    generate.make_local_dataset("lunarlander", "expert", 4, seed=0, root=root, ref_episodes=2,
                                max_episode_steps=60)
    return root


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("dt")
    cfg = TrainDTConfig(dataset=LUNAR_ID, root=str(root), steps=20, lr=3e-3, log_every=5, out_dir=str(out),
                        seed=1, **TINY)
    return cfg, train_dt(cfg, argv=["train-dt", "--steps", "20"])


def fixed_batch(root, seed: int = 0):
    dataset = datasets.load_dataset(LUNAR_ID, root)
    eps = datasets.episodes(dataset)
    obs = np.concatenate([ep.observations for ep in eps])
    sampler = SubsequenceSampler(eps, 5, obs.mean(0), obs.std(0) + 1e-6, 100.0, 1000,
                                 np.random.default_rng(seed))
    return sampler.sample(64)


def test_sampler_pads_on_the_left_and_scales():
    episode = datasets.Episode(
        observations=np.arange(12, dtype=np.float32).reshape(3, 4),
        actions=np.full((3, 2), 0.5, np.float32),
        rewards=np.array([1.0, 2.0, 3.0], np.float32),
        terminated=True,
        truncated=False,
    )
    sampler = SubsequenceSampler([episode], 4, np.zeros(4, np.float32), np.full(4, 2.0, np.float32), 10.0,
                                 2, np.random.default_rng(0))
    batch = sampler.sample(32)
    for b in range(32):
        mask = batch["attention_mask"][b]
        n = int(mask.sum())
        assert mask.tolist() == [0] * (4 - n) + [1] * n  # left padding
        start = 3 - n
        assert batch["states"][b, 4 - n :].tolist() == (episode.observations[start:] / 2).tolist()
        assert batch["states"][b, : 4 - n].abs().sum() == 0
        rtg = np.array([6.0, 5.0, 3.0])[start:] / 10
        np.testing.assert_allclose(batch["returns_to_go"][b, 4 - n :, 0].numpy(), rtg)
        assert batch["timesteps"][b, 4 - n :].tolist() == [min(t, 1) for t in range(start, 3)]  # clipped


def test_end_windows_are_what_a_rollout_sees():
    """window="end": a random last step and the K steps up to it, so a short episode is always seen from
    its first step (what a memory task needs); "start" windows mostly miss it."""
    n, k = 10, 16
    episode = datasets.Episode(np.arange(n, dtype=np.float32)[:, None], np.zeros((n, 1), np.float32),
                               np.zeros(n, np.float32), True, False)
    ends, starts = set(), set()
    for window, seen in (("end", ends), ("start", starts)):
        rng = np.random.default_rng(0)
        sampler = SubsequenceSampler([episode], k, np.zeros(1), np.ones(1), 1.0, 100, rng, window)
        batch = sampler.sample(200)
        for b in range(200):
            m = int(batch["attention_mask"][b].sum())
            first, last = batch["timesteps"][b, k - m].item(), batch["timesteps"][b, -1].item()
            seen.add((first, last))
    assert {first for first, _ in ends} == {0} and {last for _, last in ends} == set(range(n))
    assert {last for _, last in starts} == {n - 1} and len({first for first, _ in starts}) == n
    with pytest.raises(ValueError, match="window must be one of"):
        TrainDTConfig(window="middle")


def test_last_step_share_ends_that_share_of_windows_at_the_episode_end():
    """last_step_share=0.5: about half the windows end at the last step (plus the uniform draws that
    land there), the others at every step; it needs window="end"."""
    n, k, draws = 10, 4, 2000
    episode = datasets.Episode(np.zeros((n, 1), np.float32), np.zeros((n, 1), np.float32),
                               np.zeros(n, np.float32), True, False)
    sampler = SubsequenceSampler([episode], k, np.zeros(1), np.ones(1), 1.0, 100, np.random.default_rng(0),
                                 "end", last_step_share=0.5)
    last = sampler.sample(draws)["timesteps"][:, -1].numpy()
    share = float(np.mean(last == n - 1))
    expected = 0.5 + 0.5 / n
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / draws)
    assert set(last.tolist()) == set(range(n))
    with pytest.raises(ValueError, match="needs window='end'"):
        TrainDTConfig(last_step_share=0.5)
    with pytest.raises(ValueError, match=r"last_step_share must be in \[0, 1\]"):
        TrainDTConfig(window="end", last_step_share=1.5)


def test_sampler_weights_episodes_by_length():
    def ep(n):
        return datasets.Episode(np.zeros((n, 1), np.float32), np.zeros((n, 1), np.float32),
                                np.zeros(n, np.float32), True, False)

    sampler = SubsequenceSampler([ep(1), ep(3)], 2, np.zeros(1), np.ones(1), 1.0, 10,
                                 np.random.default_rng(0))
    np.testing.assert_allclose(sampler.probs, [0.25, 0.75])


def test_training_reduces_the_loss_and_writes_its_outputs(trained):
    cfg, result = trained
    assert len(result.losses) == 20 and all(np.isfinite(result.losses))
    assert np.mean(result.losses[-5:]) < 0.7 * result.losses[0]
    log = [json.loads(line) for line in open(f"{cfg.out_dir}/train_log.jsonl")]
    assert [r["step"] for r in log] == [5, 10, 15, 20]
    events = [p.name for p in (Path(cfg.out_dir) / "tensorboard").iterdir()]
    assert any(name.startswith("events.out.tfevents") for name in events)
    meta = json.loads(open(f"{cfg.out_dir}/dt_meta.json").read())
    assert meta["dataset_id"] == LUNAR_ID and meta["env_id"] == "LunarLanderContinuous-v3"
    assert len(meta["state_mean"]) == len(meta["state_std"]) == 8
    assert meta["context"] == 5 and meta["seed"] == 1 and meta["max_ep_len"] == 60
    assert meta["command"] == "namm-transfer train-dt --steps 20" and "git_revision" in meta
    assert meta["ref_min_score"] is not None and meta["ref_max_score"] is not None
    assert meta["target_return"] == pytest.approx(meta["dataset_stats"]["return_max"])


def test_saved_directory_predicts_like_the_in_memory_model(trained, root):
    cfg, result = trained
    loaded = load_dt(cfg.out_dir)
    assert loaded.context == 5 and loaded.dataset_id == LUNAR_ID
    np.testing.assert_array_equal(loaded.state_mean, np.array(result.meta["state_mean"], np.float32))
    batch = fixed_batch(root)
    with torch.no_grad():
        a = result.model(**batch, return_dict=True).action_preds
        b = loaded.model(**batch, return_dict=True).action_preds
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_is_seeded(trained, root, tmp_path):
    cfg, result = trained
    again = train_dt(TrainDTConfig(**{**cfg.__dict__, "out_dir": str(tmp_path)}))
    assert again.losses == result.losses


def test_train_dt_cli(root, tmp_path):
    out = tmp_path / "dt"
    args = ["train-dt", "--dataset", LUNAR_ID, "--root", str(root), "--steps", "2", "--batch-size", "4",
            "-K", "3", "--hidden", "16", "--layers", "1", "--heads", "2", "--threads", "1",
            "--out-dir", str(out)]
    assert main(args) == 0
    loaded = load_dt(out)
    assert loaded.model.config.n_head == 2 and loaded.context == 3
    assert loaded.meta["command"].startswith("namm-transfer train-dt --dataset")


def test_unknown_dataset_is_a_clear_error(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="'namm/nothing/expert-v0'.*unreachable"):
        train_dt(TrainDTConfig(dataset="namm/nothing/expert-v0", root=str(root), out_dir=str(tmp_path),
                               **TINY))


def test_dataset_with_the_wrong_observation_shape_is_refused(trained, root):
    cfg, _ = trained
    bipedal = generate.make_local_dataset("bipedalwalker", "expert", 1, seed=0, root=root, ref_episodes=1,
                                          max_episode_steps=3)
    loaded = load_dt(cfg.out_dir)
    loaded.check_dataset(datasets.load_dataset(LUNAR_ID, root))  # the right one passes
    with pytest.raises(ValueError, match=r"observations of shape \(24,\).*expects \(8,\)"):
        loaded.check_dataset(bipedal)
    with pytest.raises(ValueError, match="state_dim 8"):
        loaded.normalise_states(np.zeros((2, 24)))


# --------------------------------------------------------------------------------------------------
# the public edbeeching/decision-transformer-gym-* format: config.json + weights, no state statistics


def public_dir(tmp_path, weights: str):
    torch.manual_seed(0)
    config = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=32, n_layer=1, n_head=1,
                                       max_ep_len=1000, action_tanh=True)
    model = DecisionTransformerModel(config).eval()
    directory = tmp_path / "decision-transformer-gym-hopper-medium"
    if weights == "safetensors":
        model.save_pretrained(directory)
    else:  # what the edbeeching repositories hold
        config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return model, directory


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_public_format_loads_with_caller_statistics(tmp_path, weights):
    model, directory = public_dir(tmp_path, weights)
    with pytest.raises(ValueError, match="pass state_mean and state_std"):
        load_dt(directory)
    with pytest.raises(ValueError, match=r"state_mean has shape \(8,\)"):
        load_dt(directory, np.zeros(8), np.ones(8))
    mean, std = np.linspace(-1, 1, 11), np.linspace(0.5, 2, 11)
    loaded = load_dt(directory, mean, std)
    assert loaded.context == 20 and loaded.return_scale == 1000.0 and loaded.env_id == "Hopper-v4"
    assert loaded.meta == {} and loaded.target_return is None
    np.testing.assert_allclose(loaded.normalise_states(np.ones(11)), (1 - mean) / std, rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    inputs = dict(states=torch.randn(2, 4, 11, generator=g), actions=torch.randn(2, 4, 3, generator=g),
                  returns_to_go=torch.randn(2, 4, 1, generator=g), timesteps=torch.arange(4).expand(2, 4),
                  attention_mask=torch.ones(2, 4, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).action_preds, model(**inputs).action_preds,
                                   rtol=0, atol=0)
    assert load_dt(directory, mean, std, context=10, return_scale=3600.0).context == 10


def test_load_dt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Decision Transformer directory"):
        load_dt(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_dt(tmp_path)
    from transformers import GPT2Config

    GPT2Config(n_layer=1).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model, not a decision_transformer"):
        load_dt(tmp_path / "gpt2")


def test_hub_id_without_network_says_so():
    with pytest.raises(FileNotFoundError, match="pass a local directory"):
        load_dt("edbeeching/decision-transformer-gym-hopper-medium", np.zeros(11), np.ones(11))


def test_loss_ignores_padded_steps(root):
    batch = fixed_batch(root)
    torch.manual_seed(0)
    model = DecisionTransformerModel(DecisionTransformerConfig(state_dim=8, act_dim=2, hidden_size=16,
                                                               n_layer=1, n_head=1, max_ep_len=1000))
    padded = {k: v.clone() for k, v in batch.items()}
    pad = padded["attention_mask"] == 0
    assert pad.any()
    padded["actions"][pad] = 5.0  # padded targets must not count
    torch.testing.assert_close(action_loss(model.eval(), batch), action_loss(model, padded))


def test_extra_datasets_join_the_training_set(tmp_path):
    root = tmp_path / "minari"
    for level, n in (("expert", 2), ("medium", 3)):
        generate.make_local_dataset("lunarlander", level, n, seed=0, root=root, ref_episodes=1,
                                    max_episode_steps=20, ref_scores=(-100.0, 200.0))
    medium_id = "namm/lunarlandercontinuous/medium-v0"
    cfg = TrainDTConfig(dataset=LUNAR_ID, extra_datasets=(medium_id,), root=str(root), steps=2,
                        out_dir=str(tmp_path / "dt"), **TINY)
    meta = train_dt(cfg).meta
    both = [datasets.episodes(datasets.load_dataset(i, root)) for i in (LUNAR_ID, medium_id)]
    assert meta["dataset_id"] == LUNAR_ID and meta["extra_dataset_ids"] == [medium_id]
    assert meta["dataset_stats"]["episodes"] == 5
    assert meta["dataset_stats"]["steps"] == sum(len(ep) for eps in both for ep in eps)
    states = np.concatenate([ep.observations for eps in both for ep in eps])
    np.testing.assert_allclose(meta["state_mean"], states.mean(0), rtol=1e-5, atol=1e-6)
    assert (meta["ref_min_score"], meta["ref_max_score"]) == (-100.0, 200.0)  # the first dataset's

    generate.make_local_dataset("bipedalwalker", "expert", 1, seed=0, root=root, ref_episodes=1,
                                max_episode_steps=3, ref_scores=(-100.0, 200.0))
    bad = TrainDTConfig(**{**cfg.__dict__, "extra_datasets": ("namm/bipedalwalker/expert-v0",)})
    with pytest.raises(ValueError, match="bipedalwalker/expert-v0.*has spaces"):
        train_dt(bad)


def test_train_dt_cli_extra_datasets():
    from namm_transfer.pipelines.cli import parse

    cfg = parse(["train-dt", "--dataset", "a", "--extra-datasets", "b", "c"])[1]
    assert cfg.dataset == "a" and cfg.extra_datasets == ("b", "c")


def test_last_only_loss_counts_each_windows_last_action():
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(0)
    model = DecisionTransformerModel(DecisionTransformerConfig(
        state_dim=2, act_dim=1, hidden_size=16, n_layer=1, n_head=1, n_inner=32, max_ep_len=10,
        action_tanh=True, bos_token_id=None, eos_token_id=None)).eval()
    batch = {"states": torch.randn(3, 4, 2), "actions": torch.rand(3, 4, 1),
             "returns_to_go": torch.rand(3, 4, 1), "timesteps": torch.arange(4).repeat(3, 1),
             "attention_mask": torch.tensor([[0, 1, 1, 1]] * 3)}
    with torch.no_grad():
        preds = model(**batch, return_dict=True).action_preds
        last = action_loss(model, batch, last_only=True)
        every = action_loss(model, batch)
    torch.testing.assert_close(last, ((preds[:, -1] - batch["actions"][:, -1]) ** 2).mean())
    torch.testing.assert_close(every, ((preds[:, 1:] - batch["actions"][:, 1:]) ** 2).mean())
    with pytest.raises(ValueError, match="loss must be"):
        TrainDTConfig(loss="first")
