"""Gradient flow diagnostics and the plain (shortcut-free) ablation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from residual import NoShortcut, Residual, ResidualError, ReZero
from residual.diagnostics import DepthProfile, gradient_flow, plot_gradient_flow
from residual.models import cifar_resnet


def test_plain_nets_are_the_same_builder_without_shortcuts() -> None:
    plain, residual = cifar_resnet(20, plain=True), cifar_resnet(20)
    blocks = [m for m in plain.modules() if isinstance(m, Residual)]
    assert len(blocks) == 9 and all(isinstance(b.shortcut, NoShortcut) for b in blocks)
    assert list(plain.state_dict()) == list(residual.state_dict())  # option A: no shortcut weights
    block = blocks[0].eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(block.fn(x)), atol=0, rtol=0)
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_no_shortcut_refuses_merge_and_drop() -> None:
    with pytest.raises(ResidualError, match="takes no merge"):
        Residual(nn.Linear(4, 4), "none", merge=ReZero())
    with pytest.raises(ResidualError, match="drop_path needs a shortcut"):
        Residual(nn.Linear(4, 4), "none", drop_path=0.1)
    with pytest.raises(ResidualError, match="plain network has no shortcut"):
        cifar_resnet(20, plain=True, drop_path=0.1)


def test_gradient_flow_profiles_every_block_and_leaves_grads_alone() -> None:
    model = cifar_resnet(20, in_channels=1)
    marker = torch.ones_like(model.fc.weight)
    model.fc.weight.grad = marker
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    profile = gradient_flow(model, x, y)
    assert isinstance(profile, DepthProfile)
    assert profile.names == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    for values in (profile.output_grad_norms, profile.param_grad_norms, profile.activation_norms):
        assert len(values) == 9 and all(v > 0 for v in values)
    assert profile.loss > 0
    assert model.fc.weight.grad is marker


def test_gradient_flow_matches_a_hand_computed_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(Residual(nn.Linear(3, 3)), Residual(nn.Linear(3, 3)))
    x = torch.randn(5, 3)
    profile = gradient_flow(net, x)
    net.zero_grad()
    h1 = net[0](x)
    h1.retain_grad()
    net[1](h1).square().mean().backward()
    assert profile.output_grad_norms[0] == pytest.approx(h1.grad.norm().item(), rel=1e-6)
    expected = torch.cat([p.grad.flatten() for p in net[1].parameters()]).norm().item()
    assert profile.param_grad_norms[1] == pytest.approx(expected, rel=1e-6)


def test_gradient_flow_on_any_named_blocks_and_errors() -> None:
    stack = nn.Sequential(*(nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(5)))
    profile = gradient_flow(stack, torch.randn(3, 4), blocks=list(stack))
    assert profile.names == [str(i) for i in range(5)]
    with pytest.raises(ResidualError, match="holds no Residual block; pass blocks="):
        gradient_flow(stack, torch.randn(3, 4))


def test_plot_gradient_flow_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need the 'examples' extra (matplotlib)")
    model = cifar_resnet(20, in_channels=1)
    profile = gradient_flow(model, torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    path = tmp_path / "flow.png"
    plot_gradient_flow({"residual-20": profile}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_degradation_benchmark_trains_one_epoch() -> None:
    pytest.importorskip("sklearn", reason="needs the 'examples' extra (scikit-learn)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import degradation

    result = degradation.train(20, True, seed=0, epochs=1, lr=0.05)
    assert len(result["curve"]) == 1 and 0.0 <= result["test_acc"] <= 1.0
    # it learns: the epoch's mean training loss is below chance, cross-entropy ln(10) = 2.30
    assert result["curve"][0] < 2.0
