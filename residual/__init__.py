"""residual: the residual connection H(x) = F(x) + S(x) as one small, exact, fast combinator."""

from residual.blocks import Bottleneck, PreActBlock, ResidualBlock
from residual.core import Residual
from residual.drop import apply_drop_schedule, drop_path, linear_drop_rates, set_drop_seed
from residual.errors import ResidualError
from residual.merges import (
    Add,
    GRUGate,
    HighwayGate,
    LayerScale,
    ReZero,
    ScaledAdd,
    deepnorm_scales,
)
from residual.shortcuts import (
    IdentityShortcut,
    NoShortcut,
    PooledProjectionShortcut,
    ProjectionShortcut,
    ZeroPadShortcut,
    resolve_shortcut,
)

__version__ = "0.1.0"

__all__ = [
    "Add",
    "Bottleneck",
    "GRUGate",
    "HighwayGate",
    "IdentityShortcut",
    "LayerScale",
    "NoShortcut",
    "PooledProjectionShortcut",
    "PreActBlock",
    "ProjectionShortcut",
    "ReZero",
    "Residual",
    "ResidualBlock",
    "ResidualError",
    "ScaledAdd",
    "ZeroPadShortcut",
    "__version__",
    "apply_drop_schedule",
    "deepnorm_scales",
    "drop_path",
    "linear_drop_rates",
    "resolve_shortcut",
    "set_drop_seed",
]
