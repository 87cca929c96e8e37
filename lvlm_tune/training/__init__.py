"""Training: freezing policies per stage (and, next to them, the trainer and checkpoints)."""
