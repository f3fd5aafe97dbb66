"""envs: env factories, local Minari dataset generation, loading by id, normalised scores.

Tiny sizes: a few LunarLander episodes (~200 steps each, ~10k env steps/s), time limits cut short
where the test does not need whole episodes; the BipedalWalker quality check is @slow.
"""

from __future__ import annotations

import minari
import numpy as np
import pytest

from namm_transfer.envs import controllers, datasets, factory, generate, scores
from namm_transfer.pipelines.cli import main
from namm_transfer.pipelines.rl import datasets as rl_datasets

LUNAR = generate.LOCAL_ENVS["lunarlander"]
SHORT = 40  # max_episode_steps where whole episodes are not needed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("minari")


@pytest.fixture(scope="module")
def lunar_expert(root):
    """namm/lunarlandercontinuous/expert-v0: 3 episodes of at most 40 steps, reference from 2 each."""
    return generate.make_local_dataset("lunarlander", "expert", 3, seed=5, root=root, ref_episodes=2,
                                       max_episode_steps=SHORT)


# --------------------------------------------------------------------------------------------------
# env factories


def test_make_env_resolves_short_names_and_seeds_reset():
    env = factory.make_env("lunarlander", seed=3)
    assert env.spec.id == "LunarLanderContinuous-v3"
    first = env.reset(seed=3)[0]
    again = factory.make_env("LunarLanderContinuous-v3").reset(seed=3)[0]
    np.testing.assert_array_equal(first, again)
    assert factory.resolve_env_id("Hopper") == "Hopper-v4"


def test_make_env_unknown_id_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown environment 'NoSuchEnv-v0'.*lunarlander"):
        factory.make_env("NoSuchEnv-v0")


def test_vector_env_and_env_batch_shapes():
    vec = factory.make_vector_env("lunarlander", 3, seed=0)
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, 8)
    vec.close()

    batch = factory.EnvBatch("lunarlander", 2, max_episode_steps=5)
    obs = batch.reset(seeds=10)
    assert obs.shape == (2, 8) and obs.dtype == np.float32
    with pytest.raises(ValueError, match=r"actions must be \[2, 2\]"):
        batch.step(np.zeros((2, 3)))
    frozen = None
    for _ in range(7):  # past the 5-step limit: finished episodes stay finished and frozen
        obs, rewards, done = batch.step(np.zeros((2, 2)))
        if done.all() and frozen is None:
            frozen = obs.copy()
        elif frozen is not None:
            np.testing.assert_array_equal(obs, frozen)
            assert (rewards == 0).all()
    assert batch.all_done and (batch.lengths == 5).all()


# --------------------------------------------------------------------------------------------------
# controllers


def test_bipedal_port_matches_gymnasium_heuristic():
    from gymnasium.envs.box2d.bipedal_walker import BipedalWalkerHeuristics

    env = factory.make_env("bipedalwalker")
    obs, _ = env.reset(seed=1)
    ours, theirs = controllers.BipedalWalkerHeuristic(), BipedalWalkerHeuristics()
    for _ in range(150):
        a = ours(obs)
        np.testing.assert_allclose(a, theirs.step_heuristic(obs), rtol=0, atol=1e-6)
        obs, *_ = env.step(a)


def test_noisy_controller_is_seeded_and_stays_in_the_box():
    low, high = -np.ones(2, np.float32), np.ones(2, np.float32)
    obs = np.zeros(8, np.float32)

    def actions(seed):
        c = controllers.NoisyController(controllers.LunarLanderHeuristic(), low, high,
                                        np.random.default_rng(seed), noise=0.5, random_prob=0.5)
        return np.stack([c(obs) for _ in range(50)])

    np.testing.assert_array_equal(actions(0), actions(0))
    assert not np.array_equal(actions(0), actions(1))
    assert actions(0).min() >= -1 and actions(0).max() <= 1
    with pytest.raises(ValueError, match="random_prob"):
        controllers.NoisyController(controllers.LunarLanderHeuristic(), low, high,
                                    np.random.default_rng(0), random_prob=1.5)


# --------------------------------------------------------------------------------------------------
# generation


def test_generation_is_deterministic_and_extends():
    a = generate.run_episodes(LUNAR, "replay", 3, seed=7, max_episode_steps=SHORT)
    b = generate.run_episodes(LUNAR, "replay", 3, seed=7, max_episode_steps=SHORT)
    for x, y in zip(a.buffers, b.buffers, strict=True):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)
        assert x.rewards == y.rewards and x.seed == y.seed
    # a larger dataset starts with the smaller one; another seed differs
    longer = generate.run_episodes(LUNAR, "replay", 4, seed=7, max_episode_steps=SHORT)
    np.testing.assert_array_equal(longer.buffers[2].observations, a.buffers[2].observations)
    other = generate.run_episodes(LUNAR, "replay", 1, seed=8, max_episode_steps=SHORT)
    assert not np.array_equal(other.buffers[0].observations, a.buffers[0].observations)
    # replay mixes noise levels across episodes
    assert len(set(a.noises[:, 1])) == 3


