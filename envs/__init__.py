"""RL side (gymnasium env factories, Minari datasets, score normalisation): added by the offline-RL issue."""
