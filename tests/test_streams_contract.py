"""The multi-stream residuals' contract, token by token: every message whole, every default by
value, every branch of the code (one stream or several, static or dynamic, channels first or
last, 2-d and 4-d) against a reference written from the module docstrings' formulas, in float64
with random non-zero connection parameters, forward and every gradient (the written-out
backwards of the token mix, the skinny matmul and Sinkhorn included); the reversible stack's
inverse and memory-saving backward against plain autograd."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from residual import Residual, ResidualError
from residual.hyper import (
    FracBranch,
    FracMix,
    HyperBranch,
    MHCBranch,
    MHCMix,
    StreamMix,
    expand_streams,
    frac_residual,
    hyper_residual,
    mhc_residual,
    reduce_streams,
    sinkhorn,
)
from residual.reversible import Reversible, ReversibleSequence
from residual.streams._fold import (
    _normed_matmul,
    layer_normed_matmul,
    stream_spread,
    stream_sum,
    thin_product,
    token_mix,
)
from residual.streams.mhc import _flat_rms_projection, _rms_projection

F32 = torch.float32
F64 = torch.float64
LAYOUT_HINT = (
    "; use 'channels_first' (N, C, *spatial: conv) or 'channels_last' (..., C: MLP, RNN, "
    "Transformer)"
)
EXPAND_HINT = "; expand the input with expand_streams(x, streams) first"


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def kept_shape(caller: str, before: tuple[int, ...], after: tuple[int, ...]) -> str:
    return exact(
        f"{caller}: fn turned {before} into {after}; a hyper-connected branch must keep the "
        "stream's shape"
    )


def check_argument_messages(name: str, make: Any, count: str, dim: int) -> None:
    """A constructor's count (streams, fracs), dim and layout checks, messages whole."""
    with pytest.raises(
        ResidualError, match=exact(f"{name}: {count} must be a positive int, got 0")
    ):
        make(0, dim)
    with pytest.raises(ResidualError, match=exact(f"{name}: dim must be a positive int, got 0")):
        make(2, 0)
    with pytest.raises(TypeError, match=exact(f"{name}: dim must be an int, got float 8.0")):
        make(2, 8.0)
    with pytest.raises(ResidualError, match=exact(f"{name}: unknown layout 'nchw'{LAYOUT_HINT}")):
        make(2, dim, layout="nchw")


def default_parts(make: Any, branch: type, mix: type, count: int, dim: int) -> tuple[Any, Any]:
    """``make(fn, count, dim)`` at its defaults: its two parts; no post, no drop, channels last."""
    fn = nn.Linear(dim, dim)
    block = make(fn, count, dim)
    assert isinstance(block.fn, branch) and isinstance(block.shortcut, mix) and block.fn.fn is fn
    assert block.post is None and block.drop is None and block.drop_path == 0.0
    assert block.fn.layout == block.shortcut.layout == "channels_last"
    return block.fn, block.shortcut


def layer_norm(t: Tensor) -> Tensor:
    """Over the last dim, no affine, eps 1e-5 (the connections' statistics)."""
    return (t - t.mean(-1, keepdim=True)) / (t.var(-1, correction=0, keepdim=True) + 1e-5).sqrt()


def sinkhorn_loop(logits: Tensor, iters: int) -> Tensor:
    m = torch.exp(logits)
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def randomise(block: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    """Every parameter (the branch's too) random and non-zero, float64."""
    block.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * scale)
    return block


# (layout, the per-stream input shape for N = 2, d = 4): a 2-d and a 3-d sequence, a 4-d image
SHAPES = {
    "last-2d": ("channels_last", (2, 4)),
    "last-3d": ("channels_last", (2, 3, 4)),
    "first-4d": ("channels_first", (2, 4, 3, 2)),
}


def inner(layout: str, d: int = 4) -> nn.Module:
    return nn.Linear(d, d) if layout == "channels_last" else nn.Conv2d(d, d, 1)


def to_last(t: Tensor, layout: str, dim: int) -> Tensor:
    return t.movedim(dim, -1) if layout == "channels_first" else t


def to_native(t: Tensor, layout: str, dim: int) -> Tensor:
    return t.movedim(-1, dim) if layout == "channels_first" else t


def check_value_and_grads(block: nn.Module, reference: Any, h: Tensor, seed: int) -> None:
    """Forward and the gradients of the input and of every parameter, against ``reference``."""
    h = h.detach().requires_grad_()
    out = block(h)
    expected = reference(h)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    wrt = [h, *block.parameters()]
    got = torch.autograd.grad((out * weight).sum(), wrt, allow_unused=True)
    want = torch.autograd.grad((expected * weight).sum(), wrt, allow_unused=True)
    names = ["input", *(name for name, _ in block.named_parameters())]
    for name, a, b in zip(names, got, want, strict=True):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


# --- hyper-connections ----------------------------------------------------------------------


def hyper_reference(block: Residual, h: Tensor, n: int, layout: str) -> Tensor:
    """H'_j = sum_i Ar_ij(H) H_i + B_j(H) fn(sum_i Am_i(H) H_i), each coefficient plus
    s * tanh(layer_norm(H_i) W) when dynamic."""
    branch, mix = block.fn, block.shortcut
    s = to_last(h.unflatten(0, (n, -1)), layout, 2)  # (n, N, ..., C)
    normed = layer_norm(s)
    tokens = s.shape[1:-1]
    ar = mix.mix.view(n, *([1] * len(tokens)), n)  # [i, ..., j]
    am = branch.width.view(n, *([1] * len(tokens)))
    b = branch.depth.view(n, *([1] * len(tokens)))
    if mix.dynamic is not None:
        ar = ar + mix.dynamic.scale * torch.tanh(normed @ mix.dynamic.weight)
        am = (
            am
            + branch.width_dynamic.scale * torch.tanh(normed @ branch.width_dynamic.weight)[..., 0]
        )
        b = (
            b
            + branch.depth_dynamic.scale * torch.tanh(normed @ branch.depth_dynamic.weight)[..., 0]
        )
    x = torch.einsum("i...,i...c->...c", am.expand(s.shape[:-1]), s)
    y = to_last(branch.fn(to_native(x, layout, 1)), layout, 1)
    out = torch.einsum("i...j,i...c->j...c", ar.expand(*s.shape[:-1], n), s)
    out = out + b.expand(s.shape[:-1]).unsqueeze(-1) * y
    return to_native(out, layout, 2).flatten(0, 1)


