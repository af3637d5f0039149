"""The shortcut strategies' contract (``residual/shortcuts.py``), message by message and value by
value: every argument check with its exact message (class and argument named), every default,
both layouts and every rank, compared with torch.nn.functional written out by hand."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import Residual
from residual.errors import ResidualError
from residual.shortcuts import (
    DEFAULT_NORM,
    SHORTCUTS,
    IdentityShortcut,
    LowRankShortcut,
    NoShortcut,
    PooledProjectionShortcut,
    ProjectionShortcut,
    ZeroPadShortcut,
    is_identity,
    resolve_shortcut,
    shortcut_for,
)

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
ODD = {1: (7,), 2: (7, 5), 3: (5, 3, 7)}  # odd sizes: a stride of 2 keeps ceil(H / 2)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def seeded(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def randomize(module: nn.Module) -> nn.Module:
    """Move every parameter and BatchNorm statistic off its initial value; eval mode."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module.eval()


def batch_norm(y: Tensor, bn: nn.Module) -> Tensor:
    """Eval-mode BatchNorm over dim 1, by hand."""
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    assert bn.running_mean is not None and bn.running_var is not None
    view = (1, -1) + (1,) * (y.dim() - 2)
    mean, var = bn.running_mean.view(view), bn.running_var.view(view)
    return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(view) + bn.bias.view(view)


