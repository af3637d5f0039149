"""Errors that teach: each mistake raises early, naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from residual import (
    LayerScale,
    ProjectionShortcut,
    Residual,
    ResidualBlock,
    ResidualError,
    ZeroPadShortcut,
    resolve_shortcut,
)


def test_error_family() -> None:
    assert issubclass(ResidualError, ValueError)


@pytest.mark.parametrize(
    ("build", "exc", "match"),
    [
        pytest.param(
            lambda: Residual(None),
            TypeError,
            "fn must be a torch.nn.Module, got NoneType",
            id="fn-none",
        ),
        pytest.param(
            lambda: Residual(lambda x: x),
            TypeError,
            "wrap a function in an nn.Module",
            id="fn-lambda",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), post=torch.relu),
            TypeError,
            "post must be",
            id="post-function",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), "projektion"),
            ResidualError,
            "unknown shortcut 'projektion'; valid names are identity, projection, zero_pad, "
            "pooled_projection, auto",
            id="unknown-shortcut",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), 3),
            TypeError,
            "shortcut must be a name",
            id="shortcut-int",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 8)),
            ResidualError,
            r"maps 4 -> 8 channels.*use shortcut=\"projection\" or \"zero_pad\"",
            id="identity-on-widening",
        ),
        pytest.param(
            lambda: Residual(nn.ReLU(), "projection"),
            ResidualError,
            "cannot read the channel counts.*ProjectionShortcut",
            id="projection-unknown-dims",
        ),
        pytest.param(
            lambda: ZeroPadShortcut(32, 16),
            ResidualError,
            "cannot shrink 32 channels to 16.*projection",
            id="zero-pad-shrinks",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(8, 4), "zero_pad"),
            ResidualError,
            "cannot shrink 8 channels to 4",
            id="zero-pad-shrinks-inferred",
        ),
        pytest.param(
            lambda: ResidualBlock(0, 16),
            ResidualError,
            "in_channels must be a positive int, got 0",
            id="zero-channels",
        ),
        pytest.param(
            lambda: ResidualBlock(16, -4),
            ResidualError,
            "out_channels must be a positive int, got -4",
            id="negative-channels",
        ),
        pytest.param(
            lambda: ResidualBlock(16, 16, stride=0),
            ResidualError,
            "stride must be a positive int, got 0",
            id="zero-stride",
        ),
        pytest.param(
            lambda: ResidualBlock(16, 16, stride=1.5),
            TypeError,
            "stride must be an int, got float",
            id="float-stride",
        ),
        pytest.param(
            lambda: ProjectionShortcut(4, 8, layout="NHWC"),
            ResidualError,
            "unknown layout 'NHWC'",
            id="bad-layout",
        ),
        pytest.param(
            lambda: ProjectionShortcut(4, 8, spatial_dims=4),
            ResidualError,
            "spatial_dims must be 1, 2 or 3",
            id="bad-spatial-dims",
        ),
        pytest.param(
            lambda: resolve_shortcut("projection"),
            ResidualError,
            "needs in_channels and out_channels",
            id="resolver-no-dims",
        ),
        pytest.param(
            lambda: resolve_shortcut(
                "pooled_projection", in_channels=2, out_channels=4, layout="channels_last"
            ),
            ResidualError,
            "channel-first only",
            id="pooled-channels-last",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), drop_path=1.0),
            ResidualError,
            r"drop_path must be in \[0, 1\), got 1.0",
            id="rate-one",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), drop_path=-0.1),
            ResidualError,
            r"must be in \[0, 1\)",
            id="rate-negative",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), drop_path="0.1"),
            TypeError,
            "drop_path must be a float",
            id="rate-string",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 4), drop_path=0.1, drop_mode="rows"),
            ResidualError,
            "unknown drop_mode 'rows'; valid modes are row, batch, subset",
            id="bad-mode",
        ),
        pytest.param(
            lambda: Residual(nn.Linear(4, 8), "projection", merge=LayerScale(4)),
            ResidualError,
            "built for 4 channels but the branch outputs 8; build it with dim=8",
            id="layerscale-dim",
        ),
    ],
)
def test_construction_errors(build, exc, match) -> None:
    with pytest.raises(exc, match=match):
        build()


def test_call_errors() -> None:
    block = Residual(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="first argument must be the main tensor, got list"):
        block([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TypeError, match="got NoneType"):
        block(None)

    class ReturnsDict(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": x}

    with pytest.raises(TypeError, match="returned dict; it must return a tensor, or a tuple"):
        Residual(ReturnsDict())(torch.randn(2, 4))

    class ReturnsNone(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    with pytest.raises(TypeError, match="returned NoneType"):
        Residual(ReturnsNone())(torch.randn(2, 4))


def test_wrong_layout_or_channels_at_call() -> None:
    shortcut = ProjectionShortcut(8, 16)
    with pytest.raises(
        ResidualError,
        match=r"expected 8 channels at dim 1 \(channels_first\), got input of shape \(2, 5, 5, 8\)",
    ):
        shortcut(torch.randn(2, 5, 5, 8))
    with pytest.raises(ResidualError, match="expected 8 channels at the last dim"):
        ZeroPadShortcut(8, 16, layout="channels_last")(torch.randn(2, 8, 5))
