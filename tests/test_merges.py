"""Merges: each equals its hand-written formula; learned parameters live in the merge."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torchinfo
from torch import nn

from residual import (
    GRUGate,
    HighwayGate,
    LayerScale,
    Residual,
    ResidualError,
    ReZero,
    ScaledAdd,
)
from residual.merges import Add, deepnorm_scales
from residual.shortcuts import ProjectionShortcut


def test_add_and_scaled_add() -> None:
    fn = nn.Linear(6, 6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(Residual(fn, merge=Add())(x), x + fn(x), atol=0, rtol=0)
    torch.testing.assert_close(Residual(fn, merge=ScaledAdd(alpha=1.7))(x), 1.7 * x + fn(x))
    torch.testing.assert_close(Residual(fn, merge=ScaledAdd(beta=0.3))(x), x + 0.3 * fn(x))
    torch.testing.assert_close(
        Residual(fn, merge=ScaledAdd(alpha=2.0, beta=0.5))(x), 2 * x + 0.5 * fn(x)
    )


def test_deepnorm_scales_follow_the_paper() -> None:
    enc, dec = deepnorm_scales(encoder_layers=6)
    assert dec is None and enc is not None
    assert math.isclose(enc.alpha, 12**0.25) and math.isclose(enc.beta, 48**-0.25)
    enc, dec = deepnorm_scales(decoder_layers=6)
    assert enc is None and dec is not None and math.isclose(dec.alpha, 12**0.25)
    enc, dec = deepnorm_scales(encoder_layers=6, decoder_layers=6)
    assert enc is not None and dec is not None
    assert math.isclose(enc.alpha, 0.81 * (6**5) ** (1 / 16))
    assert math.isclose(enc.beta, 0.87 * (6**5) ** (-1 / 16))
    assert math.isclose(dec.alpha, 18**0.25) and math.isclose(dec.beta, 72**-0.25)
    with pytest.raises(ResidualError, match="give a positive encoder_layers"):
        deepnorm_scales()


def test_rezero_starts_as_identity_and_learns() -> None:
    block = Residual(nn.Linear(4, 4), merge=ReZero())
    x = torch.randn(5, 4)
    torch.testing.assert_close(block(x), x, atol=0, rtol=0)
    block(x).square().sum().backward()
    assert block.merge.alpha.grad is not None and block.merge.alpha.grad.abs() > 0
    assert "merge.alpha" in block.state_dict()


@pytest.mark.parametrize(
    ("layout", "shape", "view"),
    [("channels_last", (2, 5, 6), (6,)), ("channels_first", (2, 6, 3, 3), (6, 1, 1))],
    ids=["channels_last", "channels_first"],
)
def test_layerscale_is_per_channel_and_layout_aware(layout, shape, view) -> None:
    fn = nn.Identity()
    merge = LayerScale(6, layout=layout)
    assert torch.all(merge.gamma == 1e-5)
    with torch.no_grad():
        merge.gamma.copy_(torch.arange(6.0))
    x = torch.randn(shape)
    block = Residual(fn, merge=merge)
    torch.testing.assert_close(block(x), x + torch.arange(6.0).view(view) * x)


def test_layerscale_channel_mismatch_at_call() -> None:
    block = Residual(nn.Identity(), merge=LayerScale(8))
    with pytest.raises(
        ResidualError,
        match=r"^LayerScale: built for 8 channels \(layout not set: read as channels_last\), got a "
        r"branch output of shape \(2, 6\); if its channels are last \(\.\.\., C\), build it as "
        r"LayerScale\(6, layout='channels_last'\)$",
    ):
        block(torch.randn(2, 6))


def test_highway_gate_formula() -> None:
    fn = nn.Linear(4, 4)
    gate = HighwayGate(4, bias_init=-2.0)
    x = torch.randn(3, 4)
    g = torch.sigmoid(gate.proj(x))
    torch.testing.assert_close(Residual(fn, merge=gate)(x), g * fn(x) + (1 - g) * x)
    assert torch.all(gate.proj.bias == -2.0)


def test_highway_gate_channels_first() -> None:
    gate = HighwayGate(3, layout="channels_first")
    s, f = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    g = torch.sigmoid(
        torch.einsum("oc,nchw->nohw", gate.proj.weight, s) + gate.proj.bias.view(3, 1, 1)
    )
    torch.testing.assert_close(gate(s, f), g * f + (1 - g) * s)


def test_gru_gate_is_a_gru_cell_with_the_shortcut_as_hidden_state() -> None:
    gate = GRUGate(8)
    s, f = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = gate.gru(f.reshape(-1, 8), s.reshape(-1, 8)).view(2, 5, 8)
    torch.testing.assert_close(gate(s, f), expected, atol=0, rtol=0)
    # By hand: the GRU equations of Parisotto et al. 2019 with x = branch, h = shortcut.
    w_ih, w_hh, b_ih, b_hh = (
        gate.gru.weight_ih,
        gate.gru.weight_hh,
        gate.gru.bias_ih,
        gate.gru.bias_hh,
    )
    gi, gh = f @ w_ih.T + b_ih, s @ w_hh.T + b_hh
    r = torch.sigmoid(gi[..., :8] + gh[..., :8])
    z = torch.sigmoid(gi[..., 8:16] + gh[..., 8:16])
    n = torch.tanh(gi[..., 16:] + r * gh[..., 16:])
    torch.testing.assert_close(gate(s, f), (1 - z) * n + z * s, atol=1e-6, rtol=1e-5)


def test_merge_parameters_show_in_torchinfo_and_state_dict() -> None:
    block = Residual(nn.Linear(16, 16), merge=GRUGate(16))
    stats = torchinfo.summary(block, input_size=(2, 3, 16), verbose=0)
    rows = {(i.class_name, i.num_params) for i in stats.summary_list}
    assert ("GRUGate", 3 * 16 * 16 * 2 + 6 * 16) in rows
    assert any(k.startswith("merge.gru.") for k in block.state_dict())


def test_scaled_add_with_a_branch_scale_other_than_one() -> None:
    s, f = torch.randn(3, 6), torch.randn(3, 6)
    torch.testing.assert_close(ScaledAdd(beta=2.0)(s, f), s + 2.0 * f)
    torch.testing.assert_close(ScaledAdd(alpha=0.5, beta=2.0)(s, f), 0.5 * s + 2.0 * f)
    torch.testing.assert_close(ScaledAdd(alpha=3.0)(s, f), 3.0 * s + f)


@pytest.mark.parametrize("layers", [1, 6, 18, 100])
def test_deepnorm_scales_of_one_stack_are_the_papers(layers: int) -> None:
    # Wang et al. 2022, DeepNet, Table 1: encoder-only or decoder-only (N or M layers).
    enc, _ = deepnorm_scales(encoder_layers=layers)
    _, dec = deepnorm_scales(decoder_layers=layers)
    for scales in (enc, dec):
        assert scales is not None
        assert math.isclose(scales.alpha, (2 * layers) ** (1 / 4))
        assert math.isclose(scales.beta, (8 * layers) ** (-1 / 4))


def test_deepnorm_scales_refuse_a_negative_stack() -> None:
    for encoder_layers, decoder_layers in ((-1, 3), (3, -1), (0, 0)):
        with pytest.raises(
            ResidualError,
            match=rf"^deepnorm_scales: give a positive encoder_layers and/or decoder_layers, "
            rf"got encoder_layers={encoder_layers}, decoder_layers={decoder_layers}$",
        ):
            deepnorm_scales(encoder_layers=encoder_layers, decoder_layers=decoder_layers)


def test_rezero_with_a_learned_scale() -> None:
    merge = ReZero(init=0.5)
    s, f = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(merge(s, f), s + 0.5 * f)
    with torch.no_grad():
        merge.alpha.fill_(-1.5)
    torch.testing.assert_close(merge(s, f), s - 1.5 * f)


@pytest.mark.parametrize(
    ("layout", "shape"),
    [("channels_last", (5,)), ("channels_first", (2, 5)), ("channels_first", (2, 5, 3))],
)
def test_layerscale_on_the_fewest_dims_a_layout_allows(layout, shape) -> None:
    merge = LayerScale(5, init=0.0, layout=layout)
    with torch.no_grad():
        merge.gamma.copy_(torch.arange(1.0, 6.0))
    s, f = torch.randn(shape), torch.randn(shape)
    gamma = torch.arange(1.0, 6.0).view((5,) + (1,) * (len(shape) - 2 if len(shape) > 1 else 0))
    torch.testing.assert_close(merge(s, f), s + gamma * f)


@pytest.mark.parametrize("merge", [LayerScale, HighwayGate, GRUGate])
@pytest.mark.parametrize(
    ("layout", "shape"),
    [("channels_first", (5,)), ("channels_first", ()), ("channels_last", ())],
)
def test_a_branch_without_a_channel_dim_is_named(merge, layout, shape) -> None:
    name = merge.__name__
    with pytest.raises(
        ResidualError,
        match=rf"^{name}: built for 5 channels \({layout}\), got a branch output of shape "
        rf"{re.escape(str(shape))}; give it a channel dim or fix the layout$",
    ):
        merge(5, layout=layout)(torch.randn(shape), torch.randn(shape))


@pytest.mark.parametrize("merge", [LayerScale, HighwayGate, GRUGate])
def test_per_channel_merges_name_themselves_and_the_bad_argument(merge) -> None:
    name = merge.__name__
    with pytest.raises(ResidualError, match=rf"^{name}: dim must be a positive int, got 0$"):
        merge(0)
    with pytest.raises(TypeError, match=rf"^{name}: dim must be an int, got float 4\.0$"):
        merge(4.0)
    with pytest.raises(ResidualError, match=rf"^{name}: unknown layout 'nchw'; use"):
        merge(4, layout="nchw")
    with pytest.raises(
        ResidualError,
        match=rf"^{name}: built for 4 channels \(channels_first\), got a branch output of "
        rf"shape \(2, 3, 4\); if its channels are last \(\.\.\., C\), build it as "
        rf"{name}\(4, layout='channels_last'\); if its channels are at dim 1 \(N, C, \*spatial: "
        rf"a conv branch\), build it as {name}\(3, layout='channels_first'\)$",
    ):
        merge(4, layout="channels_first")(torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_gru_gate_channels_first_gates_every_position() -> None:
    gate = GRUGate(3, layout="channels_first")
    s, f = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    # position by position: the GRU cell on the channel vector at (n, h, w)
    expected = torch.empty_like(s)
    for n, h, w in itertools.product(range(2), range(4), range(5)):
        cell = gate.gru(f[n, :, h, w].unsqueeze(0), s[n, :, h, w].unsqueeze(0))
        expected[n, :, h, w] = cell[0]
    torch.testing.assert_close(gate(s, f), expected)
    assert gate.layout == "channels_first"


def test_laurel_rw_needs_two_logits_and_says_so() -> None:
    from residual.merges import LaurelRW

    message = "LaurelRW: init holds the two logits (alpha, beta), got (0.0, 0.0, 0.0)"
    with pytest.raises(ResidualError, match=f"^{re.escape(message)}$"):
        LaurelRW(init=(0.0, 0.0, 0.0))  # type: ignore[arg-type]


def test_laurel_rw_weights_take_the_streams_dtype() -> None:
    """bfloat16 streams get the weights rounded to bfloat16 first, as every other op in them."""
    from residual.merges import LaurelRW

    merge = LaurelRW(init=(0.7, -0.4))
    s, b = torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16()
    alpha, beta = torch.tensor([0.7, -0.4]).softmax(0).bfloat16().unbind()
    out = merge(s, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, alpha * b + beta * s, rtol=0, atol=0)


# --- per-channel merges on channels-first branches: the layout follows the block ----------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of (N, C, H, W): a custom forward, so the branch is opaque."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _convnext_branch(c: int) -> nn.Sequential:
    """ConvNeXt's block (Liu et al. 2022) as torchvision's CNBlock, einops for its Permute."""
    from einops.layers.torch import Rearrange

    return nn.Sequential(
        nn.Conv2d(c, c, 7, padding=3, groups=c),
        Rearrange("n c h w -> n h w c"),
        nn.LayerNorm(c),
        nn.Linear(c, 4 * c),
        nn.GELU(),
        nn.Linear(4 * c, c),
        Rearrange("n h w c -> n c h w"),
    )


def _set_gamma(merge: LayerScale, c: int) -> torch.Tensor:
    gamma = torch.linspace(0.5, 2.0, c)
    with torch.no_grad():
        merge.gamma.copy_(gamma)
    return gamma


C = 6  # the branches below see (N, C, H, W) inputs whose W == C: the silently wrong case


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(C, C, 3, padding=1),
        lambda: nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()),
        lambda: Residual(nn.Conv2d(C, C, 3, padding=1)),  # a nested residual block
        lambda: _convnext_branch(C),
        # sizes kept by two even kernels: no stride can be read, the layout still is
        lambda: nn.Sequential(nn.Conv2d(C, C, 2, padding=1), nn.Conv2d(C, C, 2)),
    ],
    ids=["conv", "sequential", "nested-residual", "convnext", "even-kernels"],
)
def test_layerscale_follows_a_channels_first_branch_when_w_equals_c(make) -> None:
    fn = make().eval()
    merge = LayerScale(C)
    block = Residual(fn, merge=merge)
    assert merge.layout == "channels_first"
    gamma = _set_gamma(merge, C)
    x = torch.randn(2, C, 5, C)
    torch.testing.assert_close(block(x), x + gamma.view(1, C, 1, 1) * fn(x))


def test_a_per_channel_merge_follows_the_layout_the_shortcut_declares() -> None:
    """An opaque branch beside a channels-first projection: the block's output is (N, C, H, W)."""

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    fn = Opaque()
    merge = LayerScale(8)
    block = Residual(fn, shortcut=ProjectionShortcut(4, 8, norm_layer=None), merge=merge).eval()
    assert merge.layout == "channels_first"
    gamma = _set_gamma(merge, 8)
    x = torch.randn(2, 4, 3, 8)
    expected = block.shortcut(x) + gamma.view(1, 8, 1, 1) * fn(x)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("merge", [HighwayGate, GRUGate])