class Opaque(nn.Module):
    """A custom forward: its channels and stride cannot be read."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# --- 1. the argument checks: class, argument and value named ------------------------------------

CHANNEL_SHORTCUTS: dict[str, Callable[..., nn.Module]] = {
    "ProjectionShortcut": ProjectionShortcut,
    "ZeroPadShortcut": ZeroPadShortcut,
    "PooledProjectionShortcut": PooledProjectionShortcut,
}
SIZES = {"in_channels": 4, "out_channels": 8, "stride": 1}


@pytest.mark.parametrize("cls", CHANNEL_SHORTCUTS)
@pytest.mark.parametrize("argument", SIZES)
def test_a_size_that_is_not_an_int_names_the_class_and_the_argument(
    cls: str, argument: str
) -> None:
    with pytest.raises(
        TypeError, match=exactly(f"{cls}: {argument} must be an int, got float 2.0")
    ):
        CHANNEL_SHORTCUTS[cls](**{**SIZES, argument: 2.0})


@pytest.mark.parametrize("cls", CHANNEL_SHORTCUTS)
@pytest.mark.parametrize("argument", SIZES)
def test_a_size_below_one_names_the_class_and_the_argument(cls: str, argument: str) -> None:
    with pytest.raises(
        ResidualError, match=exactly(f"{cls}: {argument} must be a positive int, got 0")
    ):
        CHANNEL_SHORTCUTS[cls](**{**SIZES, argument: 0})


@pytest.mark.parametrize("cls", ["ProjectionShortcut", "ZeroPadShortcut"])
def test_an_unknown_layout_names_the_class(cls: str) -> None:
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}: unknown layout 'nhwc'; use 'channels_first' (N, C, *spatial: conv) or "
        "'channels_last' (..., C: MLP, RNN, Transformer)"
    )):  # fmt: skip
        CHANNEL_SHORTCUTS[cls](4, 8, layout="nhwc")


@pytest.mark.parametrize("cls", ["ProjectionShortcut", "PooledProjectionShortcut"])
@pytest.mark.parametrize(("value", "shown"), [(True, "bool True"), ("2", "str '2'")])
def test_spatial_dims_that_is_not_an_int_is_a_type_error(
    cls: str, value: object, shown: str
) -> None:
    with pytest.raises(
        TypeError, match=exactly(f"{cls}: spatial_dims must be an int (1, 2 or 3), got {shown}")
    ):
        CHANNEL_SHORTCUTS[cls](4, 8, spatial_dims=value)


@pytest.mark.parametrize("cls", ["ProjectionShortcut", "PooledProjectionShortcut"])
@pytest.mark.parametrize("value", [0, 4])
def test_spatial_dims_outside_one_to_three_is_refused(cls: str, value: int) -> None:
    with pytest.raises(
        ResidualError, match=exactly(f"{cls}: spatial_dims must be 1, 2 or 3, got {value}")
    ):
        CHANNEL_SHORTCUTS[cls](4, 8, spatial_dims=value)


def test_zero_padding_cannot_shrink_and_points_to_the_projection() -> None:
    with pytest.raises(ResidualError, match=exactly(
        "ZeroPadShortcut: cannot shrink 8 channels to 4 by zero-padding; "
        'use shortcut="projection" to reduce channels'
    )):  # fmt: skip
        ZeroPadShortcut(8, 4)


def test_an_unknown_placement_names_both_placements() -> None:
    with pytest.raises(ResidualError, match=exactly(
        "ZeroPadShortcut: placement must be 'end' or 'both', got 'start'"
    )):  # fmt: skip
        ZeroPadShortcut(4, 8, placement="start")  # type: ignore[arg-type]


@pytest.mark.parametrize("argument", ["dim", "rank"])
def test_low_rank_sizes_are_checked_by_name(argument: str) -> None:
    sizes = {"dim": 8, "rank": 2}
    with pytest.raises(
        TypeError, match=exactly(f"LowRankShortcut: {argument} must be an int, got float 2.0")
    ):
        LowRankShortcut(**{**sizes, argument: 2.0})  # type: ignore[arg-type]
    with pytest.raises(
        ResidualError, match=exactly(f"LowRankShortcut: {argument} must be a positive int, got 0")
    ):
        LowRankShortcut(**{**sizes, argument: 0})


def test_a_rank_above_the_dim_is_refused_and_the_full_rank_is_allowed() -> None:
    with pytest.raises(ResidualError, match=exactly(
        "LowRankShortcut: rank=5 is larger than dim=4; use rank <= 4"
    )):  # fmt: skip
        LowRankShortcut(4, 5)
    assert LowRankShortcut(4, 4).up.shape == (4, 4)


# --- 2. the input's channels, checked at the layout's channel dim --------------------------------

WRONG_CHANNELS: list[tuple[Callable[[], nn.Module], tuple[int, ...], str]] = [
    (lambda: ProjectionShortcut(4, 8), (2, 3, 5, 5), "ProjectionShortcut"),
    (lambda: ZeroPadShortcut(4, 8, stride=2), (2, 3, 5), "ZeroPadShortcut"),
    (lambda: PooledProjectionShortcut(4, 8, stride=2), (2, 3, 5, 4), "PooledProjectionShortcut"),
]


@pytest.mark.parametrize(("make", "shape", "cls"), WRONG_CHANNELS)
def test_wrong_channels_first_names_the_class_dim_1_and_the_shape(
    make: Callable[[], nn.Module], shape: tuple[int, ...], cls: str
) -> None:
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}: expected 4 channels at dim 1 (channels_first), got input of shape {shape}; "
        "check the layout or the in_channels the shortcut was built with"
    )):  # fmt: skip
        make()(torch.zeros(shape))


@pytest.mark.parametrize(
    ("make", "cls"),
    [
        (lambda: ProjectionShortcut(4, 8, layout="channels_last"), "ProjectionShortcut"),
        (lambda: ZeroPadShortcut(4, 8, layout="channels_last"), "ZeroPadShortcut"),
        (lambda: LowRankShortcut(4, 2), "LowRankShortcut"),
    ],
)
@pytest.mark.parametrize("shape", [(2, 5, 3), (3,)], ids=["wrong-channels", "1-d"])
def test_wrong_channels_last_names_the_class_the_last_dim_and_the_shape(
    make: Callable[[], nn.Module], cls: str, shape: tuple[int, ...]
) -> None:
    """A 1-d input of the right size is one sample (see below); of another size it is refused."""
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}: expected 4 channels at the last dim (channels_last), got input of shape "
        f"{shape}; check the layout or the in_channels the shortcut was built with"
    )):  # fmt: skip
        make()(torch.zeros(shape))


def test_a_channels_first_input_with_channels_at_the_end_is_refused() -> None:
    """(N, H, W, C) given to a channel-first shortcut: the channels are read at dim 1 only."""
    with pytest.raises(
        ResidualError, match=r"at dim 1 \(channels_first\), got input of shape \(2, 3, 5, 4\)"
    ):
        PooledProjectionShortcut(4, 8)(torch.zeros(2, 3, 5, 4))


# --- 3. the projection (option B): defaults and values ------------------------------------------


def test_projection_defaults_are_a_stride_1_conv2d_without_bias_then_batchnorm() -> None:
    proj = randomize(ProjectionShortcut(4, 8))
    assert (proj.stride, proj.layout, proj.spatial_dims) == (1, "channels_first", 2)
    assert isinstance(proj.conv, nn.Conv2d) and proj.conv.bias is None
    assert proj.conv.kernel_size == (1, 1) and proj.conv.stride == (1, 1)
    assert isinstance(proj.norm, nn.BatchNorm2d) and proj.norm.num_features == 8
    assert not hasattr(proj, "linear")
    x = seeded(2, 4, 5, 3)
    expected = batch_norm(F.conv2d(x, proj.conv.weight), proj.norm)
    torch.testing.assert_close(proj(x), expected, atol=1e-6, rtol=1e-5)
    assert proj.extra_repr() == "4, 8, stride=1, layout='channels_first'"


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_strided_channels_first_projection_is_conv_stride_then_batchnorm(dims: int) -> None:
    proj = randomize(ProjectionShortcut(4, 6, stride=2, spatial_dims=dims, bias=True))
    conv = proj.conv
    assert isinstance(proj.norm, BATCH_NORM[dims]) and conv.bias is not None
    x = seeded(2, 4, *ODD[dims])
    expected = batch_norm(CONV[dims](x, conv.weight, conv.bias, stride=2), proj.norm)
    out = proj(x)
    assert out.shape == (2, 6, *(-(-s // 2) for s in ODD[dims]))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spatial", [(), (7,), (5, 3)], ids=["tokens", "1-d", "2-d"])
def test_a_channels_last_projection_subsamples_then_applies_linear_without_norm(
    spatial: tuple[int, ...],
) -> None:
    proj = randomize(ProjectionShortcut(4, 6, stride=2, layout="channels_last"))
    assert isinstance(proj.linear, nn.Linear) and proj.linear.bias is None
    assert isinstance(proj.norm, nn.Identity) and not hasattr(proj, "conv")
    x = seeded(2, *spatial, 4)
    every = (slice(None),) + (slice(None, None, 2),) * len(spatial)
    torch.testing.assert_close(proj(x), x[every] @ proj.linear.weight.t(), atol=1e-6, rtol=1e-5)
    assert proj.extra_repr() == "4, 6, stride=2, layout='channels_last'"


def test_a_channels_last_projection_takes_a_bias_and_a_norm_factory() -> None:
    made: list[int] = []

    def norm(channels: int) -> nn.Module:
        made.append(channels)
        return nn.LayerNorm(channels)

    proj = randomize(ProjectionShortcut(4, 6, layout="channels_last", bias=True, norm_layer=norm))
    assert made == [6] and proj.linear.bias is not None
    x = seeded(3, 5, 4)
    ln = proj.norm
    assert isinstance(ln, nn.LayerNorm)
    expected = F.layer_norm(
        F.linear(x, proj.linear.weight, proj.linear.bias), (6,), ln.weight, ln.bias
    )
    torch.testing.assert_close(proj(x), expected, atol=1e-6, rtol=1e-5)


def test_a_projection_without_norm_is_the_conv_alone() -> None:
    proj = randomize(ProjectionShortcut(4, 6, stride=2, norm_layer=None))
    assert isinstance(proj.norm, nn.Identity)
    x = seeded(2, 4, 5, 5)
    torch.testing.assert_close(
        proj(x), F.conv2d(x, proj.conv.weight, stride=2), atol=1e-6, rtol=1e-5
    )


# --- 4. the pooled projection (ResNet-D) -------------------------------------------------------


def test_pooled_projection_defaults_have_no_pool_a_conv2d_without_bias_and_batchnorm() -> None:
    """Stride 1 by default: no pool at all (as documented), the size is kept."""
    proj = randomize(PooledProjectionShortcut(4, 8))
    assert (proj.stride, proj.spatial_dims) == (1, 2)
    assert isinstance(proj.pool, nn.Identity)
    assert isinstance(proj.conv, nn.Conv2d) and proj.conv.bias is None
    assert isinstance(proj.norm, nn.BatchNorm2d) and proj.norm.num_features == 8
    x = seeded(2, 4, 5, 3)
    expected = batch_norm(F.conv2d(x, proj.conv.weight), proj.norm)
    torch.testing.assert_close(proj(x), expected, atol=1e-6, rtol=1e-5)
    assert proj.extra_repr() == "4, 8, stride=1"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride", [2, 3])
def test_pooled_projection_is_ceil_avg_pool_then_conv_then_batchnorm(
    dims: int, stride: int
) -> None:
    proj = randomize(PooledProjectionShortcut(4, 6, stride=stride, spatial_dims=dims))
    assert isinstance(proj.norm, BATCH_NORM[dims])
    x = seeded(2, 4, *ODD[dims])
    pooled = AVG_POOL[dims](x, stride, stride, ceil_mode=True, count_include_pad=False)
    expected = batch_norm(CONV[dims](pooled, proj.conv.weight), proj.norm)
    torch.testing.assert_close(proj(x), expected, atol=1e-6, rtol=1e-5)
    assert proj.extra_repr() == f"4, 6, stride={stride}"


def test_pooled_projection_without_norm_is_pool_then_conv() -> None:
    proj = randomize(PooledProjectionShortcut(4, 6, stride=2, norm_layer=None))
    assert isinstance(proj.norm, nn.Identity)
    x = seeded(2, 4, 5, 5)
    pooled = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    torch.testing.assert_close(proj(x), F.conv2d(pooled, proj.conv.weight), atol=1e-6, rtol=1e-5)


# --- 5. zero padding (option A) ----------------------------------------------------------------


def zero_pad_by_hand(x: Tensor, stride: int, before: int, after: int, last: bool) -> Tensor:
    every = slice(None, None, stride)
    if last:
        sub = x[(slice(None),) + (every,) * (x.dim() - 2) + (slice(None),)]
        return torch.cat(
            [sub.new_zeros(*sub.shape[:-1], before), sub, sub.new_zeros(*sub.shape[:-1], after)], -1
        )
    sub = x[(slice(None), slice(None)) + (every,) * (x.dim() - 2)]
    zeros = sub.new_zeros
    return torch.cat(
        [
            zeros(sub.shape[0], before, *sub.shape[2:]),
            sub,
            zeros(sub.shape[0], after, *sub.shape[2:]),
        ],
        1,
    )


def test_zero_pad_defaults_keep_the_size_and_append_zeros_at_the_end() -> None:
    s = ZeroPadShortcut(3, 5)
    assert (s.stride, s.layout, s.placement) == (1, "channels_first", "end")
    x = seeded(2, 3, 4, 5)
    torch.testing.assert_close(s(x), zero_pad_by_hand(x, 1, 0, 2, last=False), atol=0, rtol=0)
    assert s.extra_repr() == "3, 5, stride=1, layout='channels_first', placement='end'"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize(("extra", "before"), [(0, 0), (2, 1), (3, 1), (4, 2)])
@pytest.mark.parametrize("placement", ["end", "both"])
def test_zero_pad_subsamples_and_places_the_zeros(
    dims: int, layout: Any, extra: int, before: int, placement: Any
) -> None:
    """ "both" puts extra // 2 zero channels before the input's, the rest after."""
    s = ZeroPadShortcut(3, 3 + extra, stride=2, layout=layout, placement=placement)
    before = before if placement == "both" else 0
    last = layout == "channels_last"
    x = seeded(2, *ODD[dims], 3) if last else seeded(2, 3, *ODD[dims])
    expected = zero_pad_by_hand(x, 2, before, extra - before, last)
    torch.testing.assert_close(s(x), expected, atol=0, rtol=0)
    assert s.extra_repr() == (
        f"3, {3 + extra}, stride=2, layout={layout!r}, placement={placement!r}"
    )


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_zero_pad_with_nothing_to_add_returns_the_input_without_a_copy(layout: Any) -> None:
    x = seeded(2, 3, 4, 3)
    for placement in ("end", "both"):
        assert ZeroPadShortcut(3, 3, layout=layout, placement=placement)(x) is x


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [((2, 3, 4, 6), torch.channels_last), ((2, 3, 4, 6, 2), torch.channels_last_3d)],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_zero_pad_keeps_the_memory_format_of_its_input(
    shape: tuple[int, ...], fmt: torch.memory_format, stride: int
) -> None:
    s = ZeroPadShortcut(3, 5, stride=stride, placement="both")
    dense = seeded(*shape)
    last = dense.contiguous(memory_format=fmt)
    out_dense, out_last = s(dense), s(last)
    assert out_dense.is_contiguous() and not out_dense.is_contiguous(memory_format=fmt)
    assert out_last.is_contiguous(memory_format=fmt) and not out_last.is_contiguous()
    torch.testing.assert_close(out_last, out_dense, atol=0, rtol=0)


