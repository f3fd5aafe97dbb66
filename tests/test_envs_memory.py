"""The cue corridor: the cue is seen once, the reward needs it ``corridor`` steps later."""

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from namm_transfer.envs import make_env  # noqa: E402
from namm_transfer.envs.memory import CueCorridorEnv, CueCorridorExpert  # noqa: E402


def _episode(env, act, seed):
    obs, info = env.reset(seed=seed)
    seen, total, steps = [obs], 0.0, 0
    while True:
        obs, reward, terminated, truncated, _ = env.step(act(obs))
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            return info["cue"], total, steps, np.stack(seen)
        seen.append(obs)


def test_cue_only_at_the_first_step_and_the_expert_always_succeeds():
    env = make_env("cuecorridor")  # registered short name, default corridor of 100 steps
    expert = CueCorridorExpert()
    cues = set()
    for seed in range(20):
        expert.reset()
        cue, total, steps, seen = _episode(env, expert, seed)
        cues.add(cue)
        assert steps == 101 and total == 1.0
        assert seen[0, 0] == cue and np.all(seen[1:, 0] == 0)
        assert seen[-1, 2] == 1.0 and np.all(seen[:-1, 2] == 0) and seen[-1, 1] == 1.0
    assert cues == {-1.0, 1.0}


def test_without_the_cue_half_the_episodes_succeed():
    env = CueCorridorEnv(corridor=5)
    wins = [_episode(env, lambda obs: np.array([1.0]), seed)[1] for seed in range(400)]
    assert 0.4 < np.mean(wins) < 0.6
    contrarian = CueCorridorExpert()  # turns away from the cue: never rewarded
    contrarian.reset()
    assert [_episode(env, lambda obs: -contrarian(obs), s)[1] for s in range(5)] == [0.0] * 5


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="at least 1 step"):
        CueCorridorEnv(corridor=0)
    env = CueCorridorEnv(corridor=1)
    env.reset(seed=0)
    env.step(np.zeros(1))
    env.step(np.zeros(1))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(1))
