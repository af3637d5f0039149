"""mHC (manifold-constrained hyper-connections): the paper's formula, Sinkhorn, the properties."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from residual import Residual, ResidualError
from residual.hyper import MHCBranch, MHCMix, expand_streams, mhc_residual, reduce_streams, sinkhorn


def randomise(module: nn.Module, seed: int, scale: float) -> None:
    """Every connection parameter (not the branch's) drawn at random, ~``scale`` logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("fn.fn."):
                continue
            fan_in = p.shape[0] * p.shape[1] if p.dim() == 3 else 1  # phi: n*C inputs per logit
            p.copy_(torch.randn(p.shape, generator=gen) * scale / fan_in**0.5)


def reference(block: Residual, h: Tensor, n: int) -> Tensor:
    """The paper's equations per token, on (N, n, C) tokens, from the parameters of ``block``."""
    branch, mix = block.fn, block.shortcut
    channels = h.shape[-1]
    tokens = h.view(n, -1, channels).transpose(0, 1)  # (N, n, C)
    flat = nn.functional.rms_norm(tokens.reshape(len(tokens), -1), (n * channels,), eps=1e-6)
    if branch.weight is None:
        pre_logits, post_logits = branch.pre_bias.expand(len(tokens), n), branch.post_bias
        res_logits = mix.res_bias
    else:
        prepost = flat @ branch.weight.reshape(n * channels, 2 * n)
        pre_logits = branch.pre_scale * prepost[:, :n] + branch.pre_bias
        post_logits = branch.post_scale * prepost[:, n:] + branch.post_bias
        res = (flat @ mix.weight.reshape(n * channels, n * n)).view(-1, n, n)
        res_logits = mix.res_scale * res + mix.res_bias
    h_pre, h_post = torch.sigmoid(pre_logits), 2 * torch.sigmoid(post_logits)
    m = torch.exp(res_logits)  # Sinkhorn-Knopp: rows, then columns, 20 times
    for _ in range(mix.sinkhorn_iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    y = branch.fn((h_pre.unsqueeze(-1) * tokens).sum(1))  # (N, C)
    out = m @ tokens + h_post.unsqueeze(-1) * y.unsqueeze(1)  # (N, n, C)
    return out.transpose(0, 1).reshape(h.shape)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_the_paper_formula_with_random_parameters(dynamic: bool) -> None:
    torch.manual_seed(0)
    n, d = 4, 6
    block = mhc_residual(nn.Linear(d, d), streams=n, dim=d, dynamic=dynamic, layer_index=1)
    randomise(block, seed=1, scale=1.0)
    h = torch.randn(n * 5, d)
    torch.testing.assert_close(block(h), reference(block, h, n), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_one_stream_is_exactly_the_plain_residual(dynamic: bool) -> None:
    fn = nn.Linear(8, 8)
    block = mhc_residual(fn, streams=1, dim=8, dynamic=dynamic)
    x = torch.randn(3, 5, 8)
    assert torch.equal(reduce_streams(block(expand_streams(x, 1)), 1), x + fn(x))
    assert not any(n for n, _ in block.named_parameters() if not n.startswith("fn."))


class Zero(nn.Module):
    """A branch whose contribution is zero (and that still sees its input)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.0


@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 5),
    dynamic=st.booleans(),
    scale=st.floats(0.0, 1.0),
    big=st.floats(1.0, 6.0),
)
def test_the_shortcut_keeps_the_sum_and_bounds_every_stream(
    seed: int, n: int, dynamic: bool, scale: float, big: float
) -> None:
    """With the branch's contribution zero: the sum over streams is kept for any parameters
    (the columns of H_res sum to 1 after every round), and no stream exceeds the largest input
    stream once Sinkhorn has converged (logits of size ~1 and 50 rounds: rows within 1e-7)."""
    torch.manual_seed(seed)
    h = torch.randn(n * 3, 2, 4, dtype=torch.float64) * 3
    for size, iters in ((big, 20), (scale, 50)):
        block = mhc_residual(
            Zero(), streams=n, dim=4, dynamic=dynamic, sinkhorn_iters=iters
        ).double()
        randomise(block, seed, size)
        out = block(h)
        torch.testing.assert_close(reduce_streams(out, n), reduce_streams(h, n))
    largest = h.view(n, -1).abs().amax(0)
    assert bool((out.view(n, -1).abs() <= largest * (1 + 1e-6) + 1e-12).all())


@settings(max_examples=20)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 6), iters=st.integers(1, 30))
def test_sinkhorn_columns_sum_to_one_and_rows_converge(seed: int, n: int, iters: int) -> None:
    logits = torch.randn(7, n, n, generator=torch.Generator().manual_seed(seed)).double()
    m = sinkhorn(logits, iters)
    assert bool((m >= 0).all())
    torch.testing.assert_close(m.sum(-2), torch.ones(7, n, dtype=torch.float64))
    rows = (sinkhorn(logits * 0.5, 50).sum(-1) - 1).abs().max()
    assert rows < 1e-6


def test_sinkhorn_gradients_are_right() -> None:
    logits = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 7), (logits,))


def test_layer_gradients_are_right() -> None:
    torch.manual_seed(0)
    block = mhc_residual(nn.Linear(3, 3), streams=2, dim=3, sinkhorn_iters=5).double()
    randomise(block, seed=2, scale=1.0)
    h = torch.randn(2 * 2, 3, dtype=torch.float64, requires_grad=True)
    weight = block.shortcut.weight.detach().clone().requires_grad_()

    def layer(h: Tensor, weight: Tensor) -> Tensor:
        params = {"shortcut.weight": weight}
        return torch.func.functional_call(block, params, (h,))

    assert torch.autograd.gradcheck(layer, (h, weight))


def test_channels_first_equals_channels_last() -> None:
    torch.manual_seed(0)
    n, d = 3, 4
    last = mhc_residual(nn.Linear(d, d), streams=n, dim=d)
    first = mhc_residual(nn.Conv2d(d, d, 1), streams=n, dim=d, layout="channels_first")
    randomise(last, seed=3, scale=1.0)
    with torch.no_grad():
        first.fn.fn.weight.copy_(last.fn.fn.weight.view(d, d, 1, 1))
        first.fn.fn.bias.copy_(last.fn.fn.bias)
    first.load_state_dict(
        {k: v for k, v in last.state_dict().items() if ".fn." not in k}, strict=False
    )
    h = torch.randn(n * 2, d, 3, 3)
    out = first(h)
    expected = last(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_static_matrix_is_doubly_stochastic_at_init_and_parameter_count() -> None:
    mix = MHCMix(4, 8, dynamic=False)
    m = mix.matrix()
    torch.testing.assert_close(m.sum(0), torch.ones(4))
    torch.testing.assert_close(m.sum(1), torch.ones(4))
    assert m[0, 0] > m[0, 1]  # b_res = I: each stream mostly keeps itself
    block = mhc_residual(nn.Identity(), streams=4, dim=8)
    # b_pre 4 + b_post 4 + b_res 16 + phi (4*8) x (4 + 4 + 16) + three gates
    assert sum(p.numel() for p in block.parameters()) == 24 + 32 * 24 + 3


@pytest.mark.parametrize("layer_index", [None, 0, 1, 6])
def test_b_pre_favours_the_layer_index_stream_at_init(layer_index: int | None) -> None:
    kwargs = {} if layer_index is None else {"layer_index": layer_index}
    branch = MHCBranch(nn.Identity(), 4, 8, **kwargs)  # the default is layer 0
    want = torch.zeros(4)
    want[(layer_index or 0) % 4] = 1.0
    torch.testing.assert_close(branch.pre_bias.detach(), want)
    assert torch.equal(mhc_residual(nn.Identity(), 4, 8, **kwargs).fn.pre_bias.detach(), want)


def test_symbolic_trace_equals_eager() -> None:
    torch.manual_seed(0)
    stack = nn.Sequential(*(mhc_residual(nn.Linear(4, 4), 3, 4, layer_index=i) for i in range(2)))
    randomise(stack, seed=4, scale=1.0)
    h = torch.randn(3 * 2, 5, 4)
    traced = torch.fx.symbolic_trace(stack)
    torch.testing.assert_close(traced(h), stack(h))


def test_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    block = mhc_residual(nn.Linear(4, 4), streams=3, dim=4, sinkhorn_iters=4)
    randomise(block, seed=5, scale=1.0)
    h = torch.randn(3 * 2, 4)
    torch.testing.assert_close(
        torch.compile(block, fullgraph=True)(h), block(h), atol=1e-5, rtol=1e-5
    )


def test_errors() -> None:
    with pytest.raises(
        ResidualError, match=r"expected \(\.\.\., n, n\) logits, got shape \(2, 3\)"
    ):
        sinkhorn(torch.zeros(2, 3))
    with pytest.raises(ResidualError, match="iters must be a positive int, got 0"):
        sinkhorn(torch.zeros(2, 2), 0)
    with pytest.raises(ResidualError, match="streams must be a positive int, got 0"):
        mhc_residual(nn.Linear(4, 4), streams=0, dim=4)
    with pytest.raises(ResidualError, match="not a multiple of streams=3.*expand_streams"):
        mhc_residual(nn.Linear(4, 4), streams=3, dim=4)(torch.randn(4, 4))
    with pytest.raises(ResidualError, match="MHCBranch: fn turned"):
        MHCBranch(nn.Linear(4, 2), 2, 4)(torch.randn(4, 4))
    with pytest.raises(ResidualError, match="pass h"):
        MHCMix(2, 4).matrix()


@pytest.mark.parametrize("shape", [(3, 3), (2, 5, 4, 4)], ids=["static", "per-token"])
def test_sinkhorn_matches_the_unrolled_iterations(shape: tuple[int, ...]) -> None:
    logits = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    m = torch.exp(logits - logits.amax(-1, keepdim=True).detach())
    for _ in range(6):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    grad = torch.randn(*shape, dtype=torch.float64)
    out = sinkhorn(logits, 6)
    torch.testing.assert_close(out, m)
    (expected,) = torch.autograd.grad(m, logits, grad)
    (got,) = torch.autograd.grad(out, logits, grad, create_graph=True)
    torch.testing.assert_close(got, expected)
    with pytest.raises(RuntimeError, match="grad"):  # backward written out: no second order
        torch.autograd.grad(got.sum(), logits)


def sinkhorn_float64(logits: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp in the log domain, float64: the reference no rounding or underflow spoils."""
    u = logits.double()
    for _ in range(iters):
        u = u - u.logsumexp(-1, keepdim=True)
        u = u - u.logsumexp(-2, keepdim=True)
    return u.exp()


EXTREME_LOGITS = {  # every exact answer is 0.5 everywhere but the last (the identity)
    "20-rank-one": [[20.0, 0.0], [20.0, 0.0]],
    "200-rank-one": [[200.0, 0.0], [200.0, 0.0]],
    "200-cross": [[200.0, 0.0], [0.0, -200.0]],
    "1e4-rank-one": [[1e4, 0.0], [1e4, 0.0]],
    "1e4-identity": [[1e4, 0.0], [0.0, 1e4]],
}
HALF_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", list(HALF_TOL), ids=str)
@pytest.mark.parametrize("name", list(EXTREME_LOGITS))
def test_sinkhorn_is_finite_and_right_on_extreme_logits(name: str, dtype: torch.dtype) -> None:
    """Finite logits never give NaN, in any dtype: float16 [[20, 0], [20, 0]] (exp(-20)
    underflows in float16) and logits of 200 or 1e4 (exp(-200) underflows in float32) gave NaN
    when Sinkhorn ran in the input dtype. The result keeps the input's dtype."""
    logits = torch.tensor(EXTREME_LOGITS[name], dtype=dtype)
    out = sinkhorn(logits)
    assert out.dtype == dtype
    assert bool(out.isfinite().all())
    expected = sinkhorn_float64(logits)
    torch.testing.assert_close(out.double(), expected, atol=HALF_TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_sinkhorn_of_low_precision_logits_is_as_close_as_their_rounding_allows(
    dtype: torch.dtype,
) -> None:
    """Logits of std 6 (a trained mHC's res logits can reach that): float16 ran 0.036 off the
    float64 result (0.26 on these 2000 matrices); computed in float32 and rounded once, the
    result is as close as the rounded logits allow (lucidrains' float32 path: 9e-4)."""
    logits = torch.randn(2000, 4, 4, generator=torch.Generator().manual_seed(0)).double() * 6
    expected = sinkhorn_float64(logits)
    err = (sinkhorn(logits.to(dtype)).double() - expected).abs().max().item()
    # the bound each dtype allows: the float64 answer on the rounded logits, rounded to dtype
    floor = (sinkhorn_float64(logits.to(dtype)).to(dtype).double() - expected).abs().max().item()
    assert err <= floor * 1.05 + 1e-6, (err, floor)


def test_sinkhorn_gradients_are_right_for_large_logits() -> None:
    logits = (torch.randn(2, 3, 3, dtype=torch.float64) * 40).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 5), (logits,))
    extreme = torch.tensor([[200.0, 0.0], [200.0, 0.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sinkhorn(t, 3), (extreme,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sinkhorn_gradients_of_half_logits_are_finite_and_close(dtype: torch.dtype) -> None:
    logits = torch.randn(50, 4, 4, generator=torch.Generator().manual_seed(1)) * 6
    logits[0] = torch.tensor([[20.0, 0, 0, 0]] * 4)  # the rank-one matrix of the issue
    weight = torch.randn(50, 4, 4, generator=torch.Generator().manual_seed(2))
    half = logits.to(dtype).requires_grad_()
    (sinkhorn(half) * weight.to(dtype)).sum().backward()
    assert half.grad is not None and half.grad.dtype == dtype
    assert bool(half.grad.isfinite().all())
    wide = half.detach().double().requires_grad_()
    (sinkhorn(wide) * weight.double()).sum().backward()
    assert wide.grad is not None
    scale = wide.grad.abs().max().item()
    assert (half.grad.double() - wide.grad).abs().max().item() <= 0.02 * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_half_precision_layers_are_finite_and_close_to_float32(
    dynamic: bool, dtype: torch.dtype
) -> None:
    """A ``.half()`` / ``.bfloat16()`` mHC layer with res logits of ~30 (a float16 Sinkhorn
    gave NaN) stays finite and within the dtype's rounding of the float32 layer."""
    torch.manual_seed(0)
    n, d = 4, 8
    block = mhc_residual(nn.Linear(d, d), streams=n, dim=d, dynamic=dynamic)
    randomise(block, seed=6, scale=1.0)
    with torch.no_grad():
        block.shortcut.res_bias.mul_(30)
    h = torch.randn(n * 3, 5, d)
    expected = block(h)
    low = copy.deepcopy(block).to(dtype)
    out = low(h.to(dtype))
    assert out.dtype == dtype and bool(out.isfinite().all())
    tol = 0.02 if dtype == torch.float16 else 0.1
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    out.float().square().sum().backward()
    assert all(bool(p.grad.isfinite().all()) for p in low.parameters() if p.grad is not None)
