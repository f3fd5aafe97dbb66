"""A long-horizon memory task: the cue corridor (a T-maze with a long corridor, after Bakker 2001).

The agent walks down a corridor of ``length`` steps (its actions there change nothing). At one step,
drawn per episode from ``cue_steps`` (default 10 to 29, so never among the first tokens that
attention-sink policies such as StreamingLLM always keep), the observation shows a cue, +1 or -1; at
every other step it shows 0. At the junction (the last step) the sign of the action picks an arm,
and the reward is 1 if it matches the cue, else 0. The cue comes at least ``length - cue_steps[1]``
(default 91) steps before it is needed, so the return says whether the agent remembered it, and a
policy that only sees recent steps succeeds half the time.

The corridor ignores actions, and says so: ``info["applied_action"]`` is 0 there (and the chosen arm,
+-1, at the junction). Datasets record that applied action and Decision Transformer rollouts feed it
back instead of the DT's own prediction; otherwise a DT carries the cue forward in its own actions
(measured: a DT trained on this task wrote corridor actions of ~0.01 whose sign followed the cue at
every step, so a recency window of 15 steps still succeeded): memory outside the KV cache.

Observation ``[cue, progress, at_junction]`` (``progress`` = step / length, in [0, 1]); action
``Box(-1, 1, (1,))``; episodes are ``length + 1`` steps. Registered with gymnasium as
:data:`ENV_ID` (default length 120) when this module is imported, which
:mod:`namm_transfer.envs.factory` does, so ``make_env`` and Minari's ``recover_environment`` find it.

The noisy corridor (``noisy=True``, registered as :data:`NOISY_ENV_ID`, cue at step 20): every corridor
step shows a random sign in the cue channel and the cue is the sign shown at the cue step, which only
its position tells apart. In the silent corridor the cue is the one non-zero input of the episode, so
after the usual state normalisation it is a ~10-sigma outlier, and a policy that keeps unusual keys
(L2Norm: measured, it keeps the cue at every budget) solves the task without reading attention. Here
every state token has the same norm, as in memory tasks whose observations are never blank.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "namm/CueCorridor-v0"
NOISY_ENV_ID = "namm/NoisyCueCorridor-v0"
DEFAULT_LENGTH = 120
DEFAULT_CUE_STEPS = (10, 30)
NOISY_CUE_STEP = 20


class CueCorridorEnv(gym.Env):
    """The cue corridor: ``length`` steps to the junction, the cue at a step drawn from
    ``range(*cue_steps)``; ``noisy``: a random sign in the cue channel at every other corridor step."""

    metadata = {"render_modes": []}

    def __init__(self, length: int = DEFAULT_LENGTH, cue_steps: tuple[int, int] = DEFAULT_CUE_STEPS,
                 noisy: bool = False):
        low, high = (int(v) for v in cue_steps)
        if not 0 <= low < high <= length:
            raise ValueError(f"need 0 <= cue_steps[0] < cue_steps[1] <= length, got {cue_steps}, {length}")
        self.length, self.cue_steps, self.noisy = int(length), (low, high), bool(noisy)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        self._t, self._cue, self._cue_step = 0, 1.0, low

    def _obs(self) -> np.ndarray:
        if self._t == self._cue_step:
            cue = self._cue
        elif self.noisy and self._t < self.length:
            cue = 1.0 if self.np_random.random() < 0.5 else -1.0
        else:
            cue = 0.0
        return np.array([cue, self._t / self.length, float(self._t == self.length)], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._cue = 1.0 if self.np_random.random() < 0.5 else -1.0
        self._cue_step = int(self.np_random.integers(*self.cue_steps))
        return self._obs(), {"cue": self._cue, "cue_step": self._cue_step}

    def step(self, action):
        if self._t > self.length:
            raise RuntimeError("step() after the episode ended: call reset()")
        at_junction = self._t == self.length
        reward, choice = 0.0, 0.0
        if at_junction:
            choice = float(np.sign(np.asarray(action, dtype=np.float32).reshape(-1)[0]))
            reward = float(choice == self._cue)
        self._t += 1
        obs = self._obs() if not at_junction else np.zeros(3, dtype=np.float32)
        info = {"cue": self._cue, "cue_step": self._cue_step,
                "applied_action": np.array([choice], dtype=np.float32)}
        return obs, reward, at_junction, False, info


class CueCorridorExpert:
    """Scripted expert: remembers the cue when it is shown, walks with action 0, and at the junction
    turns towards the cue (action = cue). ``cue_step`` (the noisy corridor): the cue is the sign seen
    at that step (read from ``progress``), not the first non-zero one."""

    def __init__(self, cue_step: int | None = None, length: int = DEFAULT_LENGTH) -> None:
        self.cue_step, self.length = cue_step, length
        self.cue = 0.0

    def reset(self) -> None:
        self.cue = 0.0

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        if self.cue_step is None:
            if observation[0] != 0.0:
                self.cue = float(observation[0])
        elif round(float(observation[1]) * self.length) == self.cue_step:
            self.cue = float(observation[0])
        action = self.cue if observation[2] > 0.5 else 0.0
        return np.array([action], dtype=np.float32)


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=f"{__name__}:CueCorridorEnv", max_episode_steps=DEFAULT_LENGTH + 1)
if NOISY_ENV_ID not in gym.registry:
    gym.register(NOISY_ENV_ID, entry_point=f"{__name__}:CueCorridorEnv", max_episode_steps=DEFAULT_LENGTH + 1,
                 kwargs={"noisy": True, "cue_steps": (NOISY_CUE_STEP, NOISY_CUE_STEP + 1)})
