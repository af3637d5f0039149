"""Reversible residuals (RevNet, Gomez et al. 2017; Reformer): activation memory flat in depth.

A :class:`Reversible` block splits the stream into two halves along the channel dim and computes
``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``; its inverse recovers ``x`` from ``y`` exactly (up to
rounding). A :class:`ReversibleSequence` stores no activations in training: its backward
reconstructs each block's input from its output and recomputes the block, replaying the RNG
(dropout matches) and leaving norm statistics as the forward left them (they move once). Its
backward is itself differentiable (double backward), and it refuses a train/eval switch between
forward and backward.

The additive coupling is the residual connection with the shortcut on the other half; it lives
here rather than in ``Residual`` because the two halves must be inverted together.

>>> import torch
>>> from torch import nn
>>> block = Reversible(nn.Linear(4, 4), nn.Linear(4, 4))
>>> x = torch.randn(3, 8)
>>> bool((block.inverse(block(x)) - x).abs().max() < 1e-5)
True
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from residual import _branch
from residual._checkpoint import FrozenNormStats
from residual._dims import read_branch_dims
from residual._types import Layout, check_layout
from residual.errors import ResidualError, check_module

__all__ = ["Reversible", "ReversibleSequence"]


class _RngState:
    """The CPU and (if used) CUDA generator states at one moment, to replay a random op."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def run(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            return fn(x)


def _split(x: Tensor, dim: int, layout: str) -> tuple[Tensor, Tensor]:
    """The two channel halves of ``x``; raise on an odd channel count (an FX leaf: reads shapes)."""
    channels = x.shape[dim]
    with _branch.shape_checks():  # quiet under torch.jit.trace: a check, not a computation
        odd = bool(channels % 2)
    if odd:
        raise ResidualError(
            f"Reversible: the stream has {channels} channels ({layout}, shape "
            f"{tuple(x.shape)}); a reversible split needs an even count"
        )
    a, b = x.chunk(2, dim=dim)
    return a, b


def _check_half(name: str, out: Tensor, like: Tensor) -> Tensor:
    """``out``; raise unless it has the shape of the half ``like`` (an FX leaf: reads shapes)."""
    with _branch.shape_checks():
        differs = out.shape != like.shape
    if differs:
        raise ResidualError(
            f"Reversible: {name} turned a half of shape {tuple(like.shape)} into "
            f"{tuple(out.shape)}; both functions must keep the shape"
        )
    return out


class Reversible(nn.Module):
    """``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` on the two channel halves of ``x``.

    Args:
        f, g: modules that keep the shape of a half.
        layout: where the channels are: ``"channels_last"`` (default) or ``"channels_first"``.

    Raises:
        TypeError: ``f`` or ``g`` is not a module.
        ResidualError: ``f`` or ``g`` changes the channel count (read from its layers when they
            declare it, else at the first call), or the stream has an odd channel count.

    >>> import torch
    >>> from torch import nn
    >>> block = Reversible(nn.Conv2d(4, 4, 3, padding=1), nn.Identity(), layout="channels_first")
    >>> x = torch.randn(2, 8, 5, 5)
    >>> y = block(x)
    >>> y.shape, bool(torch.allclose(block.inverse(y), x, atol=1e-5))
    (torch.Size([2, 8, 5, 5]), True)
    """

    def __init__(self, f: nn.Module, g: nn.Module, *, layout: Layout = "channels_last") -> None:
        super().__init__()
        for name, m in (("f", f), ("g", g)):
            check_module("Reversible", name, m)
            dims = read_branch_dims(m)
            if dims is not None and (dims.in_channels != dims.out_channels or dims.stride != 1):
                raise ResidualError(
                    f"Reversible: {name} maps {dims.in_channels} -> {dims.out_channels} channels "
                    f"(stride {dims.stride}); both functions must keep the shape of a half"
                )
        self.f, self.g = f, g
        self.layout = check_layout("Reversible", layout)
        self.dim = 1 if layout == "channels_first" else -1

    def _halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _split(x, self.dim, self.layout)

    def _checked(self, name: str, out: Tensor, like: Tensor) -> Tensor:
        return _check_half(name, out, like)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self._halves(x)
        y1 = x1 + self._checked("f", self.f(x2), x1)
        y2 = x2 + self._checked("g", self.g(y1), x2)
        return torch.cat([y1, y2], dim=self.dim)

    def inverse(self, y: Tensor) -> Tensor:
        """Recover the input from the output: ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``."""
        y1, y2 = self._halves(y)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=self.dim)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}"


def _modes(block: nn.Module) -> tuple[bool, ...]:
    """The ``training`` flag of every module in ``block`` (itself first), in module order."""
    return tuple(m.training for m in block.modules())


