"""ImageNet ResNets with exactly torchvision's architectures and parameter counts.

The module tree mirrors torchvision's (``conv1``, ``bn1``, ``layer1``-``layer4``, ``fc``), each
block being a :class:`~residual.Residual`; :func:`~residual.models.load_torchvision` maps
torchvision's state_dict onto it.

>>> sum(p.numel() for p in resnet18().parameters())
11689512
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from residual._types import DropMode, ModuleFactory, check_positive_int
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

    Build it with :func:`resnet18` and friends, which take torchvision's keyword arguments
    (``replace_stride_with_dilation``, ``norm_layer``, ``zero_init_residual``, ``groups``,
    ``width_per_group``, ``weights=None``, ``progress``) and timm's conveniences
    (``forward_features``, ``forward_head``, ``forward_intermediates``, ``feature_info``,
    ``reset_classifier``, ``get_classifier``, ``num_classes=0`` for a headless net).

    Args:
        block: ``"basic"`` (ResidualBlock) or ``"bottleneck"`` (Bottleneck).
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]``.
        num_classes: classifier outputs; 0 gives no classifier (``fc`` is an ``nn.Identity``
            and the net returns the pooled features, as timm's ``num_classes=0``).
        zero_init_residual: every block starts as its shortcut (the last BN of each branch is
            zeroed by the block itself).
        groups, width_per_group: ResNeXt / wide ResNet bottleneck options (basic blocks take
            only ``groups=1, width_per_group=64``, as torchvision's ``BasicBlock``).
        replace_stride_with_dilation: three booleans for stages 2-4, as torchvision: a True
            stage keeps its resolution and dilates its 3x3 convs instead (segmentation
            backbones: ``[False, True, True]`` gives output stride 8). Bottleneck nets only.
        norm_layer: norm factory for the whole net, called with the channel count; None is
            ``nn.BatchNorm2d``.
        in_channels: image channels of the stem conv (1 for grey images, 4 for RGB-D, ...).
        avg_down: ResNet-D shortcuts (average pool, then conv1x1 + norm) on downsampling blocks.
        drop_path: stochastic depth rate of the deepest block, decayed linearly with depth.
        drop_mode, checkpoint: passed to every block.
        weights: None only (torchvision's default); for torchvision's weights, build the model
            and call :func:`~residual.models.load_torchvision`.
        progress: accepted for torchvision's signature; nothing is downloaded.

    Raises:
        ResidualError: a basic-block net with ``groups`` or ``width_per_group`` changed, a
            ``replace_stride_with_dilation`` that is not three booleans, ``weights`` not None.
        NotImplementedError: a dilated basic block (as torchvision's ``BasicBlock``).
        TypeError: ``replace_stride_with_dilation`` holding other than bools, ``num_classes``
            not an int.

    Attributes:
        feature_info: timm's list of ``dict(num_chs=, reduction=, module=)``, one per output
            of :meth:`forward_intermediates`: the stem (``relu``) and ``layer1``-``layer4``.
        num_features: channels entering the classifier (timm); ``inplanes`` is the same
            number under torchvision's name (read by its detection backbones).

    >>> import torch
    >>> ResNet("basic", [1, 1, 1, 1], num_classes=5)(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 5])
    >>> [f["reduction"] for f in resnet50(replace_stride_with_dilation=[False, True, True])
    ...  .feature_info]
    [2, 4, 8, 8, 8]
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
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: ModuleFactory | None = None,
        in_channels: int = 3,
        avg_down: bool = False,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        checkpoint: bool = False,
        weights: None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ResidualError(f"ResNet: block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ResidualError(f"ResNet: layers must be 4 positive block counts, got {layers}")
        if weights is not None:
            raise ResidualError(
                f"ResNet: weights={weights!r}: this library downloads nothing; build the model "
                "with weights=None, then load_torchvision(model, state_dict_or_path) with "
                "torchvision's file"
            )
        if block == "basic" and (groups != 1 or width_per_group != 64):
            raise ResidualError(
                "ResNet: BasicBlock only supports groups=1 and base_width=64, got "
                f"groups={groups}, width_per_group={width_per_group}; use a bottleneck net "
                "(resnet50, resnext50_32x4d, wide_resnet50_2) for grouped or wider blocks"
            )
        dilate = _check_dilation(replace_stride_with_dilation)
        check_positive_int("ResNet", "in_channels", in_channels)
        norm = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        expansion = 4 if block == "bottleneck" else 1
        options: dict[str, Any] = {
            "norm_layer": norm,
            "zero_init_residual": zero_init_residual,
            "drop_mode": drop_mode,
            "checkpoint": checkpoint,
        }

        def build(cin: int, width: int, stride: int, rate: float, dilation: int) -> Residual:
            changes = stride != 1 or cin != width * expansion
            shortcut = ("pooled_projection" if avg_down else "projection") if changes else None
            if block == "bottleneck":
                return Bottleneck(
                    cin,
                    width,
                    stride,
                    groups=groups,
                    base_width=width_per_group,
                    dilation=dilation,
                    shortcut=shortcut,
                    drop_path=rate,
                    **options,
                )
            if dilation > 1:
                raise NotImplementedError(
                    "ResNet: Dilation > 1 not supported in BasicBlock (resnet18/34), as in "
                    "torchvision; dilate a bottleneck net (resnet50, resnet101) instead"
                )
            return ResidualBlock(cin, width, stride, shortcut=shortcut, drop_path=rate, **options)

        strides = [1, 2, 2, 2]
        stages, channels = make_stages(
            build,
            64,
            [64, 128, 256, 512],
            layers,
            strides,
            lambda w: w * expansion,
            drop_path,
            "ResNet",
            [False, *dilate],
        )
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.inplanes = channels
        self.num_classes = num_classes
        self.fc = _head("ResNet", channels, num_classes)
        reductions = [4]
        for stride, dilates in zip(strides[1:], dilate, strict=True):
            reductions.append(reductions[-1] * (1 if dilates else stride))
        self.feature_info = [{"num_chs": 64, "reduction": 2, "module": "relu"}] + [
            {"num_chs": w * expansion, "reduction": r, "module": f"layer{i + 1}"}
            for i, (w, r) in enumerate(zip([64, 128, 256, 512], reductions, strict=True))
        ]
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's init: Kaiming-normal convs (fan_out).

        Norms keep torch's defaults (weight 1, bias 0); they are not touched here, so the zeroed
        last norms of blocks built with ``zero_init_residual`` stay zero (the blocks own that).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and the four stages: (N, C, H, W) -> (N, num_features, H / 32, W / 32).

        (H / 8 with ``replace_stride_with_dilation=[False, True, True]``.)

        >>> import torch
        >>> resnet18().forward_features(torch.randn(1, 3, 64, 64)).shape
        torch.Size([1, 512, 2, 2])
        """
        x = _stages.check_images("ResNet", x, self.conv1.in_channels)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Average pool and classifier; ``pre_logits=True`` stops after the pool (timm).

        >>> import torch
        >>> net = resnet18(num_classes=10)
        >>> net.forward_head(torch.randn(2, 512, 2, 2), pre_logits=True).shape
        torch.Size([2, 512])
        """
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Multi-scale features as timm's ``forward_intermediates``, for detection/segmentation.

        The outputs are numbered as :attr:`feature_info`: 0 is the stem (after its ReLU, before
        the max pool; reduction 2), 1-4 are ``layer1``-``layer4`` (reductions 4, 8, 16, 32).

        Args:
            x: images (N, in_channels, H, W).
            indices: which outputs: None for all five, an int n for the last n, or a list of
                indices (negative ones count from the end).
            norm: no final norm in a ResNet: accepted for timm's signature, no effect.
            stop_early: skip the stages after the last output asked for.
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list.

        Returns:
            The list of feature maps in index order, or ``(features, list)`` where
            ``features`` is :meth:`forward_features`'s output (the last computed stage's output
            with ``stop_early``).

        >>> import torch
        >>> net = resnet50()
        >>> feats = net.forward_intermediates(torch.randn(1, 3, 64, 64), [1, 2, 3, 4],
        ...                                   intermediates_only=True)
        >>> [tuple(f.shape[1:]) for f in feats]
        [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]
        >>> [net.feature_info[i]["num_chs"] for i in [1, 2, 3, 4]]
        [256, 512, 1024, 2048]
        """
        if output_fmt != "NCHW":
            raise ResidualError(
                f"ResNet.forward_intermediates: output_fmt must be 'NCHW', got {output_fmt!r}"
            )
        take = _take_indices(len(self.feature_info), indices)
        x = _stages.check_images("ResNet", x, self.conv1.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x] if 0 in take else []
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        for index, stage in enumerate(stages[: max(take)] if stop_early else stages, start=1):
            x = stage(x)
            if index in take:
                features.append(x)
        return features if intermediates_only else (x, features)

    def get_classifier(self) -> nn.Module:
        """The classifier, ``fc`` (timm).

        >>> resnet18(num_classes=10).get_classifier()
        Linear(in_features=512, out_features=10, bias=True)
        """
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``fc`` by a new ``num_classes`` classifier; 0 removes it (timm).

        The new ``nn.Linear`` has torch's default init. Load weights first: the state_dict
        then has other ``fc`` keys (none for 0) than torchvision's.

        >>> import torch
        >>> net = resnet18()
        >>> net.reset_classifier(0)
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 512])
        >>> net.reset_classifier(10)
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
        """
        self.fc = _head("ResNet.reset_classifier", self.num_features, num_classes)
        self.num_classes = num_classes


def _check_dilation(replace: Sequence[bool] | None) -> list[bool]:
    """torchvision's ``replace_stride_with_dilation`` -> three flags (stages 2-4)."""
    if replace is None:
        return [False, False, False]
    if isinstance(replace, str) or not isinstance(replace, Sequence) or len(replace) != 3:
        raise ResidualError(
            "ResNet: replace_stride_with_dilation should be None or a 3-element tuple, got "
            f"{replace!r}; one bool per stage 2-4, e.g. [False, True, True] (output stride 8)"
        )
    if not all(isinstance(flag, bool) for flag in replace):
        raise TypeError(
            f"ResNet: replace_stride_with_dilation must hold bools, got {replace!r}; "
            "e.g. [False, True, True]"
        )
    return list(replace)


def _head(caller: str, num_features: int, num_classes: int) -> nn.Module:
    """``nn.Linear(num_features, num_classes)``, or ``nn.Identity()`` for 0 classes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"{caller}: num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 0:
        raise ResidualError(
            f"{caller}: num_classes must be >= 0, got {num_classes}; 0 removes the classifier"
        )
    return nn.Linear(num_features, num_classes) if num_classes else nn.Identity()


def _take_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: None -> all, n -> the last n, a list -> itself."""
    caller = "ResNet.forward_intermediates"
    if indices is None:
        return list(range(count))
    if isinstance(indices, bool):
        raise TypeError(f"{caller}: indices must be None, an int or a list of ints, got bool")
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ResidualError(f"{caller}: indices={indices} must be in 1..{count} (the last n)")
        return list(range(count - indices, count))
    take = [int(i) for i in indices]
    if not take or any(not -count <= i < count for i in take):
        raise ResidualError(
            f"{caller}: indices must be in -{count}..{count - 1} (0 is the stem, 1-4 the "
            f"stages), got {list(indices)}"
        )
    return sorted({i % count for i in take})


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
