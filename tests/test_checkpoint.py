"""Activation checkpointing: same numbers, norm statistics moved once, RNG replayed, kwargs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import MySelfAttention
from residual import Residual, ResidualBlock
from residual.models import TransformerEncoderLayer


def _branch() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(4, 4, 3, padding=1),
    )


def test_same_outputs_and_gradients_with_dropout() -> None:
    plain = Residual(_branch())
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(3, 4, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    ya = plain(xa)
    ya.square().sum().backward()
    torch.manual_seed(7)
    yb = ckpt(xb)
    yb.square().sum().backward()  # the recomputation replays the same dropout mask
    torch.testing.assert_close(yb, ya, atol=0, rtol=0)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-6)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-6, msg=name)


def test_batchnorm_statistics_move_exactly_once() -> None:
    plain = ResidualBlock(4, 4)
    ckpt = ResidualBlock(4, 4, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(5, 4, 6, 6)
    for model in (plain, ckpt):
        model(x.clone().requires_grad_()).sum().backward()
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
    assert int(ckpt.fn.bn1.num_batches_tracked) == 1


def test_plain_torch_checkpoint_moves_them_twice() -> None:
    """The bug our checkpointing avoids, shown on torch's own function."""
    bn = nn.BatchNorm1d(3)
    x = torch.randn(8, 3, requires_grad=True)
    checkpoint(bn, x, use_reentrant=False).sum().backward()
    assert int(bn.num_batches_tracked) == 2


def test_kwargs_reach_a_checkpointed_branch() -> None:
    attn = MySelfAttention(8, 2)
    block = Residual(attn, checkpoint=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, -1] = True
    y = block(x, key_padding_mask=mask)
    torch.testing.assert_close(y, x + attn(x, key_padding_mask=mask))
    y.sum().backward()
    assert all(p.grad is not None for p in attn.parameters())


def test_checkpoint_with_a_branch_returning_no_tensor() -> None:
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [x]

    with pytest.raises(TypeError, match="returned list; it must return a tensor"):
        Residual(Bad(), checkpoint=True)(torch.randn(2, 2, requires_grad=True))


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_checkpoint_combines_with_drop_modes(mode: str) -> None:
    """Same seed: the checkpointed block draws what the plain one draws, and its gradients."""
    plain = Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), drop_path=0.3, drop_mode=mode)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(8, 4)
    ran = set()
    for step in range(12):
        grads = []
        for block in (plain, ckpt):
            xi = x.clone().requires_grad_()
            torch.manual_seed(step)
            y = block(xi)
            y.square().sum().backward()
            grads.append((y, xi.grad))
        (ya, ga), (yb, gb) = grads
        torch.testing.assert_close(yb, ya, atol=0, rtol=0)
        torch.testing.assert_close(gb, ga)
        ran.add(torch.equal(ya, x))  # was the branch dropped for every sample?
    if mode == "batch":
        assert ran == {True, False}  # both draws occurred
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


def test_gradcheck_checkpointed_branch() -> None:
    block = Residual(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), checkpoint=True).double()
    x = torch.randn(4, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_gradcheck_subset_drop(checkpointed: bool) -> None:
    block = Residual(nn.Linear(3, 3), drop_path=0.5, drop_mode="subset", checkpoint=checkpointed)
    block = block.double()

    def fixed_draw(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(3)  # the same subset on every call gradcheck makes
        return block(x)

    x = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(fixed_draw, (x,))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_norm_statistics_once_for_both_momentum_kinds(momentum) -> None:
    def branch() -> nn.Sequential:
        return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=momentum))

    plain, ckpt = Residual(branch()), Residual(branch(), checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    for _ in range(3):
        x = torch.randn(6, 3)
        for model in (plain, ckpt):
            model(x.clone().requires_grad_()).sum().backward()
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
    assert ckpt.fn[1].momentum == momentum


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh()
    )


class _Case(NamedTuple):
    build: Callable[[bool], nn.Module]  # checkpoint -> model
    shape: tuple[int, ...]
    branches: Callable[[nn.Module], list[nn.Module]]


_CASES = {
    "Residual": _Case(lambda ck: Residual(_mlp(), checkpoint=ck), (4, 8), lambda m: [m.fn]),
    "Residual-subset-drop": _Case(
        lambda ck: Residual(_mlp(), drop_path=0.5, drop_mode="subset", checkpoint=ck),
        (4, 8),
        lambda m: [m.fn],
    ),
    "ResidualBlock": _Case(
        lambda ck: ResidualBlock(8, 8, checkpoint=ck), (2, 8, 5, 5), lambda m: [m.fn]
    ),
    # batch == length: the input fits batch-first and sequence-first layouts alike
    "TransformerEncoderLayer": _Case(
        lambda ck: TransformerEncoderLayer(16, 2, dim_feedforward=32, checkpoint=ck),
        (4, 4, 16),
        lambda m: [m.self_attn_block.fn, m.ff_block.fn],
    ),
}


