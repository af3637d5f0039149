"""Helpers the block builders share (private)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from residual._types import DropMode, ModuleFactory, Stride
from residual.shortcuts import resolve_shortcut


def make_act(act_layer: ModuleFactory) -> nn.Module:
    """``act_layer(inplace=True)`` where the layer takes ``inplace``, else ``act_layer()``."""
    try:
        takes_inplace = "inplace" in inspect.signature(act_layer).parameters
    except (TypeError, ValueError):
        takes_inplace = False
    return act_layer(inplace=True) if takes_inplace else act_layer()


def conv_shortcut(
    shortcut: str | nn.Module | None,
    in_channels: int,
    out_channels: int,
    stride: Stride,
    spatial_dims: int,
    norm_layer: ModuleFactory | None,
) -> nn.Module:
    """Resolve a conv block's shortcut; None picks identity or a conv1x1 + norm projection.

    ``spatial_dims`` picks the projection's conv; ``norm_layer`` None means no norm after it.
    """
    return resolve_shortcut(
        "auto" if shortcut is None else shortcut,
        in_channels=in_channels,
        out_channels=out_channels,
        stride=stride,
        layout="channels_first",
        spatial_dims=spatial_dims,
        norm_layer=norm_layer,
    )


def residual_options(drop_path: float, drop_mode: DropMode, checkpoint: bool) -> dict[str, Any]:
    """The ``Residual`` keyword options every block builder forwards."""
    return {"drop_path": drop_path, "drop_mode": drop_mode, "checkpoint": checkpoint}