def test_gates_follow_a_channels_first_branch(merge) -> None:
    fn = nn.Conv2d(C, C, 3, padding=1)
    followed = merge(C)
    block = Residual(fn, merge=followed)
    assert followed.layout == "channels_first"
    explicit = merge(C, layout="channels_first")
    explicit.load_state_dict(followed.state_dict())
    x = torch.randn(2, C, 3, C)
    torch.testing.assert_close(block(x), explicit(x, fn(x)))


def test_a_merge_built_for_the_other_layout_is_refused_at_build_with_a_fix_that_works() -> None:
    fn = nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(
        ResidualError,
        match=r"^Residual: merge LayerScale was built for 4 channels \(channels_last\) but the "
        r"branch outputs 4 \(channels_first\); build it with "
        r"LayerScale\(4, layout='channels_first'\)$",
    ):
        Residual(fn, merge=LayerScale(4, layout="channels_last"))
    merge = LayerScale(4, layout="channels_first")
    gamma = _set_gamma(merge, 4)
    x = torch.randn(2, 4, 3, 4)
    torch.testing.assert_close(Residual(fn, merge=merge)(x), x + gamma.view(1, 4, 1, 1) * fn(x))


class OpaqueConv(nn.Module):
    """A conv branch whose layout cannot be read (a custom forward)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _suggested(message: str, caller: str, layout: str) -> str:
    found = re.search(rf"{caller}\((\d+), layout='{layout}'\)", message)
    assert found is not None, message
    return found.group(1)


@pytest.mark.parametrize("merge", [LayerScale, HighwayGate, GRUGate])
def test_an_opaque_branch_with_convs_asks_for_the_layout_at_build(merge) -> None:
    """W == C: nothing at call time could tell the width from the channels; the block asks."""
    name = merge.__name__
    fn = OpaqueConv(C)
    with pytest.raises(ResidualError) as error:
        Residual(fn, merge=merge(C))
    message = str(error.value)
    assert message == (
        f"Residual: merge {name}({C}) has no layout, and the branch OpaqueConv holds "
        "convolutions but its output layout cannot be read (a custom forward); build it with "
        f"{name}({C}, layout='channels_first') for (N, C, *spatial) outputs, or "
        f"{name}({C}, layout='channels_last') for (..., C)"
    )
    fixed = merge(int(_suggested(message, name, "channels_first")), layout="channels_first")
    block = Residual(fn, merge=fixed)
    x = torch.randn(2, C, 5, C)
    if merge is LayerScale:
        gamma = _set_gamma(fixed, C)
        torch.testing.assert_close(block(x), x + gamma.view(1, C, 1, 1) * fn(x))
    else:
        torch.testing.assert_close(block(x), fixed(x, fn(x)))


class OpaqueTanh(nn.Module):
    """A branch without layers: nothing says where its channels are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def test_an_unreadable_branch_gets_both_fixes_at_call_and_the_layout_one_works() -> None:
    fn = OpaqueTanh()
    block = Residual(fn, merge=LayerScale(4))
    assert block.merge.layout is None  # nothing certain to follow: read as channels last
    x = torch.randn(2, 4, 3, 5)
    with pytest.raises(ResidualError) as error:
        block(x)
    message = str(error.value)
    assert "build it with dim=5" not in message
    # both readings, each with the constructor that fits it, the one keeping 4 channels first
    assert message.index("channels_first')") < message.index("channels_last')")
    assert _suggested(message, "LayerScale", "channels_first") == "4"
    assert _suggested(message, "LayerScale", "channels_last") == "5"
    merge = LayerScale(
        int(_suggested(message, "LayerScale", "channels_first")), layout="channels_first"
    )
    gamma = _set_gamma(merge, 4)
    torch.testing.assert_close(Residual(fn, merge=merge)(x), x + gamma.view(1, 4, 1, 1) * fn(x))


