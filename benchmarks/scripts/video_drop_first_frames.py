"""Diagnostic, not a policy: does keeping the video's first frames cause the one-shot empty answers?

``plain``: the EMA-0.9999 joint NAMM with video statistics, one-shot at 15% of the video tokens, on the
72 validation questions. ``drop``: the same, with its joint scores of prompt positions 4..34 (the first 8
frames' tokens after the 4 sink tokens; 3 text tokens precede the video) set to -inf before every
eviction, so the budget goes to later frames. ``recent``: instead, the last 8 frames' tokens (positions
483..514, up to the video's end) scored +inf, always kept.

    python benchmarks/scripts/video_drop_first_frames.py plain   # writes runs/diag_firstframes_plain
    python benchmarks/scripts/video_drop_first_frames.py drop
"""

import sys

import torch

from namm_transfer import NAMM
from namm_transfer.pipelines.video.evaluate import EvalVideoConfig, run_eval_video

torch.set_num_threads(1)
mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
if mode not in ("plain", "drop", "recent"):
    raise SystemExit(f"mode must be plain, drop or recent, got {mode!r}")
if mode == "drop":
    orig = NAMM.prepare_joint

    def prepare_joint(self, states, views):
        orig(self, states, views)
        if self._pending.shape[-1] > 35:
            self._pending[:, 4:35] = float("-inf")
    NAMM.prepare_joint = prepare_joint
if mode == "recent":  # the last 8 frames before the question (prompt positions 483..514) always kept
    orig_recent = NAMM.prepare_joint

    def prepare_recent(self, states, views):
        orig_recent(self, states, views)
        if self._pending.shape[-1] >= 515:
            self._pending[:, 483:515] = float("inf")
    NAMM.prepare_joint = prepare_recent
run_eval_video(EvalVideoConfig(
    annotations="runs/video_qa_128/val.jsonl", model="smollm2-shapes-128",
    namm="runs/namm_ema9999_videostats",
    num_frames=128, policies=["NAMM"], budgets=[0.15], protocols=["one-shot"], own_budget=False, limit=72,
    threads=1, heatmaps=0, output_dir=f"runs/diag_firstframes_{mode}"))
