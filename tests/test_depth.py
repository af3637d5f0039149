"""LAuReL (RW, LR, PA), DenseFormer, value residual and ResiDual against hand-written formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import Residual, ResidualError
from residual.depth import (
    DepthStack,
    DepthWeightedAverage,
    PreviousActivations,
    denseformer,
    laurel_pa,
)
from residual.hyper import expand_streams
from residual.merges import LaurelRW
from residual.models import ValueResidualGPTBlock, gpt_block
from residual.resi_dual import ResiDualOutput, resi_dual_residual
from residual.shortcuts import LowRankShortcut

D = 8


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))


def _perturb(module: nn.Module, seed: int = 1) -> None:
    """Every parameter set to random values (so that no init value hides a wrong formula)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


# LAuReL-RW and LR ------------------------------------------------------------------------------


def test_laurel_rw_is_the_softmax_weighted_sum() -> None:
    fn = _mlp()
    block = Residual(fn, merge=LaurelRW(init=(0.3, -1.2)))
    x = torch.randn(4, D)
    w = torch.tensor([0.3, -1.2]).exp()
    alpha, beta = w / w.sum()
    torch.testing.assert_close(block(x), alpha * fn(x) + beta * x)


def test_laurel_rw_starts_at_half_and_half_and_learns_its_weights() -> None:
    fn = _mlp()
    block = Residual(fn, merge=LaurelRW())
    x = torch.randn(4, D)
    torch.testing.assert_close(block(x), 0.5 * fn(x) + 0.5 * x)
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_low_rank_shortcut_is_x_plus_a_b_x() -> None:
    shortcut = LowRankShortcut(D, rank=3)
    _perturb(shortcut)
    x = torch.randn(5, D)
    torch.testing.assert_close(shortcut(x), x + x @ (shortcut.up @ shortcut.down).t())


def test_low_rank_shortcut_init_is_the_identity_with_column_orthogonal_a() -> None:
    shortcut = LowRankShortcut(D, rank=3)
    x = torch.randn(5, D)
    assert torch.equal(shortcut(x), x)
    assert torch.equal(shortcut.down, torch.zeros(3, D))
    torch.testing.assert_close(shortcut.up.t() @ shortcut.up, torch.eye(3))
    shortcut(x).square().sum().backward()
    assert shortcut.down.grad is not None and shortcut.down.grad.abs().sum() > 0


def test_laurel_rw_lr_composes_in_one_residual() -> None:
    fn = _mlp()
    block = Residual(fn, shortcut=LowRankShortcut(D, 2), merge=LaurelRW())
    _perturb(block)
    x = torch.randn(3, D)
    alpha, beta = block.merge.logits.softmax(0)
    s = block.shortcut
    torch.testing.assert_close(block(x), alpha * fn(x) + beta * (x + (x @ s.down.t()) @ s.up.t()))


def test_laurel_rw_lr_traces_with_fx_and_passes_gradcheck() -> None:
    block = Residual(_mlp(), shortcut=LowRankShortcut(D, 2), merge=LaurelRW()).double()
    _perturb(block)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), block(x))
    assert torch.autograd.gradcheck(block, (x,))
    params = (block.merge.logits, block.shortcut.down, block.shortcut.up)

    def by_params(logits: Tensor, down: Tensor, up: Tensor) -> Tensor:
        alpha, beta = logits.softmax(0)
        return alpha * block.fn(x) + beta * (x + (x @ down.t()) @ up.t())

    leaves = [p.detach().clone().requires_grad_() for p in params]
    torch.autograd.backward(by_params(*leaves).sin().sum())
    block(x).sin().sum().backward()
    for p, ref in zip(params, leaves, strict=True):  # the parameters' gradients, as the formula's
        torch.testing.assert_close(p.grad, ref.grad)


def test_low_rank_shortcut_refuses_bad_sizes() -> None:
    with pytest.raises(ResidualError, match="rank=9 is larger than dim=8"):
        LowRankShortcut(8, 9)
    with pytest.raises(ResidualError, match="expected 8 channels"):
        LowRankShortcut(8, 2)(torch.randn(2, 4))


# DenseFormer and LAuReL-PA ---------------------------------------------------------------------


def _blocks(n: int) -> list[nn.Module]:
    return [Residual(_mlp()) for _ in range(n)]


@pytest.mark.parametrize(("dilation", "period"), [(1, 1), (2, 1), (2, 2)], ids=str)
def test_denseformer_at_init_is_the_plain_stack_exactly(dilation: int, period: int) -> None:
    stack = denseformer(_blocks(4), dilation=dilation, period=period)
    x = torch.randn(3, 5, D)
    assert torch.equal(stack(x), nn.Sequential(*stack.blocks)(x))


def test_denseformer_is_the_depth_weighted_average_of_the_paper() -> None:
    stack = denseformer(_blocks(4), dilation=2, period=1)
    _perturb(stack)
    x = torch.randn(3, D)
    outs, y = [x], x  # X_0 = x; X_i = B_i(Y_{i-1}); Y_i = sum_{j <= i, j = i mod 2} a_ij X_j
    for i, block in enumerate(stack.blocks, start=1):
        outs.append(block(y))
        alpha = stack.connections[i - 1].alpha
        sources = [j for j in range(i + 1) if (i - j) % 2 == 0]
        y = sum(a * outs[j] for a, j in zip(alpha, sources, strict=True))
    torch.testing.assert_close(stack(x), y)


