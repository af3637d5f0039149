"""1-D and 3-D conv blocks: ``spatial_dims=1 | 3`` against hand-built Conv1d / Conv3d references."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

from residual import (
    Bottleneck,
    PreActBlock,
    ProjectionShortcut,
    ResidualBlock,
    ResidualError,
    ZeroPadShortcut,
)
from residual.shortcuts import resolve_shortcut

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZES = {1: (9,), 2: (7, 6), 3: (3, 5, 4)}  # odd sizes: a stride-2 block gives ceil(size / 2)
ANISO = {1: (3,), 2: (2, 1), 3: (1, 2, 2)}  # a stride per spatial dim (CRNN's (2, 1))


def _input(dims: int, channels: int, batch: int = 2) -> Tensor:
    return torch.randn(batch, channels, *SIZES[dims])


def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Load ``src``'s weights (and running stats) into the hand-built ``dst``: same shapes."""
    dst.load_state_dict(src.state_dict())


def _randomize_stats(block: nn.Module) -> None:
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


class HandBasic(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU, written out with ``nn.Conv{d}d``."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int, down: nn.Module | None):
        super().__init__()
        conv, norm = CONV[dims], NORM[dims]
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class HandBottleneck(nn.Module):
    def __init__(self, dims: int, cin: int, planes: int, stride: int, down: nn.Module | None):
        super().__init__()
        conv, norm = CONV[dims], NORM[dims]
        self.conv1, self.bn1 = conv(cin, planes, 1, bias=False), norm(planes)
        self.conv2, self.bn2 = conv(planes, planes, 3, stride, 1, bias=False), norm(planes)
        self.conv3, self.bn3 = conv(planes, planes * 4, 1, bias=False), norm(planes * 4)
        self.down = down

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class HandPreAct(nn.Module):
    """He et al. 2016: BN-ReLU shared by both paths when the shortcut projects (plain conv1x1)."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        conv, norm = CONV[dims], NORM[dims]
        self.bn1, self.conv1 = norm(cin), conv(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = norm(cout), conv(cout, cout, 3, 1, 1, bias=False)
        self.down = conv(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.down is None else self.down(pre))


def _projection(dims: int, cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(CONV[dims](cin, cout, 1, stride, bias=False), NORM[dims](cout))


def _assert_matches(ours: nn.Module, hand: nn.Module, x: Tensor) -> None:
    for train in (True, False):
        ours.train(train)
        hand.train(train)
        torch.testing.assert_close(ours(x), hand(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize(("cin", "cout", "stride"), [(4, 4, 1), (4, 6, 2), (4, 4, 2)])
def test_residual_block_matches_hand_built(dims: int, cin: int, cout: int, stride: int) -> None:
    ours = ResidualBlock(cin, cout, stride, spatial_dims=dims)
    projects = stride != 1 or cin != cout
    hand = HandBasic(
        dims, cin, cout, stride, _projection(dims, cin, cout, stride) if projects else None
    )
    _randomize_stats(ours)
    for name in ("conv1", "bn1", "conv2", "bn2"):
        _copy(getattr(hand, name), getattr(ours.fn, name))
    if projects:
        _copy(hand.down[0], ours.shortcut.conv)
        _copy(hand.down[1], ours.shortcut.norm)
    x = _input(dims, cin)
    _assert_matches(ours, hand, x)
    expected = (2, cout, *(-(-s // stride) for s in SIZES[dims]))
    assert ours(x).shape == expected


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize(("cin", "planes", "stride"), [(8, 2, 1), (4, 2, 2)])
def test_bottleneck_matches_hand_built(dims: int, cin: int, planes: int, stride: int) -> None:
    ours = Bottleneck(cin, planes, stride, spatial_dims=dims)
    projects = stride != 1 or cin != planes * 4
    down = _projection(dims, cin, planes * 4, stride) if projects else None
    hand = HandBottleneck(dims, cin, planes, stride, down)
    _randomize_stats(ours)
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        _copy(getattr(hand, name), getattr(ours.fn, name))
    if down is not None:
        _copy(down[0], ours.shortcut.conv)
        _copy(down[1], ours.shortcut.norm)
    _assert_matches(ours, hand, _input(dims, cin))


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize(("cin", "cout", "stride"), [(4, 4, 1), (4, 6, 2)])
def test_preact_block_matches_hand_built(dims: int, cin: int, cout: int, stride: int) -> None:
    ours = PreActBlock(cin, cout, stride, spatial_dims=dims)
    hand = HandPreAct(dims, cin, cout, stride)
    _randomize_stats(ours)
    bn1 = ours.fn.bn1 if hand.down is None else ours.pre.bn1
    _copy(hand.bn1, bn1)
    for name in ("conv1", "bn2", "conv2"):
        _copy(getattr(hand, name), getattr(ours.fn, name))
    if hand.down is not None:
        _copy(hand.down, ours.shortcut.conv)
    _assert_matches(ours, hand, _input(dims, cin))


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
@pytest.mark.parametrize("placement", ["end", "both"])
def test_zero_pad_shortcut_blocks(dims: int, placement: str) -> None:
    """Option A in 1-D / 3-D: subsample by the stride (odd sizes: ceil), zero channels."""
    shortcut = ZeroPadShortcut(4, 6, stride=2, placement=placement)  # type: ignore[arg-type]
    block = ResidualBlock(4, 6, 2, shortcut=shortcut, spatial_dims=dims).eval()
    x = _input(dims, 4)
    every = (slice(None), slice(None)) + (slice(None, None, 2),) * dims
    before = 1 if placement == "both" else 0
    pad = (0, 0) * dims + (before, 2 - before)
    expected = torch.relu(nn.functional.pad(x[every], pad) + block.fn(x))
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)
    by_name = ResidualBlock(4, 6, 2, shortcut="zero_pad", spatial_dims=dims)
    assert by_name.shortcut.extra_repr() == ZeroPadShortcut(4, 6, stride=2).extra_repr()


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
def test_every_shortcut_name_builds_the_right_dimensionality(dims: int) -> None:
    x = _input(dims, 4)
    out_shape = (2, 8, *(-(-s // 2) for s in SIZES[dims]))
    for name in ("auto", "projection", "zero_pad", "pooled_projection"):
        block = ResidualBlock(4, 8, 2, shortcut=name, spatial_dims=dims)
        assert block(x).shape == out_shape, name
        convs = [
            m for m in block.shortcut.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        ]
        assert all(isinstance(m, CONV[dims]) for m in convs), name
    auto = resolve_shortcut("auto", in_channels=4, out_channels=8, stride=2, spatial_dims=dims)
    assert isinstance(auto, ProjectionShortcut) and isinstance(auto.conv, CONV[dims])
    assert isinstance(auto.norm, NORM[dims])
    same = ResidualBlock(4, 4, spatial_dims=dims, shortcut="identity").eval()
    torch.testing.assert_close(same(x), torch.relu(x + same.fn(x)), atol=0, rtol=0)


def test_two_d_default_is_unchanged() -> None:
    """The default is 2-D with BatchNorm2d: the keys and layers of the seed's block."""
    block = ResidualBlock(4, 8, 2)
    assert block.spatial_dims == 2
    assert isinstance(block.fn.conv1, nn.Conv2d) and isinstance(block.fn.bn1, nn.BatchNorm2d)
    assert isinstance(block.shortcut.norm, nn.BatchNorm2d)
    assert list(block.state_dict()) == list(
        ResidualBlock(4, 8, 2, spatial_dims=2, norm_layer=nn.BatchNorm2d).state_dict()
    )


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
def test_custom_norm_and_zero_init(dims: int) -> None:
    block = Bottleneck(4, 2, spatial_dims=dims, norm_layer=nn.Identity, zero_init_residual=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())
    block = ResidualBlock(4, 4, spatial_dims=dims, zero_init_residual=True).eval()
    x = _input(dims, 4)
    torch.testing.assert_close(block(x), torch.relu(x), atol=0, rtol=0)
    preact = PreActBlock(4, 4, spatial_dims=dims, zero_init_residual=True)
    torch.testing.assert_close(preact(x), x, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("block", "bad", "match"),
    [
        (
            lambda: ResidualBlock(4, 4, spatial_dims=1),
            (2, 4, 5, 5),
            r"ResidualBlock\(spatial_dims=1\) expects \(N, C, L\) input, got shape "
            r"\(2, 4, 5, 5\); build the block with spatial_dims=2 for \(N, C, H, W\) input$",
        ),
        (
            lambda: Bottleneck(4, 1, spatial_dims=3),
            (2, 4, 5, 5),
            r"Bottleneck\(spatial_dims=3\) expects \(N, C, D, H, W\).*spatial_dims=2 for "
            r"\(N, C, H, W\) input or add the batch dim",
        ),
        (
            lambda: PreActBlock(4, 4, spatial_dims=1),
            (4, 9),
            r"add the batch dim \(x.unsqueeze\(0\)\) for a single sample",
        ),
        (
            lambda: ResidualBlock(4, 4),
            (2, 4, 3, 5, 4),
            r"ResidualBlock\(spatial_dims=2\).*spatial_dims=3 for \(N, C, D, H, W\)",
        ),
        (
            lambda: ResidualBlock(4, 4, spatial_dims=3),
            (4,),
            r"expects \(N, C, D, H, W\) input, got shape \(4,\); reshape the input",
        ),
    ],
    ids=["1d-got-4d", "3d-got-4d", "1d-unbatched", "2d-got-5d", "3d-got-1d"],
)
def test_wrong_input_rank_names_the_fix(block, bad: tuple[int, ...], match: str) -> None:
    with pytest.raises(ResidualError, match=match):
        block()(torch.randn(*bad))


@pytest.mark.parametrize(
    ("bad", "error"), [(0, ResidualError), (4, ResidualError), (True, TypeError), (2.0, TypeError)]
)
def test_bad_spatial_dims(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"spatial_dims must be (an int \()?1, 2 or 3"):
        ResidualBlock(4, 4, spatial_dims=bad)  # type: ignore[arg-type]


def test_a_non_tensor_input_gets_residuals_own_message() -> None:
    with pytest.raises(TypeError, match="the first argument must be the main tensor"):
        ResidualBlock(4, 4, spatial_dims=1)([1.0, 2.0])  # type: ignore[arg-type]


def test_the_fixes_in_the_messages_work() -> None:
    ResidualBlock(4, 4, spatial_dims=2)(torch.randn(2, 4, 5, 5))
    PreActBlock(4, 4, spatial_dims=1)(torch.randn(4, 9).unsqueeze(0))


@pytest.mark.parametrize("dims", [1, 3], ids=["1d", "3d"])
def test_fx_trace(dims: int) -> None:
    block = Bottleneck(4, 2, 2, spatial_dims=dims).eval()
    traced = torch.fx.symbolic_trace(block)
    x = _input(dims, 4)
    torch.testing.assert_close(traced(x), block(x), atol=0, rtol=0)
    with pytest.raises(ResidualError, match="spatial_dims"):
        traced(torch.randn(2, 4, 5, 5) if dims != 2 else torch.randn(2, 4, 5))


@pytest.mark.parametrize(
    ("make", "dims"),
    [
        (lambda: ResidualBlock(4, 6, 2, spatial_dims=1), 1),
        (lambda: PreActBlock(4, 4, spatial_dims=3), 3),
    ],
    ids=["basic-1d", "preact-3d"],
)
def test_compile_fullgraph(make, dims: int) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    block = make().eval()
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    x = _input(dims, 4)
    torch.testing.assert_close(compiled(x), block(x))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("cout", [4, 6])
def test_blocks_take_a_stride_per_spatial_dim(dims: int, cout: int) -> None:
    """stride=(2, 1) as CRNN-style ResNets: ceil(H / 2), W; every block, against hand-built."""
    stride = ANISO[dims]
    x = _input(dims, 4)
    down = _projection(dims, 4, cout, stride)  # type: ignore[arg-type]
    ours = ResidualBlock(4, cout, stride, spatial_dims=dims)
    hand = HandBasic(dims, 4, cout, stride, down)  # type: ignore[arg-type]
    _randomize_stats(ours)
    for name in ("conv1", "bn1", "conv2", "bn2"):
        _copy(getattr(hand, name), getattr(ours.fn, name))
    _copy(down[0], ours.shortcut.conv)
    _copy(down[1], ours.shortcut.norm)
    _assert_matches(ours, hand, x)
    expected = (2, cout, *(-(-h // s) for h, s in zip(SIZES[dims], stride, strict=True)))
    assert ours(x).shape == expected
    for name in ("auto", "projection", "zero_pad", "pooled_projection"):
        for block in (
            ResidualBlock(4, cout, stride, shortcut=name, spatial_dims=dims),
            Bottleneck(4, cout, stride, shortcut=name, spatial_dims=dims, expansion=1),
            PreActBlock(4, cout, stride, shortcut=name, spatial_dims=dims),
        ):
            assert block(x).shape == expected, (type(block).__name__, name)


def test_a_bottleneck_with_a_stride_per_dim_matches_hand_built() -> None:
    x = _input(3, 4)
    down = _projection(3, 4, 8, (1, 2, 2))  # type: ignore[arg-type]
    ours = Bottleneck(4, 2, (1, 2, 2), spatial_dims=3)
    hand = HandBottleneck(3, 4, 2, (1, 2, 2), down)  # type: ignore[arg-type]
    _randomize_stats(ours)
    for name in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"):
        _copy(getattr(hand, name), getattr(ours.fn, name))
    _copy(down[0], ours.shortcut.conv)
    _copy(down[1], ours.shortcut.norm)
    _assert_matches(ours, hand, x)


def test_a_block_stride_of_the_wrong_length_names_spatial_dims() -> None:
    with pytest.raises(
        ResidualError,
        match=r"^ResidualBlock: stride \(2, 1\) gives one step per spatial dim \(2\) but "
        r"spatial_dims=3; give 3 steps or build it with spatial_dims=2$",
    ):
        ResidualBlock(4, 4, (2, 1), spatial_dims=3)
    assert ResidualBlock(4, 4, (2, 1), spatial_dims=2)(torch.randn(1, 4, 5, 5)).shape == (
        1, 4, 3, 5,
    )  # fmt: skip