def test_hyper_defaults_by_value() -> None:
    branch, mix = default_parts(hyper_residual, HyperBranch, StreamMix, 3, 4)
    assert torch.equal(branch.width.data, torch.tensor([1.0, 0.0, 0.0]))  # layer_index 0
    assert torch.equal(branch.depth.data, torch.ones(3))
    assert torch.equal(mix.mix.data, torch.eye(3))
    for dyn, outputs in ((branch.width_dynamic, 1), (branch.depth_dynamic, 1), (mix.dynamic, 3)):
        assert dyn is not None
        assert torch.equal(dyn.weight.data, torch.zeros(4, outputs))
        assert torch.equal(dyn.scale.data, torch.tensor(0.01))
    assert mix.extra_repr() == "streams=3, dim=4, layout='channels_last'"
    assert branch.extra_repr() == "streams=3, dim=4, layout='channels_last'"
    alone = HyperBranch(nn.Identity(), 3, 4, layer_index=4)  # the defaults of the classes
    assert torch.equal(alone.width.data, torch.tensor([0.0, 1.0, 0.0]))  # 4 mod 3
    assert alone.width_dynamic is not None and alone.layout == "channels_last"
    assert StreamMix(2, 4).dynamic is not None and StreamMix(2, 4).layout == "channels_last"
    assert torch.equal(HyperBranch(nn.Identity(), 2, 4).width.data, torch.tensor([1.0, 0.0]))


def test_hyper_options_reach_the_parts() -> None:
    post = nn.Identity()
    block = hyper_residual(
        nn.Conv2d(4, 4, 1),
        2,
        4,
        layer_index=3,
        dynamic=False,
        layout="channels_first",
        post=post,
        drop_path=0.25,
    )
    assert block.post is post and block.drop_path == 0.25
    assert block.fn.layout == block.shortcut.layout == "channels_first"
    assert block.fn.width_dynamic is None and block.fn.depth_dynamic is None
    assert block.shortcut.dynamic is None
    assert torch.equal(block.fn.width.data, torch.tensor([0.0, 1.0]))  # 3 mod 2
    assert "dynamic" not in dict(block.named_modules())


def test_hyper_at_init_reads_stream_layer_index_and_copies_back() -> None:
    fn = nn.Linear(4, 4).double()
    h = torch.randn(3 * 2, 4, dtype=F64)
    block = hyper_residual(fn, 3, 4, layer_index=2).double()
    s = h.view(3, 2, 4)
    torch.testing.assert_close(block(h).view(3, 2, 4), s + fn(s[2]))


def test_expand_and_reduce_streams_by_value() -> None:
    x = torch.randn(2, 3)
    h = expand_streams(x, 3)
    assert torch.equal(h, torch.cat([x, x, x]))
    assert torch.equal(expand_streams(x, 1), x)
    h = torch.randn(6, 3)
    assert torch.equal(reduce_streams(h, 3), h[:2] + h[2:4] + h[4:])
    assert torch.equal(reduce_streams(h, 2), h[:3] + h[3:])
    assert torch.equal(reduce_streams(h, 1), h)


def test_hyper_messages_whole() -> None:
    x = torch.randn(2, 3)
    for name, call in (("expand_streams", expand_streams), ("reduce_streams", reduce_streams)):
        with pytest.raises(
            ResidualError, match=exact(f"{name}: streams must be a positive int, got 0")
        ):
            call(x, 0)
        with pytest.raises(
            TypeError, match=exact(f"{name}: streams must be an int, got float 2.0")
        ):
            call(x, 2.0)  # type: ignore[arg-type]
    with pytest.raises(
        ResidualError, match=exact("reduce_streams: batch dim 5 is not a multiple of streams=2")
    ):
        reduce_streams(torch.randn(5, 3), 2)
    for cls in (StreamMix, lambda n, d, **kw: HyperBranch(nn.Identity(), n, d, **kw)):
        name = "StreamMix" if cls is StreamMix else "HyperBranch"
        check_argument_messages(name, cls, "streams", 4)
        with pytest.raises(
            ResidualError,
            match=exact(
                f"hyper-connections: batch dim 5 is not a multiple of streams=2{EXPAND_HINT}"
            ),
        ):
            cls(2, 4)(torch.randn(5, 4))
    with pytest.raises(
        TypeError, match=exact("HyperBranch: fn must be a torch.nn.Module, got int")
    ):
        HyperBranch(3, 2, 4)  # type: ignore[arg-type]
    with pytest.raises(ResidualError, match=kept_shape("HyperBranch", (3, 4), (3, 2))):
        HyperBranch(nn.Linear(4, 2), 2, 4, dynamic=False)(torch.randn(6, 4))
    with pytest.raises(
        TypeError, match=exact("hyper_residual: fn must be a torch.nn.Module, got str")
    ):
        hyper_residual("fn", 2, 4)  # type: ignore[arg-type]
    for bad in (0, -2):
        with pytest.raises(
            ResidualError, match=exact(f"hyper_residual: streams must be >= 1, got {bad}")
        ):
            hyper_residual(nn.Linear(4, 4), bad, 4)
    with pytest.raises(
        TypeError, match=exact("HyperBranch: streams must be an int, got bool True")
    ):
        hyper_residual(nn.Linear(4, 4), True, 4)
    with pytest.raises(
        TypeError, match=exact("HyperBranch: streams must be an int, got float 0.5")
    ):
        hyper_residual(nn.Linear(4, 4), 0.5, 4)  # type: ignore[arg-type]
    for n in (1, 2):  # valid counts build
        assert hyper_residual(nn.Linear(4, 4), n, 4).fn.streams == n


# --- the written-out kernels ----------------------------------------------------------------


@pytest.mark.parametrize("grads", ["both", "matrix", "streams"])
def test_token_mix_gradients_by_value_broadcast_matrix(grads: str) -> None:
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(1, 3, 3, generator=gen, dtype=F64)  # one matrix for all 5 tokens
    streams = torch.randn(3, 5, 2, generator=gen, dtype=F64)
    matrix.requires_grad_(grads in ("both", "matrix"))
    streams.requires_grad_(grads in ("both", "streams"))
    wrt = [t for t in (matrix, streams) if t.requires_grad]
    weight = torch.randn(3, 5, 2, generator=gen, dtype=F64)
    out = token_mix(matrix, streams)
    expected = torch.einsum("...ij,j...c->i...c", matrix, streams)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    got = torch.autograd.grad((out * weight).sum(), wrt)
    want = torch.autograd.grad((expected * weight).sum(), wrt)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("w_shape", [(4, 2), (3, 1, 4, 2)], ids=["shared", "per-stream"])
