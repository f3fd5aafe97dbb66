"""Text jobs: the synthetic long-context tasks, the text evaluation, and evolving a NAMM on text."""
