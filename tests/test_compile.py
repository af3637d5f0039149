"""torch.compile(fullgraph=True): no graph break, same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MySelfAttention
from torch import nn

from residual import Bottleneck, Residual, ResidualBlock


def _cases() -> list:
    return [
        pytest.param(lambda: ResidualBlock(8, 16, stride=2), (2, 8, 7, 7), {}, id="ResidualBlock"),
        pytest.param(lambda: Bottleneck(16, 4), (2, 16, 6, 6), {}, id="Bottleneck"),
        pytest.param(
            lambda: Residual(
                nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            ),
            (4, 16),
            {},
            id="mlp",
        ),
        pytest.param(
            lambda: Residual(MySelfAttention(16, 4)), (2, 5, 16), {"mask": True}, id="attention"
        ),
    ]


@pytest.mark.parametrize(("build", "shape", "opts"), _cases())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_forward_backward(build, shape, opts, train) -> None:
    torch._dynamo.reset()
    eager = build().train(train)
    compiled = torch.compile(eager, fullgraph=True)
    x = torch.randn(shape)
    kwargs = {}
    if opts.get("mask"):
        mask = torch.zeros(shape[0], shape[1], dtype=torch.bool)
        mask[:, -1] = True
        kwargs["key_padding_mask"] = mask
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_model = copy.deepcopy(eager)  # own parameters and BatchNorm statistics
    ya = ref_model(xa, **kwargs)
    yb = compiled(xb, **kwargs)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(ref_model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-4, msg=name)
