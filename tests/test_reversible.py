"""Reversible residuals: exact inverse, gradients equal to the stored stack, O(1) memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from residual import ResidualError
from residual.reversible import Reversible, ReversibleSequence


def mlp(dim: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout), nn.Linear(dim, dim))


def conv(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
    )


class FirstChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1]


def stack(depth: int, dim: int, dropout: float = 0.0) -> ReversibleSequence:
    return ReversibleSequence(
        *(Reversible(mlp(dim, dropout), mlp(dim, dropout)) for _ in range(depth))
    )


def test_block_formula_and_inverse() -> None:
    f, g = mlp(4), mlp(4)
    block = Reversible(f, g)
    x = torch.randn(3, 8)
    x1, x2 = x[:, :4], x[:, 4:]
    y1 = x1 + f(x2)
    torch.testing.assert_close(block(x), torch.cat([y1, x2 + g(y1)], dim=-1))
    assert (block.inverse(block(x)) - x).abs().max() < 1e-5


def test_channels_first_split() -> None:
    block = Reversible(conv(3), conv(3), layout="channels_first").eval()
    x = torch.randn(2, 6, 5, 5)
    assert (block.inverse(block(x)) - x).abs().max() < 1e-4


def test_gradcheck_float64() -> None:
    torch.manual_seed(0)
    seq = stack(3, 3).double()
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(seq, (x,))


def test_gradients_equal_the_stored_stack_float64() -> None:
    seq = stack(6, 5).double()
    x = torch.randn(7, 10, dtype=torch.double, requires_grad=True)
    seq(x).square().sum().backward()
    rev_grads = [p.grad.clone() for p in seq.parameters()]
    rev_x = x.grad.clone()
    seq.zero_grad()
    x.grad = None
    y = x
    for block in seq.blocks:  # the same blocks, activations stored by autograd
        y = block(y)
    y.square().sum().backward()
    assert (x.grad - rev_x).abs().max() <= 1e-6
    for a, b in zip(rev_grads, [p.grad for p in seq.parameters()], strict=True):
        assert (a - b).abs().max() <= 1e-6


def test_dropout_is_replayed() -> None:
    seq = stack(4, 6, dropout=0.5)
    x = torch.randn(8, 12, requires_grad=True)
    torch.manual_seed(3)
    seq(x).sum().backward()
    rev = [p.grad.clone() for p in seq.parameters()]
    seq.zero_grad()
    torch.manual_seed(3)
    y = x
    for block in seq.blocks:
        y = block(y)
    y.sum().backward()
    for a, b in zip(rev, [p.grad for p in seq.parameters()], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_batchnorm_statistics_move_once() -> None:
    rev = ReversibleSequence(
        *(Reversible(conv(2), conv(2), layout="channels_first") for _ in range(3))
    )
    plain = ReversibleSequence(
        *(Reversible(conv(2), conv(2), layout="channels_first") for _ in range(3))
    )
    plain.load_state_dict(rev.state_dict())
    x = torch.randn(4, 4, 6, 6, requires_grad=True)
    rev(x).sum().backward()
    y = x
    for block in plain.blocks:
        y = block(y)
    y.sum().backward()
    for (name, a), b in zip(rev.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert int(rev.blocks[0].f[1].num_batches_tracked) == 1


def test_activation_memory_does_not_grow_with_depth() -> None:
    def saved(depth: int) -> int:
        seq = stack(depth, 32)
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = seq(torch.randn(16, 64, requires_grad=True))
        out.sum().backward()
        return total

    assert saved(4) == saved(32)


def test_errors() -> None:
    with pytest.raises(ResidualError, match="f maps 4 -> 8 channels"):
        Reversible(nn.Linear(4, 8), nn.Linear(4, 4))
    with pytest.raises(ResidualError, match="7 channels.*needs an even count"):
        Reversible(nn.Identity(), nn.Identity())(torch.randn(2, 7))
    with pytest.raises(ResidualError, match=r"f turned a half of shape \(2, 3\) into \(2, 1\)"):
        Reversible(FirstChannel(), nn.Identity())(torch.randn(2, 6))
    with pytest.raises(TypeError, match="f must be an nn.Module"):
        Reversible(torch.tanh, nn.Identity())
    with pytest.raises(TypeError, match="block 0 is Linear, not Reversible"):
        ReversibleSequence(nn.Linear(2, 2))
    with pytest.raises(ResidualError, match="at least one"):
        ReversibleSequence()
