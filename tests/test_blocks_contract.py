"""The conv blocks' contract, exactly: every message, every default, and each block's output by
value against the functional ops (torch.nn.functional), in 1-D, 2-D and 3-D."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import ResidualError
from residual.blocks import Bottleneck, PreActBlock, ResidualBlock
from residual.shortcuts import IdentityShortcut, ProjectionShortcut, ZeroPadShortcut

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
BLOCKS = (ResidualBlock, Bottleneck, PreActBlock)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def randomize(module: nn.Module) -> nn.Module:
    """Non-initial values everywhere (norm weights, biases and statistics too), in eval."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn_like(m.running_mean))
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return module.eval().double()


def bn(x: Tensor, norm: nn.Module) -> Tensor:
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=1e-5)


def conv(x: Tensor, layer: nn.Module, stride: int = 1, pad: int = 1, dil: int = 1, groups: int = 1) -> Tensor:  # fmt: skip
    return CONV[x.dim() - 2](x, layer.weight, None, stride, pad, dil, groups)


# --- input rank ---------------------------------------------------------------------------

RANK_CASES = [
    (ResidualBlock, 2, (2, 4, 8), "build the block with spatial_dims=1 for (N, C, L) input or add "
     "the batch dim (x.unsqueeze(0)) for a single sample"),
    (Bottleneck, 1, (2, 4, 8, 8), "build the block with spatial_dims=2 for (N, C, H, W) input"),
    (PreActBlock, 3, (2, 4, 8, 8), "build the block with spatial_dims=2 for (N, C, H, W) input or "
     "add the batch dim (x.unsqueeze(0)) for a single sample"),
    (ResidualBlock, 2, (1, 1, 2, 4, 8, 8), "reshape the input"),
    (PreActBlock, 1, (2, 4), "add the batch dim (x.unsqueeze(0)) for a single sample"),
    (Bottleneck, 3, (4, 5, 6, 7), "build the block with spatial_dims=2 for (N, C, H, W) input or "
     "add the batch dim (x.unsqueeze(0)) for a single sample"),
]  # fmt: skip
SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


@pytest.mark.parametrize(("cls", "dims", "shape", "fix"), RANK_CASES)
def test_a_wrong_rank_names_the_block_its_shape_and_the_fix(
    cls: type, dims: int, shape: tuple[int, ...], fix: str
) -> None:
    block = cls(4, 4, spatial_dims=dims)
    message = (
        f"{cls.__name__}(spatial_dims={dims}) expects {SHAPES[dims]} input, got shape {shape}; "
        f"{fix}"
    )
    with pytest.raises(ResidualError, match=exactly(message)):
        block(torch.randn(shape))


@pytest.mark.parametrize("cls", BLOCKS)
def test_a_non_tensor_input_gets_the_combinators_message(cls: type) -> None:
    message = (
        "Residual: the first argument must be the main tensor, got list; call "
        "block(x, *args, **kwargs)"
    )
    with pytest.raises(TypeError, match=exactly(message)):
        cls(4, 4)([1.0])


# --- construction errors -------------------------------------------------------------------


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 4), {}, "in_channels must be a positive int, got 0"),
        ((4, -1), {}, "out_channels must be a positive int, got -1"),
        ((4, 4, 0), {}, "stride must be a positive int, got 0"),
        ((4, 4), {"spatial_dims": 4}, "spatial_dims must be 1, 2 or 3, got 4"),
        ((4, 4), {"spatial_dims": 0}, "spatial_dims must be 1, 2 or 3, got 0"),
    ],
)
def test_bad_sizes_are_refused_under_the_blocks_name(
    cls: type, args: tuple[int, ...], kwargs: dict, message: str
) -> None:
    if cls is Bottleneck:  # its second argument is the inner width
        message = message.replace("out_channels", "planes")
    with pytest.raises(ResidualError, match=exactly(f"{cls.__name__}: {message}")):
        cls(*args, **kwargs)


@pytest.mark.parametrize("name", ["groups", "base_width", "expansion", "dilation"])
def test_the_bottlenecks_own_sizes_are_checked(name: str) -> None:
    with pytest.raises(
        ResidualError, match=exactly(f"Bottleneck: {name} must be a positive int, got 0")
    ):
        Bottleneck(4, 4, **{name: 0})