def test_zero_pad_of_a_1d_conv_input_has_no_channels_last_format() -> None:
    x = seeded(2, 3, 5)
    out = ZeroPadShortcut(3, 4)(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, zero_pad_by_hand(x, 1, 0, 1, last=False), atol=0, rtol=0)


# --- 6. identity, none, low rank ---------------------------------------------------------------


def test_identity_returns_its_input_and_no_shortcut_returns_none() -> None:
    x = seeded(2, 3)
    assert IdentityShortcut()(x) is x
    assert NoShortcut()(x) is None
    assert is_identity(IdentityShortcut()) and is_identity(nn.Identity())
    assert not is_identity(ZeroPadShortcut(3, 3)) and not is_identity(NoShortcut())


def test_low_rank_starts_as_the_identity_with_an_orthogonal_up_projection() -> None:
    s = LowRankShortcut(6, 3)
    assert torch.equal(s.down, torch.zeros(3, 6))
    torch.testing.assert_close(s.up.t() @ s.up, torch.eye(3), atol=1e-6, rtol=0)
    x = seeded(2, 6)
    assert torch.equal(s(x), x)
    assert s.extra_repr() == "6, rank=3"


@pytest.mark.parametrize("shape", [(2, 6), (2, 5, 6), (2, 3, 4, 6)])
def test_low_rank_adds_a_times_b_times_x(shape: tuple[int, ...]) -> None:
    s = randomize(LowRankShortcut(6, 2))
    x = seeded(*shape)
    low = x @ s.down.t() @ s.up.t()
    torch.testing.assert_close(s.low_rank(x), low, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s(x), x + low, atol=1e-6, rtol=1e-5)


