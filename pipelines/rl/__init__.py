"""Decision Transformer jobs: offline datasets, training, and rollouts with a memory policy attached."""