@pytest.mark.parametrize("cls", [ResidualBlock, Bottleneck])
@pytest.mark.parametrize(
    ("norm", "name"),
    [(functools.partial(nn.BatchNorm2d, affine=False), "BatchNorm2d"), (lambda c: nn.Identity(), "Identity")],
)  # fmt: skip
def test_zero_init_needs_a_norm_with_a_weight(cls: type, norm: Callable, name: str) -> None:
    message = f"zero_init_residual=True needs a norm layer with a learnable weight, got {name}"
    with pytest.raises(ResidualError, match=exactly(message)):
        cls(4, 4, norm_layer=norm, zero_init_residual=True)
    cls(4, 4, norm_layer=norm)  # without zero init the same norm is fine


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "stride"), [(4, 4, 1), (4, 6, 2)])
def test_residual_block_is_its_formula(dims: int, cin: int, cout: int, stride: int) -> None:
    block = randomize(ResidualBlock(cin, cout, stride, spatial_dims=dims))
    x = torch.randn(2, cin, *[5] * dims, dtype=torch.float64)
    f = block.fn
    h = F.relu(bn(conv(x, f.conv1, stride), f.bn1))
    h = bn(conv(h, f.conv2), f.bn2)
    if stride == 1 and cin == cout:
        assert isinstance(block.shortcut, IdentityShortcut)
        s = x
    else:
        s = bn(conv(x, block.shortcut.conv, stride, 0), block.shortcut.norm)
    torch.testing.assert_close(block(x), F.relu(h + s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2])
def test_bottleneck_is_its_formula_with_groups_width_and_dilation(dims: int) -> None:
    block = Bottleneck(6, 8, 2, groups=2, base_width=96, expansion=2, dilation=2, spatial_dims=dims)
    width = int(8 * 96 / 64) * 2
    f = block.fn
    assert (f.conv1.out_channels, f.conv2.groups, f.conv3.out_channels) == (width, 2, 16)
    block = randomize(block)
    x = torch.randn(2, 6, *[7] * dims, dtype=torch.float64)
    h = F.relu(bn(conv(x, f.conv1, pad=0), f.bn1))
    h = F.relu(bn(conv(h, f.conv2, 2, pad=2, dil=2, groups=2), f.bn2))
    h = bn(conv(h, f.conv3, pad=0), f.bn3)
    s = bn(conv(x, block.shortcut.conv, 2, 0), block.shortcut.norm)
    torch.testing.assert_close(block(x), F.relu(h + s), rtol=1e-12, atol=1e-12)


def test_bottleneck_defaults_are_torchvisions() -> None:
    block = Bottleneck(64, 16)
    f = block.fn
    assert (f.conv1.out_channels, f.conv3.out_channels) == (16, 64)  # width 16, expansion 4
    assert (f.conv2.stride, f.conv2.groups, f.conv2.dilation, f.conv2.padding) == (
        (1, 1), 1, (1, 1), (1, 1)
    )  # fmt: skip
    assert isinstance(block.shortcut, IdentityShortcut)
    assert all(c.bias is None for c in (f.conv1, f.conv2, f.conv3))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize(("cin", "cout", "stride"), [(4, 4, 1), (4, 6, 2)])
def test_preact_block_is_its_formula(dims: int, cin: int, cout: int, stride: int) -> None:
    block = randomize(PreActBlock(cin, cout, stride, spatial_dims=dims))
    x = torch.randn(2, cin, *[5] * dims, dtype=torch.float64)
    same = stride == 1 and cin == cout
    parts = block.fn if same else block.pre
    a = F.relu(bn(x, parts.bn1))  # the pre-activation
    f = block.fn
    h = conv(F.relu(bn(conv(a, f.conv1, stride), f.bn2)), f.conv2)
    if same:
        assert block.pre is None and isinstance(block.shortcut, IdentityShortcut)
        s = x  # the raw input
    else:  # the projection sees the pre-activated input and has no norm
        assert isinstance(block.shortcut.norm, nn.Identity)
        s = conv(a, block.shortcut.conv, stride, 0)
    torch.testing.assert_close(block(x), h + s, rtol=1e-12, atol=1e-12)


SIZES = {ResidualBlock: (4, 4), Bottleneck: (16, 4), PreActBlock: (4, 4)}
LAST = {ResidualBlock: "bn2", Bottleneck: "bn3", PreActBlock: "conv2"}


@pytest.mark.parametrize("cls", BLOCKS)
def test_a_zeroed_last_layer_makes_the_block_its_shortcut(cls: type) -> None:
    """With the last layer's output zero, the block is relu(x) (post-activation) or x."""
    block = randomize(cls(*SIZES[cls]))
    with torch.no_grad():
        for p in getattr(block.fn, LAST[cls]).parameters():
            p.zero_()
    x = torch.randn(2, SIZES[cls][0], 5, 5, dtype=torch.float64)
    expected = x if cls is PreActBlock else F.relu(x)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cls", BLOCKS)