# --- 7. the resolver: names to modules -----------------------------------------------------------


def test_the_names() -> None:
    assert SHORTCUTS == ("identity", "projection", "zero_pad", "pooled_projection", "auto", "none")
    assert repr(DEFAULT_NORM) == "DEFAULT_NORM"


def test_a_module_is_returned_as_it_is() -> None:
    module = nn.Linear(2, 2)
    assert resolve_shortcut(module) is module
    assert shortcut_for(module, nn.Conv2d(2, 4, 1)) is module


def test_identity_and_none_need_no_dimensions() -> None:
    assert type(resolve_shortcut("identity")) is IdentityShortcut
    assert type(resolve_shortcut("none")) is NoShortcut
    assert type(resolve_shortcut(None, in_channels=4, out_channels=4)) is IdentityShortcut


def test_a_module_class_asks_for_an_instance() -> None:
    with pytest.raises(TypeError, match=exactly(
        "Residual: shortcut must be a module instance, got the class IdentityShortcut; create "
        "one first: Residual(..., shortcut=IdentityShortcut(...))"
    )):  # fmt: skip
        resolve_shortcut(IdentityShortcut)  # type: ignore[arg-type]


def test_neither_a_name_nor_a_module_is_a_type_error_listing_the_names() -> None:
    message = exactly(f"shortcut must be a name {SHORTCUTS} or an nn.Module, got int")
    with pytest.raises(TypeError, match=message):
        resolve_shortcut(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        shortcut_for(3, nn.Conv2d(2, 4, 1))  # type: ignore[arg-type]


def test_an_unknown_name_lists_the_valid_ones() -> None:
    message = exactly(
        "unknown shortcut 'projetion'; valid names are identity, projection, zero_pad, "
        "pooled_projection, auto, none"
    )
    with pytest.raises(ResidualError, match=message):
        resolve_shortcut("projetion")
    with pytest.raises(ResidualError, match=message):  # before the branch is read
        shortcut_for("projetion", Opaque())


@pytest.mark.parametrize("given", [{}, {"in_channels": 4}, {"out_channels": 8}])
def test_a_name_that_needs_dimensions_says_which_and_how(given: dict[str, int]) -> None:
    with pytest.raises(ResidualError, match=exactly(
        "shortcut 'zero_pad' needs in_channels and out_channels; pass a module instead, "
        "e.g. shortcut=ProjectionShortcut(in_channels, out_channels)"
    )):  # fmt: skip
        resolve_shortcut("zero_pad", **given)


@pytest.mark.parametrize("spec", ["auto", None])
def test_auto_is_the_identity_only_for_the_same_channels_and_stride_1(spec: str | None) -> None:
    assert type(resolve_shortcut(spec, in_channels=4, out_channels=4)) is IdentityShortcut
    for channels, stride in ((8, 1), (4, 2)):
        proj = resolve_shortcut(spec, in_channels=4, out_channels=channels, stride=stride)
        assert isinstance(proj, ProjectionShortcut)
        assert proj.extra_repr() == f"4, {channels}, stride={stride}, layout='channels_first'"
    # only "auto" picks the identity: the other names keep their module for the same shape
    same = {"in_channels": 4, "out_channels": 4}
    assert type(resolve_shortcut("projection", **same)) is ProjectionShortcut
    assert type(resolve_shortcut("zero_pad", **same)) is ZeroPadShortcut
    assert type(resolve_shortcut("pooled_projection", **same)) is PooledProjectionShortcut


def test_resolver_defaults_are_a_channels_first_2d_stride_1_batchnorm_projection() -> None:
    proj = resolve_shortcut("projection", in_channels=4, out_channels=8)
    assert isinstance(proj, ProjectionShortcut)
    assert (proj.stride, proj.layout, proj.spatial_dims) == (1, "channels_first", 2)
    assert isinstance(proj.conv, nn.Conv2d) and isinstance(proj.norm, nn.BatchNorm2d)


def test_the_resolver_passes_every_setting_on() -> None:
    kw: dict[str, Any] = {"in_channels": 4, "out_channels": 8, "stride": 2}
    proj = resolve_shortcut("projection", **kw, layout="channels_last", norm_layer=nn.LayerNorm)
    assert isinstance(proj, ProjectionShortcut) and isinstance(proj.norm, nn.LayerNorm)
    assert proj.extra_repr() == "4, 8, stride=2, layout='channels_last'"
    conv3d = resolve_shortcut("projection", **kw, spatial_dims=3, norm_layer=None)
    assert isinstance(conv3d, ProjectionShortcut) and isinstance(conv3d.conv, nn.Conv3d)
    assert isinstance(conv3d.norm, nn.Identity) and conv3d.spatial_dims == 3
    pad = resolve_shortcut("zero_pad", **kw, layout="channels_last")
    assert isinstance(pad, ZeroPadShortcut)
    assert pad.extra_repr() == "4, 8, stride=2, layout='channels_last', placement='end'"
    pooled = resolve_shortcut("pooled_projection", **kw, spatial_dims=1, norm_layer=None)
    assert isinstance(pooled, PooledProjectionShortcut) and isinstance(pooled.norm, nn.Identity)
    assert isinstance(pooled.pool, nn.AvgPool1d) and isinstance(pooled.conv, nn.Conv1d)
    assert pooled.extra_repr() == "4, 8, stride=2"
    pooled = resolve_shortcut("pooled_projection", in_channels=4, out_channels=8)
    assert isinstance(pooled, PooledProjectionShortcut)
    assert isinstance(pooled.norm, nn.BatchNorm2d) and pooled.spatial_dims == 2


def test_the_pooled_projection_is_channel_first_only() -> None:
    with pytest.raises(ResidualError, match=exactly(
        "shortcut 'pooled_projection' (ResNet-D) is channel-first only; use 'projection' for "
        "channel-last streams"
    )):  # fmt: skip
        resolve_shortcut("pooled_projection", in_channels=4, out_channels=8, layout="channels_last")


# --- 8. shortcut_for: the dimensions read from the branch ----------------------------------------


def test_identity_none_and_no_spec_never_read_the_branch() -> None:
    assert type(shortcut_for(None, Opaque())) is IdentityShortcut
    assert type(shortcut_for("identity", Opaque())) is IdentityShortcut
    assert type(shortcut_for("none", Opaque())) is NoShortcut


@pytest.mark.parametrize("name", ["projection", "zero_pad", "pooled_projection", "auto"])
def test_an_unreadable_branch_asks_for_the_module(name: str) -> None:
    with pytest.raises(ResidualError, match=exactly(
        f"Residual: shortcut {name!r} needs the branch's channels and stride, and Opaque does "
        "not show them for certain (a custom forward, or layers whose order or padding do not "
        "fix them); pass the module instead, e.g. shortcut=ProjectionShortcut(in_channels, "
        "out_channels, stride=s) or ZeroPadShortcut(in_channels, out_channels, stride=s)"
    )):  # fmt: skip
        shortcut_for(name, Opaque())


def test_the_dimensions_read_from_the_branch_reach_the_shortcut() -> None:
    conv = nn.Conv1d(4, 8, 3, stride=2, padding=1)
    proj = shortcut_for("projection", conv)
    assert isinstance(proj, ProjectionShortcut) and isinstance(proj.conv, nn.Conv1d)
    assert proj.extra_repr() == "4, 8, stride=2, layout='channels_first'"
    linear = shortcut_for("auto", nn.Linear(4, 8))
    assert isinstance(linear, ProjectionShortcut) and isinstance(linear.norm, nn.Identity)
    assert linear.extra_repr() == "4, 8, stride=1, layout='channels_last'"
    pooled = shortcut_for("pooled_projection", nn.Conv3d(4, 8, 3, stride=2, padding=1))
    assert isinstance(pooled, PooledProjectionShortcut) and isinstance(pooled.conv, nn.Conv3d)
    assert type(shortcut_for("auto", nn.Conv2d(4, 4, 3, padding=1))) is IdentityShortcut


def test_a_named_shortcut_in_a_block_matches_the_formula() -> None:
    block = Residual(nn.Conv2d(3, 5, 3, stride=2, padding=1), shortcut="zero_pad")
    x = seeded(2, 3, 5, 5)
    expected = zero_pad_by_hand(x, 2, 0, 2, last=False) + block.fn(x)
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)


