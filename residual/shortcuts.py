"""Shortcut strategies S(x): identity, projection, zero-pad (option A) and pooled projection.

Each strategy is a module usable on its own, and by name through :func:`resolve_shortcut` (the
single resolver that ``Residual(fn, shortcut="...")`` uses). Each knows its layout:
``"channels_first"`` is (N, C, *spatial) for convolutions, ``"channels_last"`` is (..., C) for
MLP, RNN and Transformer streams. A stride ``s`` keeps every ``s``-th position starting at the
first, so an odd size ``H`` becomes ``ceil(H / s)``, as the branch's padded 3x3 conv does; a
stride may differ per spatial dim (``stride=(2, 1)``: ``ceil(H / 2)``, ``W``).

A shortcut accepts what its branch accepts: a channels-first shortcut that knows its
``spatial_dims`` also takes one unbatched sample (C, *spatial), as torch's convs do, and a
channels-last one a single vector (C,); either gives what it gives the batch of that one
sample.

>>> import torch
>>> from residual.shortcuts import ZeroPadShortcut
>>> ZeroPadShortcut(16, 32, stride=2)(torch.ones(2, 16, 7, 7)).shape
torch.Size([2, 32, 4, 4])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from residual import _branch
from residual._dims import read_branch_dims, read_branch_spatial_dims
from residual._types import Layout, ModuleFactory, Stride, check_layout, check_positive_int
from residual.errors import ResidualError, check_module

__all__ = [
    "IdentityShortcut",
    "LowRankShortcut",
    "NoShortcut",
    "PooledProjectionShortcut",
    "ProjectionShortcut",
    "SHORTCUTS",
    "ZeroPadShortcut",
    "resolve_shortcut",
    "shortcut_for",
]

SHORTCUTS: tuple[str, ...] = (
    "identity",
    "projection",
    "zero_pad",
    "pooled_projection",
    "auto",
    "none",
)
"""The names :func:`resolve_shortcut` accepts."""

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCH_NORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_AVG_POOLS: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class _DefaultNorm:
    """Marker: BatchNorm for channel-first projections, no norm for channel-last ones."""

    def __repr__(self) -> str:
        return "DEFAULT_NORM"


DEFAULT_NORM = _DefaultNorm()


def _check_spatial_dims(caller: str, spatial_dims: int) -> int:
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int):
        raise TypeError(
            f"{caller}: spatial_dims must be an int (1, 2 or 3), got "
            f"{type(spatial_dims).__name__} {spatial_dims!r}"
        )
    if spatial_dims not in _CONVS:
        raise ResidualError(f"{caller}: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def _check_stride(caller: str, stride: object, spatial_dims: int | None = None) -> Stride:
    """Return ``stride``: a positive int, or a tuple of them with one per spatial dim."""
    if not isinstance(stride, tuple | list):
        return check_positive_int(caller, "stride", stride)
    steps = tuple(stride)
    if not steps or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in steps):
        raise ResidualError(
            f"{caller}: stride must be a positive int or a tuple of them (one per spatial dim), "
            f"got {stride!r}"
        )
    if spatial_dims is not None and len(steps) != spatial_dims:
        fix = f" or build it with spatial_dims={len(steps)}" if len(steps) in _CONVS else ""
        raise ResidualError(
            f"{caller}: stride {steps} gives one step per spatial dim ({len(steps)}) but "
            f"spatial_dims={spatial_dims}; give {spatial_dims} steps{fix}"
        )
    return steps


def _is_one(stride: Stride) -> bool:
    return stride == 1 or (isinstance(stride, tuple) and all(s == 1 for s in stride))


def _subsample(caller: str, x: Tensor, stride: Stride, layout: Layout) -> Tensor:
    """Keep every ``stride``-th position of each spatial dim (ceil(H / stride) remain).

    An FX leaf, as are the other helpers here that read the rank or shapes (registered at the
    end): ``torch.fx.symbolic_trace`` records the call and it runs on the real tensor.
    """
    if _is_one(stride):
        return x
    with _branch.shape_checks():
        spatial = max(x.dim() - 2, 0)
        shape = tuple(x.shape)
    if isinstance(stride, tuple):
        if len(stride) != spatial:
            raise ResidualError(
                f"{caller}: stride {stride} gives one step per spatial dim ({len(stride)}) but "
                f"the input of shape {shape} has {spatial} ({layout}); give one step per "
                "spatial dim"
            )
        steps = stride
    else:
        steps = (stride,) * spatial
    if not steps:
        return x
    every = tuple(slice(None, None, s) for s in steps)
    first = layout == "channels_first"
    index = (slice(None), slice(None), *every) if first else (slice(None), *every, slice(None))
    return x[index]


def _batched(
    caller: str, x: Tensor, expected: int, layout: Layout, spatial_dims: int | None
) -> Tensor:
    """``x`` as a batch: one unbatched sample gains a batch dim of one (an FX leaf).

    Raises unless ``x`` has ``expected`` channels where ``layout`` puts them. Channels first, a
    rank of ``spatial_dims + 1`` is one sample (C, *spatial) when ``spatial_dims`` is known;
    channels last, a vector (C,) is one sample.
    """
    with _branch.shape_checks():  # under torch.jit.trace: no warning for the shape reads
        return _batch_of(caller, x, expected, layout, spatial_dims)


def _batch_of(
    caller: str, x: Tensor, expected: int, layout: Layout, spatial_dims: int | None
) -> Tensor:
    rank, shape = x.dim(), tuple(x.shape)
    if layout == "channels_last":
        if rank == 1 and shape[0] == expected:
            return x.unsqueeze(0)
        if not (rank >= 1 and shape[-1] == expected):
            raise ResidualError(
                f"{caller}: expected {expected} channels at the last dim (channels_last), got "
                f"input of shape {shape}; check the layout or the in_channels the shortcut was "
                "built with"
            )
        return x
    if spatial_dims is not None and rank == spatial_dims + 1:
        if shape[0] != expected:
            raise ResidualError(
                f"{caller}: expected {expected} channels at dim 0 of an unbatched (C, *spatial) "
                f"sample (channels_first, spatial_dims={spatial_dims}), got input of shape "
                f"{shape}; check the layout, the in_channels the shortcut was built with, or its "
                "spatial_dims"
            )
        return x.unsqueeze(0)
    if spatial_dims is not None and rank != spatial_dims + 2:
        fix = (
            f"build it with spatial_dims={rank - 2}" if rank - 2 in _CONVS else "reshape the input"
        )
        raise ResidualError(
            f"{caller}(spatial_dims={spatial_dims}) expects (N, C, *{spatial_dims} spatial) "
            f"input or one unbatched (C, *{spatial_dims} spatial) sample, got shape {shape}; {fix}"
        )
    if not (rank >= 2 and shape[1] == expected):
        unbatched = (
            f", or for one unbatched (C, *spatial) sample build it with spatial_dims={rank - 1}"
            if spatial_dims is None and shape[:1] == (expected,) and rank - 1 in _CONVS
            else ""
        )
        raise ResidualError(
            f"{caller}: expected {expected} channels at dim 1 (channels_first), got input of "
            f"shape {shape}; check the layout or the in_channels the shortcut was built "
            f"with{unbatched}"
        )
    return x


def _unbatched(y: Tensor, x: Tensor) -> Tensor:
    """``y`` without the batch dim :func:`_batched` gave an unbatched ``x`` (an FX leaf)."""
    with _branch.shape_checks():
        added = x.dim() < y.dim()
    return y.squeeze(0) if added else y


def _check_channels(caller: str, x: Tensor, expected: int, layout: Layout) -> Tensor:
    """Return ``x``; raise unless it has ``expected`` channels (an FX leaf; any batching)."""
    _batched(caller, x, expected, layout, None)
    return x


def _pad_channels_first(x: Tensor, sub: Tensor, before: int, after: int) -> Tensor:
    """Zero channels around dim 1 of ``sub``, in the memory format of ``x``."""
    # pad's spec runs from the last dim backwards: (0, 0) for each spatial dim, then channels.
    out = nn.functional.pad(sub, (0, 0) * (x.dim() - 2) + (before, after))
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None and x.is_contiguous(memory_format=fmt):
        return out.contiguous(memory_format=fmt)  # keep channels_last (odd sizes lose it)
    return out


class IdentityShortcut(nn.Module):
    """S(x) = x: the shortcut when the branch keeps the shape.

    >>> import torch
    >>> IdentityShortcut()(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """

    def forward(self, x: Tensor) -> Tensor:
        return x


class LowRankShortcut(nn.Module):
    """LAuReL-LR (Menghani et al., ICML 2025): ``S(x) = x + A B x``, a learned rank-r map added.

    ``B`` (rank, dim) starts at zero and ``A`` (dim, rank) column-orthogonal, as the paper, so
    the shortcut is exactly the identity at init and learns a low-rank correction; channels
    last (..., dim). ``Residual(fn, shortcut=LowRankShortcut(d, r))`` is LAuReL-LR; with the
    merge :class:`~residual.merges.LaurelRW` it is LAuReL-RW+LR.

    Args:
        dim: channels of the stream; rank: r (the paper uses r << dim, e.g. 16-64).

    >>> import torch
    >>> s = LowRankShortcut(8, rank=2)
    >>> x = torch.randn(3, 8)
    >>> bool(torch.equal(s(x), x))  # the identity at init
    True
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim = check_positive_int("LowRankShortcut", "dim", dim)
        self.rank = check_positive_int("LowRankShortcut", "rank", rank)
        if rank > dim:
            raise ResidualError(
                f"LowRankShortcut: rank={rank} is larger than dim={dim}; use rank <= {dim}"
            )
        self.down = nn.Parameter(torch.zeros(rank, dim))  # B
        self.up = nn.Parameter(nn.init.orthogonal_(torch.empty(dim, rank)))  # A

    def low_rank(self, x: Tensor) -> Tensor:
        """``A B x`` alone (LAuReL-PA's ``h``)."""
        _check_channels("LowRankShortcut", x, self.dim, "channels_last")
        return (x @ self.down.t()) @ self.up.t()  # a vector (dim,) is one sample

    def forward(self, x: Tensor) -> Tensor:
        return x + self.low_rank(x)

    def extra_repr(self) -> str:
        return f"{self.dim}, rank={self.rank}"


class NoShortcut(nn.Module):
    """No shortcut at all: ``Residual(fn, NoShortcut())`` computes ``post(fn(x))``.

    The ablation behind "plain" networks (``cifar_resnet(56, plain=True)``): the same builder,
    the same layers, only the connection removed. It takes no merge.

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> Residual(nn.Linear(2, 3), NoShortcut())(torch.zeros(1, 2)).shape
    torch.Size([1, 3])
    """

    def forward(self, x: Tensor) -> None:
        return None


class ProjectionShortcut(nn.Module):
    """S(x) = norm(W x), a learned 1x1 projection with an optional stride (ResNet option B).

    Channel-first it is a 1x1 ``ConvNd`` (attribute ``conv``), channel-last a ``Linear``
    (attribute ``linear``); ``norm`` follows, BatchNorm by default for channel-first, none for
    channel-last. The conv has no bias by default (the norm supplies it), as in torchvision.

    Args:
        in_channels: channels entering the shortcut.
        out_channels: channels leaving it (the branch's output channels).
        stride: spatial subsampling, matching the branch's stride: an int, or one per spatial
            dim (``(2, 1)``); each dim gives ``ceil(H / s)``.
        layout: ``"channels_first"`` (N, C, *spatial) or ``"channels_last"`` (..., C).
        spatial_dims: 1, 2 or 3, the conv's dimensionality (channel-first only); the
            projection takes (N, C, *spatial) batches and single (C, *spatial) samples.
        norm_layer: factory called with ``out_channels``, or None for no norm.
        bias: give the projection a bias.

    >>> import torch
    >>> proj = ProjectionShortcut(64, 128, stride=2)
    >>> proj(torch.randn(2, 64, 7, 7)).shape
    torch.Size([2, 128, 4, 4])
    >>> ProjectionShortcut(256, 512, layout="channels_last")(torch.randn(3, 256)).shape
    torch.Size([3, 512])
    >>> ProjectionShortcut(64, 128, stride=(2, 1))(torch.randn(64, 7, 7)).shape  # one sample
    torch.Size([128, 4, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: Stride = 1,
        layout: Layout = "channels_first",
        spatial_dims: int = 2,
        norm_layer: ModuleFactory | _DefaultNorm | None = DEFAULT_NORM,
        bias: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_positive_int(name, "in_channels", in_channels)
        self.out_channels = check_positive_int(name, "out_channels", out_channels)
        self.layout = check_layout(name, layout)
        self.spatial_dims = _check_spatial_dims(name, spatial_dims)
        first = layout == "channels_first"
        self.stride = _check_stride(name, stride, spatial_dims if first else None)
        if isinstance(norm_layer, _DefaultNorm):
            norm_layer = _BATCH_NORMS[spatial_dims] if layout == "channels_first" else None
        if layout == "channels_first":
            conv = _CONVS[spatial_dims]
            self.conv = conv(in_channels, out_channels, 1, stride=stride, bias=bias)
        else:
            self.linear = nn.Linear(in_channels, out_channels, bias=bias)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if self.layout == "channels_first":
            batch = _batched(name, x, self.in_channels, self.layout, self.spatial_dims)
            return _unbatched(self.norm(self.conv(batch)), x)
        batch = _batched(name, x, self.in_channels, self.layout, None)
        y = self.norm(self.linear(_subsample(name, batch, self.stride, "channels_last")))
        return _unbatched(y, x)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, layout={self.layout!r}"
        )


class ZeroPadShortcut(nn.Module):
    """S(x): subsample by ``stride``, then append zero channels (ResNet paper option A).

    No parameters. The zeros go after the input channels (``placement="end"``, as the
    ``nn.Concat(Identity, MulConstant(0))`` of fb.resnet.torch's CIFAR nets) or half before and
    half after (``placement="both"``, as many PyTorch CIFAR ports do).

    Args:
        in_channels: channels entering.
        out_channels: channels leaving, at least ``in_channels``.
        stride: spatial subsampling, an int or one per spatial dim; odd sizes give
            ceil(H / stride).
        layout: ``"channels_first"`` or ``"channels_last"``.
        placement: ``"end"`` or ``"both"``.
        spatial_dims: channels first, the number of spatial dims if known (``Residual`` passes
            its conv branch's): then one unbatched (C, *spatial) sample is taken too. None: any
            rank, always batched.

    Raises:
        ResidualError: ``out_channels < in_channels`` (zero-padding cannot drop channels).

    >>> import torch
    >>> s = ZeroPadShortcut(2, 4, stride=2)
    >>> y = s(torch.ones(1, 2, 3, 3))
    >>> y.shape, y[0, :, 0, 0].tolist()
    (torch.Size([1, 4, 2, 2]), [1.0, 1.0, 0.0, 0.0])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: Stride = 1,
        layout: Layout = "channels_first",
        placement: Literal["end", "both"] = "end",
        spatial_dims: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_positive_int(name, "in_channels", in_channels)
        self.out_channels = check_positive_int(name, "out_channels", out_channels)
        self.layout = check_layout(name, layout)
        if spatial_dims is not None:
            _check_spatial_dims(name, spatial_dims)
        self.spatial_dims = spatial_dims
        self.stride = _check_stride(name, stride, spatial_dims)
        if out_channels < in_channels:
            raise ResidualError(
                f"{name}: cannot shrink {in_channels} channels to {out_channels} by zero-padding; "
                'use shortcut="projection" to reduce channels'
            )
        if placement not in ("end", "both"):
            raise ResidualError(f"{name}: placement must be 'end' or 'both', got {placement!r}")
        self.placement = placement
        extra = out_channels - in_channels
        self._before = extra // 2 if placement == "both" else 0
        self._after = extra - self._before

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        first = self.layout == "channels_first"
        batch = _batched(
            name, x, self.in_channels, self.layout, self.spatial_dims if first else None
        )
        sub = _subsample(name, batch, self.stride, self.layout)
        if self._before == 0 and self._after == 0:
            return _unbatched(sub, x)
        if self.layout == "channels_last":
            return _unbatched(nn.functional.pad(sub, (self._before, self._after)), x)
        return _unbatched(_pad_channels_first(batch, sub, self._before, self._after), x)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"layout={self.layout!r}, placement={self.placement!r}"
        )


class PooledProjectionShortcut(nn.Module):
    """S(x) = norm(conv1x1(avgpool(x))), the ResNet-D shortcut (He et al. 2019, "Bag of Tricks").

    The average pool (kernel = stride, ``ceil_mode=True``, ``count_include_pad=False``) does the
    subsampling so that the 1x1 conv sees every position; with stride 1 there is no pool.
    Channel-first only.

    >>> import torch
    >>> PooledProjectionShortcut(64, 128, stride=2)(torch.randn(2, 64, 7, 7)).shape
    torch.Size([2, 128, 4, 4])
    >>> PooledProjectionShortcut(64, 128, stride=(2, 1))(torch.randn(64, 7, 7)).shape
    torch.Size([128, 4, 7])
    """

    layout: Layout = "channels_first"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: Stride = 1,
        spatial_dims: int = 2,
        norm_layer: ModuleFactory | _DefaultNorm | None = DEFAULT_NORM,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_positive_int(name, "in_channels", in_channels)
        self.out_channels = check_positive_int(name, "out_channels", out_channels)
        self.spatial_dims = _check_spatial_dims(name, spatial_dims)
        self.stride = _check_stride(name, stride, spatial_dims)
        if isinstance(norm_layer, _DefaultNorm):
            norm_layer = _BATCH_NORMS[spatial_dims]
        pool = _AVG_POOLS[spatial_dims]
        self.pool = (
            nn.Identity()
            if _is_one(self.stride)
            else pool(self.stride, stride=self.stride, ceil_mode=True, count_include_pad=False)
        )
        self.conv = _CONVS[spatial_dims](in_channels, out_channels, 1, bias=False)
        self.norm = norm_layer(out_channels) if norm_layer is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        batch = _batched(name, x, self.in_channels, "channels_first", self.spatial_dims)
        return _unbatched(self.norm(self.conv(self.pool(batch))), x)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def resolve_shortcut(
    spec: str | nn.Module | None,
    *,
    in_channels: int | None = None,
    out_channels: int | None = None,
    stride: Stride = 1,
    layout: Layout = "channels_first",
    spatial_dims: int = 2,
    norm_layer: ModuleFactory | _DefaultNorm | None = DEFAULT_NORM,
) -> nn.Module:
    """Turn a shortcut name (or module) into a shortcut module: the one resolver.

    ``"auto"`` (and None) is identity when ``in_channels == out_channels`` and the stride is 1
    (in every dim), otherwise a projection. A module is returned as it is.

    Raises:
        ResidualError: unknown name (the valid ones are listed), or dimensions missing.
        TypeError: neither a string nor a module.

    >>> resolve_shortcut("auto", in_channels=64, out_channels=128, stride=2)
    ProjectionShortcut(
      64, 128, stride=2, layout='channels_first'
      (conv): Conv2d(64, 128, kernel_size=(1, 1), stride=(2, 2), bias=False)
      (norm): BatchNorm2d(128, ...)
    )
    """
    if isinstance(spec, nn.Module):
        return spec
    if spec is None:
        spec = "auto"
    if isinstance(spec, type):
        check_module("Residual", "shortcut", spec)  # a module class: asks for an instance
    if not isinstance(spec, str):
        raise TypeError(
            f"shortcut must be a name {SHORTCUTS} or an nn.Module, got {type(spec).__name__}"
        )
    if spec not in SHORTCUTS:
        raise ResidualError(f"unknown shortcut {spec!r}; valid names are {', '.join(SHORTCUTS)}")
    if spec == "identity":
        return IdentityShortcut()
    if spec == "none":
        return NoShortcut()
    if in_channels is None or out_channels is None:
        raise ResidualError(
            f"shortcut {spec!r} needs in_channels and out_channels; pass a module instead, "
            "e.g. shortcut=ProjectionShortcut(in_channels, out_channels)"
        )
    if spec == "auto" and in_channels == out_channels and _is_one(stride):
        return IdentityShortcut()  # any other "auto" is the projection at the end
    if spec == "zero_pad":
        dims = spatial_dims if layout == "channels_first" else None
        return ZeroPadShortcut(
            in_channels, out_channels, stride=stride, layout=layout, spatial_dims=dims
        )
    if spec == "pooled_projection":
        if layout != "channels_first":
            raise ResidualError(
                "shortcut 'pooled_projection' (ResNet-D) is channel-first only; "
                "use 'projection' for channel-last streams"
            )
        return PooledProjectionShortcut(
            in_channels,
            out_channels,
            stride=stride,
            spatial_dims=spatial_dims,
            norm_layer=norm_layer,
        )
    return ProjectionShortcut(
        in_channels,
        out_channels,
        stride=stride,
        layout=layout,
        spatial_dims=spatial_dims,
        norm_layer=norm_layer,
    )


def shortcut_for(
    spec: str | nn.Module | None, branch: nn.Module, batched_ndim: int | None = None
) -> nn.Module:
    """The shortcut ``Residual(branch, shortcut=spec)`` uses.

    A module is used as it is; ``"identity"`` (and None) and ``"none"`` never look at the
    branch. Other names need the branch's channels and stride: they are read where the reading
    is certain (``residual._dims``), else the caller is asked for the module.

    >>> from torch import nn
    >>> shortcut_for("zero_pad", nn.Conv2d(16, 32, 3, stride=2, padding=1))
    ZeroPadShortcut(16, 32, stride=2, layout='channels_first', placement='end')
    >>> shortcut_for("projection", nn.Conv2d(16, 32, 3, stride=(2, 1), padding=1)).stride
    (2, 1)
    """
    if isinstance(spec, nn.Module):
        _fill_spatial_dims(spec, branch, batched_ndim)
        return spec
    name = "identity" if spec is None else spec
    if name in ("identity", "none") or not isinstance(name, str) or name not in SHORTCUTS:
        return resolve_shortcut(name)  # raises for unknown names and wrong types
    dims = read_branch_dims(branch)
    if dims is None:
        raise ResidualError(
            f"Residual: shortcut {name!r} needs the branch's channels and stride, and "
            f"{type(branch).__name__} does not show them for certain (a custom forward, or "
            "layers whose order or padding do not fix them); pass the module instead, e.g. "
            "shortcut=ProjectionShortcut(in_channels, out_channels, stride=s) or "
            "ZeroPadShortcut(in_channels, out_channels, stride=s)"
        )
    return resolve_shortcut(
        name,
        in_channels=dims.in_channels,
        out_channels=dims.out_channels,
        stride=dims.stride,
        layout=dims.layout,
        spatial_dims=dims.spatial_dims,
    )


def _fill_spatial_dims(shortcut: nn.Module, branch: nn.Module, batched_ndim: int | None) -> None:
    """A channels-first ``ZeroPadShortcut`` built without ``spatial_dims`` takes the branch's.

    Read where certain (convs, pools), else from the block's sample axis (its batched rank):
    with it, one unbatched (C, *spatial) sample is told from a batch, as the branch tells it.
    """
    if not isinstance(shortcut, ZeroPadShortcut) or shortcut.spatial_dims is not None:
        return
    spatial = read_branch_spatial_dims(branch)
    if spatial is None and batched_ndim is not None and batched_ndim - 2 in _CONVS:
        spatial = batched_ndim - 2
    steps = shortcut.stride if isinstance(shortcut.stride, tuple) else (shortcut.stride,)
    if shortcut.layout == "channels_first" and spatial and len(steps) in (1, spatial):
        shortcut.spatial_dims = spatial


def is_identity(shortcut: nn.Module) -> bool:
    """True for the shortcuts that return their input unchanged."""
    return isinstance(shortcut, IdentityShortcut | nn.Identity)


for _name in ("_subsample", "_check_channels", "_pad_channels_first", "_batched", "_unbatched"):
    torch.fx.wrap(_name)
