"""ImageNet ResNets with exactly torchvision's architectures and parameter counts.

The module tree mirrors torchvision's (``conv1``, ``bn1``, ``layer1``-``layer4``, ``fc``), each
block being a :class:`~residual.Residual`; :func:`~residual.models.load_torchvision` maps
torchvision's state_dict onto it.

>>> sum(p.numel() for p in resnet18().parameters())
11689512
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

from residual._types import DropMode, ModuleFactory
from residual.blocks import Bottleneck, ResidualBlock
from residual.core import Residual
from residual.errors import ResidualError
from residual.models import _stages
from residual.models._stages import make_stages

__all__ = [
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]


class ResNet(nn.Module):
    """Stem (conv7x7, BN, ReLU, max pool), four stages of residual blocks, pool, classifier.

    Build it with :func:`resnet18` and friends. ``block`` is ``"basic"`` or ``"bottleneck"``;
    ``layers`` the block count per stage.

    Args:
        block: ``"basic"`` (ResidualBlock) or ``"bottleneck"`` (Bottleneck).
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]``.
        num_classes: classifier outputs.
        zero_init_residual: every block starts as its shortcut (the last BN of each branch is
            zeroed by the block itself).
        groups, width_per_group: ResNeXt / wide ResNet bottleneck options.
        norm_layer: norm factory for the whole net.
        avg_down: ResNet-D shortcuts (average pool, then conv1x1 + norm) on downsampling blocks.
        drop_path: stochastic depth rate of the deepest block, decayed linearly with depth.
        drop_mode, checkpoint: passed to every block.

    >>> import torch
    >>> ResNet("basic", [1, 1, 1, 1], num_classes=5)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 5])
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: list[int],
        num_classes: int = 1000,
        *,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: ModuleFactory = nn.BatchNorm2d,
        avg_down: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ResidualError(f"ResNet: block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ResidualError(f"ResNet: layers must be 4 positive block counts, got {layers}")
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        expansion = 4 if block == "bottleneck" else 1
        options: dict[str, Any] = {
            "norm_layer": norm_layer,
            "zero_init_residual": zero_init_residual,
            "drop_mode": drop_mode,
            "checkpoint": checkpoint,
        }

        def build(cin: int, width: int, stride: int, rate: float) -> Residual:
            changes = stride != 1 or cin != width * expansion
            shortcut = ("pooled_projection" if avg_down else "projection") if changes else None
            if block == "bottleneck":
                return Bottleneck(
                    cin,
                    width,
                    stride,
                    groups=groups,
                    base_width=width_per_group,
                    shortcut=shortcut,
                    drop_path=rate,
                    **options,
                )
            return ResidualBlock(cin, width, stride, shortcut=shortcut, drop_path=rate, **options)

        stages, channels = make_stages(
            build,
            64,
            [64, 128, 256, 512],
            layers,
            [1, 2, 2, 2],
            lambda w: w * expansion,
            drop_path,
            "ResNet",
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's init: Kaiming-normal convs (fan_out).

        Norms keep torch's defaults (weight 1, bias 0); they are not touched here, so the zeroed
        last norms of blocks built with ``zero_init_residual`` stay zero (the blocks own that).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        _stages.check_images("ResNet", x, 3)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18(num_classes: int = 1000, **options: Any) -> ResNet:
    """ResNet-18 (11,689,512 parameters at 1000 classes). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in resnet18().parameters())
    11689512
    """
    return ResNet("basic", [2, 2, 2, 2], num_classes, **options)


def resnet34(num_classes: int = 1000, **options: Any) -> ResNet:
    """ResNet-34 (21,797,672 parameters). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in resnet34().parameters())
    21797672
    """
    return ResNet("basic", [3, 4, 6, 3], num_classes, **options)


def resnet50(num_classes: int = 1000, **options: Any) -> ResNet:
    """ResNet-50 v1.5 (25,557,032 parameters). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in resnet50().parameters())
    25557032
    """
    return ResNet("bottleneck", [3, 4, 6, 3], num_classes, **options)


def resnet101(num_classes: int = 1000, **options: Any) -> ResNet:
    """ResNet-101 (44,549,160 parameters). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in resnet101().parameters())
    44549160
    """
    return ResNet("bottleneck", [3, 4, 23, 3], num_classes, **options)


def resnet152(num_classes: int = 1000, **options: Any) -> ResNet:
    """ResNet-152 (60,192,808 parameters). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in resnet152().parameters())
    60192808
    """
    return ResNet("bottleneck", [3, 8, 36, 3], num_classes, **options)


def resnext50_32x4d(num_classes: int = 1000, **options: Any) -> ResNet:
    """ResNeXt-50 32x4d (25,028,904 parameters). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in resnext50_32x4d().parameters())
    25028904
    """
    return ResNet("bottleneck", [3, 4, 6, 3], num_classes, groups=32, width_per_group=4, **options)


def wide_resnet50_2(num_classes: int = 1000, **options: Any) -> ResNet:
    """Wide ResNet-50-2 (68,883,240 parameters). Options as :class:`ResNet`.

    >>> sum(p.numel() for p in wide_resnet50_2().parameters())
    68883240
    """
    return ResNet("bottleneck", [3, 4, 6, 3], num_classes, width_per_group=128, **options)
