"""CIFAR and ImageNet ResNets: exact parameter counts, torchvision parity, strict interop."""

from __future__ import annotations

import io

import pytest
import torch
from reference import BasicBlock, Bottleneck, TorchvisionResNet
from torch import nn

from residual import Residual, ResidualError, ZeroPadShortcut
from residual.models import (
    cifar_resnet,
    load_torchvision,
    resnet18,
    resnet34,
    resnet50,
    resnext50_32x4d,
    to_torchvision_state_dict,
)

CIFAR_COUNTS = {
    20: 269_722,
    32: 464_154,
    44: 658_586,
    56: 853_018,
    110: 1_727_962,
    1202: 19_421_274,
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "count"), CIFAR_COUNTS.items(), ids=str)
def test_cifar_parameter_counts(depth: int, count: int) -> None:
    assert _count(cifar_resnet(depth)) == count
    assert _count(cifar_resnet(depth, shortcut="projection")) == count + 2_752


def test_cifar_is_made_of_residuals() -> None:
    net = cifar_resnet(20)
    blocks = [m for m in net.modules() if isinstance(m, Residual)]
    assert len(blocks) == 9
    assert isinstance(net.layer2[0].shortcut, ZeroPadShortcut)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_preact_and_options() -> None:
    net = cifar_resnet(20, preact=True, num_classes=7, in_channels=1)
    assert all(isinstance(m, Residual) for m in net.layer1)
    assert net.layer1[0].post is None  # no ReLU after the add
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    first = net.layer1[0].fn
    assert isinstance(first.bn1, nn.BatchNorm2d) and first[0] is first.bn1  # BN before conv
    assert isinstance(net.layer2[0].pre, nn.Sequential)  # downsampling: shared pre-activation
    assert isinstance(net.bn_final, nn.BatchNorm2d) and isinstance(net.bn1, nn.Identity)
    net = cifar_resnet(20, drop_path=0.2)
    rates = [m.drop_path for m in net.modules() if isinstance(m, Residual)]
    assert rates == pytest.approx([0.2 * (i + 1) / 9 for i in range(9)])


def test_cifar_zero_init_residual_starts_as_shortcut() -> None:
    net = cifar_resnet(20, zero_init_residual=True).eval()
    block = net.layer1[0]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("depth", "says"),
    [
        (
            19,
            r"6n \+ 2 \(20, 32, 44, 56, 110, 1202, \.\.\.\), got 19; the nearest valid depth is 20",
        ),
        (21, r"6n \+ 2 .*, got 21; the nearest valid depth is 20"),
        (2, r"6n \+ 2 .*, got 2; the nearest valid depth is 8"),
        (0, r"a positive int, got 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, int) else "",
)
def test_cifar_bad_depth(depth: int, says: str) -> None:
    with pytest.raises(ResidualError, match=rf"^cifar_resnet: depth must be {says}$"):
        cifar_resnet(depth)


@pytest.mark.parametrize(
    ("build", "block", "layers", "extra"),
    [
        (resnet18, BasicBlock, [2, 2, 2, 2], {}),
        (resnet34, BasicBlock, [3, 4, 6, 3], {}),
        (resnet50, Bottleneck, [3, 4, 6, 3], {}),
        (resnext50_32x4d, Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    ],
    ids=["resnet18", "resnet34", "resnet50", "resnext50_32x4d"],
)
def test_torchvision_parity(build, block, layers, extra) -> None:
    ref = TorchvisionResNet(block, layers, num_classes=10, **extra)
    with torch.no_grad():  # non-trivial norms and statistics
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    ours = build(num_classes=10)
    assert _count(ours) == _count(ref)
    load_torchvision(ours, ref.state_dict())
    assert to_torchvision_state_dict(ours).keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        ref.train(train)
        ours.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)


def test_load_torchvision_from_file_and_strictness(tmp_path) -> None:
    ref = TorchvisionResNet(BasicBlock, [2, 2, 2, 2])
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    ours = resnet18()
    load_torchvision(ours, path)
    state = ref.state_dict()
    del state["layer3.0.downsample.1.running_var"]
    with pytest.raises(ResidualError, match=r"missing keys: layer3\.0\.downsample\.1\.running_var"):
        load_torchvision(resnet18(), state)
    state = ref.state_dict()
    state["layer1.0.conv9.weight"] = torch.zeros(1)
    with pytest.raises(ResidualError, match=r"unexpected keys: layer1\.0\.conv9\.weight"):
        load_torchvision(resnet18(), state)
    with pytest.raises(
        ResidualError, match=r"shape mismatches: .*theirs .* ours .*same architecture"
    ):
        load_torchvision(resnet18(), TorchvisionResNet(Bottleneck, [3, 4, 6, 3]).state_dict())
    with pytest.raises(ResidualError, match="avg_down"):
        load_torchvision(resnet18(avg_down=True), ref.state_dict())


def test_resnet_options() -> None:
    net = resnet18(num_classes=5, zero_init_residual=True, drop_path=0.1)
    assert torch.all(net.layer1[0].fn.bn2.weight == 0)
    blocks = [m for m in net.modules() if isinstance(m, Residual)]
    assert blocks[-1].drop_path == pytest.approx(0.1)
    net = resnet50(avg_down=True)
    assert type(net.layer2[0].shortcut).__name__ == "PooledProjectionShortcut"
    net = resnet18(norm_layer=lambda c: nn.GroupNorm(8, c))
    assert isinstance(net.bn1, nn.GroupNorm) and isinstance(net.layer1[0].fn.bn1, nn.GroupNorm)
    with pytest.raises(TypeError, match="unexpected keyword argument 'zero_init_residul'"):
        resnet18(zero_init_residul=True)


def test_whole_model_pickles() -> None:
    net = cifar_resnet(20).eval()
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), net(x), atol=0, rtol=0)


def test_wrong_input_rank_or_channels() -> None:
    with pytest.raises(
        ResidualError,
        match=r"expected images of shape \(N, 3, H, W\), got \(3, 64, 64\); add a batch",
    ):
        resnet18()(torch.randn(3, 64, 64))
    with pytest.raises(ResidualError, match=r"\(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        cifar_resnet(20)(torch.randn(2, 1, 32, 32))


def test_cifar_resnet_equals_a_hand_written_one() -> None:
    from reference import HandCifarResNet, hand_cifar_to_ours

    ref = HandCifarResNet(20)
    ours = cifar_resnet(20)
    ours.load_state_dict(hand_cifar_to_ours(ref.state_dict()))
    x = torch.randn(4, 3, 32, 32)
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_load_torchvision_accepts_files_without_num_batches_tracked() -> None:
    """torchvision's older ImageNet weight files have no BN counters; torch's strict load takes
    them, and so do we (the counters keep their values)."""
    source, target = resnet18(), resnet18()
    theirs = {k: v for k, v in to_torchvision_state_dict(source).items() if "num_batches" not in k}
    load_torchvision(target, theirs)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_load_torchvision_strips_a_ddp_prefix() -> None:
    source, target = resnet18(), resnet18()
    theirs = {f"module.{k}": v for k, v in to_torchvision_state_dict(source).items()}
    with pytest.warns(UserWarning, match="prefix was stripped"):
        load_torchvision(target, theirs)
    assert torch.equal(target.fc.weight, source.fc.weight)


def test_load_torchvision_names_a_malformed_value() -> None:
    theirs = to_torchvision_state_dict(resnet18())
    theirs["fc.bias"] = [0.0] * 1000  # type: ignore[assignment]
    with pytest.raises(ResidualError, match="'fc.bias' is a list, not a tensor"):
        load_torchvision(resnet18(), theirs)
