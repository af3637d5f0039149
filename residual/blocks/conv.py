"""Convolutional residual blocks: the classic block, the bottleneck and the pre-activation block.

One implementation for 1-D, 2-D and 3-D: ``spatial_dims=1 | 2 | 3`` (default 2) picks
``nn.Conv{1,2,3}d``, ``nn.BatchNorm{1,2,3}d`` and the shortcut's conv; the block then takes
(N, C, L), (N, C, H, W) or (N, C, D, H, W) input and refuses any other rank.

Each is a :class:`~residual.Residual` subclass that only builds its parts (``isinstance``
works); none carries residual logic of its own, and each owns its initialisation
(``zero_init_residual``). State dict keys follow torchvision's names inside the branch:
``fn.conv1.weight``, ``fn.bn1.running_mean``, ..., and ``shortcut.conv.weight``,
``shortcut.norm.weight`` for a projection.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from residual import _branch
from residual._types import DropMode, ModuleFactory, Stride, check_positive_int
from residual.blocks._common import conv_shortcut, make_act, residual_options
from residual.core import Residual
from residual.errors import ResidualError
from residual.shortcuts import (
    _BATCH_NORMS,
    _CONVS,
    _check_spatial_dims,
    _check_stride,
    is_identity,
)

__all__ = ["Bottleneck", "PreActBlock", "ResidualBlock"]

_INPUT_SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _conv3x3(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    stride: Stride = 1,
    groups: int = 1,
    dilation: int = 1,
) -> nn.Module:
    return _CONVS[spatial_dims](
        in_channels,
        out_channels,
        3,
        stride=stride,
        padding=dilation,
        groups=groups,
        dilation=dilation,
        bias=False,
    )


def _conv1x1(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    return _CONVS[spatial_dims](in_channels, out_channels, 1, bias=False)


def _check_rank(caller: str, x: Tensor, spatial_dims: int) -> Tensor:
    """Return ``x``; raise unless it is a batch of the block's dimensionality (an FX leaf)."""
    if not isinstance(x, Tensor):
        return x  # Residual's own check names that mistake
    with _branch.shape_checks():
        fits = x.dim() == spatial_dims + 2
    if not fits:
        fixes = [
            f"build the block with spatial_dims={d} for {_INPUT_SHAPES[d]} input"
            for d in _INPUT_SHAPES
            if d != spatial_dims and d + 2 == x.dim()
        ]
        if x.dim() == spatial_dims + 1:
            fixes.append("add the batch dim (x.unsqueeze(0)) for a single sample")
        fix = " or ".join(fixes) if fixes else "reshape the input"
        raise ResidualError(
            f"{caller}(spatial_dims={spatial_dims}) expects {_INPUT_SHAPES[spatial_dims]} input, "
            f"got shape {tuple(x.shape)}; {fix}"
        )
    return x


class _ConvBlock(Residual):
    """What the conv blocks share: their dimensionality and its input check (no residual logic)."""

    spatial_dims: int

    # One tensor in, one out (no masks or states): the narrower signature keeps
    # torch.fx.symbolic_trace(block) from meeting a *args Proxy.
    def forward(self, x: Tensor) -> Tensor:
        x = _check_rank(type(self).__name__, x, self.spatial_dims)
        out: Tensor = super().forward(x)
        return out


def _resolve_dims(
    caller: str, spatial_dims: int, norm_layer: ModuleFactory | None
) -> tuple[int, ModuleFactory]:
    """The checked dimensionality and the norm factory (None: BatchNorm of that dimensionality)."""
    _check_spatial_dims(caller, spatial_dims)
    return spatial_dims, _BATCH_NORMS[spatial_dims] if norm_layer is None else norm_layer


def _check_channels(
    caller: str, in_channels: int, out_channels: int, out_name: str = "out_channels"
) -> None:
    check_positive_int(caller, "in_channels", in_channels)
    check_positive_int(caller, out_name, out_channels)


