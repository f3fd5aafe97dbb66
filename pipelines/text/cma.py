"""Separable CMA-ES whose whole state pickles, RNG included (docs/design.md, "Evolution").

``cmaes.SepCMA`` drops its RNG when pickled on purpose (an unpickled optimizer draws from a fresh
RandomState). An evolution checkpoint needs the exact stream, so that a resumed run samples the same
members as an uninterrupted one. This subclass is the one place that touches ``SepCMA``'s internals;
the jobs use only ``ask``/``tell``, ``mean``, ``sigma`` and ``pickle``.
"""

from __future__ import annotations

from typing import Any

from cmaes import SepCMA


class ResumableSepCMA(SepCMA):
    """``cmaes.SepCMA`` that keeps its RNG state through ``pickle`` and exposes its step size."""

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_rng_state"] = self._rng.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng_state = state.pop("_rng_state", None)
        super().__setstate__(state)
        if rng_state is not None:
            self._rng.set_state(rng_state)

    @property
    def sigma(self) -> float:
        """The global step size sigma of N(m, sigma^2 C)."""
        return float(self._sigma)

    @classmethod
    def upgrade(cls, optimizer: SepCMA, rng_state: Any = None) -> ResumableSepCMA:
        """A checkpoint written before this class (a plain ``SepCMA`` and its RNG state kept beside it)."""
        if isinstance(optimizer, cls):
            return optimizer
        state = optimizer.__getstate__()
        if rng_state is not None:
            state["_rng_state"] = rng_state
        upgraded = cls.__new__(cls)
        upgraded.__setstate__(state)
        return upgraded
