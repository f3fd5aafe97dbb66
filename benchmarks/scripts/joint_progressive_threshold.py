"""The joint NAMM's threshold for the progressive protocol, chosen on training prompts.

The evolve run calibrates the final bias so that ``score >= 0`` keeps 40% of a training context at the
one-shot eviction point. In the progressive protocol (``attach``'s default: an update every 256 tokens,
the prompt fed in chunks) a token faces the threshold at every update, and that bias keeps ~12%. This
script runs the progressive protocol on 4 training prompts per task with the bias raised by each
shift given on the command line (the same as ``threshold = -shift``) and appends the mean kept
fraction and raw score per shift to ``benchmarks/results/joint_progressive_threshold.jsonl``:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scripts/joint_progressive_threshold.py 3 6 12

(run on the evolve output ``runs/joint-namm``: the shipped ``smollm2-text-joint`` with threshold 0).
"""

from __future__ import annotations

import json
import sys

import torch

from namm_transfer import NAMM
from namm_transfer.pipelines.models import load_named_model
from namm_transfer.pipelines.text.evaluate import evaluate_prompt
from namm_transfer.pipelines.text.tasks import TASKS, split_seeds


def main(shifts: list[float], source: str = "runs/joint-namm") -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_named_model("smollm2")
    base = NAMM.from_pretrained(source).replace(threshold=0.0)
    prompts = [(t, TASKS[t].make(tokenizer, s, 1024)) for t in ("passkey", "kv", "docs")
               for s in split_seeds("train", 4, 0)]  # the evolve run's training pool starts there (seed 0)
    with open("benchmarks/results/joint_progressive_threshold.jsonl", "a") as out:
        for shift in shifts:
            params = base.params.clone()
            params[0, -1] += shift
            namm = NAMM(base.config, params, base.norm_mean, base.norm_var)
            kept, score = [], []
            for task, example in prompts:
                row = evaluate_prompt(model, tokenizer, namm, example, TASKS[task], 256,
                                      TASKS[task].max_new_tokens)
                kept.append(row["kept_fraction"])
                score.append(row["score"])
            record = {"shift": shift, "kept": sum(kept) / len(kept), "score": sum(score) / len(score)}
            print(record, flush=True)
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main([float(x) for x in sys.argv[1:]])