# --- 8. anisotropic strides: ceil(H / sh), ceil(W / sw) per spatial dim -------------------------

ANISO = {1: (3,), 2: (2, 1), 3: (1, 2, 3)}


def subsample_by_hand(x: Tensor, stride: tuple[int, ...], last: bool) -> Tensor:
    every = tuple(slice(None, None, s) for s in stride)
    return x[(slice(None), *every, slice(None))] if last else x[(slice(None), slice(None), *every)]


def ceil_sizes(sizes: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-h // s) for h, s in zip(sizes, stride, strict=True))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_projection_with_a_stride_per_dim_is_conv_stride_then_batchnorm(dims: int) -> None:
    stride = ANISO[dims]
    proj = randomize(ProjectionShortcut(4, 6, stride=stride, spatial_dims=dims))
    x = seeded(2, 4, *ODD[dims])
    out = proj(x)
    assert out.shape == (2, 6, *ceil_sizes(ODD[dims], stride))
    expected = batch_norm(CONV[dims](x, proj.conv.weight, stride=stride), proj.norm)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert proj.extra_repr() == f"4, 6, stride={stride}, layout='channels_first'"


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_channels_last_projection_with_a_stride_per_dim_subsamples_each_dim(dims: int) -> None:
    stride = ANISO[dims]
    proj = randomize(ProjectionShortcut(4, 6, stride=stride, layout="channels_last"))
    x = seeded(2, *ODD[dims], 4)
    expected = subsample_by_hand(x, stride, last=True) @ proj.linear.weight.t()
    torch.testing.assert_close(proj(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_zero_pad_with_a_stride_per_dim(dims: int, layout: Any) -> None:
    stride = ANISO[dims]
    last = layout == "channels_last"
    s = ZeroPadShortcut(3, 5, stride=stride, layout=layout, placement="both")
    x = seeded(2, *ODD[dims], 3) if last else seeded(2, 3, *ODD[dims])
    sub = subsample_by_hand(x, stride, last)
    expected = F.pad(sub, (1, 1)) if last else F.pad(sub, (0, 0) * dims + (1, 1))
    torch.testing.assert_close(s(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pooled_projection_with_a_stride_per_dim_pools_each_dim(dims: int) -> None:
    stride = ANISO[dims]
    proj = randomize(PooledProjectionShortcut(4, 6, stride=stride, spatial_dims=dims))
    x = seeded(2, 4, *ODD[dims])
    pooled = AVG_POOL[dims](x, stride, stride, ceil_mode=True, count_include_pad=False)
    expected = batch_norm(CONV[dims](pooled, proj.conv.weight), proj.norm)
    out = proj(x)
    assert out.shape == (2, 6, *ceil_sizes(ODD[dims], stride))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_a_stride_of_ones_has_no_pool() -> None:
    assert isinstance(PooledProjectionShortcut(4, 6, stride=(1, 1)).pool, nn.Identity)
    assert type(resolve_shortcut("auto", in_channels=4, out_channels=4, stride=(1, 1))) is (
        IdentityShortcut
    )


@pytest.mark.parametrize("cls", ["ProjectionShortcut", "PooledProjectionShortcut"])
def test_a_stride_tuple_of_the_wrong_length_names_spatial_dims(cls: str) -> None:
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}: stride (2, 1) gives one step per spatial dim (2) but spatial_dims=3; "
        "give 3 steps or build it with spatial_dims=2"
    )):  # fmt: skip
        CHANNEL_SHORTCUTS[cls](4, 8, stride=(2, 1), spatial_dims=3)
    fixed = CHANNEL_SHORTCUTS[cls](4, 8, stride=(2, 1), spatial_dims=2)
    assert fixed(torch.zeros(2, 4, 5, 5)).shape == (2, 8, 3, 5)


@pytest.mark.parametrize("cls", CHANNEL_SHORTCUTS)
@pytest.mark.parametrize("bad", [(2, 0), (2, 1.5), ()], ids=["zero", "float", "empty"])
def test_a_stride_tuple_holds_positive_ints(cls: str, bad: tuple[Any, ...]) -> None:
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}: stride must be a positive int or a tuple of them (one per spatial dim), "
        f"got {bad!r}"
    )):  # fmt: skip
        CHANNEL_SHORTCUTS[cls](4, 8, stride=bad)


