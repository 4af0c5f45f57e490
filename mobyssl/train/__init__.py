"""Pre-training loop, optimizer schedules, checkpoints and run logging."""
