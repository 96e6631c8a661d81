"""blockopt: blockwise Hessian spectra for PyTorch models.

``partition`` splits a model's parameters into blocks, ``block_spectra`` estimates each diagonal
Hessian block's spectrum with Lanczos (stochastic Lanczos quadrature) from one gradient graph,
``heterogeneity`` scores how far apart those spectra are.
"""

from .blocks import Block, BlockPart, partition
from .heterogeneity import Heterogeneity, heterogeneity
from .hvp import BlockHessian, DoubleBackwardError
from .lanczos import LanczosResult, gaussian_density, lanczos, lanczos_many
from .optimizer import BlockOptimizer, wrap
from .policy import Decision, Thresholds
from .spectra import BlockSpectrum, Spectra, block_spectra, model_spectrum
from .tuning import tune_block_lrs

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockHessian",
    "BlockOptimizer",
    "BlockPart",
    "BlockSpectrum",
    "Decision",
    "DoubleBackwardError",
    "Heterogeneity",
    "LanczosResult",
    "Spectra",
    "Thresholds",
    "__version__",
    "block_spectra",
    "gaussian_density",
    "heterogeneity",
    "lanczos",
    "lanczos_many",
    "model_spectrum",
    "partition",
    "tune_block_lrs",
    "wrap",
]
