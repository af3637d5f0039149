"""CIFAR and ImageNet ResNets: exact parameter counts, torchvision parity, strict interop."""

from __future__ import annotations

import io

import pytest
import torch
from reference import BasicBlock, Bottleneck, TorchvisionResNet
from torch import nn

from residual import Residual, ResidualError, ZeroPadShortcut
from residual.models import (
    ResNet,
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


def _randomise_norms(model: nn.Module) -> None:
    with torch.no_grad():  # non-trivial norms and statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


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
    _randomise_norms(ref)
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


# --- torchvision's builder arguments and timm's conveniences ----------------------------------


@pytest.mark.parametrize(
    "dilate",
    [(False, False, True), (False, True, True), (True, True, True)],
    ids=["os16", "os8", "os4"],
)
def test_dilation_equals_torchvision_make_layer(dilate: tuple[bool, bool, bool]) -> None:
    ref = TorchvisionResNet(
        Bottleneck, [1, 2, 2, 2], num_classes=10, replace_stride_with_dilation=dilate
    )
    _randomise_norms(ref)
    ours = ResNet(
        "bottleneck", [1, 2, 2, 2], num_classes=10, replace_stride_with_dilation=list(dilate)
    )
    load_torchvision(ours, ref.state_dict())
    for name in ("layer2", "layer3", "layer4"):
        for theirs, mine in zip(ref.get_submodule(name), ours.get_submodule(name), strict=True):
            assert mine.fn.conv2.dilation == theirs.conv2.dilation
            assert mine.fn.conv2.stride == theirs.conv2.stride
    assert ours.layer4[1].fn.conv2.dilation == (2 ** sum(dilate),) * 2
    assert ours.layer4[0].fn.conv2.dilation == (2 ** sum(dilate[:2]),) * 2  # previous dilation
    x = torch.randn(2, 3, 64, 64)
    ref.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    size = 64 // 32 * 2 ** sum(dilate)
    assert ours.forward_features(x).shape == (2, 2048, size, size)
    assert [f["reduction"] for f in ours.feature_info][-1] == 32 // 2 ** sum(dilate)


def test_dilated_resnet_traces_with_fx() -> None:
    net = ResNet(
        "bottleneck", [1, 1, 2, 2], replace_stride_with_dilation=[False, True, True]
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(net)(x), net(x), atol=0, rtol=0)


def test_basic_block_arguments_are_checked_as_torchvision() -> None:
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1 and base_width=64"):
        resnet18(groups=2)
    with pytest.raises(ResidualError, match=r"width_per_group=128; use a bottleneck net"):
        resnet18(width_per_group=128)
    with pytest.raises(NotImplementedError, match=r"Dilation > 1 not supported in BasicBlock"):
        resnet34(replace_stride_with_dilation=[False, False, True])
    # As torchvision: a stage's first block keeps the previous dilation, so a one-block
    # basic stage can be "dilated" (its output size stays); a second block cannot.
    net = ResNet("basic", [1, 1, 1, 1], replace_stride_with_dilation=[False, False, True])
    assert net.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ([True, False], ResidualError, r"None or a 3-element tuple, got \[True, False\]"),
        ("TTT", ResidualError, "3-element tuple"),
        ([0, 1, 1], TypeError, "must hold bools"),
    ],
    ids=["two", "string", "ints"],
)
def test_replace_stride_with_dilation_is_checked(value, error, match) -> None:
    with pytest.raises(error, match=match):
        resnet50(replace_stride_with_dilation=value)


def test_norm_layer_none_is_batchnorm_and_a_callable_is_called_with_channels() -> None:
    torch.manual_seed(0)
    default = resnet18()
    torch.manual_seed(0)
    none = resnet18(norm_layer=None)
    assert [type(m) for m in none.modules()] == [type(m) for m in default.modules()]
    torch.testing.assert_close(none.state_dict(), default.state_dict(), atol=0, rtol=0)
    widths: list[int] = []

    def group_norm(num_features: int) -> nn.Module:
        widths.append(num_features)
        return nn.GroupNorm(32, num_features)

    net = resnet50(norm_layer=group_norm, zero_init_residual=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(widths) == 53 and set(widths) == {64, 128, 256, 512, 1024, 2048}
    assert torch.all(net.layer1[0].fn.bn3.weight == 0)


def test_in_channels_for_non_rgb_images() -> None:
    net = resnet18(in_channels=1, num_classes=4)
    assert net.conv1.weight.shape == (64, 1, 7, 7)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ResidualError, match=r"\(N, 1, H, W\), got \(2, 3, 32, 32\)"):
        net(torch.randn(2, 3, 32, 32))
    with pytest.raises(ResidualError, match="in_channels must be a positive int, got 0"):
        resnet18(in_channels=0)


