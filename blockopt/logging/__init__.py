"""What blockopt writes to TensorBoard."""
