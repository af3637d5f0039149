"""Reversible residuals: exact inverse, gradients equal to the stored stack, O(1) memory."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

from residual import ResidualError
from residual.reversible import Reversible, ReversibleSequence


def mlp(dim: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout), nn.Linear(dim, dim))


def conv(channels: int, momentum: float | None = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, momentum=momentum),
        nn.ReLU(),
    )


class FirstChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :1]


def stack(depth: int, dim: int, dropout: float = 0.0) -> ReversibleSequence:
    return ReversibleSequence(
        *(Reversible(mlp(dim, dropout), mlp(dim, dropout)) for _ in range(depth))
    )


def plain_forward(seq: ReversibleSequence, x: torch.Tensor) -> torch.Tensor:
    for block in seq.blocks:  # the same blocks, activations stored by autograd
        x = block(x)
    return x


def test_block_formula_and_inverse() -> None:
    f, g = mlp(4), mlp(4)
    block = Reversible(f, g)
    x = torch.randn(3, 8)
    x1, x2 = x[:, :4], x[:, 4:]
    y1 = x1 + f(x2)
    torch.testing.assert_close(block(x), torch.cat([y1, x2 + g(y1)], dim=-1))
    assert (block.inverse(block(x)) - x).abs().max() < 1e-5


def test_channels_first_split() -> None:
    f, g = conv(3).eval(), conv(3).eval()
    block = Reversible(f, g, layout="channels_first").eval()
    x = torch.randn(2, 6, 5, 5)
    x1, x2 = x[:, :3], x[:, 3:]  # halves of the channels (dim 1), not of the last dim
    y1 = x1 + f(x2)
    torch.testing.assert_close(block(x), torch.cat([y1, x2 + g(y1)], dim=1))
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


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batchnorm_statistics_move_once(momentum: float | None) -> None:
    def build() -> ReversibleSequence:
        torch.manual_seed(0)
        return ReversibleSequence(
            *(
                Reversible(conv(2, momentum), conv(2, momentum), layout="channels_first")
                for _ in range(3)
            )
        ).double()

    rev, plain = build(), build()
    for step in range(2):
        x = torch.randn(4, 4, 6, 6, dtype=torch.double, requires_grad=True)
        rev(x).sum().backward()
        plain_forward(plain, x).sum().backward()
        for (name, a), b in zip(rev.named_buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
        assert int(rev.blocks[0].f[1].num_batches_tracked) == step + 1
    assert all(m.momentum == momentum for m in rev.modules() if isinstance(m, nn.BatchNorm2d))
    for a, b in zip(rev.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_activation_memory_does_not_grow_with_depth() -> None:
    def saved(depth: int) -> int:
        seq = stack(depth, 32)
        weights = {p.untyped_storage().data_ptr() for p in seq.parameters()}
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.untyped_storage().data_ptr() not in weights:  # parameters: saved, never copied
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
    with pytest.raises(
        TypeError, match="Reversible: f must be a torch.nn.Module, got builtin_function_or_method"
    ):
        Reversible(torch.tanh, nn.Identity())
    with pytest.raises(TypeError, match="block 0 is Linear, not Reversible"):
        ReversibleSequence(nn.Linear(2, 2))
    with pytest.raises(ResidualError, match="at least one"):
        ReversibleSequence()


# --- higher-order gradients ---------------------------------------------------------------------


def tiny(depth: int = 2, half: int = 2) -> ReversibleSequence:
    def fn() -> nn.Module:
        return nn.Sequential(nn.Linear(half, half), nn.Tanh())

    return ReversibleSequence(*(Reversible(fn(), fn()) for _ in range(depth))).double()


def test_gradgradcheck_float64_input_and_parameters() -> None:
    seq = tiny()
    names = [name for name, _ in seq.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in seq.parameters()]

    def run(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(seq, dict(zip(names, ps, strict=True)), (x,))

    x = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(run, (x, *params))
    assert torch.autograd.gradgradcheck(run, (x, *params))


def penalised(forward: Any, seq: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A gradient penalty: loss + |d loss / dx|^2 + |d loss / d w|^2 (double backward)."""
    out = forward(x)
    loss = out.square().sum()
    weights = [p for p in seq.parameters() if p.dim() > 1]
    dx, *dw = torch.autograd.grad(loss, [x, *weights], create_graph=True)
    (loss + dx.square().sum() + sum(g.square().sum() for g in dw)).backward()
    grads = [x.grad, *(p.grad for p in seq.parameters())]
    x.grad = None
    seq.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        pytest.param(lambda: stack(3, 3, dropout=0.5).double(), (5, 6), id="mlp_dropout"),
        pytest.param(
            lambda: ReversibleSequence(
                *(Reversible(conv(2), conv(2), layout="channels_first") for _ in range(2))
            ).double(),
            (3, 4, 4, 4),
            id="conv_batchnorm",
        ),
    ],
)
def test_double_backward_equals_the_stored_stack(make: Any, shape: tuple[int, ...]) -> None:
    seq = make()
    start = copy.deepcopy(seq.state_dict())
    x = torch.randn(shape, dtype=torch.double, requires_grad=True)
    torch.manual_seed(3)
    rev = penalised(seq, seq, x)
    rev_buffers = [b.clone() for b in seq.buffers()]
    seq.load_state_dict(start)
    torch.manual_seed(3)
    plain = penalised(lambda t: plain_forward(seq, t), seq, x)
    for i, (a, b) in enumerate(zip(rev, plain, strict=True)):
        torch.testing.assert_close(a, b, msg=f"gradient {i}")
    for a, b in zip(rev_buffers, seq.buffers(), strict=True):  # statistics moved once
        torch.testing.assert_close(a, b)


