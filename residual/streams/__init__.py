"""Multi-stream residual connections built from ``Residual``: mHC (manifold-constrained
hyper-connections) and frac-connections. Hyper-connections and the stream helpers live in
:mod:`residual.hyper`, which re-exports everything here.
"""

from residual.streams.frac import FracBranch, FracMix, frac_residual
from residual.streams.mhc import MHCBranch, MHCMix, mhc_residual, sinkhorn

__all__ = [
    "FracBranch",
    "FracMix",
    "MHCBranch",
    "MHCMix",
    "frac_residual",
    "mhc_residual",
    "sinkhorn",
]