def test_thin_product_is_the_matmul(w_shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, generator=gen, dtype=F64)
    w = torch.randn(w_shape, generator=gen, dtype=F64)
    torch.testing.assert_close(thin_product(x, w), x @ w, atol=1e-12, rtol=0)


def grads_by_value(fn: Any, ref: Any, inputs: list[Tensor], wrt: list[bool], seed: int) -> None:
    """``fn`` equals ``ref`` (float64, to 1e-12) in value and in the gradient of every input
    marked in ``wrt``, taken through a random weighting of the output."""
    gen = torch.Generator().manual_seed(seed)
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip(inputs, wrt, strict=True)]
    out, expected = fn(*leaves), ref(*leaves)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    weight = torch.randn(out.shape, generator=gen, dtype=F64)
    chosen = [t for t in leaves if t.requires_grad]
    got = torch.autograd.grad((out * weight).sum(), chosen)
    want = torch.autograd.grad((expected * weight).sum(), chosen)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


WRT = {"both": [True, True], "first": [True, False], "second": [False, True]}


def layer_norm_then_matmul(x: Tensor, w: Tensor) -> Tensor:
    return nn.functional.layer_norm(x, x.shape[-1:]) @ w


@pytest.mark.parametrize("grads", list(WRT))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("k", [1, 3])
def test_layer_normed_matmul_is_layer_norm_then_matmul(grads: str, layout: str, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    x = 2 * torch.randn(3, 5, 6, generator=gen, dtype=F64) + 0.5
    if layout == "strided":  # channels moved last from a channels-first tensor: not contiguous
        x = torch.randn(3, 6, 5, generator=gen, dtype=F64).movedim(1, -1)
    w = torch.randn(6, k, generator=gen, dtype=F64)
    grads_by_value(layer_normed_matmul, layer_norm_then_matmul, [x, w], WRT[grads], k)
    assert torch.autograd.gradgradcheck(
        layer_normed_matmul, (x.requires_grad_(), w.requires_grad_())
    )


def test_layer_normed_matmul_centres_before_squaring() -> None:
    # A mean 1000 stds from zero: E[x²] - E[x]² would lose every digit of the variance in
    # float32; the variance of the centred rows keeps layer_norm's accuracy.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=gen) + 1000.0
    w = torch.randn(256, 4, generator=gen)
    exact_out = layer_norm_then_matmul(x.double(), w.double())
    torch.testing.assert_close(layer_normed_matmul(x, w).double(), exact_out, atol=2e-2, rtol=0)
    torch.testing.assert_close(layer_norm_then_matmul(x, w).double(), exact_out, atol=2e-2, rtol=0)


def per_token_weights(shape: str, n: int, gen: torch.Generator) -> Tensor:
    return torch.randn((n, 5, 1) if shape == "per-token" else (n, 1, 1), generator=gen, dtype=F64)


@pytest.mark.parametrize("grads", list(WRT))
@pytest.mark.parametrize("shape", ["per-token", "per-stream"])
def test_stream_sum_and_spread_by_value(grads: str, shape: str) -> None:
    gen = torch.Generator().manual_seed(4)
    w = per_token_weights(shape, 3, gen)
    streams, x = torch.randn(3, 5, 4, generator=gen, dtype=F64), torch.randn(5, 4, dtype=F64)
    grads_by_value(stream_sum, lambda a, b: (a * b).sum(0), [w, streams], WRT[grads], 5)
    grads_by_value(stream_spread, lambda a, b: a * b, [w, x], WRT[grads], 6)
    for fn, args in ((stream_sum, (w, streams)), (stream_spread, (w, x))):
        leaves = tuple(t.detach().clone().requires_grad_() for t in args)
        assert torch.autograd.gradgradcheck(fn, leaves)


def rms_projection_reference(last: Tensor, weight: Tensor) -> Tensor:
    n, channels = last.shape[0], last.shape[-1]
    scale = torch.rsqrt(last.square().sum((0, -1)) / (n * channels) + 1e-6).unsqueeze(-1)
    return torch.einsum("i...c,ick->...k", last, weight) * scale


@pytest.mark.parametrize("grads", list(WRT))
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_flat_rms_projection_by_value(grads: str, layout: str) -> None:
    gen = torch.Generator().manual_seed(7)
    last = torch.randn(3, 2, 5, 4, generator=gen, dtype=F64)
    if layout == "strided":
        last = torch.randn(3, 2, 4, 5, generator=gen, dtype=F64).movedim(2, -1)
    weight = torch.randn(3, 4, 6, generator=gen, dtype=F64)
    grads_by_value(_flat_rms_projection, rms_projection_reference, [last, weight], WRT[grads], 8)
    leaves = (last.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_())
    assert torch.autograd.gradgradcheck(_flat_rms_projection, leaves)


def test_kernels_keep_float32_statistics_for_bfloat16_streams() -> None:
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 6, 16, generator=gen) + 3).bfloat16()  # a mean bfloat16 would round
    w = torch.randn(16, 3, generator=gen).bfloat16()
    phi = torch.randn(2, 16, 5, generator=gen).bfloat16()
    out, mean, rstd = _normed_matmul(x, w, 1e-5)
    assert (out.dtype, mean.dtype, rstd.dtype) == (torch.bfloat16, F32, F32)
    # as close to the float64 truth as torch's own bfloat16 layer_norm then matmul (0.018 here;
    # subtracting mean * 1ᵀw after a bfloat16 product of the raw rows would be off by ~0.1)
    truth = layer_norm_then_matmul(x.double(), w.double())
    torch_error = (layer_norm_then_matmul(x, w).double() - truth).abs().max()
    assert (out.double() - truth).abs().max() <= 1.5 * torch_error
    proj, scale = _rms_projection(x, phi, 1e-6)
    assert (proj.dtype, scale.dtype) == (torch.bfloat16, F32)
    truth = rms_projection_reference(x.double(), phi.double())
    assert (proj.double() - truth).abs().max() <= 2**-7 * truth.abs().max()


