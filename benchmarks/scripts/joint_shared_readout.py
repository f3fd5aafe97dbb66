"""Can a joint NAMM's read-out be shared by every layer-head (and so transfer to another architecture)?

A joint NAMM (``NAMMConfig(scorer="joint")``) reads each token's spectrogram features in every layer-head
with its own weights per (layer-head, bin): ``rows * n_bins`` weights tied to one model. A read-out whose
spectral weights are the same for every layer-head (``w[r, k] = v[k] / rows``: the layer-head mean of the
z-scored features, then ``v``) has ``n_bins + age_dim + 1`` parameters and would apply to any model. Both
are fitted by the joint warm start (listwise loss towards the oracle's top 10% tokens, Adam, 6,000 steps)
on the same pool and scored by validation fitness with the shared-prefill engine (one-shot).

Pool: 16 training and 8 validation prompts per task (passkey, kv, docs; 1,024 and 1,536 tokens by seed,
SmolLM2-135M, 4 sink tokens); validation at 15%, 25% and 50% of the context kept. Writes
``benchmarks/results/joint_shared_readout.json`` (~9 min on one core):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scripts/joint_shared_readout.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from namm_transfer import NAMM
from namm_transfer.adapters import attach
from namm_transfer.pipelines.models import load_named_model
from namm_transfer.pipelines.text.evolve import EvolveConfig
from namm_transfer.pipelines.text.evolve_shared import (
    SINKS,
    PrefillPool,
    collect_statistics,
    joint_inputs_of,
    joint_label,
    joint_warm_start,
    listwise_loss,
    pool_seeds,
    population_fitness,
)
from namm_transfer.pipelines.text.tasks import TASKS

BUDGETS = (0.15, 0.25, 0.5)
TASK_NAMES = ("passkey", "kv", "docs")
OUT = Path("benchmarks/results/joint_shared_readout.json")


def shared_warm_start(entries, probe: NAMM, rows: int, n_bins: int, steps: int, lr: float) -> torch.Tensor:
    """The joint warm start on the layer-head mean of each token's features; returned as joint parameters
    (``v[k] / rows`` for every layer-head, the age weights, the bias)."""
    data = []
    for entry in entries:
        x, age = joint_inputs_of(entry, probe)
        positions = torch.arange(x.shape[0])
        mean_over_rows = x.view(x.shape[0], rows, n_bins).mean(1)
        label = joint_label(entry, positions, "topk")
        data.append((torch.cat([mean_over_rows, age], -1), label, positions >= SINKS))
    allx = torch.cat([d[0] for d in data])
    mean, std = allx.mean(0), allx.std(0) + 1e-6
    torch.manual_seed(0)
    linear = torch.nn.Linear(allx.shape[1], 1)
    torch.nn.init.zeros_(linear.weight)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    order = np.random.default_rng(0)
    for _ in range(steps):
        x, label, allowed = data[int(order.integers(len(data)))]
        with torch.enable_grad():
            loss = listwise_loss(linear((x - mean) / std)[:, 0][None], label[None], allowed[None])
            opt.zero_grad()
            loss.backward()
        opt.step()
    w = linear.weight.detach()[0] / std
    bias = linear.bias.detach()[0] - (w * mean).sum()
    return torch.cat([(w[:n_bins] / rows).repeat(rows), w[n_bins:], bias[None]])


def main() -> None:
    torch.set_num_threads(1)
    cfg = EvolveConfig(engine="shared-prefill", scorer="joint", sink_tokens=4, update_every=256, seed=0,
                       joint_reference="fresh-median", prompt_lengths=[1024, 1536])
    model, tokenizer = load_named_model("smollm2")
    namm_cfg = cfg.namm_config()
    start = time.perf_counter()
    with attach(model, NAMM(namm_cfg)) as handle:
        pool = PrefillPool(model, tokenizer, handle, TASKS, namm_cfg, cfg.prompt_lengths)
        train = [pool.get(t, s) for t in TASK_NAMES for s in pool_seeds(0, "train", 16)]
        val = [pool.get(t, s) for t in TASK_NAMES for s in pool_seeds(0, "val", 8)]
        norm = collect_statistics(train, namm_cfg)
        probe = NAMM(namm_cfg, None, torch.as_tensor(norm[0]), torch.as_tensor(norm[1]))
        rows = sum(layer.keys.shape[1] for layer in train[0].prefill.cache.layers)
        joint_cfg = cfg.namm_config(joint_rows=rows)

        def validate(params: torch.Tensor) -> dict:
            per_budget = {}
            for b in BUDGETS:
                res = population_fitness(model, val, [b] * len(val), joint_cfg, params.numpy()[None], norm,
                                         17, 0.5)
                per_budget[str(b)] = float(res["fitness"][0])
            return {"val_fitness": float(np.mean(list(per_budget.values()))), "per_budget": per_budget}

        results = {}
        full, _ = joint_warm_start(train, probe, 6000, 0.003, 0, loss="topk", progress=False)
        results["per layer-head weights (rows x bins + age + 1)"] = {
            "n_params": full.numel(), **validate(full)
        }
        for lr in (0.003, 0.01):
            shared = shared_warm_start(train, probe, rows, joint_cfg.n_bins, 6000, lr)
            results[f"shared weights (bins + age + 1), lr {lr}"] = {
                "n_params": joint_cfg.n_bins + joint_cfg.age_dim + 1, **validate(shared)
            }
    OUT.write_text(json.dumps({"seconds": time.perf_counter() - start, "results": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