def _zero_norm(norm: nn.Module) -> None:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ResidualError(
            "zero_init_residual=True needs a norm layer with a learnable weight, got "
            f"{type(norm).__name__}"
        )
    nn.init.zeros_(weight)


class ResidualBlock(_ConvBlock):
    """The classic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv (and of the shortcut): an int, or one per spatial dim
            (``(2, 1)`` halves H and keeps W, as CRNN-style ResNets); each dim gives
            ``ceil(size / stride)``.
        shortcut: None picks identity when ``stride == 1`` and the channels match, else a
            conv1x1 + BN projection; or a name (``"zero_pad"`` is the ResNet paper's option A)
            or a module.
        spatial_dims: 1, 2 (default) or 3: ``Conv1d`` on (N, C, L), ``Conv2d`` on
            (N, C, H, W) or ``Conv3d`` on (N, C, D, H, W), with the matching BatchNorm.
        norm_layer: factory for the norms (called with the channel count); None is the
            BatchNorm of ``spatial_dims`` (``nn.BatchNorm2d`` by default).
        act_layer: factory for the activations (``inplace=True`` where it takes it).
        zero_init_residual: zero the last BN's weight so the block starts as its shortcut.
        drop_path: stochastic depth rate; drop_mode: its mode; checkpoint: recompute in backward.

    Raises:
        ResidualError: bad channels, stride or ``spatial_dims``; when called, an input whose
            rank is not ``spatial_dims + 2``.

    Parts: ``fn`` = Sequential(conv1, bn1, act1, conv2, bn2), the shortcut, and ``post`` = the
    final activation.

    >>> import torch
    >>> block = ResidualBlock(16, 32, stride=2, shortcut="zero_pad")
    >>> block(torch.randn(2, 16, 7, 7)).shape, sum(p.numel() for p in block.parameters())
    (torch.Size([2, 32, 4, 4]), 13952)
    >>> ResidualBlock(16, 32, stride=2, spatial_dims=1)(torch.randn(2, 16, 9)).shape
    torch.Size([2, 32, 5])
    >>> ResidualBlock(16, 32, stride=(2, 1))(torch.randn(2, 16, 7, 7)).shape
    torch.Size([2, 32, 4, 7])
    >>> isinstance(block, Residual)
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: Stride = 1,
        *,
        shortcut: str | nn.Module | None = None,
        spatial_dims: int = 2,
        norm_layer: ModuleFactory | None = None,
        act_layer: ModuleFactory = nn.ReLU,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        _check_channels("ResidualBlock", in_channels, out_channels)
        dims, norm = _resolve_dims("ResidualBlock", spatial_dims, norm_layer)
        stride = _check_stride("ResidualBlock", stride, dims)
        last_norm = norm(out_channels)
        if zero_init_residual:
            _zero_norm(last_norm)
        fn = nn.Sequential(
            OrderedDict(
                conv1=_conv3x3(dims, in_channels, out_channels, stride),
                bn1=norm(out_channels),
                act1=make_act(act_layer),
                conv2=_conv3x3(dims, out_channels, out_channels),
                bn2=last_norm,
            )
        )
        super().__init__(
            fn,
            conv_shortcut(shortcut, in_channels, out_channels, stride, dims, norm),
            post=make_act(act_layer),
            **residual_options(drop_path, drop_mode, checkpoint),
        )
        self.spatial_dims = dims


class Bottleneck(_ConvBlock):
    """The bottleneck block: conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN, shortcut, ReLU.

    As torchvision's ``Bottleneck`` (ResNet v1.5): the stride sits on the 3x3 conv, the inner
    width is ``int(planes * base_width / 64) * groups`` (ResNeXt: ``groups=32, base_width=4``;
    wide ResNet: ``base_width=128``) and the output has ``planes * expansion`` channels.
    ``spatial_dims`` and ``norm_layer`` as in :class:`ResidualBlock`.

    >>> import torch
    >>> block = Bottleneck(64, 64)
    >>> block(torch.randn(1, 64, 8, 8)).shape
    torch.Size([1, 256, 8, 8])
    >>> Bottleneck(8, 4, stride=2, spatial_dims=3)(torch.randn(1, 8, 3, 5, 5)).shape
    torch.Size([1, 16, 2, 3, 3])
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: Stride = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        expansion: int = 4,
        dilation: int = 1,
        shortcut: str | nn.Module | None = None,
        spatial_dims: int = 2,
        norm_layer: ModuleFactory | None = None,
        act_layer: ModuleFactory = nn.ReLU,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        _check_channels("Bottleneck", in_channels, planes, "planes")
        check_positive_int("Bottleneck", "groups", groups)
        check_positive_int("Bottleneck", "base_width", base_width)
        check_positive_int("Bottleneck", "expansion", expansion)
        check_positive_int("Bottleneck", "dilation", dilation)
        dims, norm = _resolve_dims("Bottleneck", spatial_dims, norm_layer)
        stride = _check_stride("Bottleneck", stride, dims)
        width = int(planes * (base_width / 64.0)) * groups
        out_channels = planes * expansion
        last_norm = norm(out_channels)
        if zero_init_residual:
            _zero_norm(last_norm)
        fn = nn.Sequential(
            OrderedDict(
                conv1=_conv1x1(dims, in_channels, width),
                bn1=norm(width),
                act1=make_act(act_layer),
                conv2=_conv3x3(dims, width, width, stride, groups, dilation),
                bn2=norm(width),
                act2=make_act(act_layer),
                conv3=_conv1x1(dims, width, out_channels),
                bn3=last_norm,
            )
        )
        super().__init__(
            fn,
            conv_shortcut(shortcut, in_channels, out_channels, stride, dims, norm),
            post=make_act(act_layer),
            **residual_options(drop_path, drop_mode, checkpoint),
        )
        self.spatial_dims = dims