@pytest.mark.parametrize("make", [hyper_residual, mhc_residual, frac_residual])
def test_bfloat16_layers_stay_bfloat16_forward_and_backward(make: Any) -> None:
    torch.manual_seed(10)
    block = make(nn.Linear(16, 16), 4, 16)
    for p in block.parameters():  # dynamic parts away from their zero init
        p.data.add_(0.05 * torch.randn_like(p))
    h = torch.randn(4 * 3, 5, 16)
    low = copy.deepcopy(block).bfloat16()
    out, ref = low(h.bfloat16().requires_grad_()), block(h.requires_grad_())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    out.float().square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(low.named_parameters(), block.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16, name
        scale = q.grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(p.grad.float() / scale, q.grad / scale, atol=0.1, rtol=0.05)


# --- mHC --------------------------------------------------------------------------------------


def mhc_reference(block: Residual, h: Tensor, n: int, layout: str) -> Tensor:
    """The mHC equations of residual.streams.mhc, token by token (channels moved last)."""
    branch, mix = block.fn, block.shortcut
    s = to_last(h.unflatten(0, (n, -1)), layout, 2)  # (n, N, ..., C)
    channels = s.shape[-1]
    lead = s.shape[1:-1]
    if branch.weight is None:
        pre = torch.sigmoid(branch.pre_bias).expand(*lead, n)
        post = (2 * torch.sigmoid(branch.post_bias)).expand(*lead, n)
        res = sinkhorn_loop(mix.res_bias, mix.sinkhorn_iters).expand(*lead, n, n)
    else:
        scale = torch.rsqrt(s.square().sum((0, -1)) / (n * channels) + 1e-6).unsqueeze(-1)
        prepost = torch.einsum("i...c,ick->...k", s, branch.weight) * scale  # x' phi
        pre = torch.sigmoid(branch.pre_scale * prepost[..., :n] + branch.pre_bias)
        post = 2 * torch.sigmoid(branch.post_scale * prepost[..., n:] + branch.post_bias)
        logits = (torch.einsum("i...c,ick->...k", s, mix.weight) * scale).unflatten(-1, (n, n))
        res = sinkhorn_loop(mix.res_scale * logits + mix.res_bias, mix.sinkhorn_iters)
    x = torch.einsum("...i,i...c->...c", pre, s)
    y = to_last(branch.fn(to_native(x, layout, 1)), layout, 1)
    out = torch.einsum("...ij,j...c->i...c", res, s) + post.movedim(-1, 0).unsqueeze(-1) * y
    return to_native(out, layout, 2).flatten(0, 1)


def test_mhc_matrix_by_value() -> None:
    mix = randomise(MHCMix(2, 4, sinkhorn_iters=3), seed=3)
    h = torch.randn(2 * 5, 4, dtype=F64)
    s = h.view(2, 5, 4)
    scale = torch.rsqrt(s.square().sum((0, -1)) / 8 + 1e-6).unsqueeze(-1)
    logits = (torch.einsum("inc,ick->nk", s, mix.weight) * scale).view(5, 2, 2)
    expected = sinkhorn_loop(mix.res_scale * logits + mix.res_bias, 3)
    torch.testing.assert_close(mix.matrix(h), expected, atol=1e-12, rtol=0)
    static = randomise(MHCMix(2, 4, dynamic=False, sinkhorn_iters=3), seed=3)
    torch.testing.assert_close(static.matrix(), sinkhorn_loop(static.res_bias, 3))
    torch.testing.assert_close(static.matrix(h), sinkhorn_loop(static.res_bias, 3))


def test_sinkhorn_default_iterations_are_twenty() -> None:
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(4), dtype=F64) * 6
    assert (sinkhorn_loop(logits, 20) - sinkhorn_loop(logits, 21)).abs().max() > 1e-9
    torch.testing.assert_close(sinkhorn(logits), sinkhorn_loop(logits, 20), atol=1e-12, rtol=0)
    mix = MHCMix(3, 2, dynamic=False)
    with torch.no_grad():
        mix.res_bias.copy_(logits)
    torch.testing.assert_close(mix.double().matrix(), sinkhorn_loop(logits, 20))
    block = mhc_residual(nn.Identity(), 3, 2)
    assert block.shortcut.sinkhorn_iters == 20


