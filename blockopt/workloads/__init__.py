"""Bundled data, reference models and the tasks the demo and the benchmarks train."""