def test_create_graph_gradients_equal_the_plain_backward() -> None:
    seq = stack(2, 3).double()
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    first = torch.autograd.grad(seq(x).sum(), [x, *seq.parameters()])
    again = torch.autograd.grad(seq(x).sum(), [x, *seq.parameters()], create_graph=True)
    assert again[0].requires_grad  # differentiable: a graph was built
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0.0)


# --- what the backward refuses ------------------------------------------------------------------


SWITCHES = {
    "sequence_eval": (
        lambda seq: seq.eval(),
        r"block 0 changed mode .*: the block \(train -> eval\)",
    ),
    "one_dropout_eval": (
        lambda seq: seq.blocks[1].f[2].eval(),
        r"block 1 changed mode between forward and backward: f\.2 \(train -> eval\)",
    ),
}


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
@pytest.mark.parametrize(("switch", "match"), SWITCHES.values(), ids=SWITCHES.keys())
def test_train_eval_switch_between_forward_and_backward_is_an_error(
    switch: Any, match: str, create_graph: bool
) -> None:
    seq = stack(2, 3, dropout=0.5)
    x = torch.randn(4, 6, requires_grad=True)
    torch.manual_seed(3)
    out = seq(x)
    switch(seq)
    with pytest.raises(ResidualError, match=match):
        torch.autograd.grad(out.sum(), [x, *seq.parameters()], create_graph=create_graph)
    seq.train()
    out.sum().backward()  # switched back: the backward is the forward's again
    stored = x.detach().requires_grad_()
    torch.manual_seed(3)  # the same dropout masks, activations stored by autograd
    plain_forward(seq, stored).sum().backward()
    torch.testing.assert_close(x.grad, stored.grad)


def test_switch_after_backward_is_fine() -> None:
    seq = stack(2, 3, dropout=0.5)
    seq(torch.randn(4, 6, requires_grad=True)).sum().backward()
    seq.eval()
    x = torch.randn(4, 6)
    y = x
    for block in seq.blocks:  # by hand: y1 = x1 + f(x2), y2 = x2 + g(y1); no dropout in eval
        y1 = y[:, :3] + block.f(y[:, 3:])
        y = torch.cat([y1, y[:, 3:] + block.g(y1)], dim=-1)
    torch.testing.assert_close(seq(x), y)


