"""``bench rollout``'s median paired ratio (NAMM env steps/s over the full cache's, repetition by
repetition) for A/B runs of two versions of a core module, alternated process by process.

``--scorers-from FILE`` loads ``namm_transfer.scorers`` from FILE before anything imports it (for
example the version before the folded read-out: ``git show ca160cd:namm_transfer/scorers.py >
/tmp/scorers_plain.py``); then :func:`~namm_transfer.pipelines.bench.rollout.run_rollout_speed` runs
on the cue corridor's memory-task episodes (100 episodes from seed 1000, ``exact_output=False``) and
the capped NAMM's paired ratios are printed. Its tables go to a temporary folder.

    for i in 1 2 3; do
      python benchmarks/scripts/rollout_ratio.py --scorers-from /tmp/scorers_plain.py
      python benchmarks/scripts/rollout_ratio.py
    done
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorers-from", default=None, help="a scorers.py to use instead of the package's")
    parser.add_argument("--dt", default="cuecorridor-expert")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.125])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.scorers_from:
        spec = importlib.util.spec_from_file_location("namm_transfer.scorers", args.scorers_from)
        module = importlib.util.module_from_spec(spec)
        sys.modules["namm_transfer.scorers"] = module  # before exec: its dataclasses look it up
        spec.loader.exec_module(module)

    from namm_transfer.pipelines.bench.rollout import RolloutSpeedConfig, run_rollout_speed
    from namm_transfer.pipelines.rl.evaluate import budget_label
    from namm_transfer.policies.registry import NAMM_NAME

    with tempfile.TemporaryDirectory() as tmp:
        record = run_rollout_speed(RolloutSpeedConfig(
            dts=[args.dt], budgets=args.budgets, episodes=args.episodes, seed=args.seed, reps=args.reps,
            exact_output=False, output=str(Path(tmp) / "speed.md")))
    policies = record["results"][args.dt]["policies"]
    source = args.scorers_from or sys.modules["namm_transfer.scorers"].__file__
    print(f"scorers {source}: " + ", ".join(
        f"{label} {policies[label]['paired_ratio_median']:.3f}x"
        for label in (budget_label(NAMM_NAME, b) for b in args.budgets)))


if __name__ == "__main__":
    main()
