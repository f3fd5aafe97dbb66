"""Diagnostic, not a policy: variants of the joint NAMM at one capped budget (default 15%, progressive).

Runs the EMA-0.9999 joint NAMM with video statistics, capped at ``--budget`` of the video tokens under
``--protocol`` (default 15%, progressive), changed in
one of these ways, to see what the text-evolved NAMM lacks on video:

- ``--window W``: a recent window. H2O keeps one of half its budget, SnapKV its last 32 positions. The
  NAMM's scores of the last ``W`` token positions are set to +inf before every eviction (always kept;
  with a head mix, each head's scores too).
- ``--age-scale S``: its age (recency) weights times ``S`` (0: no age term). Evolved on text, it keeps
  the video's first frames as it would a prompt's first tokens.
- ``--mix-per layer``: the head mix with each layer's own term (the sum of its KV heads' terms) in place
  of each head's: every head of a layer keeps the same tokens, and layers differ.
- ``--deal D --core C``: every layer keeps the ``C`` share of its cap that the joint score ranks best;
  the rest of the cap is dealt out in score order across ``D`` sets of layers (layer ``l`` in set
  ``l % D`` takes the next-best tokens of ranks ``d, d + D, d + 2D, ...`` beyond those), so the model as
  a whole holds more distinct tokens. Ranks by the joint score: the head mix is not used, though the
  run's ``setting.json`` says ``namm_head_mix`` 1 (any m > 0 routes ``keep()`` through the per-head
  ranking this replaces).
- ``--own PATH``: the head mix's own terms are the per-head read-outs of a ``joint_readouts.py fit-heads``
  file (``{"weights": [layer-heads, bins]}``) instead of each head's term of the joint read-out.
- ``--other-layers A-B``: a baseline (``--other``, default H2O; same cap and cadence) decides which tokens
  layers A to B keep, the NAMM the others: where, by depth, the NAMM's choices cost it accuracy.

Only the capped run (no uncapped NAMM). The 72 validation questions by default:

    python benchmarks/scripts/video_namm_variants.py --window 32    # writes runs/diag_val_w32_a1
    python benchmarks/scripts/video_namm_variants.py --window 61    # half of the 123-token budget, as H2O
    python benchmarks/scripts/video_namm_variants.py --head-mix 0.5 --age-scale 0 \\
        --annotations runs/video_qa_128_val216/val.jsonl --limit 216 --output-dir runs/val216_hm0.5_age0
"""

import argparse

import torch
from video_diagnostics import VIDEO_NAMM, run_capped_namm

from namm_transfer import NAMM, joint
from namm_transfer import namm as namm_module
from namm_transfer.pipelines.video import evaluate
from namm_transfer.policies import MemoryPolicy

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--window", type=int, default=0, help="token positions always kept (0: none)")
parser.add_argument("--age-scale", type=float, default=1.0, help="factor on the age weights (1: as evolved)")
parser.add_argument("--head-mix", type=float, default=None, help="the NAMM's head_mix (default: its own)")
parser.add_argument("--mix-per", choices=("head", "layer"), default="head", help="whose own term is mixed in")
parser.add_argument("--deal", type=int, default=0, help="D: sets of layers the rest is dealt to (0: off)")
parser.add_argument("--core", type=float, default=0.5, help="C: share of the cap every layer keeps alike")
parser.add_argument("--own", default=None, help="a fit-heads file: the head mix's own terms")
parser.add_argument("--other-layers", default=None, help="A-B: layers A..B (inclusive) evict by --other")
parser.add_argument("--other", default="H2O", help="the baseline of --other-layers")
parser.add_argument("--budget", type=float, default=0.15, help="share of the video tokens")
parser.add_argument("--protocol", default="progressive", choices=evaluate.PROTOCOLS)
parser.add_argument("--annotations", default="runs/video_qa_128/val.jsonl")
parser.add_argument("--limit", type=int, default=72)
parser.add_argument("--output-dir", default=None, help="default runs/diag_val_w{window}_a{age_scale}")
parser.add_argument("--shard", default="0/1", help="K/N: this process's share of the questions")
args = parser.parse_args()
if args.window < 0:
    raise SystemExit(f"the window must be >= 0 tokens (0: none), got {args.window}")
