"""The combinator's remaining contract, exactly: its repr, tuple outputs under stochastic depth,
checkpointed branches with extra arguments and instance norms, and the dimension reading of
pools and of Linear layers among convs."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import set_checkpoint_early_stop

from residual import Residual, ResidualError
from residual.shortcuts import ProjectionShortcut


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ""),
        ({"drop_path": 0.1}, "drop_path=0.1, drop_mode='row'"),
        ({"drop_path": 0.25, "drop_mode": "batch"}, "drop_path=0.25, drop_mode='batch'"),
        (
            {"drop_path": 0.5, "drop_mode": "subset", "scale_by_keep": False},
            "drop_path=0.5, drop_mode='subset', scale_by_keep=False",
        ),
        ({"scale_by_keep": False}, ""),  # nothing to scale without a rate
        ({"checkpoint": True}, "checkpoint=True"),
        ({"residual_in_fp32": True}, "residual_in_fp32=True"),
        (
            {"drop_path": 1.0, "checkpoint": True, "residual_in_fp32": True},
            "drop_path=1.0, drop_mode='row', checkpoint=True, residual_in_fp32=True",
        ),
    ],
)
def test_the_repr_line_lists_exactly_the_options_set(options: dict, expected: str) -> None:
    block = Residual(nn.Linear(2, 2), **options)
    assert block.extra_repr() == expected
    lines = repr(block).splitlines()
    assert lines[1] == (
        f"  {expected}" if expected else "  (fn): Linear(in_features=2, out_features=2, bias=True)"
    )


class ThreeOutputs(nn.Module):
    """A branch returning (tensor, extra, extra): the extras pass through untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.first, self.second = torch.tensor(1.0), torch.tensor(2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.linear(x), self.first, self.second


def test_row_drop_keeps_every_extra_output_of_a_tuple_branch() -> None:
    fn = ThreeOutputs()
    block = Residual(fn, drop_path=0.5).train()
    x = torch.randn(64, 3)
    torch.manual_seed(0)
    out = block(x)
    assert isinstance(out, tuple) and len(out) == 3
    assert out[1] is fn.first and out[2] is fn.second
    torch.manual_seed(0)
    mask = torch.empty(64, 1).bernoulli_(0.5) / 0.5  # timm's draw, in its order
    torch.testing.assert_close(out[0], x + fn.linear(x) * mask, rtol=0, atol=0)


class Scaled(nn.Module):
    """A branch with an extra positional argument and a keyword one."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: Tensor, scale: Tensor, *, shift: float = 0.0) -> Tensor:
        return self.linear(x) * scale + shift


@pytest.mark.parametrize("kwargs", [{}, {"shift": 0.5}])
def test_a_checkpointed_branch_gets_its_extra_arguments(kwargs: dict) -> None:
    torch.manual_seed(0)
    plain = Residual(Scaled())
    ckpt = Residual(copy.deepcopy(plain.fn), checkpoint=True)
    x = torch.randn(3, 4, requires_grad=True)
    scale = torch.full((3, 1), 3.0)
    expected = plain(x, scale, **kwargs)
    got = ckpt(x, scale, **kwargs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, x + plain.fn.linear(x) * 3.0 + kwargs.get("shift", 0.0))
    got.sum().backward()
    torch.testing.assert_close(ckpt.fn.linear.weight.grad, 3.0 * x.detach().sum(0).expand(4, 4))


def _instance_norm_branch() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.InstanceNorm2d(3, track_running_stats=True)
    )


def test_checkpointing_updates_instance_norm_statistics_once() -> None:
    """InstanceNorm's functional form says ``use_input_stats``, not ``training``.

    By default torch stops a recomputation once it has the saved tensors, which happens to be
    before instance_norm writes its statistics back; without that early stop (a user setting)
    the whole branch runs again, and the statistics must still move once.
    """
    torch.manual_seed(0)
    plain = Residual(_instance_norm_branch()).train()
    ckpt = Residual(copy.deepcopy(plain.fn), checkpoint=True).train()
    with set_checkpoint_early_stop(False):
        for _ in range(3):
            x = torch.randn(2, 3, 5, 5) + 2.0
            plain(x).sum().backward()
            ckpt(x).sum().backward()
    plain_norm, ckpt_norm = plain.fn[1], ckpt.fn[1]
    assert not torch.equal(plain_norm.running_mean, torch.zeros(3))  # the statistics moved
    torch.testing.assert_close(ckpt_norm.running_mean, plain_norm.running_mean)
    torch.testing.assert_close(ckpt_norm.running_var, plain_norm.running_var)
    torch.testing.assert_close(ckpt.fn[0].weight.grad, plain.fn[0].weight.grad)


NOT_READABLE = (
    "Residual: shortcut 'projection' needs the branch's channels and stride, and Sequential "
    "does not show them for certain (a custom forward, or layers whose order or padding do not "
    "fix them); pass the module instead, e.g. shortcut=ProjectionShortcut(in_channels, "
    "out_channels, stride=s) or ZeroPadShortcut(in_channels, out_channels, stride=s)"
)


@pytest.mark.parametrize(
    "fn",
    [
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 4)),
        nn.Sequential(nn.Sequential(nn.Linear(4, 4)), nn.Conv2d(4, 4, 3, padding=1)),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.ReLU(), nn.Linear(4, 4))),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.MaxPool2d(2)),  # floor: not a stride
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, dilation=2)),  # shrinks by 2
    ],
    ids=[
        "linear-after-conv",
        "nested-linear-before-conv",
        "nested-linear-after",
        "floor-pool",
        "dilated-unpadded",
    ],
)
def test_a_linear_among_convs_or_a_flooring_pool_is_not_read(fn: nn.Module) -> None:
    with pytest.raises(ResidualError, match=f"^{re.escape(NOT_READABLE)}$"):
        Residual(fn, shortcut="projection")


@pytest.mark.parametrize(
    ("fn", "shape", "stride", "dims"),
    [
        (nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True)), (2, 4, 7, 6), 2, 2),
        (nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.AvgPool1d(3, stride=2, padding=1)), (2, 4, 9), 2, 1),
        (nn.Sequential(nn.Conv3d(4, 8, 1), nn.MaxPool3d(3, stride=3, ceil_mode=True)), (1, 4, 5, 6, 7), 3, 3),
        (nn.Sequential(nn.Sequential(nn.Linear(4, 6)), nn.ReLU(), nn.Linear(6, 8)), (2, 5, 4), 1, 0),
        (nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.MaxPool2d(3, 2, 1, dilation=1)), (2, 4, 9, 8), 2, 2),
        (nn.Sequential(nn.MaxPool2d(2, stride=None, ceil_mode=True), nn.Conv2d(4, 8, 1)), (2, 4, 5, 5), 2, 2),
        (nn.Sequential(nn.Conv3d(4, 8, 1), nn.AvgPool3d((2, 2, 2), 2, ceil_mode=True)), (1, 4, 3, 4, 5), 2, 3),
    ],
    ids=[
        "maxpool2d",
        "avgpool1d",
        "maxpool3d",
        "nested-linears",
        "dilated-padded",
        "stride-none",
        "avgpool3d-tuple-kernel",
    ],
)  # fmt: skip
def test_pools_given_as_ints_read_as_their_stride(
    fn: nn.Module, shape: tuple[int, ...], stride: int, dims: int
) -> None:
    block = Residual(fn, shortcut="projection")
    shortcut = block.shortcut
    assert isinstance(shortcut, ProjectionShortcut)
    assert (shortcut.in_channels, shortcut.out_channels, shortcut.stride) == (4, 8, stride)
    assert shortcut.layout == ("channels_first" if dims else "channels_last")
    by_hand = ProjectionShortcut(4, 8, stride=stride, layout=shortcut.layout, **({"spatial_dims": dims} if dims else {}))  # fmt: skip
    assert shortcut.spatial_dims == by_hand.spatial_dims  # the same as built by hand
    x = torch.randn(shape)
    assert block(x).shape == fn(x).shape


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 8, 4, padding="same"),  # even kernel: torch pads asymmetrically
        nn.Conv1d(4, 8, 3, padding="same", dilation=2),
        nn.Conv3d(4, 8, (1, 2, 3), padding="same"),
        nn.Conv2d(4, 8, 1, padding="valid"),  # a 1x1 conv keeps the size unpadded
    ],
    ids=["same-even", "same-dilated", "same-3d-mixed", "valid-1x1"],
)
def test_same_and_valid_padding_read_as_stride_one(conv: nn.Conv2d) -> None:
    block = Residual(conv, shortcut="projection")
    shortcut = block.shortcut
    assert isinstance(shortcut, ProjectionShortcut)
    assert (shortcut.in_channels, shortcut.out_channels, shortcut.stride) == (4, 8, 1)
    x = torch.randn(2, 4, *[5] * (conv.weight.dim() - 2))
    assert block(x).shape == conv(x).shape


@pytest.mark.parametrize(
    "conv",
    [nn.Conv1d(4, 8, 2, stride=2, padding="valid"), nn.Conv2d(4, 8, 3, padding="valid")],
    ids=["valid-strided-floors", "valid-3x3-shrinks"],
)
def test_valid_padding_that_changes_the_size_is_not_read(conv: nn.Module) -> None:
    with pytest.raises(ResidualError, match="needs the branch's channels and stride"):
        Residual(conv, shortcut="projection")


def test_tracing_a_block_with_jit_warns_nothing() -> None:
    """The checks read shapes quietly under torch.jit.trace: a traced block raises no warning."""
    from residual.blocks import ResidualBlock

    block = ResidualBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+: jit is deprecated
        traced = torch.jit.trace(block, x)
    torch.testing.assert_close(traced(x), block(x))


@pytest.mark.parametrize(
    ("rnn", "out"),
    [
        (nn.LSTM(4, 8, batch_first=True), 8),
        (nn.GRU(4, 3, batch_first=True, bidirectional=True), 6),
        (nn.LSTM(4, 8, batch_first=True, proj_size=3), 3),
        (nn.LSTM(4, 8, batch_first=True, proj_size=5, bidirectional=True), 10),
    ],
    ids=["lstm", "bidirectional-gru", "projected-lstm", "projected-bidirectional"],
)
def test_an_rnn_reads_as_its_input_and_output_features(rnn: nn.RNNBase, out: int) -> None:
    block = Residual(rnn, shortcut="projection")
    shortcut = block.shortcut
    assert isinstance(shortcut, ProjectionShortcut)
    by_hand = ProjectionShortcut(4, out, layout="channels_last")
    assert (shortcut.in_channels, shortcut.out_channels, shortcut.stride, shortcut.layout) == (
        4, out, 1, "channels_last"
    )  # fmt: skip
    assert shortcut.spatial_dims == by_hand.spatial_dims
    y, _ = block(torch.randn(2, 5, 4))
    assert y.shape == (2, 5, out)


class CustomWithFn(nn.Module):
    """Holds an ``fn`` but computes something else: nothing can be read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.fn = nn.Linear(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x).flip(-1)


class LooksLikeABlock(nn.Module):
    """``fn`` and ``shortcut`` submodules, but not a residual block (no ``set_drop_path``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fn, self.shortcut = nn.Linear(4, 8), nn.Linear(4, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) * self.shortcut(x)


class DropsButHasNoFn(nn.Module):
    """A ``set_drop_path`` method alone does not make a readable block."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 8)

    def set_drop_path(self, p: float, drop_mode: str | None = None) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


@pytest.mark.parametrize("cls", [CustomWithFn, LooksLikeABlock, DropsButHasNoFn])
def test_only_real_residual_blocks_are_read_through(cls: type) -> None:
    message = NOT_READABLE.replace("and Sequential does", f"and {cls.__name__} does")
    with pytest.raises(ResidualError, match=f"^{re.escape(message)}$"):
        Residual(cls(), shortcut="projection")


def test_a_nested_block_is_read_with_its_pre() -> None:
    """An inner block whose shared ``pre`` widens 4 -> 8 channels reads as 4 -> 8."""
    inner = Residual(nn.Conv2d(8, 8, 3, padding=1), pre=nn.Conv2d(4, 8, 1))
    outer = Residual(nn.Sequential(inner), shortcut="projection")
    shortcut = outer.shortcut
    assert isinstance(shortcut, ProjectionShortcut)
    assert (shortcut.in_channels, shortcut.out_channels) == (4, 8)
    assert outer(torch.randn(2, 4, 5, 5)).shape == (2, 8, 5, 5)


def test_scale_by_keep_reaches_the_policy_and_stays_until_changed() -> None:
    block = Residual(nn.Linear(3, 3), drop_path=0.2, scale_by_keep=False)
    assert block.drop.scale_by_keep is False and block.scale_by_keep is False
    block.set_drop_path(0.4)  # None keeps the scaling
    assert block.drop.scale_by_keep is False and block.scale_by_keep is False
    block.set_drop_path(0.4, scale_by_keep=True)
    assert block.drop.scale_by_keep is True and block.scale_by_keep is True
    fresh = Residual(nn.Linear(3, 3), drop_path=0.2)
    fresh.set_drop_path(0.3, drop_mode="batch")  # a new policy keeps the default scaling
    assert fresh.drop.scale_by_keep is True and fresh.scale_by_keep is True


def test_changing_the_rate_keeps_the_policy_and_its_draw_state() -> None:
    torch.manual_seed(0)
    block = Residual(nn.Linear(3, 3), drop_path=0.2, drop_mode="batch").train()
    policy = block.drop
    seed = int(policy.seed)
    for _ in range(3):
        block(torch.randn(2, 3))
    block.set_drop_path(0.3, scale_by_keep=False)
    assert block.drop is policy  # the same module: its seed and step go on
    assert (int(policy.seed), int(policy.step)) == (seed, 3)
    assert policy.p == 0.3 and policy.scale_by_keep is False
    assert float(policy.keep) == pytest.approx(0.7)


def test_no_shortcut_takes_no_drop_path_but_builds_without_one() -> None:
    plain = Residual(nn.Linear(3, 3), shortcut="none")
    assert plain.drop is None
    message = (
        "Residual: drop_path needs a shortcut; with shortcut='none' dropping the branch would "
        "drop the whole layer"
    )
    with pytest.raises(ResidualError, match=f"^{re.escape(message)}$"):
        Residual(nn.Linear(3, 3), shortcut="none", drop_path=0.1)
    with pytest.raises(ResidualError, match=f"^{re.escape(message)}$"):
        plain.set_drop_path(0.1)
    plain.set_drop_path(0.0)  # nothing to drop: fine


def test_no_shortcut_takes_no_merge() -> None:
    from residual.merges import ReZero

    message = "Residual: shortcut='none' adds nothing, so it takes no merge"
    with pytest.raises(ResidualError, match=f"^{re.escape(message)}$"):
        Residual(nn.Linear(3, 3), shortcut="none", merge=ReZero())


def test_none_for_the_mode_or_scaling_at_construction_means_the_defaults() -> None:
    """As in ``set_drop_path``, None keeps the current setting: at construction, the default."""
    block = Residual(nn.Linear(3, 3), drop_path=0.1, drop_mode=None, scale_by_keep=None)  # type: ignore[arg-type]
    assert (block.drop_mode, block.scale_by_keep) == ("row", True)
    assert type(block.drop).__name__ == "RowDrop" and block.drop.scale_by_keep is True
