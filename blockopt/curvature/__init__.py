"""Curvature: a model's blocks, blockwise Hessian-vector products, Lanczos, spectra."""
