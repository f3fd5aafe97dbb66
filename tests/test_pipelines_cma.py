"""ResumableSepCMA: a pickled optimizer continues exactly as the uninterrupted one."""

import pickle

import numpy as np
import pytest

pytest.importorskip("cmaes")

from cmaes import SepCMA  # noqa: E402

from namm_transfer.pipelines.text.cma import ResumableSepCMA  # noqa: E402


def _step(opt, gens: int) -> list[np.ndarray]:
    drawn = []
    for _ in range(gens):
        xs = [opt.ask() for _ in range(opt.population_size)]
        opt.tell([(x, float(np.sum(x**2))) for x in xs])
        drawn.extend(xs)
    return drawn


def test_pickle_keeps_the_rng_stream_and_the_trajectory():
    a = ResumableSepCMA(mean=np.ones(5), sigma=0.5, seed=3, population_size=6)
    b = ResumableSepCMA(mean=np.ones(5), sigma=0.5, seed=3, population_size=6)
    _step(a, 2)
    _step(b, 2)
    b = pickle.loads(pickle.dumps(b))
    np.testing.assert_array_equal(np.stack(_step(a, 3)), np.stack(_step(b, 3)))
    assert a.sigma == b.sigma and np.array_equal(a.mean, b.mean)


def test_plain_sepcma_loses_its_stream_when_pickled():
    # Why the subclass exists: cmaes draws a fresh RNG on unpickling.
    a = SepCMA(mean=np.ones(5), sigma=0.5, seed=3, population_size=6)
    b = pickle.loads(pickle.dumps(a))
    assert not np.array_equal(a.ask(), b.ask())


def test_same_trajectory_as_cmaes_sepcma_and_sigma_adapts():
    ours = ResumableSepCMA(mean=np.ones(5), sigma=0.5, seed=7, population_size=6)
    theirs = SepCMA(mean=np.ones(5), sigma=0.5, seed=7, population_size=6)
    np.testing.assert_array_equal(np.stack(_step(ours, 4)), np.stack(_step(theirs, 4)))
    assert ours.sigma != 0.5


def test_upgrade_of_a_legacy_checkpoint_restores_its_rng():
    legacy = SepCMA(mean=np.zeros(4), sigma=0.3, seed=1, population_size=4)
    reference = ResumableSepCMA(mean=np.zeros(4), sigma=0.3, seed=1, population_size=4)
    _step(legacy, 1)
    _step(reference, 1)
    rng_state = legacy._rng.get_state()  # what old checkpoints stored beside the optimizer
    restored = ResumableSepCMA.upgrade(pickle.loads(pickle.dumps(legacy)), rng_state)
    np.testing.assert_array_equal(np.stack(_step(restored, 2)), np.stack(_step(reference, 2)))