def test_mhc_defaults_by_value() -> None:
    branch, mix = default_parts(mhc_residual, MHCBranch, MHCMix, 3, 4)
    assert torch.equal(branch.pre_bias.data, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(branch.post_bias.data, torch.zeros(3))
    assert branch.weight is not None and torch.equal(branch.weight.data, torch.zeros(3, 4, 6))
    assert mix.weight is not None and torch.equal(mix.weight.data, torch.zeros(3, 4, 9))
    for scale in (branch.pre_scale, branch.post_scale, mix.res_scale):
        assert scale is not None and torch.equal(scale.data, torch.tensor(0.01))
    assert torch.equal(mix.res_bias.data, torch.eye(3))
    assert mix.extra_repr() == "streams=3, dim=4, sinkhorn_iters=20, layout='channels_last'"
    assert branch.extra_repr() == "streams=3, dim=4, layout='channels_last'"
    alone = MHCBranch(nn.Identity(), 3, 4, layer_index=5)
    assert torch.equal(alone.pre_bias.data, torch.tensor([0.0, 0.0, 1.0]))
    assert alone.weight is not None and alone.layout == "channels_last"
    assert MHCMix(2, 4).weight is not None and MHCMix(2, 4).sinkhorn_iters == 20
    assert MHCMix(2, 4).layout == "channels_last"


def test_mhc_options_reach_the_parts() -> None:
    post = nn.Identity()
    block = mhc_residual(
        nn.Conv2d(4, 4, 1),
        2,
        4,
        dynamic=False,
        sinkhorn_iters=7,
        layer_index=3,
        layout="channels_first",
        post=post,
        drop_path=0.25,
    )
    assert block.post is post and block.drop_path == 0.25
    branch, mix = block.fn, block.shortcut
    assert branch.layout == mix.layout == "channels_first" and mix.sinkhorn_iters == 7
    assert branch.weight is branch.pre_scale is branch.post_scale is None
    assert mix.weight is mix.res_scale is None
    assert torch.equal(branch.pre_bias.data, torch.tensor([0.0, 1.0]))
    one = mhc_residual(nn.Linear(4, 4), 1, 4, post=post, drop_path=0.5)  # the plain residual
    assert type(one.fn) is nn.Linear and one.post is post and one.drop_path == 0.5
    assert [name for name, _ in one.named_parameters()] == ["fn.weight", "fn.bias"]


def test_mhc_messages_whole() -> None:
    with pytest.raises(
        ResidualError, match=exact("sinkhorn: expected (..., n, n) logits, got shape (3,)")
    ):
        sinkhorn(torch.zeros(3))
    with pytest.raises(
        ResidualError, match=exact("sinkhorn: expected (..., n, n) logits, got shape (2, 2, 3)")
    ):
        sinkhorn(torch.zeros(2, 2, 3))
    with pytest.raises(ResidualError, match=exact("sinkhorn: iters must be a positive int, got 0")):
        sinkhorn(torch.zeros(2, 2), 0)
    with pytest.raises(TypeError, match=exact("sinkhorn: iters must be an int, got float 2.0")):
        sinkhorn(torch.zeros(2, 2), 2.0)  # type: ignore[arg-type]
    torch.testing.assert_close(sinkhorn(torch.zeros(1, 1)), torch.ones(1, 1))  # 2-d, n = 1
    for name, make in (
        ("MHCMix", lambda *a, **kw: MHCMix(*a, **kw)),
        ("MHCBranch", lambda *a, **kw: MHCBranch(nn.Identity(), *a, **kw)),
    ):
        check_argument_messages(name, make, "streams", 4)
        for dynamic in (True, False):
            with pytest.raises(
                ResidualError,
                match=exact(f"{name}: batch dim 5 is not a multiple of streams=2{EXPAND_HINT}"),
            ):
                make(2, 4, dynamic=dynamic)(torch.randn(5, 4))
    with pytest.raises(
        ResidualError, match=exact("MHCMix: sinkhorn_iters must be a positive int, got 0")
    ):
        MHCMix(2, 4, sinkhorn_iters=0)
    with pytest.raises(
        ResidualError, match=exact("MHCMix.matrix: a dynamic H_res depends on the streams; pass h")
    ):
        MHCMix(2, 4).matrix()
    with pytest.raises(
        ResidualError,
        match=exact(f"MHCMix: batch dim 3 is not a multiple of streams=2{EXPAND_HINT}"),
    ):
        MHCMix(2, 4).matrix(torch.randn(3, 4))
    with pytest.raises(
        ResidualError, match=exact("mhc_residual: streams must be a positive int, got 0")
    ):
        mhc_residual(nn.Linear(4, 4), 0, 4)
    for dynamic in (True, False):
        with pytest.raises(ResidualError, match=kept_shape("MHCBranch", (3, 4), (3, 2))):
            MHCBranch(nn.Linear(4, 2), 2, 4, dynamic=dynamic)(torch.randn(6, 4))


# --- frac-connections -----------------------------------------------------------------------


def frac_reference(block: Residual, x: Tensor, m: int, layout: str) -> Tensor:
    """in_j = sum_i Y_ij F_i; F'_j = sum_i A_ij F_i + sum_i B_ij T_i, row i of each matrix plus
    s * tanh(layer_norm(F_i) W) when dynamic."""
    branch, mix = block.fn, block.shortcut
    f = to_last(x, layout, 1).unflatten(-1, (m, -1))  # (N, ..., m, c)

    def rows(static: Tensor, dynamic: nn.Module | None) -> Tensor:
        if dynamic is None:
            return static
        return static + dynamic.scale * torch.tanh(layer_norm(f) @ dynamic.weight)

    inputs = torch.einsum("...ij,...ic->...jc", rows(branch.width, branch.width_dynamic), f)
    out = branch.fn(to_native(inputs.flatten(-2), layout, 1))
    t = to_last(out, layout, 1).unflatten(-1, (m, -1))
    res = torch.einsum("...ij,...ic->...jc", rows(mix.mix, mix.dynamic), f)
    res = res + torch.einsum("...ij,...ic->...jc", rows(branch.depth, branch.depth_dynamic), t)
    return to_native(res.flatten(-2), layout, 1)


# (kind, streams or fracs): the one-stream fast paths, n = 2 and n = 3, fractions of 1 and 2
FORMULAS = [
    ("hyper", 1),
    ("hyper", 2),
    ("hyper", 3),
    ("mhc", 2),
    ("mhc", 3),
    ("frac", 1),
    ("frac", 2),
]


@pytest.mark.parametrize(("kind", "count"), FORMULAS, ids=[f"{k}{c}" for k, c in FORMULAS])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize(("layout", "shape"), SHAPES.values(), ids=SHAPES.keys())
def test_formula_and_gradients_by_value(
    kind: str, count: int, dynamic: bool, layout: str, shape: tuple[int, ...]
) -> None:
    """Every connection's forward and gradients against its docstring's formula."""
    options: dict[str, Any] = {"dynamic": dynamic, "layout": layout}
    if kind == "mhc":
        options["sinkhorn_iters"] = 3
    make, reference = {
        "hyper": (hyper_residual, hyper_reference),
        "mhc": (mhc_residual, mhc_reference),
        "frac": (frac_residual, frac_reference),
    }[kind]
    block = randomise(make(inner(layout), count, 4, **options), seed=count)
    batch = shape[0] if kind == "frac" else count * shape[0]  # streams fold into the batch
    h = torch.randn(batch, *shape[1:], dtype=F64)
    check_value_and_grads(block, lambda t: reference(block, t, count, layout), h, count)


def test_frac_defaults_and_options_by_value() -> None:
    branch, mix = default_parts(frac_residual, FracBranch, FracMix, 4, 8)
    assert (branch.fracs, branch.dim, mix.fracs, mix.dim) == (4, 8, 4, 8)
    for p in (branch.width, branch.depth, mix.mix):
        assert torch.equal(p.data, torch.eye(4))
    for dyn in (branch.width_dynamic, branch.depth_dynamic, mix.dynamic):
        assert dyn is not None
        assert torch.equal(dyn.weight.data, torch.zeros(2, 4))
        assert torch.equal(dyn.scale.data, torch.tensor(0.01))
    assert mix.extra_repr() == "fracs=4, dim=8, layout='channels_last'"
    assert branch.extra_repr() == "fracs=4, dim=8, layout='channels_last'"
    assert FracMix(2, 4).dynamic is not None and FracMix(2, 4).layout == "channels_last"
    alone = FracBranch(nn.Identity(), 2, 4)
    assert alone.width_dynamic is not None and alone.layout == "channels_last"
    post = nn.Identity()
    block = frac_residual(
        nn.Conv2d(8, 8, 1), 2, 8, dynamic=False, layout="channels_first", post=post, drop_path=0.5
    )
    assert block.post is post and block.drop_path == 0.5
    assert block.fn.layout == block.shortcut.layout == "channels_first"
    assert block.fn.width_dynamic is block.fn.depth_dynamic is block.shortcut.dynamic is None
    same = frac_residual(nn.Linear(8, 8), 4, 8, layer_index=3)  # accepted, changes nothing
    assert torch.equal(same.fn.width.data, torch.eye(4))


def test_frac_messages_whole() -> None:
    for name, make in (
        ("FracMix", lambda *a, **kw: FracMix(*a, **kw)),
        ("FracBranch", lambda *a, **kw: FracBranch(nn.Identity(), *a, **kw)),
    ):
        with pytest.raises(
            ResidualError,
            match=exact(
                f"{name}: dim=10 does not split into fracs=4 equal fractions; use a fracs that "
                "divides 10"
            ),
        ):
            make(4, 10)
        check_argument_messages(name, make, "fracs", 8)
    with pytest.raises(ResidualError, match=kept_shape("FracBranch", (3, 8), (3, 4))):
        FracBranch(nn.Linear(8, 4), 2, 8)(torch.randn(3, 8))


# --- reversible -----------------------------------------------------------------------------


class Constant(nn.Module):
    """An output that does not depend on the input: its input gradient is None."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.value.expand_as(x)


class Half(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[..., :1]


def mlp(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.Tanh())


def plain(seq: ReversibleSequence, x: Tensor) -> Tensor:
    for block in seq.blocks:
        x1, x2 = x.chunk(2, dim=block.dim)
        y1 = x1 + block.f(x2)
        x = torch.cat([y1, x2 + block.g(y1)], dim=block.dim)
    return x


def check_reversible_grads(seq: ReversibleSequence, x: Tensor, create_graph: bool) -> None:
    """Values, inverse and gradients of the memory-saving stack against plain autograd (its
    differentiable backward too, with ``create_graph``)."""
    x = x.detach().requires_grad_()
    out = seq(x)
    assert type(out.grad_fn).__name__ == "_ReversibleFunctionBackward"
    expected = plain(seq, x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(seq.inverse(out.detach()), x.detach(), atol=1e-10, rtol=0)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    params = [p for p in seq.parameters() if p.requires_grad]
    got = torch.autograd.grad(
        (out * weight).sum(), [x, *params], allow_unused=True, create_graph=create_graph
    )
    want = torch.autograd.grad((expected * weight).sum(), [x, *params], allow_unused=True)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_reversible_shared_blocks_constant_branch_and_frozen_parameters(
    create_graph: bool,
) -> None:
    torch.manual_seed(0)
    f, g = mlp(2).double(), Constant((3, 2)).double()
    frozen = mlp(2).double().requires_grad_(False)
    seq = ReversibleSequence(Reversible(f, g), Reversible(frozen, f), Reversible(f, g))
    check_reversible_grads(seq, torch.randn(3, 4, dtype=F64), create_graph)


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_reversible_channels_first_stack_by_value(create_graph: bool) -> None:
    torch.manual_seed(1)

    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh())

    seq = ReversibleSequence(
        *(Reversible(conv(), conv(), layout="channels_first") for _ in range(2))
    ).double()
    assert [b.dim for b in seq.blocks] == [1, 1]
    check_reversible_grads(seq, torch.randn(2, 4, 3, 3, dtype=F64), create_graph)


def test_reversible_eval_and_no_grad_run_the_plain_blocks() -> None:
    seq = ReversibleSequence(Reversible(mlp(2), mlp(2))).double()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert type(seq(x).grad_fn).__name__ == "_ReversibleFunctionBackward"
    seq.eval()
    out = seq(x)
    assert type(out.grad_fn).__name__ == "CatBackward0"  # autograd's own graph
    torch.testing.assert_close(out, plain(seq, x))
    seq.train()
    with torch.no_grad():
        assert seq(x).grad_fn is None


def test_reversible_defaults_and_inverse_by_value() -> None:
    f, g = mlp(3).double(), mlp(3).double()
    block = Reversible(f, g)
    assert block.layout == "channels_last" and block.dim == -1
    assert block.extra_repr() == "layout='channels_last'"
    y = torch.randn(2, 6, dtype=F64)
    y1, y2 = y[:, :3], y[:, 3:]
    x2 = y2 - g(y1)
    torch.testing.assert_close(block.inverse(y), torch.cat([y1 - f(x2), x2], -1))
    first = Reversible(nn.Identity(), nn.Identity(), layout="channels_first")
    assert first.dim == 1 and first.extra_repr() == "layout='channels_first'"


def test_reversible_messages_whole() -> None:
    with pytest.raises(
        ResidualError,
        match=exact(
            "Reversible: f maps 4 -> 8 channels (stride 1); both functions must keep the shape "
            "of a half"
        ),
    ):
        Reversible(nn.Linear(4, 8), nn.Identity())
    with pytest.raises(
        ResidualError,
        match=exact(
            "Reversible: g maps 4 -> 4 channels (stride 2); both functions must keep the shape "
            "of a half"
        ),
    ):
        Reversible(nn.Identity(), nn.Conv2d(4, 4, 3, stride=2, padding=1), layout="channels_first")
    with pytest.raises(TypeError, match=exact("Reversible: g must be a torch.nn.Module, got int")):
        Reversible(nn.Identity(), 3)  # type: ignore[arg-type]
    with pytest.raises(ResidualError, match=exact(f"Reversible: unknown layout 'x'{LAYOUT_HINT}")):
        Reversible(nn.Identity(), nn.Identity(), layout="x")  # type: ignore[arg-type]
    block = Reversible(nn.Identity(), nn.Identity(), layout="channels_first")
    with pytest.raises(
        ResidualError,
        match=exact(
            "Reversible: the stream has 5 channels (channels_first, shape (2, 5, 3)); a "
            "reversible split needs an even count"
        ),
    ):
        block(torch.randn(2, 5, 3))
    with pytest.raises(
        ResidualError,
        match=exact(
            "Reversible: g turned a half of shape (2, 3) into (2, 1); both functions must keep "
            "the shape"
        ),
    ):
        Reversible(nn.Identity(), Half())(torch.randn(2, 6))
    with pytest.raises(
        ResidualError,
        match=exact(
            "Reversible: f turned a half of shape (2, 3) into (2, 1); both functions must keep "
            "the shape"
        ),
    ):
        ReversibleSequence(Reversible(Half(), nn.Identity()))(torch.randn(2, 6, requires_grad=True))
    ok = Reversible(nn.Identity(), nn.Identity())
    with pytest.raises(
        TypeError, match=exact("ReversibleSequence: block 1 is Linear, not Reversible")
    ):
        ReversibleSequence(ok, nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(
        ResidualError, match=exact("ReversibleSequence: give at least one Reversible block")
    ):
        ReversibleSequence()


MODE_TAIL = (
    ". The backward recomputes each block from its output, and in another mode the "
    "recomputation differs (dropout, batch statistics), which would give wrong gradients; call "
    ".train() / .eval() before the forward or after the backward"
)


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_reversible_mode_switch_messages_whole(create_graph: bool) -> None:
    def run(seq: ReversibleSequence, switch: Any, changed: str, block: int) -> None:
        x = torch.randn(2, 4, requires_grad=True)
        out = seq(x)
        switch(seq)
        prefix = f"ReversibleSequence: block {block} changed mode between forward and backward: "
        with pytest.raises(ResidualError, match=exact(prefix + changed + MODE_TAIL)):
            torch.autograd.grad(out.sum(), [x], create_graph=create_graph)

    def make() -> ReversibleSequence:
        return ReversibleSequence(
            Reversible(nn.Linear(2, 2), nn.Dropout(0.0)),
            Reversible(nn.Sequential(nn.Linear(2, 2)), nn.Dropout(0.0)),
        )

    run(
        make(),
        lambda s: s.eval(),
        "the block (train -> eval), f (train -> eval), g (train -> eval)",
        0,
    )
    seq = make()
    seq.blocks[1].g.eval()
    run(seq, lambda s: s.blocks[1].g.train(), "g (eval -> train)", 1)
    run(make(), lambda s: s.blocks[1].f.append(nn.Identity()), "its submodules", 1)


# --- symbolic tracing: the shape-reading helpers are leaves ---------------------------------


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize(("layout", "shape"), SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("make", [hyper_residual, mhc_residual], ids=["hyper", "mhc"])
def test_symbolic_trace_equals_eager(
    make: Any, dynamic: bool, layout: str, shape: tuple[int, ...]
) -> None:
    block = randomise(make(inner(layout), 2, 4, dynamic=dynamic, layout=layout), seed=7)
    h = torch.randn(2 * shape[0], *shape[1:], dtype=F64)
    torch.testing.assert_close(torch.fx.symbolic_trace(block)(h), block(h), atol=1e-12, rtol=0)


def test_mhc_matrix_reads_channel_first_streams_in_their_layout() -> None:
    """The per-token H_res of channel-first streams is that of the same streams channel-last."""
    torch.manual_seed(0)
    first = MHCMix(2, 4, layout="channels_first").double()
    last = MHCMix(2, 4).double()
    with torch.no_grad():
        for p in first.parameters():
            p.copy_(torch.randn_like(p))
    last.load_state_dict(first.state_dict())
    h = torch.randn(2 * 3, 4, 5, dtype=torch.float64)  # (n * N, C, L)
    torch.testing.assert_close(first.matrix(h), last.matrix(h.movedim(1, -1)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "logits",
    [[[60.0, 60.0, 60.0]] * 3, [[100.0, 99.0], [-100.0, -101.0]]],
    ids=["large", "rows-far-apart"],
)
def test_sinkhorn_is_stable_for_large_and_far_apart_logits(logits: list[list[float]]) -> None:
    """exp after subtracting each row's max: no overflow, and no row underflowing to 0 / 0."""
    m = sinkhorn(torch.tensor(logits))
    n = len(logits)
    torch.testing.assert_close(m, torch.full((n, n), 1.0 / n))


# --- the stream against the layer: width, layout, rank, dtype ---------------------------------

# name: make(dim, layout, dynamic, fn) for every part that reads a stream; count: streams / fracs
PARTS: dict[str, Any] = {
    "StreamMix": lambda d, layout, dynamic, fn: StreamMix(2, d, dynamic=dynamic, layout=layout),
    "HyperBranch": lambda d, layout, dynamic, fn: HyperBranch(
        fn, 2, d, dynamic=dynamic, layout=layout
    ),
    "MHCMix": lambda d, layout, dynamic, fn: MHCMix(2, d, dynamic=dynamic, layout=layout),
    "MHCBranch": lambda d, layout, dynamic, fn: MHCBranch(fn, 2, d, dynamic=dynamic, layout=layout),
    "FracMix": lambda d, layout, dynamic, fn: FracMix(2, d, dynamic=dynamic, layout=layout),
    "FracBranch": lambda d, layout, dynamic, fn: FracBranch(
        fn, 2, d, dynamic=dynamic, layout=layout
    ),
}
LAYERS: dict[str, Any] = {  # the blocks a user builds: the shortcut's check speaks first
    "StreamMix": lambda d, layout, dynamic, fn: hyper_residual(
        fn, 2, d, dynamic=dynamic, layout=layout
    ),
    "MHCMix": lambda d, layout, dynamic, fn: mhc_residual(fn, 2, d, dynamic=dynamic, layout=layout),
    "FracMix": lambda d, layout, dynamic, fn: frac_residual(
        fn, 2, d, dynamic=dynamic, layout=layout
    ),
}


def width_message(name: str, dim: int, layout: str, got: int, shape: tuple, fix: str) -> str:
    axis = "the last axis" if layout == "channels_last" else "axis 1"
    return exact(
        f"{name}: built with dim={dim}, layout={layout!r}: {axis} must be {dim}, got {got} "
        f"(shape {shape}); build it with {fix}"
    )


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", [*PARTS, *(f"layer-{k}" for k in LAYERS)])
def test_a_stream_of_the_wrong_width_or_layout_names_dim_and_layout(name: str, dynamic: bool):
    """Before: an unflatten or bmm error naming neither (dynamic), or a silent run (static)."""
    make = LAYERS[name[6:]] if name.startswith("layer-") else PARTS[name]
    caller = name[6:] if name.startswith("layer-") else name
    # channels last, wrong width: (2 * 3, 5, 4) into dim=8
    h = torch.randn(2 * 3, 5, 4)
    with pytest.raises(
        ResidualError, match=width_message(caller, 8, "channels_last", 4, (6, 5, 4), "dim=4")
    ):
        make(8, "channels_last", dynamic, nn.Identity())(h)
    assert make(4, "channels_last", dynamic, nn.Identity())(h).shape == h.shape  # the fix
    # a channels-first stream into a channels-last layer, and the other way round
    img = torch.randn(2 * 3, 8, 4, 6)
    fix = "layout='channels_first' or dim=6"
    with pytest.raises(
        ResidualError, match=width_message(caller, 8, "channels_last", 6, (6, 8, 4, 6), fix)
    ):
        make(8, "channels_last", dynamic, nn.Conv2d(8, 8, 1))(img)
    assert make(8, "channels_first", dynamic, nn.Conv2d(8, 8, 1))(img).shape == img.shape
    assert make(6, "channels_last", dynamic, nn.Identity())(img).shape == img.shape
    nhwc = img.permute(0, 2, 3, 1)
    fix = "layout='channels_last' or dim=4"
    with pytest.raises(
        ResidualError, match=width_message(caller, 8, "channels_first", 4, (6, 4, 6, 8), fix)
    ):
        make(8, "channels_first", dynamic, nn.Identity())(nhwc)
    assert make(8, "channels_last", dynamic, nn.Identity())(nhwc).shape == nhwc.shape
    assert make(4, "channels_first", dynamic, nn.Identity())(nhwc).shape == nhwc.shape


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", ["FracMix", "FracBranch", "layer-FracMix"])
def test_frac_width_that_fracs_does_not_divide_names_a_fracs_that_does(name: str, dynamic: bool):
    make = LAYERS[name[6:]] if name.startswith("layer-") else PARTS[name]
    caller = name[6:] if name.startswith("layer-") else name
    x = torch.randn(3, 9)  # built with dim=8, fracs=2: 9 channels split into no 2 fractions
    with pytest.raises(
        ResidualError,
        match=width_message(caller, 8, "channels_last", 9, (3, 9), "dim=9 and fracs=1"),
    ):
        make(8, "channels_last", dynamic, nn.Identity())(x)
    fixed = FracMix(1, 9, dynamic=dynamic) if "Mix" in name else FracBranch(nn.Identity(), 1, 9)
    assert fixed(x).shape == x.shape
    with pytest.raises(
        ResidualError,
        match=width_message("FracMix", 8, "channels_last", 6, (3, 6), "dim=6 and fracs=3"),
    ):
        FracMix(4, 8, dynamic=dynamic)(torch.randn(3, 6))
    assert FracMix(3, 6, dynamic=dynamic)(torch.randn(3, 6)).shape == (3, 6)


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", [k for k in PARTS if not k.startswith("Frac")])
def test_a_stream_without_a_channel_axis_is_refused(name: str, dynamic: bool, layout: str):
    rows = torch.randn(6)
    with pytest.raises(
        ResidualError,
        match=exact(
            f"{name}: built with dim=4, layout={layout!r}: expects a stream tensor (streams * N, "
            "..., C), got shape (6,); give each row its channels, x.unsqueeze(-1), and build it "
            "with dim=1"
        ),
    ):
        PARTS[name](4, layout, dynamic, nn.Identity())(rows)
    fixed = PARTS[name](1, layout, dynamic, nn.Identity())
    assert fixed(rows.unsqueeze(-1)).shape == (6, 1)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", ["FracMix", "FracBranch"])
def test_an_unbatched_hidden_state_is_channels_last(name: str, dynamic: bool) -> None:
    state = torch.randn(6)  # a frac layer reads an unbatched hidden state (d,) channels last
    assert PARTS[name](6, "channels_last", dynamic, nn.Identity())(state).shape == (6,)
    with pytest.raises(
        ResidualError,
        match=exact(
            f"{name}: built with dim=6, layout='channels_first': expects a tensor (N, C, ...), "
            "got shape (6,); build it with layout='channels_last' for one unbatched hidden "
            "state (C,)"
        ),
    ):
        PARTS[name](6, "channels_first", dynamic, nn.Identity())(state)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", [*PARTS, *(f"layer-{k}" for k in LAYERS)])
def test_a_stream_of_another_dtype_names_both_and_the_casts(name: str, dynamic: bool) -> None:
    """Before: torch's "expected m1 and m2 to have the same dtype" or "expected scalar type
    Float but found BFloat16". Under autocast the mix stays allowed."""
    make = LAYERS[name[6:]] if name.startswith("layer-") else PARTS[name]
    caller = name[6:] if name.startswith("layer-") else name
    layer = make(8, "channels_last", dynamic, nn.Linear(8, 8))
    h = torch.randn(2 * 3, 8).bfloat16()
    with pytest.raises(
        TypeError,
        match=exact(
            f"{caller}: a torch.bfloat16 stream into a layer of torch.float32 parameters; cast "
            "the layer (layer.to(torch.bfloat16)) or the stream (x.to(torch.float32)), or run "
            "it under torch.autocast"
        ),
    ):
        layer(h)
    assert layer(h.float()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(h).shape == h.shape
    assert layer.to(torch.bfloat16)(h).dtype == torch.bfloat16


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("make", [hyper_residual, mhc_residual, frac_residual])
def test_torch_func_grad_equals_autograd(make: Any, dynamic: bool) -> None:
    """``torch.func.grad`` over ``functional_call``: the written-out kernels override
    ``setup_context`` (before: "In order to use an autograd.Function with functorch transforms
    ... it must override the setup_context staticmethod" for the dynamic layers and mHC)."""
    block = randomise(make(nn.Linear(4, 4), 2, 4, dynamic=dynamic), seed=11)
    h = torch.randn(2 * 3, 5, 4, dtype=F64)
    params = {k: v.detach() for k, v in block.named_parameters()}

    def loss(p: dict[str, Tensor], h: Tensor) -> Tensor:
        return torch.func.functional_call(block, p, (h,)).square().sum()

    got, got_h = torch.func.grad(loss, argnums=(0, 1))(params, h)
    h_ = h.clone().requires_grad_()
    want = torch.autograd.grad(block(h_).square().sum(), [*block.parameters(), h_])
    for (name, g), w in zip(got.items(), want, strict=False):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-9, msg=name)
    torch.testing.assert_close(got_h, want[-1], atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("make", [hyper_residual, mhc_residual, frac_residual])
def test_channels_last_memory_format_is_kept(make: Any, dynamic: bool) -> None:
    """A channels-first stream stored channels last (``torch.channels_last``, as conv nets run
    on CPU and GPU) stays so, as through a plain ``Residual``, with the same values. Before: the
    static hyper-/mHC layers returned it contiguous (their flat ``(n, -1)`` matmul copied it)."""
    block = randomise(
        make(nn.Conv2d(4, 4, 3, padding=1), 2, 4, dynamic=dynamic, layout="channels_first"), seed=12
    )
    h = torch.randn(2 * 3, 4, 5, 6, dtype=F64)
    stored = h.to(memory_format=torch.channels_last)
    out = block(stored)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, block(h), atol=1e-12, rtol=0)
    stored.requires_grad_()
    block(stored).sum().backward()
    assert stored.grad is not None
