"""Stacking blocks into stages, with a linear stochastic-depth schedule (private)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from residual import _branch
from residual.core import Residual
from residual.drop import check_drop_rate, linear_drop_rates
from residual.errors import ResidualError

BlockBuilder = Callable[[int, int, int, float, int], Residual]
"""(in_channels, width, stride, drop_path, dilation) -> a residual block."""


def make_stages(
    build: BlockBuilder,
    in_channels: int,
    widths: list[int],
    blocks_per_stage: list[int],
    strides: list[int],
    out_channels: Callable[[int], int],
    drop_path: float,
    caller: str,
    dilate: Sequence[bool] | None = None,
) -> tuple[list[nn.Sequential], int]:
    """Build one ``nn.Sequential`` of blocks per stage; rates decay linearly with depth.

    The first block of a stage takes the stage's stride; ``out_channels(width)`` gives the
    channels a block of that width outputs (``width`` for basic blocks, ``4 * width`` for
    bottlenecks). ``dilate[i]`` replaces stage i's stride by a dilation, as torchvision's
    ``_make_layer``: the stage keeps its input's resolution, the dilation is multiplied by the
    stride from then on, and the stage's first block still uses the previous dilation. Returns
    the stages and the channels leaving the last one.
    """
    check_drop_rate(caller, drop_path)
    total = sum(blocks_per_stage)
    rates = linear_drop_rates(drop_path, total)
    stages: list[nn.Sequential] = []
    index = 0
    channels = in_channels
    dilation = 1
    dilated = [False] * len(widths) if dilate is None else list(dilate)
    for width, count, stride, dilates in zip(
        widths, blocks_per_stage, strides, dilated, strict=True
    ):
        previous = dilation
        if dilates:
            dilation, stride = dilation * stride, 1
        blocks: list[nn.Module] = []
        for i in range(count):
            first = i == 0
            blocks.append(
                build(
                    channels,
                    width,
                    stride if first else 1,
                    rates[index],
                    previous if first else dilation,
                )
            )
            channels = out_channels(width)
            index += 1
        stages.append(nn.Sequential(*blocks))
    return stages, channels


def check_images(caller: str, x: Tensor, channels: int) -> Tensor:
    """Return ``x``; raise unless it is a batch of images (N, channels, H, W).

    An FX leaf (call it as ``_stages.check_images``): a symbolic trace records the call and the
    check runs on the real input when the traced graph runs.
    """
    with _branch.shape_checks():
        fits = bool(x.dim() == 4 and x.shape[1] == channels)
    if not fits:
        raise ResidualError(
            f"{caller}: expected images of shape (N, {channels}, H, W), got {tuple(x.shape)}"
            + ("; add a batch dim with x.unsqueeze(0)" if x.dim() == 3 else "")
        )
    return x


torch.fx.wrap("check_images")
