"""Diagnostic, not a policy: variants of the joint NAMM at 15% of the video tokens (progressive).

Runs the EMA-0.9999 joint NAMM with video statistics, progressive at 15% of the video tokens, changed in
one of three ways, to see what the text-evolved NAMM lacks on video:

- ``--window W``: a recent window. H2O keeps one of half its budget, SnapKV its last 32 positions. The
  NAMM's scores of the last ``W`` token positions are set to +inf before every eviction (always kept;
  with a head mix, each head's scores too).
- ``--age-scale S``: its age (recency) weights times ``S`` (0: no age term). Evolved on text, it keeps
  the video's first frames as it would a prompt's first tokens.
- ``--mix-per layer``: the head mix with each layer's own term (the sum of its KV heads' terms) in place
  of each head's: every head of a layer keeps the same tokens, and layers differ.

Only the capped run (no uncapped NAMM). The 72 validation questions by default:

    python benchmarks/scripts/video_namm_variants.py --window 32    # writes runs/diag_val_w32_a1
    python benchmarks/scripts/video_namm_variants.py --window 61    # half of the 123-token budget, as H2O
    python benchmarks/scripts/video_namm_variants.py --head-mix 0.5 --age-scale 0 \\
        --annotations runs/video_qa_128_val216/val.jsonl --limit 216 --output-dir runs/val216_hm0.5_age0
"""

import argparse

import torch

from namm_transfer import NAMM, joint
from namm_transfer import namm as namm_module
from namm_transfer.pipelines.video import evaluate
from namm_transfer.pipelines.video.evaluate import EvalVideoConfig, run_eval_video

NAMM_PATH = "benchmarks/results/video_128_namm_joint/videostats_val/namm_ema9999_videostats"
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--window", type=int, default=0, help="token positions always kept (0: none)")
parser.add_argument("--age-scale", type=float, default=1.0, help="factor on the age weights (1: as evolved)")
parser.add_argument("--head-mix", type=float, default=None, help="the NAMM's head_mix (default: its own)")
parser.add_argument("--mix-per", choices=("head", "layer"), default="head", help="whose own term is mixed in")
parser.add_argument("--annotations", default="runs/video_qa_128/val.jsonl")
parser.add_argument("--limit", type=int, default=72)
parser.add_argument("--output-dir", default=None, help="default runs/diag_val_w{window}_a{age_scale}")
parser.add_argument("--shard", default="0/1", help="K/N: this process's share of the questions")
args = parser.parse_args()
if args.window < 0:
    raise SystemExit(f"the window must be >= 0 tokens (0: none), got {args.window}")
torch.set_num_threads(1)

namm = NAMM.from_pretrained(NAMM_PATH)
if not namm.joint:
    raise SystemExit(f"{NAMM_PATH} is not a joint NAMM")
age = slice(-1 - namm.config.age_dim, -1)  # joint parameters: spectral weights, age weights, bias
with torch.no_grad():
    namm.params[:, age] *= args.age_scale
orig = NAMM.prepare_joint


def prepare_with_window(self, states, views):
    orig(self, states, views)
    if not args.window:
        return
    start = max(0, self._pending.shape[-1] - args.window)  # scores are indexed by token position
    self._pending[:, start:] = float("inf")
    if self._pending_heads is not None:
        self._pending_heads[..., start:] = float("inf")


def layer_mixed(params, scores, features, positions, valid, held, age_dim, mix):
    """joint.head_mixed with each layer's own term (its KV heads' terms summed) for all its heads."""
    heads = features[0].shape[1]
    own = joint.own_terms(params, features, positions, valid, age_dim, scores.shape[-1])
    own = own.unflatten(1, (len(features), heads)).sum(2)  # [B, layers, T]
    mixed = joint._zscore(scores, held)[:, None] + mix * joint._zscore(own, held[:, None])
    mixed = mixed.masked_fill(~held[:, None], float("-inf"))
    return mixed[:, :, None].expand(-1, -1, heads, -1)


NAMM.prepare_joint = prepare_with_window
if args.mix_per == "layer":
    namm_module.head_mixed = layer_mixed
cfg = EvalVideoConfig(
    annotations=args.annotations, model="smollm2-shapes-128", namm=NAMM_PATH,
    num_frames=128, policies=["NAMM"], budgets=[0.15], protocols=["progressive"], own_budget=False,
    limit=args.limit, threads=1, heatmaps=0, namm_head_mix=args.head_mix, shard=args.shard,
    output_dir=args.output_dir or f"runs/diag_val_w{args.window}_a{args.age_scale:g}")
evaluate.video_policies = lambda: []  # the capped run only (budget_runs); no uncapped NAMM
run_eval_video(cfg, namm=namm)
