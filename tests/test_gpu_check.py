"""`make gpu-check` (scripts/gpu_check.sh) skips cleanly and writes nothing on a machine without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the check would really run")
def test_gpu_check_skips_without_cuda(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PY": sys.executable, "OUT": str(out)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: skipped" in result.stdout
    assert not out.exists()


def test_make_target_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ngpu-check:" in makefile and "scripts/gpu_check.sh" in makefile
    assert os.access(ROOT / "scripts" / "gpu_check.sh", os.X_OK)
