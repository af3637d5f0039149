"""A shape mismatch names both shapes and the one fix that works, read in the right layout."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from residual import Residual, ResidualError


class Opaque(nn.Module):
    """A branch whose layout nothing can read: the hint has to try both readings."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.shape)


UPSAMPLES = (
    "the branch enlarges a spatial dim (upsampling); no strided shortcut matches it: pass a "
    "shortcut module that upsamples the input the same way"
)
NOT_STRIDED = (
    "the branch's non-channel sizes are not ceil(size / stride) of the input's (an unpadded "
    "conv, or sequence positions dropped?); keep the sizes in the branch (pad its convs), or "
    "pass a shortcut module that changes them the same way"
)


def both(c_in: int, c_out: int, stride: object, layout: str, dims: str = "") -> str:
    return (
        f'use a "projection" shortcut, shortcut=ProjectionShortcut({c_in}, {c_out}, '
        f"stride={stride}, layout='{layout}'{dims}), or a \"zero_pad\" one (no parameters), "
        f"shortcut=ZeroPadShortcut({c_in}, {c_out}, stride={stride}, layout='{layout}')"
    )


CASES = {
    "rank": (
        (2, 4),
        (2, 4, 1),
        "the branch must keep the input's rank; check the layout and any reshape in fn",
    ),
    "batch": ((2, 4), (3, 4), "the branch changed the batch size; a residual block must keep it"),
    # rank 3 reads channel-first first: a Conv1d-like branch widening 4 -> 8 channels
    "conv1d widens": ((2, 4, 10), (2, 8, 10), both(4, 8, 1, "channels_first", ", spatial_dims=1")),
    # read channel-first it only narrows; read channel-last it would be a stride-2 widening
    "conv1d narrows": (
        (2, 8, 10),
        (2, 4, 10),
        'use a "projection" shortcut to reduce channels: shortcut=ProjectionShortcut(8, 4, '
        "stride=1, layout='channels_first', spatial_dims=1)",
    ),
    "features shrink": (
        (2, 8),
        (2, 4),
        'use a "projection" shortcut to reduce channels: shortcut=ProjectionShortcut(8, 4, '
        "stride=1, layout='channels_last')",
    ),
    # the stride is the largest size: 4 -> 1 needs stride 4, not 2 or 3
    "stride = size": ((2, 4, 4, 4), (2, 4, 1, 1), both(4, 4, 4, "channels_first")),
    "stride 2, odd size": ((2, 3, 7, 8), (2, 6, 4, 4), both(3, 6, 2, "channels_first")),
    "two readings, two reasons": (
        (2, 4, 10),
        (2, 3, 20),
        f"read channel-first: {UPSAMPLES}; read channel-last: {NOT_STRIDED}",
    ),
    "two readings, one reason": ((2, 4, 10), (2, 8, 20), UPSAMPLES),
    # a stride per spatial dim: 9 -> 3 is a stride of 3, 9 -> 5 one of 2
    "a stride per dim": ((2, 4, 9, 9), (2, 4, 3, 5), both(4, 4, (3, 2), "channels_first")),
    "a stride per dim, channels last": (
        (2, 7, 6, 3),
        (2, 4, 6, 5),
        both(3, 5, (2, 1), "channels_last"),
    ),
    "no stride fits": ((2, 4, 9, 9), (2, 4, 4, 5), NOT_STRIDED),  # ceil(9 / s) is never 4
}


@pytest.mark.parametrize("case", CASES)
def test_the_mismatch_message_gives_the_fix_that_works(case: str) -> None:
    shape_in, shape_out, hint = CASES[case]
    message = (
        f"Residual: branch output {shape_out} does not match shortcut output {shape_in} "
        f"(IdentityShortcut); {hint}"
    )
    with pytest.raises(ResidualError, match=f"^{re.escape(message)}$"):
        Residual(Opaque(*shape_out))(torch.randn(shape_in))


def test_the_suggested_shortcut_fixes_the_block() -> None:
    """The hint's stride and channels are right: the block it names runs."""
    from residual.shortcuts import ProjectionShortcut

    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    fixed = Residual(conv, shortcut=ProjectionShortcut(3, 6, stride=2, layout="channels_first"))
    assert fixed(torch.randn(2, 3, 7, 8)).shape == (2, 6, 4, 4)


def test_the_suggested_stride_per_dim_fixes_the_block() -> None:
    """A branch with stride (2, 1) that nothing can read: the hint's shortcut runs."""
    from residual.shortcuts import ProjectionShortcut, ZeroPadShortcut

    class OpaqueConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=(2, 1), padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    fn, x = OpaqueConv(), torch.randn(2, 3, 7, 8)
    with pytest.raises(ResidualError) as error:
        Residual(fn)(x)
    message = str(error.value)
    assert "shortcut=ProjectionShortcut(3, 6, stride=(2, 1), layout='channels_first')" in message
    assert "shortcut=ZeroPadShortcut(3, 6, stride=(2, 1), layout='channels_first')" in message
    for shortcut in (
        ProjectionShortcut(3, 6, stride=(2, 1), layout="channels_first"),
        ZeroPadShortcut(3, 6, stride=(2, 1), layout="channels_first"),
    ):
        assert Residual(fn, shortcut=shortcut)(x).shape == (2, 6, 4, 8)