def _check_modes(blocks: list[Reversible], modes: list[tuple[bool, ...]]) -> None:
    """Raise if a block's train/eval mode changed between the forward and this backward."""
    for i, (block, before) in enumerate(zip(blocks, modes, strict=True)):
        now = _modes(block)
        if now == before:
            continue
        names = [name or "the block" for name, _ in block.named_modules()]
        if len(now) != len(before):
            changed = "its submodules"
        else:
            changed = ", ".join(
                f"{name} ({'train' if a else 'eval'} -> {'train' if b else 'eval'})"
                for name, a, b in zip(names, before, now, strict=True)
                if a != b
            )
        raise ResidualError(
            f"ReversibleSequence: block {i} changed mode between forward and backward: "
            f"{changed}. The backward recomputes each block from its output, and in another "
            "mode the recomputation differs (dropout, batch statistics), which would give wrong "
            "gradients; call .train() / .eval() before the forward or after the backward"
        )


Names = dict[str, int]  # a module's parameter names -> their index among the function's inputs
Grads = tuple[Tensor | None, ...]


def _names(module: nn.Module, index: dict[int, int]) -> Names:
    return {
        name: index[id(p)]
        for name, p in module.named_parameters(remove_duplicate=False)
        if id(p) in index
    }


def _bind(module: nn.Module, names: Names, params: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """``module`` called with the given tensors as its parameters (the forward's: saved ones).

    The module itself where they are its parameters already (the usual case: no swap).
    """
    current = dict(module.named_parameters(remove_duplicate=False))
    swap = {name: params[i] for name, i in names.items() if current.get(name) is not params[i]}
    return partial(functional_call, module, swap) if swap else module


def _replay(
    block: Reversible, state: _RngState, fn: Callable[[Tensor], Tensor], x: Tensor
) -> Tensor:
    """``fn(x)`` as the forward computed it: its RNG replayed, norm statistics left alone."""
    with FrozenNormStats(block):
        return state.run(fn, x)


def _differentiable_backward(ctx: Any, y: Tensor, params: list[Tensor], dy: Tensor) -> Grads:
    """The backward as a differentiable graph, for ``create_graph=True`` (higher-order grads).

    The input is rebuilt from the output ``y`` by differentiable inverses: through ``y`` it
    depends on the function's inputs, with Jacobian ``inverse' * forward' = I``. The blocks are
    recomputed from it with aliases (views) of their parameters and differentiated with
    ``create_graph=True`` with respect to the rebuilt input and the aliases: the partial
    derivatives the plain stack gives, without reaching back into this function's own backward.
    Memory is that of the plain stack here: higher-order gradients need the activations.
    """
    steps = list(zip(ctx.blocks, ctx.states, ctx.names, strict=True))
    x = y
    for block, (sf, sg), (f_names, g_names) in reversed(steps):
        y1, y2 = block._halves(x)
        x2 = y2 - _replay(block, sg, _bind(block.g, g_names, params), y1)
        x1 = y1 - _replay(block, sf, _bind(block.f, f_names, params), x2)
        x = torch.cat([x1, x2], dim=block.dim)
    aliases = [p.view_as(p) for p in params]
    x_in, out = x, x
    for block, (sf, sg), (f_names, g_names) in steps:
        x1, x2 = block._halves(out)
        y1 = x1 + _replay(block, sf, _bind(block.f, f_names, aliases), x2)
        y2 = x2 + _replay(block, sg, _bind(block.g, g_names, aliases), y1)
        out = torch.cat([y1, y2], dim=block.dim)
    grads = torch.autograd.grad(out, [x_in, *aliases], dy, create_graph=True, allow_unused=True)
    return (grads[0], None, *grads[1:])


class _ReversibleFunction(torch.autograd.Function):
    """Forward without storing activations; backward rebuilds them from the outputs.

    The parameters are saved (references, no copy): the backward recomputes with the very
    tensors the forward used (``torch.func.functional_call`` included), and autograd refuses a
    backward after one of them was modified in place. The backward is differentiable when
    autograd asks for it (``create_graph=True``: double backward, gradient penalties,
    ``gradgradcheck``); it then rebuilds and keeps the activations. A block whose train/eval
    mode changed between forward and backward is refused.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, blocks: list[Reversible], *params: Tensor) -> Tensor:
        index = {id(p): i for i, p in enumerate(params)}
        states: list[tuple[_RngState, _RngState]] = []
        with torch.no_grad():
            for block in blocks:
                x1, x2 = block._halves(x)
                sf = _RngState(x.device)
                y1 = x1 + block._checked("f", block.f(x2), x1)
                sg = _RngState(x.device)
                y2 = x2 + block._checked("g", block.g(y1), x2)
                x = torch.cat([y1, y2], dim=block.dim)
                states.append((sf, sg))
        ctx.blocks, ctx.states = blocks, states
        ctx.modes = [_modes(block) for block in blocks]
        ctx.names = [(_names(b.f, index), _names(b.g, index)) for b in blocks]
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Grads:
        y, *params = ctx.saved_tensors
        _check_modes(ctx.blocks, ctx.modes)
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            return _differentiable_backward(ctx, y, params, dy)
        grads: list[Tensor | None] = [None] * len(params)
        y = y.detach()
        steps = zip(ctx.blocks, ctx.states, ctx.names, strict=True)
        for block, (sf, sg), (f_names, g_names) in reversed(list(steps)):
            y1, y2 = block._halves(y)
            dy1, dy2 = block._halves(dy)
            g_at, f_at = sorted(set(g_names.values())), sorted(set(f_names.values()))
            with torch.enable_grad(), FrozenNormStats(block):
                y1_ = y1.requires_grad_()
                gy1 = sg.run(_bind(block.g, g_names, params), y1_)
                g_in = [y1_, *(params[i] for i in g_at)]
                dg = torch.autograd.grad(gy1, g_in, dy2, allow_unused=True)
                with torch.no_grad():
                    x2 = y2 - gy1
                    dy1 = dy1 + (dg[0] if dg[0] is not None else 0)
                x2_ = x2.detach().requires_grad_()
                fx2 = sf.run(_bind(block.f, f_names, params), x2_)
                f_in = [x2_, *(params[i] for i in f_at)]
                df = torch.autograd.grad(fx2, f_in, dy1, allow_unused=True)
            with torch.no_grad():
                x1 = y1 - fx2
                dx2 = dy2 + (df[0] if df[0] is not None else 0)
                y = torch.cat([x1, x2], dim=block.dim)
                dy = torch.cat([dy1, dx2], dim=block.dim)
                for i, g in (*zip(g_at, dg[1:], strict=True), *zip(f_at, df[1:], strict=True)):
                    if g is not None:
                        acc = grads[i]
                        grads[i] = g if acc is None else acc + g
        return (dy, None, *grads)


def _run_blocks(x: Tensor, blocks: nn.ModuleList) -> Tensor:
    """The stack's forward: reversible in training with grad enabled, a plain loop otherwise.

    An FX leaf: the choice is made when the traced graph runs (by the mode of ``blocks``, which
    ``.train()`` / ``.eval()`` of the traced module sets, and the grad mode), not when tracing.
    """
    if not (blocks.training and torch.is_grad_enabled()):
        for block in blocks:
            x = block(x)
        return x
    params = [p for p in blocks.parameters() if p.requires_grad]
    out: Tensor = _ReversibleFunction.apply(x, list(blocks), *params)
    return out


torch.fx.wrap("_split")
torch.fx.wrap("_check_half")
torch.fx.wrap("_run_blocks")


class ReversibleSequence(nn.Module):
    """A stack of :class:`Reversible` blocks whose training memory does not grow with depth.

    In training (with grad enabled) only the output is kept for backward; each block's input is
    rebuilt from its output during backward. In eval it is a plain sequence.

    Higher-order gradients (``torch.autograd.grad(..., create_graph=True)``, gradient penalties)
    are exact; that backward rebuilds the activations and keeps them, as the plain stack would.
    Leave the blocks' train/eval mode and their parameters alone between forward and backward:
    the backward recomputes the blocks and raises (ResidualError for a mode switch, autograd's
    in-place error for a modified parameter) rather than give the gradients of another function.

    >>> import torch
    >>> from torch import nn
    >>> seq = ReversibleSequence(*(Reversible(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)))
    >>> x = torch.randn(2, 8, requires_grad=True)
    >>> seq(x).sum().backward()
    >>> x.grad.shape
    torch.Size([2, 8])
    """

    def __init__(self, *blocks: Reversible) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            if not isinstance(block, Reversible):
                raise TypeError(
                    f"ReversibleSequence: block {i} is {type(block).__name__}, not Reversible"
                )
        if not blocks:
            raise ResidualError("ReversibleSequence: give at least one Reversible block")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        return _run_blocks(x, self.blocks)

    def inverse(self, y: Tensor) -> Tensor:
        """Recover the input from the output, block by block in reverse."""
        blocks: list[Reversible] = list(self.blocks)  # type: ignore[arg-type]
        for block in reversed(blocks):
            y = block.inverse(y)
        return y
