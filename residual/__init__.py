"""residual: the residual connection H(x) = F(x) + S(x) as one small, exact, fast combinator.

The top level holds what a residual block is made of; more lives in the submodules:
``residual.merges`` (``Add``, ``deepnorm_scales``), ``residual.shortcuts``
(``resolve_shortcut``), ``residual.drop`` (the policies, ``linear_drop_rates``),
``residual.models`` (the zoo), ``residual.hyper``, ``residual.reversible``,
``residual.depth``, ``residual.resi_dual``,
``residual.diagnostics``, ``residual.distributed``, ``residual.interop`` and
``residual.pretrained`` (checkpoints: ``save_pretrained`` / ``load_pretrained``).

>>> import torch
>>> from torch import nn
>>> import residual
>>> residual.Residual(nn.Linear(8, 8))(torch.zeros(2, 8)).shape
torch.Size([2, 8])
"""

import importlib
from typing import Any

from residual.blocks import Bottleneck, PreActBlock, ResidualBlock
from residual.core import Residual
from residual.drop import apply_drop_schedule, drop_path
from residual.errors import ResidualError
from residual.merges import GRUGate, HighwayGate, LayerScale, ReZero, ScaledAdd
from residual.pretrained import load_pretrained, save_pretrained
from residual.shortcuts import (
    IdentityShortcut,
    NoShortcut,
    PooledProjectionShortcut,
    ProjectionShortcut,
    ZeroPadShortcut,
)

__version__ = "0.2.0"

__all__ = [
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
    "drop_path",
    "load_pretrained",
    "save_pretrained",
]

_SUBMODULES = (
    "blocks",
    "depth",
    "diagnostics",
    "distributed",
    "drop",
    "hyper",
    "interop",
    "merges",
    "models",
    "pretrained",
    "resi_dual",
    "reversible",
    "shortcuts",
    "streams",
)


def __getattr__(name: str) -> Any:
    """``residual.hyper`` and the other submodules, imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"residual.{name}")
    raise AttributeError(f"module 'residual' has no attribute {name!r}")