@pytest.mark.parametrize("merge", [LayerScale, HighwayGate, GRUGate])
def test_a_channels_last_merge_on_other_channels_names_the_dim_fix_and_it_works(merge) -> None:
    name = merge.__name__
    block = Residual(nn.Identity(), merge=merge(8))
    x = torch.randn(2, 5, 6)
    with pytest.raises(ResidualError) as error:
        block(x)
    message = str(error.value)
    assert message.startswith(f"{name}: built for 8 channels"), message
    fixed = merge(int(_suggested(message, name, "channels_last")), layout="channels_last")
    assert Residual(nn.Identity(), merge=fixed)(x).shape == x.shape


# --- merges in half precision: the stream keeps its dtype ---------------------------------------


def _merges() -> list[nn.Module]:
    from residual.merges import LaurelRW

    return [Add(), ScaledAdd(2.0, 0.5), ReZero(0.3), LayerScale(8, 0.3), HighwayGate(8),
            GRUGate(8), LaurelRW((0.2, -0.1))]  # fmt: skip


@pytest.mark.parametrize("index", range(7), ids=lambda i: type(_merges()[i]).__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_merge_keeps_a_half_stream_in_its_dtype_with_float32_parameters(index, dtype) -> None:
    """float32 parameters (autocast, or a model kept in float32) on a half stream: the merge
    returns the stream's dtype, as the plain add does, close to its float64 value."""
    torch.manual_seed(0)
    merge = _merges()[index]
    s, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out = merge(s.to(dtype), b.to(dtype))
    assert out.dtype == dtype
    exact = merge.double()(s.to(dtype).double(), b.to(dtype).double())
    torch.testing.assert_close(out.double(), exact, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("index", range(7), ids=lambda i: type(_merges()[i]).__name__)
def test_residual_in_fp32_merges_in_float32_on_a_bfloat16_model(index) -> None:
    torch.manual_seed(0)
    block = Residual(nn.Linear(8, 8), merge=_merges()[index], residual_in_fp32=True)
    block = block.bfloat16()
    x = torch.randn(2, 3, 8).bfloat16()
    out = block(x)
    assert out.dtype == torch.float32
    s, y = x.double(), block.fn(x).double()
    exact = block.merge.double()(s, y)
    torch.testing.assert_close(out.double(), exact, atol=0.02, rtol=0.02)


@pytest.mark.parametrize("index", range(7), ids=lambda i: type(_merges()[i]).__name__)
def test_a_merge_runs_under_bfloat16_autocast(index) -> None:
    torch.manual_seed(0)
    block = Residual(nn.Linear(8, 8), merge=_merges()[index])
    x = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.float32  # the float32 stream plus a bfloat16 branch
    torch.testing.assert_close(out, block(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("merge", [LayerScale, HighwayGate, GRUGate])
def test_a_merge_that_followed_the_branch_traces_with_fx_export_and_compile(merge) -> None:
    """einops' Rearrange does not FX-trace on its own, so FX gets the plain conv branch."""
    x = torch.randn(2, C, 5, C)
    conv = Residual(nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.GELU()), merge=merge(C))
    traced = torch.fx.symbolic_trace(conv)
    for sample in (x, x[0]):  # a batch, and one unbatched sample
        torch.testing.assert_close(traced(sample), conv(sample), atol=0, rtol=0)
    torch.compiler.reset()  # a fresh cache: the suite compiles many blocks
    compiled_conv = torch.compile(conv, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled_conv(x[0]), conv(x[0]), atol=1e-6, rtol=1e-6)
    block = Residual(_convnext_branch(C), merge=merge(C), drop_path=0.1).eval()
    expected = block(x)
    exported = torch.export.export(block, (x,)).module()
    torch.testing.assert_close(exported(x), expected, atol=1e-6, rtol=1e-6)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("merge", [LayerScale, HighwayGate, GRUGate])
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Conv2d(C, C, 3, padding=1), (C, C, 5)),  # H == C: the silently wrong case
        (lambda: nn.Conv2d(C, C, 3, padding=1), (C, 4, 5)),
        (lambda: nn.Conv1d(C, C, 3, padding=1), (C, 7)),
        (lambda: nn.Conv3d(C, C, 3, padding=1), (C, 3, C, 2)),
    ],
    ids=["conv2d-h-equals-c", "conv2d", "conv1d", "conv3d"],
)
def test_a_channels_first_merge_on_an_unbatched_sample_is_the_batch_of_one(
    merge, make, shape
) -> None:
    """nn.Conv2d takes one (C, H, W) sample; the merge beside it reads its channels at dim 0."""
    torch.manual_seed(0)
    fn = make()
    block = Residual(fn, merge=merge(C))
    if isinstance(block.merge, LayerScale):
        _set_gamma(block.merge, C)
    x = torch.randn(shape)
    torch.testing.assert_close(block(x), block(x.unsqueeze(0)).squeeze(0))


