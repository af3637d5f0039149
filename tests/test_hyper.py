"""Hyper-connections: exact plain residual at n = 1, small overhead at n = 4, the formula."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from residual import ResidualError
from residual.hyper import HyperBranch, StreamMix, expand_streams, hyper_residual, reduce_streams
from residual.models import FeedForward


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_one_stream_is_the_plain_residual_exactly(dynamic: bool, layout: str) -> None:
    fn = nn.Linear(8, 8) if layout == "channels_last" else nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(3, 5, 8) if layout == "channels_last" else torch.randn(3, 8, 4, 4)
    block = hyper_residual(fn, streams=1, dim=8, dynamic=dynamic, layout=layout)
    h = expand_streams(x, 1)
    torch.testing.assert_close(reduce_streams(block(h), 1), x + fn(x), atol=0, rtol=0)


def test_four_streams_formula_at_init_and_after_a_change() -> None:
    n, d = 4, 6
    fn = nn.Linear(d, d)
    block = hyper_residual(fn, streams=n, dim=d, layer_index=2, dynamic=False)
    h = torch.randn(n * 3, d)
    s = h.view(n, 3, d)
    # init: the branch reads stream 2, every stream gets x + fn(stream 2)... and keeps itself
    expected = s + fn(s[2]).unsqueeze(0)
    torch.testing.assert_close(block(h).view(n, 3, d), expected)
    with torch.no_grad():
        block.shortcut.mix.copy_(torch.randn(n, n))
        block.fn.width.copy_(torch.randn(n))
        block.fn.depth.copy_(torch.randn(n))
    mix, width, depth = block.shortcut.mix, block.fn.width, block.fn.depth
    x = (width.view(n, 1, 1) * s).sum(0)
    expected = torch.einsum("ij,inc->jnc", mix, s) + depth.view(n, 1, 1) * fn(x)
    torch.testing.assert_close(block(h).view(n, 3, d), expected, atol=1e-5, rtol=1e-5)


def test_parameter_overhead_at_d512_n4() -> None:
    fn = FeedForward(512, 2048, dropout=0.0, norm=nn.LayerNorm(512))
    base = sum(p.numel() for p in fn.parameters())
    dynamic = hyper_residual(fn, streams=4, dim=512)
    overhead = sum(p.numel() for p in dynamic.parameters()) - base
    # Am 4 + B 4 + Ar 16 + W_m 512 + W_beta 512 + W_r 2048 + 3 scales
    assert overhead == 4 + 4 + 16 + 512 + 512 + 2048 + 3
    static = hyper_residual(
        FeedForward(512, 2048, dropout=0.0, norm=nn.LayerNorm(512)),
        streams=4,
        dim=512,
        dynamic=False,
    )
    assert sum(p.numel() for p in static.parameters()) - base == 24


def test_dynamic_connections_learn() -> None:
    block = hyper_residual(nn.Linear(4, 4), streams=2, dim=4)
    h = expand_streams(torch.randn(5, 4), 2)
    reduce_streams(block(h), 2).square().sum().backward()
    assert block.shortcut.dynamic.weight.grad.abs().sum() > 0
    assert block.fn.width_dynamic.weight.grad.abs().sum() > 0


def test_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    block = hyper_residual(nn.Linear(4, 4), streams=3, dim=4)
    h = expand_streams(torch.randn(2, 4), 3)
    torch.testing.assert_close(
        torch.compile(block, fullgraph=True)(h), block(h), atol=1e-6, rtol=1e-5
    )


def test_errors() -> None:
    with pytest.raises(ResidualError, match="streams must be >= 1, got 0"):
        hyper_residual(nn.Linear(4, 4), streams=0, dim=4)
    with pytest.raises(ResidualError, match="not a multiple of streams=3.*expand_streams"):
        hyper_residual(nn.Linear(4, 4), streams=3, dim=4)(torch.randn(4, 4))
    with pytest.raises(ResidualError, match="must keep the stream's shape"):
        HyperBranch(nn.Linear(4, 2), 2, 4)(torch.randn(4, 4))
    with pytest.raises(ResidualError, match="positive int"):
        StreamMix(2, 0)


@pytest.mark.parametrize("shape", [(5,), (2, 3)], ids=["tokens", "batch-x-tokens"])
def test_token_mix_has_the_einsum_gradients(shape: tuple[int, ...]) -> None:
    from residual.streams._fold import token_mix

    n, c = 3, 4
    opts = {"dtype": torch.float64, "requires_grad": True}
    matrix, streams = torch.randn(*shape, n, n, **opts), torch.randn(n, *shape, c, **opts)
    torch.testing.assert_close(
        token_mix(matrix, streams), torch.einsum("...ij,j...c->i...c", matrix, streams)
    )
    assert torch.autograd.gradcheck(token_mix, (matrix, streams))


class _Masked(nn.Module):
    """``fn`` with the mask baked in: what a branch that passes the mask on must compute."""

    def __init__(self, fn: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.fn, self.mask = fn, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, key_padding_mask=self.mask)


def _stream_layer(kind: str, fn: nn.Module, dynamic: bool) -> nn.Module:
    from residual.hyper import frac_residual, mhc_residual

    make = {"hyper": hyper_residual, "mhc": mhc_residual, "frac": frac_residual}[kind]
    block = make(fn, 2, 16, dynamic=dynamic)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # connections off their init, so the branch input mixes the streams
        for name, p in block.named_parameters():
            if not name.startswith("fn.fn."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return block


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", ["hyper", "mhc", "frac"])
def test_stream_branches_pass_masks_and_extra_arguments_to_fn(kind: str, dynamic: bool) -> None:
    """Before: "HyperBranch.forward() got an unexpected keyword argument 'key_padding_mask'".
    The mask is per sample, ``(N, L)``, for the stream-sized branch input ``(N, L, C)``."""
    from conftest import MySelfAttention

    torch.manual_seed(0)
    streams = 1 if kind == "frac" else 2
    block = _stream_layer(kind, MySelfAttention(16, 4), dynamic)
    n, length = 3, 5
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[1, 3:] = True  # sample 1: its last two positions are padding
    h = torch.randn(streams * n, length, 16)
    out = block(h, key_padding_mask=pad)
    baked = copy.deepcopy(block)
    baked.fn.fn = _Masked(baked.fn.fn, pad)
    torch.testing.assert_close(out, baked(h), atol=0, rtol=0)
    torch.testing.assert_close(block(h, pad), out, atol=0, rtol=0)  # positionally too
    # the padded keys reach no other position: change them in every stream
    moved = h.clone().view(streams, n, length, 16)
    moved[:, 1, 3:] += 5.0
    again = block(moved.view_as(h), key_padding_mask=pad).view(streams, n, length, 16)
    kept = out.view(streams, n, length, 16)
    torch.testing.assert_close(again[:, 1, :3], kept[:, 1, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(block(moved.view_as(h))[:, :3], block(h)[:, :3], atol=1e-3)


class _MaskedStack(nn.Module):
    """A user's model that hands a padding mask to its stream layers."""

    def __init__(self, kind: str, dynamic: bool) -> None:
        super().__init__()
        from conftest import MySelfAttention

        self.streams = 1 if kind == "frac" else 2
        self.layers = nn.ModuleList(
            _stream_layer(kind, MySelfAttention(16, 4), dynamic) for _ in range(2)
        )

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = expand_streams(x, self.streams)
        for layer in self.layers:
            h = layer(h, key_padding_mask=pad)
        return reduce_streams(h, self.streams)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("kind", ["hyper", "mhc", "frac"])
def test_fx_traces_masks_through_stream_layers(kind: str, dynamic: bool) -> None:
    torch.manual_seed(0)
    model = _MaskedStack(kind, dynamic)
    x, pad = torch.randn(3, 5, 16), torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 4:] = True
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x, pad), model(x, pad))
    # a branch traced on its own records fn(x) alone, and refuses extra arguments later
    branch = torch.fx.symbolic_trace(model.layers[0].fn)
    h = expand_streams(x, model.streams)
    torch.testing.assert_close(branch(h), model.layers[0].fn(h))
    with pytest.raises(TypeError, match="traced with torch.fx.symbolic_trace on its own"):
        branch(h, key_padding_mask=pad)
