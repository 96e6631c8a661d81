"""The optimizer: modes, probe control, learning-rate tuning, checkpoints."""
