"""Scripted controllers for local offline-RL data: gymnasium's heuristics, a random policy, and noise.

- :class:`LunarLanderHeuristic`: ``gymnasium.envs.box2d.lunar_lander.heuristic`` (the continuous
  variant), returns ~245-306 on ``LunarLanderContinuous-v3``.
- :class:`BipedalWalkerHeuristic`: a port of gymnasium's ``BipedalWalkerHeuristics`` state machine
  (~305 when it does not fall, but it falls in about half the episodes) with per-instance state,
  :meth:`~BipedalWalkerHeuristic.reset` (gymnasium's class keeps its action array as a class
  attribute and has no reset) and its speed threshold as a parameter (a slower gait rarely falls).
- :class:`RandomController`: uniform actions in the action box, from its own generator.
- :class:`NoisyController`: wraps a controller for D4RL-style quality levels: with probability
  ``random_prob`` per step a uniform random action, otherwise the controller's action plus Gaussian
  noise of scale ``noise`` (in units of the action box's half-width), clipped to the box.

All controllers are deterministic given their ``numpy.random.Generator`` and the observations, which
is what makes generated datasets reproducible.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Controller(Protocol):
    """Maps an observation to an action; ``reset()`` starts an episode."""

    def reset(self) -> None: ...

    def __call__(self, observation: np.ndarray) -> np.ndarray: ...


class _ContinuousFlag:
    """Stands in for the env argument of gymnasium's lander heuristic (it reads only
    ``env.unwrapped.continuous``)."""

    continuous = True

    @property
    def unwrapped(self):
        return self


class LunarLanderHeuristic:
    """gymnasium's lunar-lander heuristic, continuous actions ``[main, lateral]`` in ``[-1, 1]``."""

    def reset(self) -> None:
        pass

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        from gymnasium.envs.box2d.lunar_lander import heuristic

        return np.asarray(heuristic(_ContinuousFlag(), observation), dtype=np.float32)


