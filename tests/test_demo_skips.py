"""The demo skips, with a message, the comparisons whose packages are missing (it never crashes after
the text table): gymnasium installed without an environment's own package (box2d's pygame) is such a case."""

from __future__ import annotations

import pytest
import torch

import namm_transfer.envs
from namm_transfer.pipelines import demo

torch.set_num_threads(1)


def test_rollouts_skipped_when_the_environment_needs_a_missing_package(monkeypatch, capsys):
    pytest.importorskip("gymnasium")

    def missing(env_id, **kwargs):
        raise ImportError(f"environment {env_id!r} needs a missing package (pygame is not installed)")

    monkeypatch.setattr(namm_transfer.envs, "make_env", missing)
    assert demo.run_rollouts(demo.DemoConfig(rollout_episodes=1)) is None
    assert "rollout comparison skipped: environment 'LunarLanderContinuous-v3' needs a missing package" \
        in capsys.readouterr().err
