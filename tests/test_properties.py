"""Property-based tests: random shapes, layouts, strides, channel counts, shortcuts, merges and
drop modes. The CI profile (conftest.py) runs 60 examples per property, derandomized."""

from __future__ import annotations

import copy
import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from residual import (
    GRUGate,
    HighwayGate,
    IdentityShortcut,
    LayerScale,
    PooledProjectionShortcut,
    ProjectionShortcut,
    Residual,
    ResidualBlock,
    ReZero,
    ScaledAdd,
    ZeroPadShortcut,
)


class Zero(nn.Module):
    """A branch that outputs zeros of a given channel count and stride."""

    def __init__(self, out_channels: int, stride: int, layout: str) -> None:
        super().__init__()
        self.out_channels, self.stride, self.layout = out_channels, stride, layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels_first":
            sub = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
            return sub.new_zeros(sub.shape[0], self.out_channels, *sub.shape[2:])
        sub = x[(slice(None),) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        return sub.new_zeros(*sub.shape[:-1], self.out_channels)


class Ramp(Zero):
    """A branch of the same output shape as :class:`Zero` whose values are not zero: the mean
    over channels of the subsampled input, times 1, 2, ... per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = super().forward(x)
        ramp = torch.arange(1.0, self.out_channels + 1)
        if self.layout == "channels_first":
            sub = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
            mean = sub.mean(dim=1, keepdim=True)
            return zeros + mean * ramp.view(-1, *[1] * (x.dim() - 2))
        sub = x[(slice(None),) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        return zeros + sub.mean(dim=-1, keepdim=True) * ramp


@st.composite
def configs(draw: st.DrawFn) -> dict:
    layout = draw(st.sampled_from(["channels_first", "channels_last"]))
    kind = draw(st.sampled_from(["identity", "projection", "zero_pad", "pooled_projection"]))
    if layout == "channels_last" and kind == "pooled_projection":
        kind = "projection"
    cin = draw(st.integers(1, 6))
    if kind == "identity":
        cout, stride = cin, 1
    else:
        cout = draw(st.integers(cin if kind == "zero_pad" else 1, 9))
        stride = draw(st.integers(1, 3))
    spatial = draw(
        st.lists(st.integers(1, 7), min_size=1 if layout == "channels_first" else 0, max_size=2)
    )
    batch = draw(st.integers(1, 4))
    return {
        "layout": layout,
        "kind": kind,
        "cin": cin,
        "cout": cout,
        "stride": stride,
        "spatial": spatial,
        "batch": batch,
    }


def shortcut_of(c: dict) -> nn.Module:
    if c["kind"] == "identity":
        return IdentityShortcut()
    if c["kind"] == "zero_pad":
        return ZeroPadShortcut(c["cin"], c["cout"], stride=c["stride"], layout=c["layout"])
    dims = max(1, len(c["spatial"]))
    if c["kind"] == "pooled_projection":
        return PooledProjectionShortcut(c["cin"], c["cout"], stride=c["stride"], spatial_dims=dims)
    return ProjectionShortcut(
        c["cin"], c["cout"], stride=c["stride"], layout=c["layout"], spatial_dims=dims
    )


def input_of(c: dict) -> torch.Tensor:
    if c["layout"] == "channels_first":
        return torch.randn(c["batch"], c["cin"], *c["spatial"])
    return torch.randn(c["batch"], *c["spatial"], c["cin"])


@given(configs())
def test_zero_branch_gives_post_of_shortcut(c: dict) -> None:
    shortcut = shortcut_of(c).eval()
    block = Residual(Zero(c["cout"], c["stride"], c["layout"]), shortcut, post=nn.Tanh()).eval()
    x = input_of(c)
    torch.testing.assert_close(block(x), torch.tanh(shortcut(x)), atol=0, rtol=0)


@given(configs())
def test_output_is_shortcut_plus_branch(c: dict) -> None:
    shortcut = shortcut_of(c).eval()
    branch = Ramp(c["cout"], c["stride"], c["layout"])
    block = Residual(nn.Sequential(branch, nn.Softsign()), shortcut).eval()
    x = input_of(c)
    expected = shortcut(x) + nn.functional.softsign(branch(x))
    assert expected.numel() == 0 or not torch.equal(expected, shortcut(x))  # a branch that counts
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)


@given(
    st.sampled_from(["zero_init", "rezero", "layerscale0"]), st.integers(1, 8), st.integers(1, 4)
)
def test_zero_initialised_branch_is_the_identity(kind: str, channels: int, batch: int) -> None:
    x = torch.randn(batch, channels, 5, 5)
    if kind == "zero_init":
        block = ResidualBlock(
            channels, channels, zero_init_residual=True, act_layer=nn.Identity
        ).eval()
    elif kind == "rezero":
        block = Residual(nn.Conv2d(channels, channels, 3, padding=1), merge=ReZero())
    else:
        block = Residual(
            nn.Conv2d(channels, channels, 3, padding=1),
            merge=LayerScale(channels, init=0.0, layout="channels_first"),
        )
    torch.testing.assert_close(block(x), x, atol=0, rtol=0)


@given(
    st.sampled_from(["row", "batch", "subset"]),
    st.floats(0.0, 0.9),
    st.integers(2, 6),
    st.sampled_from(["none", "scaled", "rezero", "highway", "gru"]),
)
def test_eval_outputs_do_not_depend_on_the_batch(
    mode: str, p: float, batch: int, merge: str
) -> None:
    merges = {
        "none": None,
        "scaled": ScaledAdd(1.5, 0.5),
        "rezero": ReZero(0.3),
        "highway": HighwayGate(4),
        "gru": GRUGate(4),
    }
    block = Residual(
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
        merge=merges[merge],
        drop_path=p,
        drop_mode=mode,
    )
    block(torch.randn(32, 4))  # move the statistics (a subset keeps >= 3 samples for BN)
    block.eval()
    x = torch.randn(batch, 4)
    whole = block(x)
    alone = torch.cat([block(x[i : i + 1]) for i in range(batch)])
    torch.testing.assert_close(whole, alone, atol=1e-6, rtol=1e-5)


@settings(max_examples=25)
@given(st.integers(1, 5), st.integers(1, 3), st.sampled_from(["linear", "conv"]))
def test_input_gradient_contains_the_identity_path(dim: int, batch: int, kind: str) -> None:
    fn = nn.Linear(dim, dim) if kind == "linear" else nn.Conv1d(dim, dim, 1)
    x = torch.randn(batch, dim) if kind == "linear" else torch.randn(batch, dim, 3)
    jac_h = torch.autograd.functional.jacobian(Residual(fn), x)
    jac_f = torch.autograd.functional.jacobian(fn, x)
    eye = torch.eye(x.numel()).view(*x.shape, *x.shape)
    torch.testing.assert_close(jac_h - jac_f, eye, atol=1e-6, rtol=0)


@settings(max_examples=20)
@given(configs())
def test_state_dict_pickle_and_deepcopy_round_trips(c: dict) -> None:
    def build() -> Residual:
        return Residual(Zero(c["cout"], c["stride"], c["layout"]), shortcut_of(c), post=nn.ReLU())

    block = build()
    x = input_of(c)
    block(x)  # move any norm statistics
    block.eval()
    fresh = build().eval()
    fresh.load_state_dict(block.state_dict())
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (fresh, loaded, copy.deepcopy(block)):
        torch.testing.assert_close(other(x), block(x), atol=0, rtol=0)


@settings(max_examples=6)
@given(
    st.sampled_from(["identity", "projection", "zero_pad", "pooled_projection"]),
    st.integers(1, 3),
    st.integers(3, 7),
)
def test_compiled_and_eager_agree(kind: str, stride: int, size: int) -> None:
    torch._dynamo.reset()
    cout = 4 if kind == "identity" else 8
    stride = 1 if kind == "identity" else stride
    block = ResidualBlock(4, cout, stride, shortcut=kind).eval()
    x = torch.randn(2, 4, size, size)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)