class BipedalWalkerHeuristic:
    """gymnasium's ``BipedalWalkerHeuristics`` (a leg-swapping state machine with PD joint control).

    Args:
        speed: hull speed above which the supporting knee bends further and the legs swap. gymnasium's
            0.29 falls in about half the episodes (returns ~305 when it does not); 0.16 rarely falls
            (~250-280), which is what the local datasets use.
    """

    STAY_ON_ONE_LEG, PUT_OTHER_DOWN, PUSH_OFF = 1, 2, 3
    SPEED = 0.29  # gymnasium's value
    SUPPORT_KNEE_ANGLE = +0.1

    def __init__(self, speed: float = SPEED) -> None:
        self.speed = float(speed)
        self.reset()

    def reset(self) -> None:
        self.state = self.STAY_ON_ONE_LEG
        self.moving_leg = 0
        self.supporting_leg = 1
        self.supporting_knee_angle = self.SUPPORT_KNEE_ANGLE

    def __call__(self, s: np.ndarray) -> np.ndarray:
        moving_base = 4 + 5 * self.moving_leg
        supporting_base = 4 + 5 * self.supporting_leg
        hip_targ: list[float | None] = [None, None]
        knee_targ: list[float | None] = [None, None]
        hip_todo = [0.0, 0.0]
        knee_todo = [0.0, 0.0]

        if self.state == self.STAY_ON_ONE_LEG:
            hip_targ[self.moving_leg] = 1.1
            knee_targ[self.moving_leg] = -0.6
            self.supporting_knee_angle += 0.03
            if s[2] > self.speed:
                self.supporting_knee_angle += 0.03
            self.supporting_knee_angle = min(self.supporting_knee_angle, self.SUPPORT_KNEE_ANGLE)
            knee_targ[self.supporting_leg] = self.supporting_knee_angle
            if s[supporting_base + 0] < 0.10:  # supporting leg is behind
                self.state = self.PUT_OTHER_DOWN
        if self.state == self.PUT_OTHER_DOWN:
            hip_targ[self.moving_leg] = +0.1
            knee_targ[self.moving_leg] = self.SUPPORT_KNEE_ANGLE
            knee_targ[self.supporting_leg] = self.supporting_knee_angle
            if s[moving_base + 4]:
                self.state = self.PUSH_OFF
                self.supporting_knee_angle = min(s[moving_base + 2], self.SUPPORT_KNEE_ANGLE)
        if self.state == self.PUSH_OFF:
            knee_targ[self.moving_leg] = self.supporting_knee_angle
            knee_targ[self.supporting_leg] = +1.0
            if s[supporting_base + 2] > 0.88 or s[2] > 1.2 * self.speed:
                self.state = self.STAY_ON_ONE_LEG
                self.moving_leg = 1 - self.moving_leg
                self.supporting_leg = 1 - self.moving_leg

        # gymnasium tests truthiness here, so a target of exactly 0 counts as none: kept as is.
        if hip_targ[0]:
            hip_todo[0] = 0.9 * (hip_targ[0] - s[4]) - 0.25 * s[5]
        if hip_targ[1]:
            hip_todo[1] = 0.9 * (hip_targ[1] - s[9]) - 0.25 * s[10]
        if knee_targ[0]:
            knee_todo[0] = 4.0 * (knee_targ[0] - s[6]) - 0.25 * s[7]
        if knee_targ[1]:
            knee_todo[1] = 4.0 * (knee_targ[1] - s[11]) - 0.25 * s[12]

        hip_todo[0] -= 0.9 * (0 - s[0]) - 1.5 * s[1]  # PD to keep the hull level
        hip_todo[1] -= 0.9 * (0 - s[0]) - 1.5 * s[1]
        knee_todo[0] -= 15.0 * s[3]  # vertical speed, damps oscillations
        knee_todo[1] -= 15.0 * s[3]

        action = np.array([hip_todo[0], knee_todo[0], hip_todo[1], knee_todo[1]], dtype=np.float64)
        return np.clip(0.5 * action, -1.0, 1.0).astype(np.float32)


class RandomController:
    """Uniform random actions in ``[low, high]``, drawn from ``rng``."""

    def __init__(self, low: np.ndarray, high: np.ndarray, rng: np.random.Generator):
        self.low, self.high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        self.rng = rng

    def reset(self) -> None:
        pass

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)


class NoisyController:
    """``controller`` with per-step random actions (probability ``random_prob``) and Gaussian noise.

    Args:
        controller: the base policy.
        low, high: the action box.
        rng: the noise generator (seed it for reproducible data).
        noise: Gaussian standard deviation as a fraction of the box's half-width.
        random_prob: probability of replacing the step's action by a uniform random one.
    """

    def __init__(
        self,
        controller: Controller,
        low: np.ndarray,
        high: np.ndarray,
        rng: np.random.Generator,
        noise: float = 0.0,
        random_prob: float = 0.0,
    ):
        if noise < 0 or not 0.0 <= random_prob <= 1.0:
            raise ValueError(f"need noise >= 0 and 0 <= random_prob <= 1, got {noise}, {random_prob}")
        self.controller = controller
        self.low, self.high = np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32)
        self.rng, self.noise, self.random_prob = rng, float(noise), float(random_prob)

    def reset(self) -> None:
        self.controller.reset()

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        # The base controller runs every step (its state machine must follow the episode), and both
        # draws happen every step, so the random stream does not depend on which branch was taken.
        action = np.asarray(self.controller(observation), dtype=np.float32)
        uniform = self.rng.uniform(self.low, self.high).astype(np.float32)
        gauss = self.rng.standard_normal(action.shape).astype(np.float32)
        take_random = self.rng.random() < self.random_prob
        if take_random:
            return uniform
        half_width = (self.high - self.low) / 2
        return np.clip(action + self.noise * half_width * gauss, self.low, self.high).astype(np.float32)
