"""Convolutional residual blocks: the classic block, the bottleneck and the pre-activation block.

Each is a :class:`~residual.Residual` subclass that only builds its parts (``isinstance`` works);
none carries residual logic of its own, and each owns its initialisation
(``zero_init_residual``). State dict keys follow torchvision's names inside
the branch: ``fn.conv1.weight``, ``fn.bn1.running_mean``, ..., and ``shortcut.conv.weight``,
``shortcut.norm.weight`` for a projection.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from residual._types import DropMode, ModuleFactory, check_positive_int
from residual.blocks._common import conv_shortcut, make_act, residual_options
from residual.core import Residual
from residual.errors import ResidualError
from residual.shortcuts import is_identity

__all__ = ["Bottleneck", "PreActBlock", "ResidualBlock"]


def _conv3x3(
    in_channels: int, out_channels: int, stride: int = 1, groups: int = 1, dilation: int = 1
) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        out_channels,
        3,
        stride=stride,
        padding=dilation,
        groups=groups,
        dilation=dilation,
        bias=False,
    )


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def _check_channels(caller: str, in_channels: int, out_channels: int, stride: int) -> None:
    check_positive_int(caller, "in_channels", in_channels)
    check_positive_int(caller, "out_channels", out_channels)
    check_positive_int(caller, "stride", stride)


def _zero_norm(norm: nn.Module) -> None:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ResidualError(
            "zero_init_residual=True needs a norm layer with a learnable weight, got "
            f"{type(norm).__name__}"
        )
    nn.init.zeros_(weight)


class ResidualBlock(Residual):
    """The classic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first conv (and of the shortcut).
        shortcut: None picks identity when ``stride == 1`` and the channels match, else a
            conv1x1 + BN projection; or a name (``"zero_pad"`` is the ResNet paper's option A)
            or a module.
        norm_layer: factory for the norms (called with the channel count).
        act_layer: factory for the activations (``inplace=True`` where it takes it).
        zero_init_residual: zero the last BN's weight so the block starts as its shortcut.
        drop_path: stochastic depth rate; drop_mode: its mode; checkpoint: recompute in backward.

    Parts: ``fn`` = Sequential(conv1, bn1, act1, conv2, bn2), the shortcut, and ``post`` = the
    final activation.

    >>> import torch
    >>> block = ResidualBlock(16, 32, stride=2, shortcut="zero_pad")
    >>> block(torch.randn(2, 16, 7, 7)).shape, sum(p.numel() for p in block.parameters())
    (torch.Size([2, 32, 4, 4]), 13952)
    >>> isinstance(block, Residual)
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        shortcut: str | nn.Module | None = None,
        norm_layer: ModuleFactory = nn.BatchNorm2d,
        act_layer: ModuleFactory = nn.ReLU,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        _check_channels("ResidualBlock", in_channels, out_channels, stride)
        last_norm = norm_layer(out_channels)
        if zero_init_residual:
            _zero_norm(last_norm)
        fn = nn.Sequential(
            OrderedDict(
                conv1=_conv3x3(in_channels, out_channels, stride),
                bn1=norm_layer(out_channels),
                act1=make_act(act_layer),
                conv2=_conv3x3(out_channels, out_channels),
                bn2=last_norm,
            )
        )
        super().__init__(
            fn,
            conv_shortcut(shortcut, in_channels, out_channels, stride, norm_layer),
            post=make_act(act_layer),
            **residual_options(drop_path, drop_mode, checkpoint),
        )


class Bottleneck(Residual):
    """The bottleneck block: conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN, shortcut, ReLU.

    As torchvision's ``Bottleneck`` (ResNet v1.5): the stride sits on the 3x3 conv, the inner
    width is ``int(planes * base_width / 64) * groups`` (ResNeXt: ``groups=32, base_width=4``;
    wide ResNet: ``base_width=128``) and the output has ``planes * expansion`` channels.

    >>> import torch
    >>> block = Bottleneck(64, 64)
    >>> block(torch.randn(1, 64, 8, 8)).shape
    torch.Size([1, 256, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        groups: int = 1,
        base_width: int = 64,
        expansion: int = 4,
        dilation: int = 1,
        shortcut: str | nn.Module | None = None,
        norm_layer: ModuleFactory = nn.BatchNorm2d,
        act_layer: ModuleFactory = nn.ReLU,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        _check_channels("Bottleneck", in_channels, planes, stride)
        check_positive_int("Bottleneck", "groups", groups)
        check_positive_int("Bottleneck", "base_width", base_width)
        check_positive_int("Bottleneck", "expansion", expansion)
        check_positive_int("Bottleneck", "dilation", dilation)
        width = int(planes * (base_width / 64.0)) * groups
        out_channels = planes * expansion
        last_norm = norm_layer(out_channels)
        if zero_init_residual:
            _zero_norm(last_norm)
        fn = nn.Sequential(
            OrderedDict(
                conv1=_conv1x1(in_channels, width),
                bn1=norm_layer(width),
                act1=make_act(act_layer),
                conv2=_conv3x3(width, width, stride, groups, dilation),
                bn2=norm_layer(width),
                act2=make_act(act_layer),
                conv3=_conv1x1(width, out_channels),
                bn3=last_norm,
            )
        )
        super().__init__(
            fn,
            conv_shortcut(shortcut, in_channels, out_channels, stride, norm_layer),
            post=make_act(act_layer),
            **residual_options(drop_path, drop_mode, checkpoint),
        )


class PreActBlock(Residual):
    """The pre-activation block (He et al. 2016): BN-ReLU-conv3x3-BN-ReLU-conv3x3, add, no ReLU.

    With an identity shortcut the whole pre-activation sits in the branch and the shortcut sees
    the raw input. When the shortcut changes the shape it sees the pre-activated input, as in the
    paper's code: the first BN-ReLU then moves to ``pre`` (keys ``pre.bn1.*``), shared by both
    paths, and the default projection is a plain conv1x1 (no norm).

    >>> import torch
    >>> PreActBlock(16, 32, stride=2)(torch.randn(2, 16, 8, 8)).shape
    torch.Size([2, 32, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        shortcut: str | nn.Module | None = None,
        norm_layer: ModuleFactory = nn.BatchNorm2d,
        act_layer: ModuleFactory = nn.ReLU,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        _check_channels("PreActBlock", in_channels, out_channels, stride)
        short = conv_shortcut(shortcut, in_channels, out_channels, stride, None)
        preact = OrderedDict(bn1=norm_layer(in_channels), act1=make_act(act_layer))
        last_conv = _conv3x3(out_channels, out_channels)
        if zero_init_residual:
            nn.init.zeros_(last_conv.weight)
        body = OrderedDict(
            conv1=_conv3x3(in_channels, out_channels, stride),
            bn2=norm_layer(out_channels),
            act2=make_act(act_layer),
            conv2=last_conv,
        )
        options = residual_options(drop_path, drop_mode, checkpoint)
        if is_identity(short):
            super().__init__(nn.Sequential(OrderedDict(**preact, **body)), short, **options)
        else:
            super().__init__(nn.Sequential(body), short, pre=nn.Sequential(preact), **options)
