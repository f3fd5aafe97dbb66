"""``namm-transfer calibrate``: its input checks (the calibration itself: test_pipelines_shared_prefill)."""

from __future__ import annotations

import pytest

from namm_transfer.pipelines.cli import parse
from namm_transfer.pipelines.text.calibrate import CalibrateConfig, run_calibrate
from namm_transfer.pipelines.text.tasks import TASKS


def test_the_command_line_builds_its_config():
    _, cfg = parse(["calibrate", "--namm", "smollm2-text-joint-v1", "--joint-reference", "fresh-median",
                    "--keep", "0.3", "--out-dir", "x"])
    assert cfg == CalibrateConfig(namm="smollm2-text-joint-v1", joint_reference="fresh-median", keep=0.3,
                                  out_dir="x")
    _, cfg = parse(["calibrate", "--prompt-lengths", "1024", "1536", "--min-tokens", "256"])
    assert cfg.prompt_lengths == [1024, 1536] and cfg.min_tokens == 256
    with pytest.raises(SystemExit):
        parse(["calibrate", "--joint-reference", "relative"])


def test_bad_settings_are_clear_errors_before_any_model_loads():
    with pytest.raises(ValueError, match="keep must be a fraction"):
        CalibrateConfig(keep=1.0)
    with pytest.raises(ValueError, match="min_tokens"):
        CalibrateConfig(min_tokens=-1)
    with pytest.raises(ValueError, match="joint NAMM"):
        run_calibrate(CalibrateConfig(namm="smollm2-text", joint_reference="fresh-median"), TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        run_calibrate(CalibrateConfig(tasks=["nope"]), TASKS)