def test_zero_init_zeroes_exactly_the_last_layer(cls: type) -> None:
    torch.manual_seed(0)
    block = cls(*SIZES[cls], zero_init_residual=True)
    plain = cls(*SIZES[cls])
    last = LAST[cls]
    assert torch.count_nonzero(getattr(block.fn, last).weight) == 0
    assert torch.count_nonzero(getattr(plain.fn, last).weight) > 0
    others = [
        n for n, p in block.fn.named_parameters() if n.endswith("weight") and not n.startswith(last)
    ]
    assert others and all(torch.count_nonzero(block.fn.get_parameter(n)) > 0 for n in others)


@pytest.mark.parametrize("cls", BLOCKS)
def test_defaults_keep_the_size_use_inplace_relu_and_forward_the_residual_options(
    cls: type,
) -> None:
    block = cls(4, 4)
    relus = [m for m in block.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(r.inplace for r in relus)
    assert block.spatial_dims == 2 and block.fn.conv1.stride in ((1, 1),)
    assert (block.drop_path, block.checkpoint) == (0.0, False)
    opts = cls(4, 4, drop_path=0.2, drop_mode="batch", checkpoint=True)
    assert (opts.drop_path, opts.drop_mode, opts.checkpoint) == (0.2, "batch", True)


@pytest.mark.parametrize("cls", BLOCKS)
def test_an_activation_without_inplace_is_built_plainly(cls: type) -> None:
    block = cls(4, 4, act_layer=nn.GELU)
    gelus = [m for m in block.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == {ResidualBlock: 2, Bottleneck: 3, PreActBlock: 2}[cls]


@pytest.mark.parametrize("cls", [ResidualBlock, Bottleneck])
def test_the_default_projection_has_the_blocks_norm(cls: type) -> None:
    norm = functools.partial(nn.GroupNorm, 2)
    block = cls(4, 8, 2, norm_layer=norm) if cls is ResidualBlock else cls(4, 4, 2, norm_layer=norm)
    assert isinstance(block.shortcut, ProjectionShortcut)
    assert isinstance(block.shortcut.norm, nn.GroupNorm)
    assert block.shortcut.stride == 2


def test_a_named_shortcut_reaches_every_block() -> None:
    for cls in BLOCKS:
        block = cls(4, 8, 2, shortcut="zero_pad") if cls is not Bottleneck else cls(4, 2, 2, shortcut="zero_pad")  # fmt: skip
        assert isinstance(block.shortcut, ZeroPadShortcut) and block.shortcut.stride == 2


@pytest.mark.parametrize("cls", BLOCKS)
def test_a_given_identity_module_is_the_shortcut_itself(cls: type) -> None:
    mine = nn.Identity()
    block = cls(16, 4, shortcut=mine) if cls is Bottleneck else cls(4, 4, shortcut=mine)
    assert block.shortcut is mine


@pytest.mark.parametrize("cls", BLOCKS)
def test_projection_blocks_forward_the_residual_options_too(cls: type) -> None:
    block = cls(4, 8, 2, drop_path=0.2, drop_mode="batch", checkpoint=True)
    assert isinstance(block.shortcut, ProjectionShortcut)
    assert (block.drop_path, block.drop_mode, block.checkpoint) == (0.2, "batch", True)


@pytest.mark.parametrize("cls", BLOCKS)
@pytest.mark.parametrize("cout", [4, 8])
def test_a_norm_factory_builds_every_norm(cls: type, cout: int) -> None:
    block = cls(4, cout, norm_layer=functools.partial(nn.GroupNorm, 2))
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert not norms  # no BatchNorm anywhere, also not in a projection
    assert sum(isinstance(m, nn.GroupNorm) for m in block.modules()) >= 2


class UnreadableFactory:
    """An activation factory whose signature inspect cannot read: built without arguments."""

    __signature__ = "unreadable"  # inspect.signature raises TypeError on it

    def __call__(self, **kwargs: bool) -> nn.Module:
        return nn.ReLU(**kwargs)


def test_a_factory_with_an_unreadable_signature_is_called_without_arguments() -> None:
    block = ResidualBlock(4, 4, act_layer=UnreadableFactory())  # type: ignore[arg-type]
    relus = [m for m in block.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 2 and not any(r.inplace for r in relus)