def test_zero_pad_with_a_stride_tuple_for_another_rank_says_so() -> None:
    with pytest.raises(ResidualError, match=exactly(
        "ZeroPadShortcut: stride (2, 1) gives one step per spatial dim (2) but the input of "
        "shape (2, 3, 5, 5, 5) has 3 (channels_first); give one step per spatial dim"
    )):  # fmt: skip
        ZeroPadShortcut(3, 4, stride=(2, 1))(torch.zeros(2, 3, 5, 5, 5))


@pytest.mark.parametrize(
    ("fn", "shape"),
    [
        (nn.Conv2d(4, 8, 3, stride=(2, 1), padding=1), (2, 4, 7, 6)),
        (nn.Conv1d(4, 8, 3, stride=3, padding=1), (2, 4, 7)),
        (nn.Conv3d(4, 8, 3, stride=(1, 2, 3), padding=1), (1, 4, 3, 5, 7)),
        (nn.Sequential(nn.Conv2d(4, 8, 3, stride=(1, 2), padding=1), nn.BatchNorm2d(8),
                       nn.ReLU(), nn.MaxPool2d((2, 1), ceil_mode=True)), (2, 4, 5, 7)),
        (nn.Sequential(nn.Conv2d(4, 8, (3, 1), stride=(2, 1), padding=(1, 0))), (2, 4, 7, 6)),
    ],
    ids=["conv2d", "conv1d-3", "conv3d", "sequential-with-pool", "kernel-3x1"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["projection", "zero_pad", "pooled_projection", "auto"])
def test_a_branch_with_a_stride_per_dim_gets_its_shortcut(
    fn: nn.Module, shape: tuple[int, ...], name: str
) -> None:
    block = Residual(fn, shortcut=name).eval()
    x = seeded(*shape)
    out = block(x)
    assert out.shape == fn(x).shape
    torch.testing.assert_close(out, block.shortcut(x) + fn(x), atol=0, rtol=0)
    assert block.shortcut(x).shape == fn(x).shape


# --- 9. unbatched input: what the branch accepts, the shortcut accepts --------------------------


@pytest.mark.parametrize(
    ("fn", "shape"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (3, 5, 4)),
        (nn.Conv2d(3, 8, 3, stride=2, padding=1), (3, 5, 4)),
        (nn.Conv1d(3, 8, 3, stride=(2,), padding=1), (3, 7)),
        (nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1), (3, 3, 5, 4)),
        (nn.Linear(16, 32), (16,)),
    ],
    ids=["conv2d", "conv2d-stride-2", "conv1d", "conv3d", "linear"],
)
@pytest.mark.parametrize("name", ["projection", "zero_pad", "pooled_projection", "auto"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_an_unbatched_input_gives_the_batch_of_one(
    fn: nn.Module, shape: tuple[int, ...], name: str, train: bool
) -> None:
    if name == "pooled_projection" and isinstance(fn, nn.Linear):
        pytest.skip("the pooled projection is channel-first only")
    torch.manual_seed(0)
    block = Residual(fn, shortcut=name).train(train)
    twin = Residual(fn, shortcut=name).train(train)
    twin.load_state_dict(block.state_dict())
    x = seeded(*shape)
    out = block(x)
    expected = twin(x.unsqueeze(0)).squeeze(0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for a, b in zip(block.buffers(), twin.buffers(), strict=True):  # BatchNorm saw the same
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ProjectionShortcut(4, 6, layout="channels_last"),
        lambda: ZeroPadShortcut(4, 6, layout="channels_last"),
        lambda: LowRankShortcut(4, 2),
    ],
    ids=["projection", "zero_pad", "low_rank"],
)
def test_a_channels_last_vector_is_one_sample(make: Callable[[], nn.Module]) -> None:
    s = randomize(make())
    x = seeded(4)
    torch.testing.assert_close(s(x), s(x.unsqueeze(0)).squeeze(0), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("make", "cls"),
    [
        (lambda: ProjectionShortcut(4, 8), "ProjectionShortcut"),
        (lambda: PooledProjectionShortcut(4, 8, stride=2), "PooledProjectionShortcut"),
        (lambda: ZeroPadShortcut(4, 8, spatial_dims=2), "ZeroPadShortcut"),
    ],
)
def test_an_unbatched_sample_with_wrong_channels_names_dim_0(
    make: Callable[[], nn.Module], cls: str
) -> None:
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}: expected 4 channels at dim 0 of an unbatched (C, *spatial) sample "
        "(channels_first, spatial_dims=2), got input of shape (3, 5, 5); check the layout, the "
        "in_channels the shortcut was built with, or its spatial_dims"
    )):  # fmt: skip
        make()(torch.zeros(3, 5, 5))


