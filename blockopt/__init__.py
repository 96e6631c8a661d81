"""blockopt: blockwise Hessian spectra for PyTorch models, and an optimizer that acts on them.

``partition`` splits a model's parameters into blocks, ``block_spectra`` estimates each diagonal
Hessian block's spectrum with Lanczos (stochastic Lanczos quadrature) from one gradient graph,
``heterogeneity`` scores how far apart those spectra are, ``tune_block_lrs`` and
``param_groups`` turn them into per-block learning rates, and ``BlockOptimizer`` / ``wrap``
switch between SGD, blockwise-lr SGD and Adam on the score while training.
"""

from blockopt.analysis.heterogeneity import Heterogeneity, heterogeneity
from blockopt.analysis.tuning import param_groups, tune_block_lrs
from blockopt.curvature.blocks import Block, BlockPart, Partition, partition
from blockopt.curvature.fd_hvp import FiniteDifferenceHessian
from blockopt.curvature.hvp import BlockHessian, DoubleBackwardError
from blockopt.curvature.isolation import ProbeContractError
from blockopt.curvature.lanczos import LanczosResult, gaussian_density, lanczos, lanczos_many
from blockopt.curvature.layouts import AttentionLayout, LayoutWarning
from blockopt.curvature.spectra import BlockSpectrum, Spectra, block_spectra, model_spectrum
from blockopt.optimizer.block_optimizer import BlockOptimizer
from blockopt.optimizer.checkpoint import CheckpointDuringProbeError
from blockopt.optimizer.policy import Decision, ProbeFault, ProbeFaultWarning, Thresholds
from blockopt.optimizer.wrap import wrap

__version__ = "0.1.0"

__all__ = [
    "AttentionLayout",
    "Block",
    "BlockHessian",
    "BlockOptimizer",
    "BlockPart",
    "BlockSpectrum",
    "CheckpointDuringProbeError",
    "Decision",
    "DoubleBackwardError",
    "FiniteDifferenceHessian",
    "Heterogeneity",
    "LanczosResult",
    "LayoutWarning",
    "Partition",
    "ProbeContractError",
    "ProbeFault",
    "ProbeFaultWarning",
    "Spectra",
    "Thresholds",
    "__version__",
    "block_spectra",
    "gaussian_density",
    "heterogeneity",
    "lanczos",
    "lanczos_many",
    "model_spectrum",
    "param_groups",
    "partition",
    "tune_block_lrs",
    "wrap",
]
