"""Read a branch's channels, stride and layout, only where the reading is certain (private).

``Residual(fn, shortcut="projection")`` must know how many channels enter and leave ``fn`` and
its stride. The reading follows what ``fn`` computes, never the order its layers were registered
in: a known layer (Linear, Conv, pool, norm, activation, dropout, an RNN on its own), an
``nn.Sequential`` of readable modules (in call order), or a residual block (its ``pre`` then its
``fn``) is readable; anything else (a custom ``forward``) is not, and the caller asks for the
dimensions instead of guessing. A conv or pool counts only when its output size is
``ceil(H / stride)`` for every input size, what a strided shortcut gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from residual._types import Layout

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_KEEP_CHANNELS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
)
_SIZES = range(1, 65)


@dataclass(frozen=True)
class BranchDims:
    """What a shortcut must know about the branch beside it."""

    in_channels: int
    out_channels: int
    stride: int
    layout: Layout
    spatial_dims: int


@dataclass(frozen=True)
class _Step:
    """One readable module: channels in and out (None: keeps them), stride, layout."""

    in_channels: int | None
    out_channels: int | None
    stride: int
    spatial_dims: int  # 0: no spatial reading (Linear, norms, activations)
    linear: bool = False  # holds a Linear (channels on the last dim)


def _tuple(v: object, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else (int(v),) * n  # type: ignore[call-overload]


def _strided(size: int, kernel: int, stride: int, pad: int, dil: int, ceil: bool) -> int:
    span = size + 2 * pad - dil * (kernel - 1) - 1
    return (-(-span // stride) if ceil else span // stride) + 1


def _uniform_stride(m: nn.Module, n: int, ceil: bool) -> int | None:
    """The module's stride if its output is ceil(H / stride) for every H tried, else None."""
    if m.padding == "same":  # stride 1 (torch refuses "same" with a stride): the size is kept,
        return 1  # even kernels too (torch pads the odd total asymmetrically)
    kernel = _tuple(m.kernel_size, n)
    stride = _tuple(m.stride, n)  # torch's pools store their kernel size for stride=None
    dil = _tuple(getattr(m, "dilation", 1), n)
    pad = _tuple(0 if m.padding == "valid" else m.padding, n)
    if len(set(stride)) != 1:
        return None
    s = stride[0]
    for k, st, p, d in zip(kernel, stride, pad, dil, strict=True):
        if any(_strided(h, k, st, p, d, ceil) != -(-h // s) for h in _SIZES):
            return None
    return s


def _step(m: nn.Module) -> _Step | None:
    if isinstance(m, nn.Linear):
        return _Step(m.in_features, m.out_features, 1, 0, linear=True)
    if isinstance(m, _CONVS):
        n = len(m.kernel_size)
        stride = _uniform_stride(m, n, ceil=False)
        return None if stride is None else _Step(m.in_channels, m.out_channels, stride, n)
    if isinstance(m, _POOLS):
        n = {"1d": 1, "2d": 2, "3d": 3}[type(m).__name__[-2:]]
        stride = _uniform_stride(m, n, ceil=bool(m.ceil_mode))
        return None if stride is None else _Step(None, None, stride, n)
    if isinstance(m, _KEEP_CHANNELS):
        return _Step(None, None, 1, 0)
    if isinstance(m, nn.Sequential):
        return _chain(list(m))
    parts = m._modules
    if "fn" in parts and "shortcut" in parts and callable(getattr(m, "set_drop_path", None)):
        return _chain([p for p in (parts.get("pre"), parts["fn"]) if p is not None])
    return None


def _chain(modules: list[nn.Module]) -> _Step | None:
    """Compose readable modules called one after the other; None if any is not readable."""
    c_in: int | None = None
    c_out: int | None = None
    stride, spatial, linear = 1, 0, False
    for m in modules:
        step = _step(m)
        if step is None:
            return None
        if step.in_channels is not None:
            if c_out is not None and c_out != step.in_channels:
                return None  # inconsistent: the branch would fail at call time anyway
            c_in = step.in_channels if c_in is None else c_in
            c_out = step.out_channels
        stride *= step.stride
        spatial = spatial or step.spatial_dims
        linear = linear or step.linear
    if linear and spatial:
        return None  # a Linear among convs acts on a spatial dim: not a channel map
    return _Step(c_in, c_out, stride, spatial, linear)


def read_branch_dims(fn: nn.Module) -> BranchDims | None:
    """(in, out, stride, layout, spatial dims) of ``fn`` when certain, else None.

    An RNN on its own reads as (input_size, hidden * directions), channel-last.
    """
    if isinstance(fn, nn.RNNBase):
        hidden = fn.proj_size or fn.hidden_size
        out = hidden * (2 if fn.bidirectional else 1)
        return BranchDims(fn.input_size, out, 1, "channels_last", 2)
    step = _step(fn)
    if step is None or step.in_channels is None or step.out_channels is None:
        return None
    layout: Layout = "channels_first" if step.spatial_dims else "channels_last"
    if not step.spatial_dims and step.stride != 1:
        return None
    return BranchDims(
        step.in_channels, step.out_channels, step.stride, layout, step.spatial_dims or 2
    )


def hint_layout(shortcut: nn.Module, fn: nn.Module) -> str:
    """The layout a mismatch hint reads shapes in: the shortcut's, else the branch's if certain.

    Only words an error message; "" lets the hint try both readings.
    """
    declared = getattr(shortcut, "layout", None)
    if isinstance(declared, str):
        return declared
    dims = read_branch_dims(fn)
    return dims.layout if dims is not None else ""
