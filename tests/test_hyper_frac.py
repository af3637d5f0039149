"""Frac-connections: the plain residual at init for any m, the formula, layouts, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from residual import ResidualError
from residual.hyper import FracBranch, FracMix, frac_residual


@pytest.mark.parametrize("fracs", [1, 2, 4])
@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_the_plain_residual_exactly_at_init(fracs: int, dynamic: bool, layout: str) -> None:
    fn = nn.Linear(8, 8) if layout == "channels_last" else nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(3, 5, 8) if layout == "channels_last" else torch.randn(3, 8, 4, 4)
    block = frac_residual(fn, fracs, 8, dynamic=dynamic, layout=layout)
    assert torch.equal(block(x), x + fn(x))


def reference(block: nn.Module, x: Tensor, m: int) -> Tensor:
    """The formula fraction by fraction, with the dynamic rows from layer_norm(F_i)."""
    branch, mix = block.fn, block.shortcut
    f = list(x.chunk(m, dim=-1))

    def rows(static: Tensor, dynamic: nn.Module | None) -> list[Tensor]:
        if dynamic is None:
            return [static[i].expand(*x.shape[:-1], m) for i in range(m)]
        return [
            static[i]
            + dynamic.scale
            * torch.tanh(nn.functional.layer_norm(f[i], f[i].shape[-1:]) @ dynamic.weight)
            for i in range(m)
        ]

    width = rows(branch.width, branch.width_dynamic)
    depth = rows(branch.depth, branch.depth_dynamic)
    res = rows(mix.mix, mix.dynamic)
    inputs = torch.cat(
        [sum(width[i][..., j : j + 1] * f[i] for i in range(m)) for j in range(m)], -1
    )
    t = branch.fn(inputs).chunk(m, dim=-1)
    return torch.cat(
        [
            sum(res[i][..., j : j + 1] * f[i] + depth[i][..., j : j + 1] * t[i] for i in range(m))
            for j in range(m)
        ],
        -1,
    )


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic", "static"])
def test_the_formula_with_random_parameters(dynamic: bool) -> None:
    torch.manual_seed(0)
    m, d = 4, 12
    block = frac_residual(nn.Linear(d, d), fracs=m, dim=d, dynamic=dynamic)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if not name.startswith("fn.fn."):
                p.copy_(torch.randn(p.shape))
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(block(x), reference(block, x, m), atol=1e-5, rtol=1e-5)


def test_parameters_and_memory_stay_those_of_one_stream() -> None:
    block = frac_residual(nn.Identity(), fracs=4, dim=512)
    # Y, A, B (4 x 4 each) + three (128 x 4) dynamic weights + three scales
    assert sum(p.numel() for p in block.parameters()) == 3 * 16 + 3 * 128 * 4 + 3
    x = torch.randn(2, 512)
    assert block(x).shape == x.shape


def test_dynamic_connections_learn() -> None:
    block = frac_residual(nn.Linear(8, 8), fracs=2, dim=8)
    block(torch.randn(5, 8)).square().sum().backward()
    for dyn in (block.fn.width_dynamic, block.fn.depth_dynamic, block.shortcut.dynamic):
        assert dyn.weight.grad.abs().sum() > 0


def test_symbolic_trace_equals_eager() -> None:
    torch.manual_seed(0)
    block = frac_residual(nn.Linear(8, 8), fracs=4, dim=8)
    with torch.no_grad():
        block.shortcut.dynamic.weight.normal_()
    x = torch.randn(3, 8)
    torch.testing.assert_close(torch.fx.symbolic_trace(block)(x), block(x))


def test_errors() -> None:
    with pytest.raises(ResidualError, match="dim=10 does not split into fracs=4"):
        frac_residual(nn.Linear(10, 10), fracs=4, dim=10)
    with pytest.raises(ResidualError, match="fracs must be a positive int, got 0"):
        FracMix(0, 8)
    with pytest.raises(TypeError, match="fracs must be an int"):
        FracMix(2.0, 8)  # type: ignore[arg-type]
    with pytest.raises(ResidualError, match="FracBranch: fn turned"):
        FracBranch(nn.Linear(8, 4), 2, 8)(torch.randn(3, 8))
