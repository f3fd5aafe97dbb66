"""The cue corridor: the cue is seen once, the reward needs it ~100 steps later."""

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from namm_transfer.envs import make_env  # noqa: E402
from namm_transfer.envs.memory import CueCorridorEnv, CueCorridorExpert  # noqa: E402


def _episode(env, act, seed):
    obs, info = env.reset(seed=seed)
    seen, applied, total, steps = [obs], [], 0.0, 0
    while True:
        obs, reward, terminated, truncated, step_info = env.step(act(obs))
        applied.append(float(step_info["applied_action"][0]))
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            return info, total, steps, np.stack(seen), applied
        seen.append(obs)


def test_cue_shown_once_after_the_first_steps_and_the_expert_always_succeeds():
    env = make_env("cuecorridor")  # registered short name: 120 steps to the junction, cue at step 10-29
    expert = CueCorridorExpert()
    cues, cue_steps = set(), set()
    for seed in range(30):
        expert.reset()
        info, total, steps, seen, applied = _episode(env, expert, seed)
        cue, at = info["cue"], info["cue_step"]
        cues.add(cue)
        cue_steps.add(at)
        assert steps == 121 and total == 1.0 and 10 <= at < 30
        assert seen[at, 0] == cue and np.count_nonzero(seen[:, 0]) == 1
        assert seen[-1, 2] == 1.0 and np.all(seen[:-1, 2] == 0) and seen[-1, 1] == 1.0
        # the corridor ignores actions and says so; the junction applies the chosen arm
        assert applied[:-1] == [0.0] * 120 and applied[-1] == cue
    assert cues == {-1.0, 1.0} and len(cue_steps) > 5


def test_without_the_cue_half_the_episodes_succeed():
    env = CueCorridorEnv(length=6, cue_steps=(1, 3))
    wins = [_episode(env, lambda obs: np.array([1.0]), seed)[1] for seed in range(400)]
    assert 0.4 < np.mean(wins) < 0.6
    contrarian = CueCorridorExpert()  # turns away from the cue: never rewarded
    contrarian.reset()
    assert [_episode(env, lambda obs: -contrarian(obs), s)[1] for s in range(5)] == [0.0] * 5


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="cue_steps"):
        CueCorridorEnv(length=5, cue_steps=(3, 9))
    env = CueCorridorEnv(length=1, cue_steps=(0, 1))
    env.reset(seed=0)
    env.step(np.zeros(1))
    env.step(np.zeros(1))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(1))


def test_env_batch_reports_what_the_envs_applied():
    from namm_transfer.envs import EnvBatch

    batch = EnvBatch("cuecorridor", 2)
    batch.reset(seeds=[0, 1])
    single = make_env("cuecorridor")
    assert [info["cue_step"] for info in batch.reset_infos] == [single.reset(seed=s)[1]["cue_step"]
                                                                for s in (0, 1)]  # kept for the plots
    batch.step(np.full((2, 1), 0.3, np.float32))
    np.testing.assert_array_equal(batch.applied_actions, np.zeros((2, 1)))  # the corridor ignores them
    lunar = pytest.importorskip("Box2D") and EnvBatch("lunarlander", 1)
    lunar.reset(seeds=[0])
    lunar.step(np.zeros((1, 2), np.float32))
    assert lunar.applied_actions is None  # envs that do not say: the agent's own action stands


def test_noisy_corridor_shows_a_sign_at_every_step_and_its_expert_reads_the_cue_by_position():
    """The noisy corridor: no blank step to make the cue stand out; the cue is the sign at step 20."""
    env = make_env("noisycorridor")
    expert = CueCorridorExpert(cue_step=20)
    first_non_zero = CueCorridorExpert()  # the silent corridor's expert: fooled by the noise
    wins, fooled = [], []
    for seed in range(40):
        expert.reset()
        info, total, steps, seen, applied = _episode(env, expert, seed)
        assert steps == 121 and info["cue_step"] == 20 and seen[20, 0] == info["cue"]
        assert set(np.abs(seen[:-1, 0]).tolist()) == {1.0} and seen[-1, 0] == 0.0
        assert applied[-1] == info["cue"]
        wins.append(total)
        first_non_zero.reset()
        fooled.append(_episode(env, first_non_zero, seed)[1])
    assert wins == [1.0] * 40 and 0.2 < np.mean(fooled) < 0.8