def _count_calls(modules: list[nn.Module]) -> list[int]:
    """A list whose entries count the forward calls of ``modules``, kept up to date by hooks.

    Pre-hooks: the recomputation stops early, once it has what backward needs, so a forward
    (post-)hook would miss it.
    """
    calls = [0] * len(modules)
    for i, m in enumerate(modules):

        def hook(*_: object, i: int = i) -> None:
            calls[i] += 1

        m.register_forward_pre_hook(hook)
    return calls


def _saved_tensors(model: nn.Module, x: torch.Tensor) -> int:
    """How many tensors one forward saves for backward (then runs backward, when there is one)."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    if y.requires_grad:
        y.sum().backward()
    return count


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("case", list(_CASES), ids=str)
def test_checkpointed_branch_reruns_in_backward(case: str, checkpointed: bool) -> None:
    build, shape, branches = _CASES[case]
    model = build(checkpointed).train()
    calls = _count_calls(branches(model))
    y = model(torch.randn(shape, requires_grad=True))
    assert calls == [1] * len(calls)
    y.square().sum().backward()
    # checkpointing recomputes every branch once in backward; without it nothing reruns
    assert calls == [2 if checkpointed else 1] * len(calls)


@pytest.mark.parametrize("case", list(_CASES), ids=str)
def test_checkpointed_branch_saves_fewer_tensors(case: str) -> None:
    build, shape, _ = _CASES[case]
    plain, ckpt = build(False).train(), build(True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(shape, requires_grad=True)
    stored, recomputed = _saved_tensors(plain, x), _saved_tensors(ckpt, x)
    assert recomputed < stored, (recomputed, stored)


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
@pytest.mark.parametrize("case", list(_CASES), ids=str)
def test_checkpoint_is_inactive_in_eval_and_without_grad(case: str, mode: str) -> None:
    build, shape, branches = _CASES[case]
    plain, ckpt = build(False), build(True)
    ckpt.load_state_dict(plain.state_dict())
    if mode == "eval":
        plain.eval()
        ckpt.eval()
    calls = _count_calls(branches(ckpt))
    x = torch.randn(shape, requires_grad=True)
    grad = torch.enable_grad() if mode == "eval" else torch.no_grad()
    with grad:
        # activations stored as without checkpointing, and the branch runs once: no recompute
        assert _saved_tensors(ckpt, x) == _saved_tensors(plain, x)
    assert calls == [1] * len(calls)


def _bn_block(checkpointed: bool) -> Residual:
    branch = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 4))
    return Residual(branch, checkpoint=checkpointed)


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_func_transforms_through_a_checkpointed_block(transform: str) -> None:
    """``torch.func`` gradients equal autograd's on the plain block; statistics move once.

    Before: "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks".
    """
    block = _bn_block(True)
    plain = copy.deepcopy(block)
    plain.checkpoint = False
    x = torch.randn(6, 4)
    plain(x).square().sum().backward()
    params = {k: v.detach() for k, v in block.named_parameters()}
    buffers = {k: v.clone() for k, v in block.named_buffers()}  # inputs: BatchNorm updates them

    def loss(p: dict, b: dict) -> torch.Tensor:
        return torch.func.functional_call(block, (p, b), (x,)).square().sum()

    transformed = torch.func.grad if transform == "grad" else torch.func.jacrev
    grads = transformed(loss)(params, buffers)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-5, msg=name)
    for name, b in plain.named_buffers():
        torch.testing.assert_close(buffers[name], b, msg=name)
    assert int(buffers["fn.1.num_batches_tracked"]) == 1


def test_func_vjp_through_a_checkpointed_block() -> None:
    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)), checkpoint=True)
    x = torch.randn(6, 4, requires_grad=True)
    y = block(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    params = {k: v.detach() for k, v in block.named_parameters()}
    out, pull = torch.func.vjp(lambda p, x: torch.func.functional_call(block, p, (x,)), params, x)
    grads, gx = pull(dy)
    torch.testing.assert_close(out, y)
    torch.testing.assert_close(gx, x.grad)
    for name, p in block.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


def test_func_grad_through_checkpointed_dropout_matches_autograd() -> None:
    """Same seed: the transform draws the plain block's mask and gives its gradient."""
    block = Residual(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), checkpoint=True)
    xa = torch.randn(8, 4, requires_grad=True)
    torch.manual_seed(1)
    block(xa).square().sum().backward()
    torch.manual_seed(1)
    gx = torch.func.grad(lambda x: block(x).square().sum())(xa.detach())
    torch.testing.assert_close(gx, xa.grad)
