"""Which layers keep the answer frames? Per-layer retention of their tokens under capped policies.

``eval-video`` rows hold each frame's retention averaged over layers. This re-runs questions under each
policy (the shipped ``smollm2-shapes-128``, 128 frames, one capped budget and protocol) and prints, per
layer, the share of the answer frames' tokens and of the other frames' tokens still cached at the end of
generation, with each policy's accuracy on those questions. Writes the ``[layers]`` profiles as JSON.

    python benchmarks/scripts/video_layer_retention.py --annotations runs/video_qa_128_val216/val.jsonl \\
        --task-type majority --limit 36 --policies NAMM H2O --head-mix 0.5 --out runs/layer_retention.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from video_diagnostics import CADENCE, FRAMES, VIDEO_NAMM

from namm_transfer import NAMM
from namm_transfer.adapters import video_layout
from namm_transfer.pipelines.video import evaluate as ev
from namm_transfer.pipelines.video.loading import load_video_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="make-video-qa JSONL (with key_frames)")
    parser.add_argument("--task-type", default=None, help="only these questions (colour, majority)")
    parser.add_argument("--limit", type=int, default=36, help="questions, in file order")
    parser.add_argument("--policies", nargs="+", default=["NAMM", "H2O"])
    parser.add_argument("--namm", default=VIDEO_NAMM)
    parser.add_argument("--head-mix", type=float, default=None, help="the NAMM's head_mix (default: its own)")
    parser.add_argument("--budget", type=float, default=0.15, help="share of the video tokens")
    parser.add_argument("--protocol", default="progressive", choices=ev.PROTOCOLS)
    parser.add_argument("--out", default="runs/layer_retention.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with open(args.annotations) as f:
        key_frames = {a["id"]: [int(k) for k in a["key_frames"]] for a in map(json.loads, f)}
    samples = [s for s in ev.load_annotations(args.annotations, None, "auto")
               if args.task_type is None or s.task_type == args.task_type][: args.limit]
    if not samples:
        raise SystemExit(f"no {args.task_type or ''} questions in {args.annotations}")
    video_model = load_video_model("smollm2-shapes-128")
    layout = video_layout(video_model.model)
    namm = NAMM.from_pretrained(args.namm)
    if args.head_mix is not None:
        namm = namm.replace(head_mix=args.head_mix)
    results: dict[str, dict] = {}
    for name in args.policies:
        def factory(ids: list[int], name: str = name):
            return ev.capped_policy(name, namm, args.budget, args.protocol, ids, layout.video_tokens(FRAMES),
                                    layout.video_token_id, CADENCE)

        answer, other, correct = [], [], []
        for sample in samples:
            row, retention = ev.evaluate_sample(video_model, sample, factory, FRAMES, CADENCE, 8)
            keys = np.zeros(retention.shape[1], dtype=bool)
            keys[key_frames[sample.sample_id]] = True
            answer.append(retention[:, keys].mean(axis=1))
            other.append(retention[:, ~keys].mean(axis=1))
            correct.append(bool(row["correct"]))
        results[name] = {"accuracy": float(np.mean(correct)), "questions": len(correct),
                         "answer_frames": np.mean(answer, axis=0).tolist(),
                         "other_frames": np.mean(other, axis=0).tolist()}
    layers = len(next(iter(results.values()))["answer_frames"])
    print(f"{len(samples)} questions, {100 * args.budget:g}% of the video tokens, {args.protocol}; "
          "answer / other frames' tokens kept per layer")
    print("| layer | " + " | ".join(args.policies) + " |")
    print("|---|" + "---|" * len(args.policies))
    for layer in range(layers):
        cells = [f"{results[p]['answer_frames'][layer]:.2f} / {results[p]['other_frames'][layer]:.2f}"
                 for p in args.policies]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print("| accuracy | " + " | ".join(f"{results[p]['accuracy']:.3f}" for p in args.policies) + " |")
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
