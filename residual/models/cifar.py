"""CIFAR ResNets of He et al. 2015, section 4.2: depth 6n + 2, widths 16 / 32 / 64.

>>> import torch
>>> net = cifar_resnet(20)
>>> sum(p.numel() for p in net.parameters())
269722
>>> net(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from residual._types import DropMode, check_positive_int
from residual.blocks import PreActBlock, ResidualBlock
from residual.core import Residual
from residual.errors import ResidualError
from residual.models import _stages
from residual.models._stages import make_stages

__all__ = ["CifarResNet", "cifar_resnet"]


class CifarResNet(nn.Module):
    """conv3x3 stem, three stages of residual blocks, global average pool, linear classifier.

    Build it with :func:`cifar_resnet`. Keys: ``conv1``, ``bn1``, ``layer1``-``layer3`` (one
    ``Residual`` per block), ``bn_final`` (pre-activation only) and ``fc``.

    >>> import torch
    >>> model = cifar_resnet(20)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> type(model).__name__, type(model.layer1[0]).__name__, len(model.layer1)
    ('CifarResNet', 'ResidualBlock', 3)
    """

    def __init__(
        self,
        stages: list[nn.Sequential],
        channels: int,
        num_classes: int,
        in_channels: int,
        preact: bool,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        # Pre-activation nets normalise inside the blocks; the stem is a bare conv.
        self.bn1 = nn.Identity() if preact else nn.BatchNorm2d(16)
        self.relu = nn.Identity() if preact else nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(channels) if preact else nn.Identity()
        self.relu_final = nn.ReLU(inplace=True) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = _stages.check_images("CifarResNet", x, self.conv1.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu_final(self.bn_final(x))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    shortcut: str = "zero_pad",
    *,
    preact: bool = False,
    plain: bool = False,
    in_channels: int = 3,
    zero_init_residual: bool = False,
    drop_path: float = 0.0,
    drop_mode: DropMode = "row",
    checkpoint: bool = False,
) -> CifarResNet:
    """The CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110, 1202, ...).

    Args:
        depth: 6n + 2 layers; n blocks per stage.
        num_classes: classifier outputs.
        shortcut: the downsampling blocks' shortcut: ``"zero_pad"`` (option A, the paper's
            CIFAR choice, no parameters) or ``"projection"`` (option B, +2,752 parameters).
        preact: pre-activation blocks (He et al. 2016) instead of the original ones.
        plain: the same network with every shortcut removed (``shortcut="none"`` in every
            block): the "plain" baseline of the degradation experiment. Each block is still a
            ``Residual``, so diagnostics and state_dict keys stay the same.
        in_channels: image channels (1 for grey images such as scikit-learn's digits).
        zero_init_residual: every block starts as its shortcut (the blocks own the init).
        drop_path: stochastic depth rate of the deepest block, decayed linearly to the first.
        drop_mode, checkpoint: passed to every block (see :class:`~residual.Residual`).

    Raises:
        ResidualError: depth not of the form 6n + 2.

    >>> sum(p.numel() for p in cifar_resnet(56, shortcut="projection").parameters())
    855770
    """
    check_positive_int("cifar_resnet", "depth", depth)
    if plain and drop_path:
        raise ResidualError("cifar_resnet: a plain network has no shortcut to keep; drop_path=0")
    if (depth - 2) % 6 != 0 or depth < 8:
        near = max(8, round((depth - 2) / 6) * 6 + 2)
        raise ResidualError(
            f"cifar_resnet: depth must be 6n + 2 (20, 32, 44, 56, 110, 1202, ...), got {depth}; "
            f"the nearest valid depth is {near}"
        )
    block: Callable[..., Residual] = PreActBlock if preact else ResidualBlock

    def build(cin: int, width: int, stride: int, rate: float, dilation: int) -> Residual:
        # dilation: always 1 (no stage is dilated here)
        return block(
            cin,
            width,
            stride,
            shortcut="none" if plain else None if cin == width and stride == 1 else shortcut,
            zero_init_residual=zero_init_residual,
            drop_path=rate,
            drop_mode=drop_mode,
            checkpoint=checkpoint,
        )

    n = (depth - 2) // 6
    stages, channels = make_stages(
        build, 16, [16, 32, 64], [n, n, n], [1, 2, 2], lambda w: w, drop_path, "cifar_resnet"
    )
    return CifarResNet(stages, channels, num_classes, in_channels, preact)
