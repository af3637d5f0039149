"""Read a branch's channels, stride and layout, only where the reading is certain (private).

``Residual(fn, shortcut="projection")`` must know how many channels enter and leave ``fn`` and
its stride; a per-channel merge (``LayerScale``) must know which axis holds the channels. The
reading follows what ``fn`` computes, never the order its layers were registered in: a known
layer (Linear, Conv, pool, norm, activation, dropout, an RNN on its own, an einops
``Rearrange`` that moves the channel axis between dim 1 and the last dim), an ``nn.Sequential``
of readable modules (in call order), or a residual block (its ``pre`` then its ``fn``) is
readable; anything else (a custom ``forward``) is not, and the caller asks for the dimensions
instead of guessing. A conv or pool gives a stride only when its output size is
``ceil(H / stride)`` for every input size in every spatial dim, what a strided shortcut gives;
its stride may differ from dim to dim (``stride=(2, 1)``). Its layout is read either way.

The layout is tracked along the chain: a conv or pool needs channels first, a Linear channels
last, a ``Rearrange("n c h w -> n h w c")`` switches from the one to the other; a chain that
would apply a Linear to a spatial dim (or a conv to a channels-last tensor) is not read.
"""

from __future__ import annotations

import re
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
_AXIS = re.compile(r"^(\.\.\.|[A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class BranchDims:
    """What a shortcut must know about the branch beside it.

    ``stride`` is an int when it is the same in every spatial dim, else one int per spatial dim.
    """

    in_channels: int
    out_channels: int
    stride: int | tuple[int, ...]
    layout: Layout
    spatial_dims: int


@dataclass(frozen=True)
class _Step:
    """One readable module (or a chain of them).

    Channels in and out (None: keeps them), the stride per spatial dim (``()``: keeps every
    size; None: changes sizes in a way no stride gives, an unpadded conv), the number of
    spatial dims it fixes (0: none), the layout it needs on its input and the one it leaves
    (None: any, as it came).
    """

    in_channels: int | None
    out_channels: int | None
    stride: tuple[int, ...] | None
    spatial_dims: int
    needs: Layout | None = None
    leaves: Layout | None = None
    lazy: bool = False  # a lazy layer: its input channels are not known before a forward


def _tuple(v: object, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else (int(v),) * n  # type: ignore[call-overload]


def _strided(size: int, kernel: int, stride: int, pad: int, dil: int, ceil: bool) -> int:
    span = size + 2 * pad - dil * (kernel - 1) - 1
    out = (-(-span // stride) if ceil else span // stride) + 1
    if ceil and (out - 1) * stride >= size + pad:  # torch: the last window starts in the input
        out -= 1
    return out


def _read_stride(m: nn.Module, n: int, ceil: bool) -> tuple[int, ...] | None:
    """The stride per spatial dim if each output size is ceil(H / s) for every H tried."""
    if m.padding == "same":  # stride 1 (torch refuses "same" with a stride): the size is kept,
        return (1,) * n  # even kernels too (torch pads the odd total asymmetrically)
    kernel = _tuple(m.kernel_size, n)
    stride = _tuple(m.stride, n)  # torch's pools store their kernel size for stride=None
    dil = _tuple(getattr(m, "dilation", 1), n)
    pad = _tuple(0 if m.padding == "valid" else m.padding, n)
    for k, s, p, d in zip(kernel, stride, pad, dil, strict=True):
        if any(_strided(h, k, s, p, d, ceil) != -(-h // s) for h in _SIZES):
            return None
    return stride


def _rearrange_step(m: nn.Module) -> _Step | None:
    """An einops ``Rearrange`` that only moves the channel axis between dim 1 and the end."""
    if type(m).__name__ != "Rearrange" or not type(m).__module__.startswith("einops."):
        return None
    pattern, lengths = getattr(m, "pattern", None), getattr(m, "axes_lengths", None)
    if not isinstance(pattern, str) or lengths or pattern.count("->") != 1:
        return None
    left, right = (side.split() for side in pattern.split("->"))
    if not all(_AXIS.match(a) for a in left + right) or len(set(left)) != len(left):
        return None
    if sorted(left) != sorted(right) or len(left) < 3:
        return None
    spatial = 0 if "..." in left else len(left) - 2
    if right == [left[0], *left[2:], left[1]]:
        return _Step(None, None, (), spatial, "channels_first", "channels_last")
    if right == [left[0], left[-1], *left[1:-1]]:
        return _Step(None, None, (), spatial, "channels_last", "channels_first")
    return _Step(None, None, (), 0) if right == left else None


def _step(m: nn.Module) -> _Step | None:
    if isinstance(m, nn.Linear):
        lazy = isinstance(m, nn.LazyLinear)
        last: Layout = "channels_last"
        return _Step(m.in_features, m.out_features, (), 0, last, last, lazy=lazy)
    if isinstance(m, _CONVS):
        n = len(m.kernel_size)
        stride = _read_stride(m, n, ceil=False)
        lazy = isinstance(m, nn.LazyConv1d | nn.LazyConv2d | nn.LazyConv3d)
        first: Layout = "channels_first"
        return _Step(m.in_channels, m.out_channels, stride, n, first, first, lazy=lazy)
    if isinstance(m, _POOLS):
        n = {"1d": 1, "2d": 2, "3d": 3}[type(m).__name__[-2:]]
        stride = _read_stride(m, n, ceil=bool(m.ceil_mode))
        return _Step(None, None, stride, n, "channels_first", "channels_first")
    if isinstance(m, _KEEP_CHANNELS):
        return _Step(None, None, (), 0)
    if isinstance(m, nn.Sequential):
        return _chain(list(m))
    parts = m._modules
    if "fn" in parts and "shortcut" in parts and callable(getattr(m, "set_drop_path", None)):
        return _chain([p for p in (parts.get("pre"), parts["fn"]) if p is not None])
    return _rearrange_step(m)


def _chain(modules: list[nn.Module]) -> _Step | None:
    """Compose readable modules called one after the other; None if any is not readable."""
    c_in: int | None = None
    c_out: int | None = None
    stride: tuple[int, ...] | None = ()
    spatial = 0
    needs: Layout | None = None  # the layout the chain's input must have
    current: Layout | None = None  # the layout of the tensor between two steps, once known
    lazy = False
    for m in modules:
        step = _step(m)
        if step is None:
            return None
        lazy = lazy or step.lazy
        if step.needs is not None:
            if current is None:
                needs = needs or step.needs
            elif current != step.needs:
                return None  # a Linear on a spatial dim, a conv on channels-last: not a map
        current = step.leaves or current or step.needs
        if step.in_channels is not None:
            if c_out is not None and c_out != step.in_channels and not step.lazy:
                return None  # inconsistent: the branch would fail at call time anyway
            c_in = step.in_channels if c_in is None else c_in
            c_out = step.out_channels
        if step.spatial_dims:
            if spatial and spatial != step.spatial_dims:
                return None  # a 1-D layer after a 2-D one: the branch would fail anyway
            spatial = step.spatial_dims
        if step.stride is None or stride is None:
            stride = None  # the layout is still read: a merge can follow it
        elif step.stride:
            pairs = zip(stride or (1,) * len(step.stride), step.stride, strict=True)
            stride = tuple(a * b for a, b in pairs)  # ceil(ceil(H / a) / b) = ceil(H / ab)
    return _Step(c_in, c_out, stride, spatial, needs, current, lazy)


def _read(fn: nn.Module) -> _Step | None:
    if isinstance(fn, nn.RNNBase):  # on its own: (input_size, hidden * directions), channels last
        hidden = fn.proj_size or fn.hidden_size
        out = hidden * (2 if fn.bidirectional else 1)
        return _Step(fn.input_size, out, (), 0, "channels_last", "channels_last")
    return _step(fn)


def read_branch_dims(fn: nn.Module) -> BranchDims | None:
    """(in, out, stride, layout, spatial dims) of ``fn`` when certain, else None.

    Certain means: channels known at both ends, one layout at both ends, and for channels-first
    branches the number of spatial dims fixed by a conv, a pool or a ``Rearrange``.
    """
    step = _read(fn)
    if step is None or step.in_channels is None or step.out_channels is None:
        return None
    if step.stride is None or step.lazy:
        return None
    if step.needs is None or step.needs != step.leaves:
        return None
    if step.leaves == "channels_first" and not step.spatial_dims:
        return None  # e.g. Rearrange("b c ... -> b ... c") around a Linear: any rank
    stride: int | tuple[int, ...] = step.stride[0] if len(set(step.stride)) == 1 else step.stride
    if not step.stride:
        stride = 1
    return BranchDims(
        step.in_channels, step.out_channels, stride, step.leaves, step.spatial_dims or 2
    )


def read_branch_layout(fn: nn.Module) -> Layout | None:
    """The layout of ``fn``'s output when certain (what a per-channel merge must follow)."""
    step = _read(fn)
    return None if step is None else step.leaves


def read_branch_spatial_dims(fn: nn.Module) -> int | None:
    """How many spatial dims ``fn``'s layers fix (a conv, a pool, a ``Rearrange``), if any."""
    step = _read(fn)
    return step.spatial_dims if step is not None and step.spatial_dims else None


def hint_layout(shortcut: nn.Module, fn: nn.Module) -> str:
    """The layout a mismatch hint reads shapes in: the shortcut's, else the branch's if certain.

    Only words an error message; "" lets the hint try both readings.
    """
    declared = getattr(shortcut, "layout", None)
    if isinstance(declared, str):
        return declared
    return read_branch_layout(fn) or ""