def test_weights_none_is_accepted_and_others_point_to_load_torchvision() -> None:
    assert resnet18(weights=None, progress=False).fc.out_features == 1000
    with pytest.raises(ResidualError, match=r"weights='IMAGENET1K_V1'.*load_torchvision"):
        resnet18(weights="IMAGENET1K_V1")  # type: ignore[arg-type]


def test_forward_features_then_head_is_forward() -> None:
    net = resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    features = net.forward_features(x)
    assert features.shape == (2, 512, 2, 2)
    torch.testing.assert_close(net.forward_head(features), net(x), atol=0, rtol=0)
    pooled = net.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features.mean((2, 3)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(net.fc(pooled), net(x), atol=0, rtol=0)
    assert net.get_classifier() is net.fc
    assert net.num_features == net.inplanes == 512  # timm's and torchvision's names


def test_reset_classifier_and_headless_nets() -> None:
    net = resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    pooled = net.forward_head(net.forward_features(x), pre_logits=True)
    net.reset_classifier(0)
    assert isinstance(net.fc, nn.Identity) and net.num_classes == 0
    assert not any(k.startswith("fc.") for k in net.state_dict())
    torch.testing.assert_close(net(x), pooled, atol=0, rtol=0)
    net.reset_classifier(7)
    assert net(x).shape == (2, 7) and net.get_classifier().in_features == 512
    headless = resnet50(num_classes=0)
    assert isinstance(headless.fc, nn.Identity)
    assert headless(x).shape == (2, 2048)
    with pytest.raises(ResidualError, match="num_classes must be >= 0, got -1"):
        net.reset_classifier(-1)
    with pytest.raises(TypeError, match="num_classes must be an int, got float"):
        resnet18(num_classes=10.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "channels", "reductions"),
    [
        (lambda: resnet18(), [64, 64, 128, 256, 512], [2, 4, 8, 16, 32]),
        (
            lambda: ResNet(
                "bottleneck", [1, 1, 1, 1], replace_stride_with_dilation=[False, True, True]
            ),
            [64, 256, 512, 1024, 2048],
            [2, 4, 8, 8, 8],
        ),
    ],
    ids=["resnet18", "bottleneck-os8"],
)
def test_forward_intermediates_match_feature_info_and_hooks(build, channels, reductions) -> None:
    net = build().eval()
    assert [f["num_chs"] for f in net.feature_info] == channels
    assert [f["reduction"] for f in net.feature_info] == reductions
    seen: dict[str, torch.Tensor] = {}
    for info in net.feature_info:
        net.get_submodule(info["module"]).register_forward_hook(
            lambda _m, _i, out, name=info["module"]: seen.__setitem__(name, out.clone())
        )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = net.forward_intermediates(x)
        logits = net(x)
    assert len(feats) == 5
    for info, feat in zip(net.feature_info, feats, strict=True):
        assert feat.shape == (2, info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
        torch.testing.assert_close(feat, seen[info["module"]], atol=0, rtol=0)
    torch.testing.assert_close(net.forward_head(final), logits, atol=0, rtol=0)
    with torch.no_grad():
        last_two = net.forward_intermediates(x, 2, intermediates_only=True)
        picked = net.forward_intermediates(x, [-1, 1], intermediates_only=True)
        early, stopped = net.forward_intermediates(x, [2], stop_early=True)
    assert [f.shape[1] for f in last_two] == channels[3:]
    assert [f.shape[1] for f in picked] == [channels[1], channels[4]]
    torch.testing.assert_close(early, stopped[0], atol=0, rtol=0)
    assert early.shape[1] == channels[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"indices": 6}, r"indices=6 must be in 1\.\.5"),
        ({"indices": [0, 5]}, r"must be in -5\.\.4 .*got \[0, 5\]"),
        ({"output_fmt": "NHWC"}, "output_fmt must be 'NCHW'"),
    ],
    ids=["too-many", "out-of-range", "nhwc"],
)
def test_forward_intermediates_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ResidualError, match=match):
        resnet18().forward_intermediates(torch.randn(1, 3, 32, 32), **kwargs)