class PreActBlock(_ConvBlock):
    """The pre-activation block (He et al. 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3, add, no ReLU.

    With an identity shortcut the whole pre-activation sits in the branch and the shortcut sees
    the raw input. When the shortcut changes the shape it sees the pre-activated input, as in the
    paper's code: the first BN-ReLU then moves to ``pre`` (keys ``pre.bn1.*``), shared by both
    paths, and the default projection is a plain conv1x1 (no norm). ``spatial_dims`` and
    ``norm_layer`` as in :class:`ResidualBlock`.

    >>> import torch
    >>> PreActBlock(16, 32, stride=2)(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 32, 4, 4])
    >>> PreActBlock(4, 4, spatial_dims=1)(torch.randn(2, 4, 7)).shape
    torch.Size([2, 4, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: Stride = 1,
        *,
        shortcut: str | nn.Module | None = None,
        spatial_dims: int = 2,
        norm_layer: ModuleFactory | None = None,
        act_layer: ModuleFactory = nn.ReLU,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        _check_channels("PreActBlock", in_channels, out_channels)
        dims, norm = _resolve_dims("PreActBlock", spatial_dims, norm_layer)
        stride = _check_stride("PreActBlock", stride, dims)
        short = conv_shortcut(shortcut, in_channels, out_channels, stride, dims, None)
        preact = OrderedDict(bn1=norm(in_channels), act1=make_act(act_layer))
        last_conv = _conv3x3(dims, out_channels, out_channels)
        if zero_init_residual:
            nn.init.zeros_(last_conv.get_parameter("weight"))
        body = OrderedDict(
            conv1=_conv3x3(dims, in_channels, out_channels, stride),
            bn2=norm(out_channels),
            act2=make_act(act_layer),
            conv2=last_conv,
        )
        options = residual_options(drop_path, drop_mode, checkpoint)
        if is_identity(short):
            super().__init__(nn.Sequential(OrderedDict(**preact, **body)), short, **options)
        else:
            super().__init__(nn.Sequential(body), short, pre=nn.Sequential(preact), **options)
        self.spatial_dims = dims


torch.fx.wrap("_check_rank")
