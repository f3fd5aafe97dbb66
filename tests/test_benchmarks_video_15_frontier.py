"""`video_15_frontier.py`: accuracies recomputed from eval-video rows as its summary does, "above both"
only past the best baseline of each protocol, and the committed test figures the results README quotes."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "video_15_frontier.py"
sys.path.insert(0, str(SCRIPT.parent))  # it reads rows with its sibling video_failures.py
spec = importlib.util.spec_from_file_location("video_15_frontier", SCRIPT)
frontier = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = frontier  # its dataclass looks its module up
spec.loader.exec_module(frontier)


def test_accuracy_skips_failed_rows_and_other_policies(tmp_path):
    rows = [{"policy": "A", "correct": c, "failed": False} for c in (True, True, False, True)]
    rows += [{"policy": "A", "correct": False, "failed": True}, {"policy": "B", "correct": False}]
    rows = [{**r, "sample_id": f"s{i}"} for i, r in enumerate(rows)]  # as eval-video's rows carry
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    acc = frontier.accuracy(tmp_path, "A")
    assert (acc.n, acc.mean) == (4, 0.75)
    assert acc.se == pytest.approx(0.5 / 4**0.5)  # sample std of (1, 1, 0, 1) is 0.5
    with pytest.raises(ValueError, match="no answered rows of policy 'C'"):
        frontier.accuracy(tmp_path, "C")
    with pytest.raises(FileNotFoundError, match="no rows.jsonl"):
        frontier.accuracy(tmp_path / "missing", "A")


def test_above_both_needs_both_protocols_past_the_best_baseline():
    a = frontier.Accuracy
    panels = {"validation": [("past both", "text", a(0.96, 0.01, 9), a(0.93, 0.01, 9)),
                             ("level one-shot", "hand", a(0.97, 0.01, 9), a(0.92, 0.01, 9))],
              "test": [("NAMM", "text", a(0.95, 0.01, 9), a(0.95, 0.01, 9)),
                       ("H2O", "base", a(0.94, 0.01, 9), a(0.70, 0.01, 9)),
                       ("SnapKV", "base", a(0.90, 0.01, 9), a(0.92, 0.01, 9))]}
    val_base = {"H2O @ 15%": a(0.95, 0, 9), "SnapKV @ 15% one-shot": a(0.92, 0, 9),
                "TOVA @ 15% one-shot": a(0.91, 0, 9)}
    best = frontier.best_baselines(panels, val_base)
    assert best == {"validation": (0.95, 0.92), "test": (0.94, 0.92)}
    table = frontier.markdown(panels, val_base, best)
    assert "| past both | fitted on text (zero-shot) | 0.960 ± 0.010 | 0.930 ± 0.010 | yes |" in table
    assert "| level one-shot | set by hand | 0.970 ± 0.010 | 0.920 ± 0.010 | no |" in table
    assert "| H2O | baseline | 0.940 ± 0.010 | 0.700 ± 0.010 | - |" in table


def test_committed_test_figures():
    """The shipped NAMM and the baselines on the 216 test questions, as the results README gives them."""
    test = {label: (round(p.mean, 3), round(o.mean, 3)) for label, _, p, o in frontier.collect()["test"]}
    assert test["shipped linear NAMM"] == (0.935, 0.866)
    assert test["H2O"] == (0.940, 0.764)
    assert test["SnapKV"] == test["TOVA"] == (0.931, 0.917)
