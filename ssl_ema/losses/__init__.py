"""Loss functions that lightly does not provide (pure functions of tensors)."""
