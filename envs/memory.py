"""A long-horizon memory task: the cue corridor (a T-maze with a long corridor, after Bakker 2001).

At the first step the observation shows a cue, +1 or -1; for the next ``corridor`` steps it shows 0
while the agent walks down the corridor (its actions there change nothing); at the junction (the last
step) the sign of the action picks an arm, and the reward is 1 if it matches the cue, else 0. So the
return says whether the agent remembered what it saw ``corridor`` steps earlier, and a policy that
only sees recent steps succeeds half the time.

Observation ``[cue, progress, at_junction]`` (``progress`` = step / corridor, in [0, 1]); action
``Box(-1, 1, (1,))``; episodes are ``corridor + 1`` steps. Registered with gymnasium as
:data:`ENV_ID` (default corridor 100) when this module is imported, which
:mod:`namm_transfer.envs.factory` does, so ``make_env`` and Minari's ``recover_environment`` find it.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "namm/CueCorridor-v0"
DEFAULT_CORRIDOR = 100


class CueCorridorEnv(gym.Env):
    """The cue corridor; ``corridor`` steps between the cue and the junction."""

    metadata = {"render_modes": []}

    def __init__(self, corridor: int = DEFAULT_CORRIDOR):
        if corridor < 1:
            raise ValueError(f"the corridor needs at least 1 step, got {corridor}")
        self.corridor = int(corridor)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
        self._t, self._cue = 0, 1.0

    def _obs(self) -> np.ndarray:
        cue = self._cue if self._t == 0 else 0.0
        return np.array([cue, self._t / self.corridor, float(self._t == self.corridor)], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._cue = 1.0 if self.np_random.random() < 0.5 else -1.0
        return self._obs(), {"cue": self._cue}

    def step(self, action):
        if self._t > self.corridor:
            raise RuntimeError("step() after the episode ended: call reset()")
        at_junction = self._t == self.corridor
        reward = 0.0
        if at_junction:
            choice = float(np.sign(np.asarray(action, dtype=np.float32).reshape(-1)[0]))
            reward = float(choice == self._cue)
        self._t += 1
        obs = self._obs() if not at_junction else np.zeros(3, dtype=np.float32)
        return obs, reward, at_junction, False, {"cue": self._cue}


class CueCorridorExpert:
    """Scripted expert: remembers the cue of the first observation, walks with action 0, and at the
    junction turns towards the cue (action = cue)."""

    def __init__(self) -> None:
        self.cue = 0.0

    def reset(self) -> None:
        self.cue = 0.0

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        if observation[0] != 0.0:
            self.cue = float(observation[0])
        action = self.cue if observation[2] > 0.5 else 0.0
        return np.array([action], dtype=np.float32)


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=f"{__name__}:CueCorridorEnv", max_episode_steps=DEFAULT_CORRIDOR + 1,
                 kwargs={"corridor": DEFAULT_CORRIDOR})