def test_denseformer_period_places_averages_every_p_blocks() -> None:
    stack = denseformer(_blocks(4), period=2)
    kinds = [type(c).__name__ for c in stack.connections]
    assert kinds == ["LastOutput", "DepthWeightedAverage", "LastOutput", "DepthWeightedAverage"]
    assert stack.connections[3].sources == (0, 1, 2, 3, 4)


def test_laurel_pa_is_the_paper_formula() -> None:
    stack = laurel_pa(_blocks(3), D, rank=2, window=2)
    _perturb(stack)
    x = torch.randn(4, D)
    xs = [x]  # x_{i+1} = x_i + f_i(x_i) + sum_{j < 2} gamma_ij A_i B_i x_{i-j}
    for i, (block, pa) in enumerate(zip(stack.blocks, stack.connections, strict=True)):
        h = pa.h
        extra = sum(
            g * (xs[i - j] @ (h.up @ h.down).t())
            for j, g in enumerate(pa.gamma)  # fewer previous activations at the bottom
        )
        xs.append(xs[i] + block.fn(xs[i]) + extra)
    torch.testing.assert_close(stack(x), xs[-1])
    assert [len(c.gamma) for c in stack.connections] == [1, 2, 2]


def test_laurel_pa_at_init_is_the_plain_stack_and_every_parameter_gets_a_gradient() -> None:
    stack = laurel_pa(_blocks(3), D, rank=2)
    x = torch.randn(4, D)
    assert torch.equal(stack(x), nn.Sequential(*stack.blocks)(x))
    stack(x).square().sum().backward()
    # B = 0 at init: gamma and A get no gradient on the first step, as the paper's init implies
    for name, p in stack.named_parameters():
        if name.endswith("down") or name.startswith("blocks"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_depth_stack_refuses_mismatched_connections() -> None:
    with pytest.raises(ResidualError, match="2 blocks but 1 connections"):
        DepthStack(_blocks(2), [None])
    with pytest.raises(ResidualError, match="at least one block"):
        DepthStack([])
    with pytest.raises(TypeError, match="connections\\[0\\] must be a torch.nn.Module"):
        DepthStack(_blocks(1), [len])  # type: ignore[list-item]
    with pytest.raises(ResidualError, match="needs 4 earlier tensors"):
        DepthStack(_blocks(1), [DepthWeightedAverage(3)])(torch.randn(2, D))
    with pytest.raises(ResidualError, match="needs 3 earlier tensors"):
        DepthStack(_blocks(1), [PreviousActivations(D, 2, 3)])(torch.randn(2, D))


@pytest.mark.parametrize("kind", ["denseformer", "laurel_pa"])
def test_depth_stacks_trace_with_fx(kind: str) -> None:
    stack = denseformer(_blocks(3)) if kind == "denseformer" else laurel_pa(_blocks(3), D, rank=2)
    _perturb(stack)
    traced = torch.fx.symbolic_trace(stack)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(traced(x), stack(x))


def test_denseformer_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    stack = denseformer(_blocks(2))
    _perturb(stack)
    compiled = torch.compile(stack, fullgraph=True, backend="eager")
    x = torch.randn(2, D)
    torch.testing.assert_close(compiled(x), stack(x))


# Value residual --------------------------------------------------------------------------------


def _plain_from(vr: ValueResidualGPTBlock) -> nn.Sequential:
    plain = gpt_block(16, 2)
    state = {
        k.replace("attn.", "0.", 1).replace("ff.", "1.", 1): v for k, v in vr.state_dict().items()
    }
    plain.load_state_dict(state)
    return plain


def test_value_residual_with_lambda_one_is_the_plain_gpt_stack() -> None:
    blocks = [ValueResidualGPTBlock(16, 2, lam=1.0) for _ in range(3)]
    stack = DepthStack(blocks, values=True)
    plain = nn.Sequential(*(_plain_from(b) for b in blocks))
    x = torch.randn(2, 6, 16)
    assert torch.equal(stack(x), plain(x))


def _reference_attention(x: Tensor, block: ValueResidualGPTBlock, v1: Tensor | None) -> tuple:
    """ResFormer's U_n = softmax(Q K^T / sqrt(d) + causal) (lam V_n + (1 - lam) V_1)."""
    attn = block.attn.fn.attention
    h = block.attn.fn.norm(x)
    q, k, v = (attn.in_proj(h).view(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)).unbind(0)
    mixed = v if v1 is None else 0.5 * v + 0.5 * v1
    scores = q @ k.transpose(-1, -2) / 8**0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ mixed).transpose(1, 2).reshape(2, 6, 16)
    return x + attn.out_proj(out), v


