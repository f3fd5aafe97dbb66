"""The Ray backend on a local two-worker cluster: the same results as in-process evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from test_pipelines_evolve import (  # noqa: E402
    TASKS,
    CharTokenizer,
    config,
    records,
    tiny_model_and_tokenizer,
)

from namm_transfer.pipelines.text.evolve import LocalEvaluator, NAMMFactory, RayEvaluator, run_evolve  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    tests_dir = str(Path(__file__).resolve().parent)  # workers import the toy task/model from here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir, "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_ray_workers_score_like_the_local_evaluator(tmp_path, cluster):
    cfg = config(tmp_path, members_per_batch=2)
    model, tokenizer = tiny_model_and_tokenizer()
    examples = [TASKS["a"].make(None, 5, 48), TASKS["b"].make(None, 6, 48)]
    tasks = [TASKS["a"], TASKS["b"]]
    from namm_transfer import NAMM

    params = np.stack([NAMM.init_random(seed=s, sigma=0.5).params[0].numpy() for s in range(5)])
    factory = NAMMFactory(cfg.namm_config())
    remote = RayEvaluator(tiny_model_and_tokenizer, cfg, workers=2)
    try:
        local = LocalEvaluator(model, tokenizer, cfg)
        ours = remote.run(factory, params, examples, tasks)
        theirs = local.run(factory, params, examples, tasks)
        np.testing.assert_array_equal(ours.scores, theirs.scores)
        np.testing.assert_allclose(ours.kept, theirs.kept)
        remote_full, remote_stats = remote.full_cache(cfg.namm_config(), examples, tasks, collect=True)
        local_full, local_stats = local.full_cache(cfg.namm_config(), examples, tasks, collect=True)
        np.testing.assert_array_equal(remote_full, local_full)
        np.testing.assert_allclose(remote_stats[0], local_stats[0], rtol=1e-6)
    finally:
        remote.close()


def test_evolution_on_ray_follows_the_local_trajectory(tmp_path, cluster):
    model, tokenizer = tiny_model_and_tokenizer()
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    run_evolve(config(local_dir), TASKS, model, CharTokenizer())
    remote = RayEvaluator(tiny_model_and_tokenizer, config(ray_dir), workers=2)
    run_evolve(config(ray_dir, backend="ray"), TASKS, model, CharTokenizer(), evaluator=remote)
    assert records(ray_dir) == records(local_dir)