torch.set_num_threads(1)

namm = NAMM.from_pretrained(VIDEO_NAMM)
if not namm.joint:
    raise SystemExit(f"{VIDEO_NAMM} is not a joint NAMM")
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


def dealt(self, keep, view):
    """NAMM._rerank_per_head for ``--deal``: the same count per head, the tokens chosen as dealt."""
    scores = namm_module._per_slot(self._pending[:, None], view)  # [B, H, S] the joint score, -inf invalid
    if self.config.sink_tokens:
        scores = scores.masked_fill(namm_module.sink_slots(view, self.config.sink_tokens), float("inf"))
    slots = scores.shape[-1]
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(slots).expand_as(order))
    count = keep.sum(-1, keepdim=True)
    core = (count * args.core).floor().long()
    beyond = rank - core
    mine = (beyond >= 0) & (beyond % args.deal == view.layer_idx % args.deal)
    tier = torch.where(rank < core, 0, torch.where(mine, 1, 2))  # core, this set's deal, the rest
    key = -(tier * slots + rank).float()
    return namm_module.select_tokens(key.masked_fill(~view.valid, float("-inf")), view.valid, view.positions,
                                     None, count, view.protect)


class ByDepth(MemoryPolicy):
    """The joint NAMM in every layer but ``layers``, where ``other`` decides; both observe every layer."""

    joint = needs_attention = True

    def __init__(self, namm: NAMM, other: MemoryPolicy, layers: range):
        super().__init__(namm.update_every)
        self.namm, self.other, self.layers = namm, other, layers

    def new_state(self, layer_idx):
        return self.namm.new_state(layer_idx), self.other.new_state(layer_idx)

    def observe(self, state, attention, row_valid):
        self.namm.observe(state[0], attention, row_valid)
        self.other.observe(state[1], attention, row_valid)

    def on_select(self, state, index):
        self.namm.on_select(state[0], index)
        self.other.on_select(state[1], index)

    def keep(self, state, view):
        if view.layer_idx in self.layers:
            return self.other.keep(state[1], view)
        return self.namm.keep(state[0], view)

    def token_cap(self, view):
        return self.namm.token_cap(view)

    def state_nbytes(self, state):
        return self.namm.state_nbytes(state[0]) + self.other.state_nbytes(state[1])

    def prepare_joint(self, states, views):
        self.namm.prepare_joint([s[0] for s in states], views)

    def release_joint(self):
        self.namm.release_joint()


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
if args.own:
    from joint_readouts import own_mixed

    namm_module.head_mixed = own_mixed(torch.load(args.own)["weights"].float(), args.head_mix or 0.0)
if args.deal:
    if args.deal < 1 or not 0 <= args.core <= 1:
        raise SystemExit(f"--deal must be >= 1 and --core in [0, 1], got {args.deal} and {args.core}")
    NAMM._rerank_per_head = dealt
    args.head_mix = args.head_mix or 1.0  # any m > 0 routes keep() through the per-head re-ranking
if args.other_layers:
    try:
        first, last = (int(x) for x in args.other_layers.split("-"))
    except ValueError:
        raise SystemExit(f"--other-layers takes A-B (two layer indices), got {args.other_layers!r}") from None
    other_layers = range(first, last + 1)
    capped = evaluate.capped_policy

    def capped_by_depth(name, namm, *rest):
        policy, chunk, info = capped(name, namm, *rest)
        if name == evaluate.NAMM_NAME:
            other, _, _ = capped(args.other, namm, *rest)
            policy = ByDepth(policy, other, other_layers)
        return policy, chunk, info

    evaluate.capped_policy = capped_by_depth
run_capped_namm(namm, annotations=args.annotations, limit=args.limit, shard=args.shard,
                head_mix=args.head_mix, budget=args.budget, protocol=args.protocol,
                output_dir=args.output_dir or f"runs/diag_val_w{args.window}_a{args.age_scale:g}")
