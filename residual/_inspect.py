"""Read a branch's channel counts, stride and layout from its layers (private).

``Residual(fn, shortcut="projection")`` needs to know how many channels enter and leave ``fn``.
They are read once, at construction, from the first and the last layer of ``fn`` that declares
them, so that every parameter exists before the first forward (optimizers, state_dict loads and
torchinfo all see the final model). A wrong guess cannot pass silently: ``Residual`` checks the
shapes on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd

from residual._types import Layout


@dataclass(frozen=True)
class BranchDims:
    """What a shortcut must know about the branch it runs beside."""

    in_channels: int
    out_channels: int
    stride: int
    layout: Layout
    spatial_dims: int


def _dims_of(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) channels a single layer declares, or None for layers that declare none."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, _ConvNd):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.RNNBase):
        hidden = module.proj_size or module.hidden_size
        return module.input_size, hidden * (2 if module.bidirectional else 1)
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim, module.embed_dim
    return None


def _stride_of(module: nn.Module) -> int:
    if isinstance(module, _ConvTransposeNd):
        return 1
    if isinstance(module, _ConvNd | _MaxPoolNd | _AvgPoolNd):
        stride: Any = module.stride
        s = stride[0] if isinstance(stride, tuple) else stride
        return int(s) if s is not None else 1
    return 1


def infer_branch_dims(fn: nn.Module) -> BranchDims | None:
    """Read (in, out, stride, layout, spatial dims) from ``fn``'s layers; None if it has none.

    The input channels are the first declaring layer's, the output channels the last one's; the
    stride is the product of the strides of its convolutions and pools; the layout is
    channel-first when it holds a convolution, otherwise channel-last.
    """
    first: tuple[int, int] | None = None
    last: tuple[int, int] | None = None
    stride = 1
    spatial_dims = 0
    for module in fn.modules():
        dims = _dims_of(module)
        if dims is not None:
            first = first or dims
            last = dims
        stride *= _stride_of(module)
        if isinstance(module, _ConvNd) and not spatial_dims:
            spatial_dims = len(module.kernel_size)
    if first is None or last is None:
        return None
    layout: Layout = "channels_first" if spatial_dims else "channels_last"
    return BranchDims(first[0], last[1], stride, layout, spatial_dims or 2)