@pytest.mark.parametrize("cls", ["ProjectionShortcut", "PooledProjectionShortcut"])
@pytest.mark.parametrize(("shape", "fix"), [((2, 4, 3, 5, 5), 3), ((4,), None)])
def test_an_input_of_another_rank_names_spatial_dims(
    cls: str, shape: tuple[int, ...], fix: int | None
) -> None:
    hint = f"build it with spatial_dims={fix}" if fix else "reshape the input"
    with pytest.raises(ResidualError, match=exactly(
        f"{cls}(spatial_dims=2) expects (N, C, *2 spatial) input or one unbatched (C, *2 spatial) "
        f"sample, got shape {shape}; {hint}"
    )):  # fmt: skip
        CHANNEL_SHORTCUTS[cls](4, 8)(torch.zeros(shape))
    if fix:
        assert CHANNEL_SHORTCUTS[cls](4, 8, spatial_dims=fix)(torch.zeros(shape)).shape[1] == 8


# --- 10. the new paths stay traceable ----------------------------------------------------------

TRACED: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "stride-per-dim-projection": (
        lambda: Residual(nn.Conv2d(4, 8, 3, stride=(2, 1), padding=1), shortcut="projection"),
        (2, 4, 7, 6),
    ),
    "stride-per-dim-zero-pad": (
        lambda: Residual(nn.Conv2d(4, 8, 3, stride=(1, 2), padding=1), shortcut="zero_pad"),
        (2, 4, 7, 6),
    ),
    "unbatched-pooled": (
        lambda: Residual(nn.Conv2d(4, 8, 3, stride=2, padding=1), shortcut="pooled_projection"),
        (4, 7, 6),
    ),
    "unbatched-linear": (lambda: Residual(nn.Linear(4, 8), shortcut="projection"), (4,)),
}