def test_a_lazy_conv_branch_still_gives_its_layout() -> None:
    """Its channels are unknown until the first forward; that it is channels first is not."""
    fn = nn.Sequential(nn.LazyConv2d(C, 3, padding=1))
    block = Residual(fn, merge=LayerScale(C))
    assert block.merge.layout == "channels_first"
    gamma = _set_gamma(block.merge, C)
    x = torch.randn(2, C, 5, C)
    torch.testing.assert_close(block(x), x + gamma.view(1, C, 1, 1) * fn(x))


def test_an_opaque_channels_first_branch_on_one_unbatched_sample_follows_the_sample_axis() -> None:
    # found by tests/test_seams.py: an opaque conv branch, LayerScale(C, channels_first) and one
    # unbatched (C, L) sample: the error advised channels_last, or C == L scaled L silently
    from residual.drop import SampleAxis

    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    x = torch.randn(4, 3)  # (C, L)
    block = Residual(Opaque(), merge=LayerScale(4, init=0.5, layout="channels_first"))
    with pytest.raises(ResidualError, match=r"sample_axis=SampleAxis\(0, batched_ndim=3\)"):
        block(x)
    fixed = Residual(
        Opaque(),
        merge=LayerScale(4, init=0.5, layout="channels_first"),
        sample_axis=SampleAxis(0, batched_ndim=3),
    )
    gamma = fixed.merge.gamma.detach().view(4, 1)
    torch.testing.assert_close(fixed(x), x + gamma * fixed.fn(x))
