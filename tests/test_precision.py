"""channels_last and bf16 autocast keep their rules; the opt-in fp32 residual stream."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from residual import Residual, ResidualBlock
from residual.models import cifar_resnet, resnet18

CL = torch.channels_last


@pytest.mark.parametrize("shortcut", ["identity", "zero_pad", "projection", "pooled_projection"])
def test_channels_last_is_kept_through_every_shortcut(shortcut: str) -> None:
    cout, stride = (16, 1) if shortcut == "identity" else (32, 2)
    block = ResidualBlock(16, cout, stride, shortcut=shortcut).to(memory_format=CL)
    x = torch.randn(2, 16, 9, 9).to(memory_format=CL)
    y = block(x)
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, block(x.contiguous()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "build", [lambda: cifar_resnet(20), resnet18], ids=["cifar_resnet20", "resnet18"]
)
def test_resnets_under_bf16_autocast_and_channels_last(build) -> None:
    model = build().to(memory_format=CL)
    x = torch.randn(2, 3, 32, 32).to(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))
        logits = model(x)
    assert features.dtype == torch.bfloat16 and features.is_contiguous(memory_format=CL)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_residual_in_fp32_keeps_the_stream_in_float32() -> None:
    fn = nn.Linear(16, 16)
    stream = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = Residual(fn)(stream.bfloat16())
        fp32 = Residual(fn, residual_in_fp32=True)(stream.bfloat16())
        branch = fn(stream.bfloat16())
    assert plain.dtype == torch.bfloat16
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32, stream.bfloat16().float() + branch.float(), atol=0, rtol=0)
    # a deep stack: the fp32 stream keeps small updates that bf16 rounds away
    x = torch.full((1, 16), 256.0)
    tiny = nn.Linear(16, 16)
    nn.init.zeros_(tiny.weight)
    nn.init.constant_(tiny.bias, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, y32 = x.bfloat16(), x
        for _ in range(8):
            y16 = Residual(tiny)(y16)
            y32 = Residual(tiny, residual_in_fp32=True)(y32)
    assert torch.all(y32 == 258.0)
    assert torch.all(y16 == 256.0)  # 256 + 0.25 rounds back to 256 in bf16
