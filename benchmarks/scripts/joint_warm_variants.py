"""Warm-start variants of a joint NAMM (``NAMMConfig(scorer="joint")``), each scored by validation fitness
with the shared-prefill engine: no warm start, 400 / 3000 Adam steps at two learning rates towards the
oracle's top tokens (``topk``), and 3000 steps towards the prompts' fact tokens (``evidence``).

Pool: 8 training and 4 validation prompts per task (passkey, kv, docs; ~1024 tokens, SmolLM2-135M);
validation at 25% and 50% of the context kept, one-shot. Appends one JSON line per variant to
``benchmarks/results/joint_warm_variants.jsonl`` (~10 min on one core):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scripts/joint_warm_variants.py
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from namm_transfer import NAMM
from namm_transfer.adapters import attach
from namm_transfer.pipelines.models import load_named_model
from namm_transfer.pipelines.text.evolve import EvolveConfig
from namm_transfer.pipelines.text.evolve_shared import (
    PrefillPool,
    collect_statistics,
    joint_warm_start,
    pool_seeds,
    population_fitness,
)
from namm_transfer.pipelines.text.tasks import TASKS

VARIANTS = [("topk", 0, 0.01), ("topk", 400, 0.01), ("topk", 3000, 0.01), ("topk", 3000, 0.003),
            ("evidence", 3000, 0.01)]  # (warm loss, Adam steps, learning rate)
BUDGETS = (0.25, 0.5)


def main() -> None:
    torch.set_num_threads(1)
    cfg = EvolveConfig(engine="shared-prefill", scorer="joint", sink_tokens=4, update_every=256, seed=0)
    model, tokenizer = load_named_model("smollm2")
    feature_cfg = cfg.namm_config()
    with attach(model, NAMM(feature_cfg)) as handle, \
            open("benchmarks/results/joint_warm_variants.jsonl", "a") as out:
        pool = PrefillPool(model, tokenizer, handle, TASKS, feature_cfg, 1024)
        names = ["passkey", "kv", "docs"]
        train = [pool.get(t, s) for t in names for s in pool_seeds(cfg.seed, "train", 8)]
        val = [pool.get(t, s) for t in names for s in pool_seeds(cfg.seed, "val", 4)]
        mean, var = collect_statistics(train, feature_cfg)
        probe = NAMM(feature_cfg, None, torch.as_tensor(mean), torch.as_tensor(var))
        joint_cfg = cfg.namm_config(joint_rows=sum(x.keys.shape[1] for x in train[0].prefill.cache.layers))
        rows = [e for e in val for _ in BUDGETS]
        fractions = [f for _ in val for f in BUDGETS]
        for loss, steps, lr in VARIANTS:
            t0 = time.time()
            if steps:
                params, losses = joint_warm_start(train, probe, steps, lr, 0, loss=loss, progress=False)
            else:
                params, losses = NAMM.keep_all_params(joint_cfg), [0.0]
            res = population_fitness(model, rows, fractions, joint_cfg, params.numpy()[None], (mean, var),
                                     block=1, em_weight=0.5)
            record = {"loss": loss, "steps": steps, "lr": lr, "first_loss": float(np.mean(losses[:50])),
                      "last_loss": float(np.mean(losses[-50:])), **{k: float(v[0]) for k, v in res.items()},
                      "seconds": time.time() - t0}
            print(record, flush=True)
            out.write(json.dumps(record) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
