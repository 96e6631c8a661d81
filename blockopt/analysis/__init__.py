"""Analysis of blockwise spectra: heterogeneity scores and per-block learning rates."""
