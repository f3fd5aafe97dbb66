"""Can a "medium" locomotion policy be trained on this 2-core machine? (issue 15's optional item)

Trains stable-baselines3's SAC (its defaults: two 256-unit layers, batch 256, one update per env step)
on a MuJoCo locomotion env with one torch thread, and every ``--eval-every`` steps prints the mean
deterministic return over 5 episodes and saves a checkpoint. D4RL's "medium" Hopper data came from a
SAC policy stopped at about a third of the expert's return (normalised ~44, return ~1,400).

stable-baselines3 is not a dependency of this project: ``pip install --no-deps stable-baselines3``
(its imports: torch, gymnasium, numpy, pandas, matplotlib, cloudpickle, all in the ``rl`` extra's env).

    python benchmarks/scripts/train_sac_locomotion.py --env Hopper-v4 --steps 300000 --out runs/locomotion
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v4")
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--eval-every", type=int, default=25_000)
    parser.add_argument("--learning-starts", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/locomotion")
    args = parser.parse_args()

    import gymnasium as gym
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SAC("MlpPolicy", gym.make(args.env), seed=args.seed, verbose=0, device="cpu",
                learning_starts=args.learning_starts)
    start = time.time()

    class Checkpoint(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % args.eval_every == 0:
                mean, std = evaluate_policy(self.model, gym.make(args.env), n_eval_episodes=5,
                                            deterministic=True)
                print(f"{time.time() - start:7.0f} s  step {self.num_timesteps}  "
                      f"eval return {mean:.0f} ± {std:.0f}", flush=True)
                self.model.save(out / f"sac_{self.num_timesteps}")
            return True

    model.learn(total_timesteps=args.steps, callback=Checkpoint())


if __name__ == "__main__":
    main()
