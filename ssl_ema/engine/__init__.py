"""The training loop, checkpoints and run tracking (shared by every method)."""
