"""Diagnostic, not a policy: does the joint NAMM lose at 15% of the video tokens for want of a recent window?

H2O keeps a recent window of half its budget, SnapKV its last 32 positions. This runs the EMA-0.9999 joint
NAMM with video statistics, progressive at 15% of the video tokens, on the 72 **validation** questions,
with its joint scores of the last ``W`` token positions set to +inf before every eviction (always kept):

    python benchmarks/scripts/video_recent_window.py 32    # writes runs/diag_recent_val_w32
    python benchmarks/scripts/video_recent_window.py 61    # half of the 123-token budget, as H2O
"""

import sys

import torch

from namm_transfer import NAMM
from namm_transfer.pipelines.video.evaluate import EvalVideoConfig, run_eval_video

torch.set_num_threads(1)
window = int(sys.argv[1]) if len(sys.argv) > 1 else 61
if window < 1:
    raise SystemExit(f"the window must be >= 1 token, got {window}")
orig = NAMM.prepare_joint


def prepare_with_window(self, states, views):
    orig(self, states, views)
    tokens = self._pending.shape[-1]
    self._pending[:, max(0, tokens - window):] = float("inf")


NAMM.prepare_joint = prepare_with_window
run_eval_video(EvalVideoConfig(
    annotations="runs/video_qa_128/val.jsonl", model="smollm2-shapes-128",
    namm="benchmarks/results/video_128_namm_joint/videostats_val/namm_ema9999_videostats",
    num_frames=128, policies=["NAMM"], budgets=[0.15], protocols=["progressive"], own_budget=False, limit=72,
    threads=1, heatmaps=0, output_dir=f"runs/diag_recent_val_w{window}"))
