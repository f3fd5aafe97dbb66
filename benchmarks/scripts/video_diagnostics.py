"""What the video diagnostics share (``video_namm_variants.py``, ``joint_readouts.py``,
``video_layer_retention.py``): the joint NAMM they vary and a capped-only ``eval-video`` run of it."""

from __future__ import annotations

from namm_transfer.pipelines.video import evaluate
from namm_transfer.pipelines.video.evaluate import EvalVideoConfig, run_eval_video

# the EMA-0.9999 joint NAMM evolved on text, with feature statistics from 24 unlabelled validation videos
VIDEO_NAMM = "benchmarks/results/video_128_namm_joint/videostats_val/namm_ema9999_videostats"
FRAMES, CADENCE = 128, 256  # as the runs of benchmarks/results/video_128*/


def run_capped_namm(namm, *, annotations: str, limit: int, output_dir: str, shard: str = "0/1",
                    head_mix: float | None = None, budget: float = 0.15,
                    protocol: str = "progressive") -> None:
    """``eval-video`` of ``namm`` (a changed :data:`VIDEO_NAMM`) on ``smollm2-shapes-128``: its capped run at
    ``budget`` of the video tokens under ``protocol`` only (no uncapped NAMM, no baselines)."""
    cfg = EvalVideoConfig(
        annotations=annotations, model="smollm2-shapes-128", namm=VIDEO_NAMM, num_frames=FRAMES,
        update_every=CADENCE, policies=["NAMM"], budgets=[budget], protocols=[protocol], own_budget=False,
        limit=limit, threads=1, heatmaps=0, namm_head_mix=head_mix, shard=shard, output_dir=output_dir)
    evaluate.video_policies = lambda: []  # the capped run only (budget_runs)
    run_eval_video(cfg, namm=namm)
