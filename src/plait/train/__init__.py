"""Training: the trainer loop, optimizer and schedule, checkpoints, metrics."""