def test_value_residual_mixes_the_first_layers_values_as_the_paper() -> None:
    blocks = [ValueResidualGPTBlock(16, 2) for _ in range(3)]
    stack = DepthStack(blocks, values=True)
    _perturb(stack)
    x = torch.randn(2, 6, 16)
    y, v1 = x, None
    for block in blocks:
        y, v = _reference_attention(y, block, v1)
        v1 = v if v1 is None else v1
        y = block.ff(y)
    torch.testing.assert_close(stack(x), y)
    stack(x).sum().backward()
    for name, p in stack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_value_residual_stack_traces_with_fx() -> None:
    stack = DepthStack([ValueResidualGPTBlock(16, 2) for _ in range(2)], values=True)
    traced = torch.fx.symbolic_trace(stack)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(traced(x), stack(x))


# ResiDual ---------------------------------------------------------------------------------------


def test_resi_dual_matches_the_papers_recurrence() -> None:
    fns = [_mlp() for _ in range(3)]
    layers = [resi_dual_residual(fn, D) for fn in fns]
    head = ResiDualOutput(D)
    model = nn.Sequential(*layers, head)
    _perturb(model)
    x = torch.randn(4, D)
    x_a, x_d = x, x
    for fn, layer in zip(fns, layers, strict=True):
        ln = layer.post.norm
        f = fn(x_a)
        x_a, x_d = F.layer_norm(x_a + f, (D,), ln.weight, ln.bias), x_d + f
    expected = x_a + F.layer_norm(x_d, (D,), head.norm.weight, head.norm.bias)
    torch.testing.assert_close(model(expand_streams(x, 2)), expected)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    torch.testing.assert_close(traced(expand_streams(x, 2)), expected)


def test_resi_dual_refuses_an_unpaired_input() -> None:
    with pytest.raises(ResidualError, match="expand_streams\\(x, 2\\)"):
        resi_dual_residual(_mlp(), D)(torch.randn(3, D))


class _NoValues(nn.Linear):
    def forward(self, x: Tensor, first_values: Tensor | None = None) -> Tensor:
        return super().forward(x)


def test_misuse_of_the_depth_parts_raises_a_clear_error() -> None:
    with pytest.raises(TypeError, match="must return \\(output, values\\)"):
        DepthStack([_NoValues(D, D)], values=True)(torch.randn(2, D))  # not unpacked as rows
    block = ValueResidualGPTBlock(16, 2)
    _, v = block(torch.randn(2, 5, 16))
    with pytest.raises(ResidualError, match="first_values \\(2, 2, 5, 8\\) do not match"):
        block(torch.randn(1, 5, 16), first_values=v)
    with pytest.raises(ResidualError, match="two logits"):
        LaurelRW(init=(0.0, 0.0, 0.0))  # type: ignore[arg-type]


@pytest.mark.parametrize("build", ["DepthStack", "denseformer", "laurel_pa"])
def test_value_residual_blocks_without_values_true_name_it(build: str) -> None:
    """Before: "Residual: the first argument must be the main tensor, got tuple" (the next
    block fed the pair) or "'tuple' object has no attribute 'dtype'" (a depth connection)."""
    make = {
        "DepthStack": lambda blocks, **kw: DepthStack(blocks, **kw),
        "denseformer": lambda blocks, **kw: denseformer(blocks, **kw),
        "laurel_pa": lambda blocks, **kw: laurel_pa(blocks, 16, rank=2, **kw),
    }[build]
    torch.manual_seed(0)
    blocks = [ValueResidualGPTBlock(16, 2) for _ in range(3)]
    x = torch.randn(2, 5, 16)
    with pytest.raises(
        TypeError,
        match=(
            "^DepthStack: blocks\\[0\\] \\(ValueResidualGPTBlock\\) returned a tuple, not a "
            "tensor; build the stack with values=True for blocks that return \\(output, "
            "values\\) \\(value residual learning\\), or have each block return its output "
            "alone$"
        ),
    ):
        make(blocks)(x)
    fixed = make(blocks, values=True)  # the fix the message names
    expected = DepthStack(blocks, values=True)(x)  # at init every connection is the plain one
    torch.testing.assert_close(fixed(x), expected)


def test_resi_dual_branch_passes_masks_and_extra_arguments_to_fn() -> None:
    """Before: "ResiDualBranch.forward() got an unexpected keyword argument
    'key_padding_mask'". The mask is per sample, (N, L), for the post-norm stream x_a."""
    from conftest import MySelfAttention

    torch.manual_seed(0)
    attn = MySelfAttention(16, 4)
    layer = resi_dual_residual(attn, 16)
    x = torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[2, 2:] = True
    h = expand_streams(x, 2)
    out = layer(h, key_padding_mask=pad)
    f = attn(x, key_padding_mask=pad)
    ln = layer.post.norm
    expected = torch.cat([F.layer_norm(x + f, (16,), ln.weight, ln.bias), x + f])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer(h, pad), out, atol=0, rtol=0)  # positionally too
    traced = torch.fx.symbolic_trace(layer.fn)  # traced on its own: no extra arguments later
    torch.testing.assert_close(traced(h), layer.fn(h))
    with pytest.raises(TypeError, match="traced with torch.fx.symbolic_trace on its own"):
        traced(h, key_padding_mask=pad)