@pytest.mark.parametrize("case", TRACED)
def test_the_new_paths_trace_with_fx_export_and_compile(case: str) -> None:
    make, shape = TRACED[case]
    block = randomize(make())
    x = seeded(*shape)
    expected = block(x)
    traced = torch.fx.symbolic_trace(block)
    torch.testing.assert_close(traced(x), expected, atol=0, rtol=0)
    exported = torch.export.export(block, (x,)).module()
    torch.testing.assert_close(exported(x), expected, atol=1e-6, rtol=1e-6)
    torch.compiler.reset()  # a fresh cache: the suite compiles many blocks
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        nn.LazyConv2d(8, 3, padding=1),
        nn.LazyLinear(8),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.LazyConv2d(8, 3, padding=1)),
    ],
    ids=["lazy-conv", "lazy-linear", "sequential"],
)
@pytest.mark.parametrize("name", ["projection", "auto"])
def test_a_lazy_branch_asks_for_the_module(fn: nn.Module, name: str) -> None:
    """A lazy layer's input channels are unknown until its first forward: not read as 0."""
    with pytest.raises(ResidualError, match=f"^Residual: shortcut {name!r} needs the branch's"):
        Residual(fn, shortcut=name)


def test_a_zero_pad_module_takes_the_branchs_spatial_dims_for_unbatched_input() -> None:
    # found by tests/test_seams.py: a ZeroPadShortcut passed as a module, unbatched conv input
    conv = nn.Conv1d(3, 5, 1, stride=2)
    block = Residual(conv, shortcut=ZeroPadShortcut(3, 5, stride=2))
    assert block.shortcut.spatial_dims == 1
    x = torch.randn(3, 7)  # (C, L): nn.Conv1d takes one unbatched sample
    torch.testing.assert_close(block(x), block(x.unsqueeze(0)).squeeze(0))
    with pytest.raises(
        ResidualError, match=r"unbatched \(C, \*spatial\) sample build it with spatial_dims=1"
    ):
        ZeroPadShortcut(3, 3)(torch.randn(3, 7))
    torch.testing.assert_close(ZeroPadShortcut(3, 3, spatial_dims=1)(x), x)  # the fix works


def test_a_zero_pad_module_beside_an_opaque_branch_takes_the_blocks_batched_rank() -> None:
    from residual.drop import SampleAxis

    class Opaque(nn.Module):  # a custom forward: nothing in it can be read
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, stride=2)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    axis = SampleAxis(0, batched_ndim=4)  # (N, C, H, W); one (C, H, W) sample is unbatched
    block = Residual(Opaque(), shortcut=ZeroPadShortcut(3, 3, stride=2), sample_axis=axis)
    assert block.shortcut.spatial_dims == 2
    x = torch.randn(3, 3, 3)
    torch.testing.assert_close(block(x), block(x.unsqueeze(0)).squeeze(0))