def test_dataset_loads_back_through_minari(lunar_expert, root, monkeypatch):
    dataset_id = "namm/lunarlandercontinuous/expert-v0"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    loaded = minari.load_dataset(dataset_id)
    env = factory.make_env("lunarlander")
    assert loaded.observation_space == env.observation_space
    assert loaded.action_space == env.action_space
    assert loaded.total_episodes == 3
    assert loaded.recover_environment().spec.max_episode_steps == SHORT

    low, high = generate.reference_scores(LUNAR, 2, seed=5, max_episode_steps=SHORT)
    meta = loaded.storage.metadata
    assert (meta["ref_min_score"], meta["ref_max_score"]) == pytest.approx((low, high))
    assert meta["namm_generation"]["level"]["name"] == "expert"
    np.testing.assert_allclose(minari.get_normalized_score(loaded, np.array([high])), [1.0])

    # the stored arrays are what the generator produced
    regenerated = generate.run_episodes(LUNAR, "expert", 3, seed=5, max_episode_steps=SHORT)
    eps = datasets.episodes(loaded)
    for ep, buf in zip(eps, regenerated.buffers, strict=True):
        np.testing.assert_array_equal(ep.observations, buf.observations[:-1])
        np.testing.assert_array_equal(ep.actions, buf.actions)
        assert ep.observations.shape == (len(ep), 8) and ep.actions.shape == (len(ep), 2)


def test_existing_dataset_is_not_overwritten_silently(lunar_expert, root):
    with pytest.raises(FileExistsError, match="overwrite"):
        generate.make_local_dataset("lunarlander", "expert", 1, seed=5, root=root, max_episode_steps=SHORT,
                                    ref_scores=(0.0, 1.0))


def test_expert_return_beats_medium():
    expert = generate.run_episodes(LUNAR, "expert", 4, seed=0).returns.mean()
    medium = generate.run_episodes(LUNAR, "medium", 4, seed=0).returns.mean()
    random = generate.run_episodes(LUNAR, "random", 4, seed=0).returns.mean()
    assert expert > 200 and expert > medium > random


@pytest.mark.slow
def test_bipedal_expert_return_beats_medium():
    spec = generate.LOCAL_ENVS["bipedalwalker"]
    expert = generate.run_episodes(spec, "expert", 6, seed=0).returns.mean()
    medium = generate.run_episodes(spec, "medium", 6, seed=0).returns.mean()
    random = generate.run_episodes(spec, "random", 6, seed=0).returns.mean()
    assert expert > medium > random


# --------------------------------------------------------------------------------------------------
# loading by id and scores


def test_load_dataset_unknown_id_names_it_and_the_servers(root):
    with pytest.raises(FileNotFoundError, match=r"'mujoco/hopper/medium-v0'.*servers are unreachable"):
        datasets.load_dataset("mujoco/hopper/medium-v0", root=root)


def test_load_dataset_download_failure_is_clear(root, monkeypatch):
    def offline(dataset_id, download=False):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(minari, "load_dataset", offline)
    match = r"could not download.*'mujoco/hopper/expert-v0'.*unreachable"
    with pytest.raises(FileNotFoundError, match=match):
        datasets.load_dataset("mujoco/hopper/expert-v0", root=root, download=True)


def test_normalised_score_d4rl_constants_by_hand():
    assert scores.normalised_score("hopper-medium-v2", 3234.3) == pytest.approx(100.0)
    assert scores.normalised_score("Hopper-v4", -20.272305) == pytest.approx(0.0)
    assert scores.normalised_score("hopper", 1617.0135) == pytest.approx(50.3072494, abs=1e-6)
    cheetah = scores.normalised_score("mujoco/halfcheetah/medium-v0", 6000.0)
    assert cheetah == pytest.approx(50.5846833, abs=1e-6)
    np.testing.assert_allclose(
        scores.normalised_score("edbeeching/decision-transformer-gym-walker2d-expert", [1.629008, 2000.0]),
        [0.0, 43.5311308], atol=1e-6,
    )


def test_normalised_score_uses_the_dataset_refs(lunar_expert, root):
    low, high = datasets.dataset_ref_scores(lunar_expert)
    mid = (low + high) / 2
    assert scores.normalised_score(lunar_expert, mid) == pytest.approx(50.0)
    by_id = scores.normalised_score("namm/lunarlandercontinuous/expert-v0", [low, high], root=root)
    np.testing.assert_allclose(by_id, [0.0, 100.0])
    with pytest.raises(ValueError, match="no reference scores for 'CartPole-v1'"):
        scores.normalised_score("CartPole-v1", 1.0)


# --------------------------------------------------------------------------------------------------
# the make-rl-datasets pipeline and CLI


def test_cli_names_match_the_recipes():
    assert rl_datasets.ENV_NAMES == tuple(generate.LOCAL_ENVS)
    assert rl_datasets.LEVEL_NAMES == generate.LEVELS


def test_make_rl_datasets_cli_writes_keeps_and_refuses(tmp_path, capsys):
    args = ["make-rl-datasets", "--envs", "lunarlander", "--levels", "expert", "medium", "--episodes", "2",
            "--ref-episodes", "1", "--max-episode-steps", "20", "--root", str(tmp_path)]
    assert main(args) == 0
    ids = datasets.local_dataset_ids(tmp_path)
    assert ids == ["namm/lunarlandercontinuous/expert-v0", "namm/lunarlandercontinuous/medium-v0"]
    summary = (tmp_path / "namm_datasets.md").read_text()
    assert "namm/lunarlandercontinuous/medium-v0" in summary and "make-rl-datasets" in summary
    first = datasets.episodes(datasets.load_dataset(ids[0], tmp_path))[0].observations

    assert main(args) == 0  # same settings: kept
    np.testing.assert_array_equal(datasets.episodes(datasets.load_dataset(ids[0], tmp_path))[0].observations,
                                  first)
    with pytest.raises(FileExistsError, match="episodes: 2 there, 3 asked"):
        main([*args[:7], "3", *args[8:]])
    assert main([*args[:7], "3", *args[8:], "--overwrite"]) == 0
    assert datasets.load_dataset(ids[0], tmp_path).total_episodes == 3


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown env"):
        rl_datasets.RLDatasetsConfig(envs=["cartpole"])
