"""End-to-end smoke runs of ``demo`` and ``bench overhead`` on the real SmolLM2 (slow: ``-m slow``)."""

from __future__ import annotations

import json

import pytest
import torch

from namm_transfer.pipelines.cli import main

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


def test_demo_small(tmp_path, capsys):
    assert main(["demo", "--prompt-tokens", "600", "--update-every", "256", "--namm-budget", "300",
                 "--rollout-episodes", "2", "--video-samples", "2", "--threads", "1",
                 "--output-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for name in ("FullCache", "NAMM", "Recency", "H2O", "L2Norm", "RandomEviction", "SnapKV", "TOVA"):
        assert name in table
    result = json.loads((tmp_path / "demo.json").read_text())
    rows = {r["policy"]: r for r in result["rows"]}
    assert rows["FullCache"]["correct"] and rows["FullCache"]["kept_fraction"] == 1.0
    assert len(result["budget_per_layer"]) == 30
    namm_kept = rows["NAMM"]["kept_fraction"]
    assert namm_kept < 1.0
    for name in ("Recency", "H2O", "L2Norm", "RandomEviction", "SnapKV", "TOVA"):  # matched cache size
        assert rows[name]["kept_fraction"] == pytest.approx(namm_kept, abs=0.02)
    rollouts = result["rollouts"]  # the DT comparison: same seeds, the NAMM holds less than the full cache
    assert list(rollouts["summary"]) == ["FullCache", "NAMM", "Recency"] and rollouts["seeds"] == [0, 1]
    summary = rollouts["summary"]
    assert summary["NAMM"]["tokens_mean"] < summary["FullCache"]["tokens_mean"]
    assert summary["FullCache"]["kept_fraction"] == 1.0 and len(rollouts["budget"]) == 3
    assert "Decision Transformer lunarlander-expert" in table
    video = result["video"]["summary"]  # the video-QA comparison on the shipped video model's test videos
    assert list(video) == ["FullCache", "NAMM", "Recency", "UniformFrames"]
    assert all(s["samples"] == 2 and s["failed"] == 0 for s in video.values())
    assert video["FullCache"]["kept_video_fraction"] == pytest.approx(1.0)
    assert video["NAMM"]["kept_video_fraction"] <= 0.5  # capped at 64 tokens per layer and head
    assert video["UniformFrames"]["frames"] <= video["FullCache"]["frames"]
    assert (tmp_path / "video" / "summary.md").is_file() and "Video QA on smollm2-shapes" in table


def test_bench_overhead_small(tmp_path):
    out = tmp_path / "results" / "overhead.md"
    assert main(["bench", "overhead", "--lengths", "256", "512", "--chunk", "256", "--reps", "1",
                 "--warmup", "0", "--threads", "1", "--decode-tokens", "2", "--output", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [(r["tokens"], r["setting"]) for r in data["rows"]] == [
        (n, s)
        for n in (256, 512)
        for s in ("keep-all", "half", "half one-shot", "threshold", "threshold padded")
    ]
    one_shot = data["rows"][-3]
    assert one_shot["chunk"] == one_shot["update_every"] == 512 and one_shot["compression_ratio"] == 0.5
    assert all(r["kv_bytes_kept"] <= r["kv_bytes_namm"] for r in data["rows"])
    # the shipped NAMM's own threshold: heads keep different counts; packed storage stays within the
    # kept rows' 4-byte indices of the kept bytes (slot: 2 x 64 dims x 4 bytes), padded does not
    packed, padded = data["rows"][-2], data["rows"][-1]
    assert packed["kv_layout"] == "packed" and padded["kv_layout"] == "padded"
    assert packed["kv_bytes_kept"] == padded["kv_bytes_kept"]
    assert packed["stored_to_kept"] <= 1 + 4 / 512 + 1e-9 < padded["stored_to_kept"]
    for r in data["rows"]:
        assert r["decode_tokens"] == 2 and r["bare_decode_s"] > 0 and r["namm_decode_s"] > 0
    assert "decode NAMM / bare" in out.read_text()
    assert data["meta"]["command"].startswith("namm-transfer bench overhead")
    assert "| tokens |" in out.read_text() and "stored / kept" in out.read_text()
