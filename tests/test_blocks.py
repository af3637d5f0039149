"""The classic block, the bottleneck and the pre-activation block are Residual instances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import Bottleneck as TorchvisionBottleneck
from torch import Tensor, nn

from residual import (
    Bottleneck,
    IdentityShortcut,
    PreActBlock,
    ProjectionShortcut,
    Residual,
    ResidualBlock,
    ZeroPadShortcut,
)


class SeedResidualBlock(nn.Module):
    """The hand-written block of the tutorial this library comes from."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def _seed_to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    renamed = {}
    for key, value in state.items():
        key = key.replace("shortcut.0.", "shortcut.conv.").replace("shortcut.1.", "shortcut.norm.")
        renamed[key if key.startswith("shortcut") else f"fn.{key}"] = value
    return renamed


@pytest.mark.parametrize(
    ("cin", "cout", "stride"), [(64, 64, 1), (64, 128, 2)], ids=["64-64-s1", "64-128-s2"]
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_seed_block_outputs_and_gradients(cin, cout, stride, train) -> None:
    seed = SeedResidualBlock(cin, cout, stride)
    ours = ResidualBlock(cin, cout, stride)
    assert isinstance(ours, Residual)
    ours.load_state_dict(_seed_to_ours(seed.state_dict()))
    if not train:  # give the running statistics something to say
        with torch.no_grad():
            for m in [*seed.modules(), *ours.modules()]:
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 1.5)
        ours.load_state_dict(_seed_to_ours(seed.state_dict()))
    seed.train(train)
    ours.train(train)
    x = torch.randn(4, cin, 16, 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = seed(xa), ours(xb)
    torch.testing.assert_close(yb, ya, atol=0, rtol=0)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, atol=0, rtol=0)
    ours_params = dict(ours.named_parameters())
    for name, p in _seed_to_ours(dict(seed.named_parameters())).items():
        torch.testing.assert_close(ours_params[name].grad, p.grad, atol=0, rtol=0)
    if train:  # running statistics moved identically
        for name, buf in _seed_to_ours(dict(seed.named_buffers())).items():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buf, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("shortcut", "count"),
    [("zero_pad", 13_952), (None, 14_528), ("projection", 14_528)],
    ids=["zero_pad", "default", "projection"],
)
def test_parameter_counts(shortcut, count) -> None:
    block = ResidualBlock(16, 32, 2, shortcut=shortcut)
    assert sum(p.numel() for p in block.parameters()) == count


def test_default_shortcut_choice() -> None:
    assert isinstance(ResidualBlock(64, 64).shortcut, IdentityShortcut)
    down = ResidualBlock(64, 128, stride=2).shortcut
    assert isinstance(down, ProjectionShortcut) and isinstance(down.norm, nn.BatchNorm2d)
    assert isinstance(ResidualBlock(16, 32, 2, shortcut="zero_pad").shortcut, ZeroPadShortcut)
    assert isinstance(ResidualBlock(64, 64, stride=2).shortcut, ProjectionShortcut)


def test_zero_init_gives_shortcut_then_relu() -> None:
    block = ResidualBlock(8, 8, zero_init_residual=True).eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x), torch.relu(x), atol=0, rtol=0)
    bottleneck = Bottleneck(32, 8, zero_init_residual=True).eval()
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(bottleneck(x), torch.relu(x), atol=0, rtol=0)
    preact = PreActBlock(8, 8, zero_init_residual=True)
    torch.testing.assert_close(preact(x[:, :8]), x[:, :8], atol=0, rtol=0)


def test_custom_layers() -> None:
    block = ResidualBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c), act_layer=nn.GELU)
    assert isinstance(block.fn.bn1, nn.GroupNorm) and isinstance(block.post, nn.GELU)
    x = torch.randn(2, 8, 4, 4)
    f = block.fn
    norm1 = F.group_norm(f.conv1(x), 2, f.bn1.weight, f.bn1.bias, f.bn1.eps)
    norm2 = F.group_norm(f.conv2(F.gelu(norm1)), 2, f.bn2.weight, f.bn2.bias, f.bn2.eps)
    torch.testing.assert_close(block(x), F.gelu(x + norm2))


@pytest.mark.parametrize(
    ("inplanes", "planes", "stride", "groups", "base_width"),
    [(64, 16, 1, 1, 64), (64, 32, 2, 1, 64), (64, 32, 2, 32, 4), (64, 16, 1, 1, 128)],
    ids=["identity", "down", "resnext", "wide"],
)
def test_bottleneck_matches_torchvision_layout(
    inplanes, planes, stride, groups, base_width
) -> None:
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
    ref = TorchvisionBottleneck(inplanes, planes, stride, downsample, groups, base_width)
    ours = Bottleneck(inplanes, planes, stride, groups=groups, base_width=base_width)
    state = {}
    for key, value in ref.state_dict().items():
        key = key.replace("downsample.0.", "shortcut.conv.").replace(
            "downsample.1.", "shortcut.norm."
        )
        state[key if key.startswith("shortcut") else f"fn.{key}"] = value
    ours.load_state_dict(state)
    x = torch.randn(2, inplanes, 8, 8)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


class PaperPreActBlock(nn.Module):
    """He et al. 2016's pre-activation block, written out."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.proj = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return out + (self.proj(a) if self.proj is not None else x)


@pytest.mark.parametrize(
    ("cin", "cout", "stride"), [(8, 8, 1), (8, 16, 2)], ids=["identity", "projection"]
)
def test_preact_matches_paper(cin, cout, stride) -> None:
    ref = PaperPreActBlock(cin, cout, stride)
    ours = PreActBlock(cin, cout, stride)
    mapping = {
        "bn1": "bn1",
        "conv1": "conv1",
        "bn2": "bn2",
        "conv2": "conv2",
        "proj": "shortcut.conv",
    }
    prefix = "fn." if ref.proj is None else None
    state = {}
    for key, value in ref.state_dict().items():
        head, tail = key.split(".", 1)
        if head == "proj":
            state[f"shortcut.conv.{tail}"] = value
        elif prefix is None and head == "bn1":
            state[f"pre.bn1.{tail}"] = value
        else:
            state[f"fn.{mapping[head]}.{tail}"] = value
    ours.load_state_dict(state)
    x = torch.randn(2, cin, 7, 7)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)
    assert ours.post is None
