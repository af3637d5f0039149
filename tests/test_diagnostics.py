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


# --- a diagnosis leaves the model and the process as they were -------------------------------


def _stochastic_net() -> nn.Sequential:
    """BatchNorm, dropout and the three stochastic-depth policies, in training mode."""
    return nn.Sequential(
        Residual(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.2))),
        Residual(nn.Linear(6, 6), drop_path=0.5, drop_mode="row"),
        Residual(nn.Linear(6, 6), drop_path=0.5, drop_mode="batch"),
        Residual(nn.Linear(6, 6), drop_path=0.5, drop_mode="subset"),
    ).train()


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def test_gradient_flow_leaves_buffers_alone() -> None:
    """BatchNorm statistics and the batch drop's step counter (non-persistent buffers too).

    Before: running_mean, running_var and num_batches_tracked moved, and BatchDrop's step.
    """
    model = _stochastic_net()
    before = _buffers(model)
    gradient_flow(model, torch.randn(8, 6))
    after = _buffers(model)
    assert after.keys() == before.keys()
    assert [name for name, value in before.items() if not torch.equal(after[name], value)] == []


def test_gradient_flow_leaves_the_global_rng_alone() -> None:
    """Before: dropout and stochastic depth drew from it, so the next draw changed."""
    model = _stochastic_net()
    x = torch.randn(8, 6)
    state = torch.get_rng_state()
    first = gradient_flow(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert gradient_flow(model, x) == first  # the same draws: the same profile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gradient_flow_leaves_the_cuda_rng_alone() -> None:
    model = _stochastic_net().cuda()
    state = torch.cuda.get_rng_state()
    gradient_flow(model, torch.randn(8, 6, device="cuda"))
    assert torch.equal(torch.cuda.get_rng_state(), state)


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_gradient_flow_leaves_training_flags_alone(mode: str) -> None:
    model = _stochastic_net().train(mode != "eval")
    if mode == "mixed":
        model[0].fn[1].eval()  # a frozen BatchNorm inside a training model
    flags = [m.training for m in model.modules()]
    gradient_flow(model, torch.randn(8, 6))
    assert [m.training for m in model.modules()] == flags


def test_gradient_flow_leaves_grads_and_requires_grad_alone() -> None:
    model = _stochastic_net()
    frozen = model[0].fn[0].weight
    frozen.requires_grad_(False)
    marker = torch.full_like(model[1].fn.weight, 7.0)
    model[1].fn.weight.grad = marker
    x = torch.randn(8, 6, requires_grad=True)
    x.grad = torch.ones_like(x)
    x_grad = x.grad
    flags = [p.requires_grad for p in model.parameters()]
    profile = gradient_flow(model, x)
    assert profile.param_grad_norms[1] > 0
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model[1].fn.weight.grad is marker and torch.equal(marker, torch.full_like(marker, 7.0))
    assert all(p.grad is None for p in model.parameters() if p is not model[1].fn.weight)
    assert x.grad is x_grad and torch.equal(x_grad, torch.ones_like(x))  # before: 1 + dloss/dx


def test_gradient_flow_under_no_grad() -> None:
    """A diagnosis called inside ``torch.no_grad()`` (an eval loop) still runs its backward.

    Before: "element 0 of tensors does not require grad and does not have a grad_fn".
    """
    model = _stochastic_net()
    with torch.no_grad():
        profile = gradient_flow(model, torch.randn(8, 6))
        assert not torch.is_grad_enabled()
    assert all(v > 0 for v in profile.output_grad_norms)


def test_gradient_flow_of_a_frozen_model() -> None:
    """Every parameter frozen: the gradient still flows back through the blocks to the input.

    Before: "element 0 of tensors does not require grad and does not have a grad_fn".
    """
    model = _stochastic_net().requires_grad_(False)
    profile = gradient_flow(model, torch.randn(8, 6))
    assert profile.param_grad_norms == [0.0] * 4
    assert all(v > 0 for v in profile.output_grad_norms)
    assert not any(p.requires_grad for p in model.parameters())
