"""Median paired env-steps/s ratio of the capped NAMM to the full cache on the cue corridor's memory-task
episodes, in one process: for A/B runs of two versions of a core module, alternated process by process.

``--scorers-from FILE`` loads ``namm_transfer.scorers`` from FILE before anything imports it (for
example the version before the folded read-out: ``git show ca160cd:namm_transfer/scorers.py >
/tmp/scorers_plain.py``). Every repetition rolls out each policy once, in turn, on the same episodes;
the printed figure is the median over repetitions of each policy's env steps/s over the full cache's of
that repetition. One torch thread, ``attach``'s default ``exact_output=False``.

    for i in 1 2 3; do
      python benchmarks/scripts/rollout_ratio.py --scorers-from /tmp/scorers_plain.py
      python benchmarks/scripts/rollout_ratio.py
    done
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers-from", default=None, help="a scorers.py to use instead of the package's")
    parser.add_argument("--dt", default="cuecorridor-expert")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.125])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--update-every", type=int, default=30)
    args = parser.parse_args()
    if args.scorers_from:
        spec = importlib.util.spec_from_file_location("namm_transfer.scorers", args.scorers_from)
        module = importlib.util.module_from_spec(spec)
        sys.modules["namm_transfer.scorers"] = module  # before exec: its dataclasses look it up
        spec.loader.exec_module(module)

    import torch

    from namm_transfer import NAMM
    from namm_transfer.pipelines.rl.evaluate import capped_policy, episode_tokens, fraction_cap, rollout_batch
    from namm_transfer.pipelines.rl.models import load_dt
    from namm_transfer.policies.registry import FULL_CACHE, build_policy

    torch.set_num_threads(1)
    namm = NAMM.from_pretrained("smollm2-text").replace(update_every=args.update_every)
    dt = load_dt(args.dt)
    tokens = episode_tokens(dt, dt.env_id, None)
    policies = {FULL_CACHE: build_policy(FULL_CACHE, None, None, args.update_every, 0)}
    for fraction in args.budgets:
        policies[f"NAMM @ {fraction:g}"] = capped_policy("NAMM", namm, fraction_cap(fraction, tokens),
                                                         args.update_every, 0)
    seeds = list(range(args.seed, args.seed + args.episodes))

    def rate(label: str, batch: list[int]) -> float:
        row = rollout_batch(dt, label, policies[label], dt.env_id, batch, dt.target_return, None, False,
                            progress=False, exact_output=False).rows[0]
        return row["batch_env_steps"] / row["batch_seconds"]

    for label in policies:  # warm-up
        rate(label, seeds[:2])
    ratios: dict[str, list[float]] = {label: [] for label in policies if label != FULL_CACHE}
    for _ in range(args.reps):
        rates = {label: rate(label, seeds) for label in policies}
        for label in ratios:
            ratios[label].append(rates[label] / rates[FULL_CACHE])
    source = args.scorers_from or sys.modules["namm_transfer.scorers"].__file__
    print(f"scorers {source}: " + ", ".join(f"{label} {statistics.median(r):.3f}x"
                                            for label, r in ratios.items()))


if __name__ == "__main__":
    main()