def test_parameter_modified_between_forward_and_backward_is_an_error() -> None:
    seq = stack(2, 3)
    out = seq(torch.randn(4, 6, requires_grad=True))
    with torch.no_grad():
        seq.blocks[0].f[0].weight.add_(1.0)  # e.g. an optimizer step before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_functional_call_uses_the_given_parameters() -> None:
    seq = stack(2, 3).double()  # no dropout: eval mode is the plain stack with stored activations
    given = {k: (v.detach() * 2).requires_grad_() for k, v in seq.named_parameters()}
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    grads = []
    for mode in (True, False):
        out = functional_call(seq.train(mode), given, (x,))
        grads.append(torch.autograd.grad(out.square().sum(), [x, *given.values()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    doubled = copy.deepcopy(seq)  # the same stack, holding the given values
    doubled.load_state_dict({k: v.detach() for k, v in given.items()})
    out = functional_call(seq.train(), given, (x,))
    torch.testing.assert_close(out, plain_forward(doubled, x))
    assert not torch.allclose(out, seq(x))  # not the module's own parameters


class WithSpare(nn.Module):
    """A branch holding a parameter its forward never uses (a frozen-out head, an ablation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.spare = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_a_parameter_the_branch_never_uses_gets_no_gradient(create_graph: bool) -> None:
    torch.manual_seed(0)
    seq = ReversibleSequence(Reversible(WithSpare(3), WithSpare(3))).double()
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    params = list(seq.parameters())
    grads = torch.autograd.grad(
        seq(x).square().sum(), [x, *params], create_graph=create_graph, allow_unused=True
    )
    plain = torch.autograd.grad(
        plain_forward(seq, x).square().sum(), [x, *params], allow_unused=True
    )
    for (name, _), got, want in zip(seq.named_parameters(), grads[1:], plain[1:], strict=True):
        if name.endswith("spare"):
            assert got is None and want is None, name
        else:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0.0, msg=name)
    torch.testing.assert_close(grads[0], plain[0], atol=1e-12, rtol=0.0)


class Constant(nn.Module):
    """A branch whose output depends on its parameter only, not on its input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(x).clone()


@pytest.mark.parametrize("constant", ["f", "g"])
def test_a_branch_that_ignores_its_input_gets_the_plain_gradients(constant: str) -> None:
    torch.manual_seed(0)
    f, g = (Constant(3), mlp(3)) if constant == "f" else (mlp(3), Constant(3))
    seq = ReversibleSequence(Reversible(f, g), Reversible(mlp(3), mlp(3))).double()
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    params = list(seq.parameters())
    got = torch.autograd.grad(seq(x).square().sum(), [x, *params])
    want = torch.autograd.grad(plain_forward(seq, x).square().sum(), [x, *params])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0.0)


def test_backward_leaves_the_global_rng_where_it_was() -> None:
    seq = stack(3, 4, dropout=0.5)  # the backward replays every block's dropout masks
    out = seq(torch.randn(5, 8, requires_grad=True))
    before = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_a_shape_error_in_training_names_the_function() -> None:
    seq = ReversibleSequence(Reversible(nn.Identity(), FirstChannel()))
    with pytest.raises(ResidualError, match=r"Reversible: g turned a half of shape \(2, 3\) into"):
        seq(torch.randn(2, 6, requires_grad=True))


class Tied(nn.Module):
    """One linear layer applied twice: its parameters stand under one name each."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.again = self.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.again(torch.tanh(self.linear(x)))


@pytest.mark.parametrize("create_graph", [False, True], ids=["backward", "create_graph"])
def test_tied_parameters_get_the_plain_gradients_without_a_functional_call(
    create_graph: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import residual.reversible as reversible

    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return functional_call(*args, **kwargs)

    monkeypatch.setattr(reversible, "functional_call", counted)
    torch.manual_seed(0)
    seq = ReversibleSequence(Reversible(Tied(3), Tied(3)), Reversible(Tied(3), mlp(3))).double()
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    params = list(seq.parameters())
    got = torch.autograd.grad(seq(x).square().sum(), [x, *params], create_graph=create_graph)
    want = torch.autograd.grad(plain_forward(seq, x).square().sum(), [x, *params])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0.0)
    # the plain backward calls each function with its own parameters (no swap); the
    # differentiable one binds views of them, and must bind both names of a tied parameter
    assert (len(calls) > 0) == create_graph


# --- torch.fx.symbolic_trace ------------------------------------------------------------------


def _fx_cases() -> dict[str, tuple[Any, tuple[int, ...]]]:
    return {
        "Reversible": (lambda: Reversible(mlp(4, 0.3), mlp(4)), (5, 8)),
        "Reversible-channels_first": (
            lambda: Reversible(conv(2), conv(2), layout="channels_first"),
            (3, 4, 5, 5),
        ),
        "ReversibleSequence": (lambda: stack(3, 4, dropout=0.3), (5, 8)),
        "ReversibleSequence-bn": (
            lambda: ReversibleSequence(
                *(Reversible(conv(2), conv(2), layout="channels_first") for _ in range(2))
            ),
            (3, 4, 5, 5),
        ),
    }


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(_fx_cases()))
def test_symbolic_trace_equals_eager(case: str, train: bool) -> None:
    """Outputs, gradients and norm statistics of the traced module equal eager's (same seed).

    Before: "symbolically traced variables cannot be used as inputs to control flow".
    """
    build, shape = _fx_cases()[case]
    torch.manual_seed(0)
    eager = build().train(train)
    traced = torch.fx.symbolic_trace(copy.deepcopy(eager))
    x = torch.randn(shape)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    ya = eager(xa)
    ya.square().sum().backward()
    torch.manual_seed(1)
    yb = traced(xb)
    yb.square().sum().backward()
    torch.testing.assert_close(yb, ya, atol=0, rtol=0)
    torch.testing.assert_close(xb.grad, xa.grad)
    for (name, pa), pb in zip(eager.named_parameters(), traced.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)
    torch.testing.assert_close(traced.state_dict(), eager.state_dict(), atol=0, rtol=0)


def test_a_traced_stack_stays_reversible_and_follows_its_mode() -> None:
    """The traced stack chooses at run time: reversible in training with grad, plain otherwise.

    Reversible: the branches rerun in backward (a pre-hook counts them) and stores no
    activation; after ``.eval()`` of the traced module, a plain forward.
    """
    gm = torch.fx.symbolic_trace(stack(2, 4).train())
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    for block in gm.blocks:
        block.f.register_forward_pre_hook(count)
    gm(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert calls[0] == 4  # 2 blocks: forward, then the recomputation in backward
    gm.eval()
    calls[0] = 0
    gm(torch.randn(3, 8, requires_grad=True)).sum().backward()
    assert calls[0] == 2  # plain forward, no recomputation


def test_traced_reversible_keeps_its_checks() -> None:
    gm = torch.fx.symbolic_trace(Reversible(mlp(4), mlp(4)))
    with pytest.raises(ResidualError, match="needs an even count"):
        gm(torch.randn(2, 7))
    bad = torch.fx.symbolic_trace(Reversible(FirstChannel(), mlp(4)))
    with pytest.raises(ResidualError, match="f turned a half of shape"):
        bad(torch.randn(2, 8))
