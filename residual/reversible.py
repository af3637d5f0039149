"""Reversible residuals (RevNet, Gomez et al. 2017; Reformer): activation memory flat in depth.

A :class:`Reversible` block splits the stream into two halves along the channel dim and computes
``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``; its inverse recovers ``x`` from ``y`` exactly (up to
rounding). A :class:`ReversibleSequence` stores no activations in training: its backward
reconstructs each block's input from its output and recomputes the block, replaying the RNG
(dropout matches) and leaving norm statistics as the forward left them (they move once).

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

from typing import Any

import torch
from torch import Tensor, nn

from residual._checkpoint import FrozenNormStats
from residual._dims import read_branch_dims
from residual._types import Layout, check_layout
from residual.errors import ResidualError

__all__ = ["Reversible", "ReversibleSequence"]


class _RngState:
    """The CPU and (if used) CUDA generator states at one moment, to replay a random op."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def run(self, fn: nn.Module, x: Tensor) -> Tensor:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            return fn(x)


class Reversible(nn.Module):
    """``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` on the two channel halves of ``x``.

    Args:
        f, g: modules that keep the shape of a half.
        layout: where the channels are: ``"channels_last"`` (default) or ``"channels_first"``.

    Raises:
        TypeError: ``f`` or ``g`` is not a module.
        ResidualError: ``f`` or ``g`` changes the channel count (read from its layers when they
            declare it, else at the first call), or the stream has an odd channel count.
    """

    def __init__(self, f: nn.Module, g: nn.Module, *, layout: Layout = "channels_last") -> None:
        super().__init__()
        for name, m in (("f", f), ("g", g)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"Reversible: {name} must be an nn.Module, got {type(m).__name__}")
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
        channels = x.shape[self.dim]
        if channels % 2:
            raise ResidualError(
                f"Reversible: the stream has {channels} channels ({self.layout}, shape "
                f"{tuple(x.shape)}); a reversible split needs an even count"
            )
        a, b = x.chunk(2, dim=self.dim)
        return a, b

    def _checked(self, name: str, out: Tensor, like: Tensor) -> Tensor:
        if out.shape != like.shape:
            raise ResidualError(
                f"Reversible: {name} turned a half of shape {tuple(like.shape)} into "
                f"{tuple(out.shape)}; both functions must keep the shape"
            )
        return out

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


class _ReversibleFunction(torch.autograd.Function):
    """Forward without storing activations; backward rebuilds them from the outputs."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, blocks: list[Reversible], params: list[nn.Parameter], *flat: Tensor
    ) -> Tensor:
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
        ctx.blocks, ctx.params, ctx.states = blocks, params, states
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        (y,) = ctx.saved_tensors
        grads: dict[int, Tensor] = {}
        for block, (sf, sg) in zip(reversed(ctx.blocks), reversed(ctx.states), strict=True):
            y1, y2 = block._halves(y.detach())
            dy1, dy2 = block._halves(dy)
            g_params = [p for p in block.g.parameters() if p.requires_grad]
            f_params = [p for p in block.f.parameters() if p.requires_grad]
            with torch.enable_grad(), FrozenNormStats(block):
                y1_ = y1.requires_grad_()
                gy1 = sg.run(block.g, y1_)
                dg = torch.autograd.grad(gy1, [y1_, *g_params], dy2, allow_unused=True)
                with torch.no_grad():
                    x2 = y2 - gy1
                    dy1 = dy1 + (dg[0] if dg[0] is not None else 0)
                x2_ = x2.detach().requires_grad_()
                fx2 = sf.run(block.f, x2_)
                df = torch.autograd.grad(fx2, [x2_, *f_params], dy1, allow_unused=True)
            with torch.no_grad():
                x1 = y1 - fx2
                dx2 = dy2 + (df[0] if df[0] is not None else 0)
                y = torch.cat([x1, x2], dim=block.dim)
                dy = torch.cat([dy1, dx2], dim=block.dim)
            for p, g in (*zip(g_params, dg[1:], strict=True), *zip(f_params, df[1:], strict=True)):
                if g is not None:
                    grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
        param_grads = tuple(grads.get(id(p)) for p in ctx.params)
        return (dy, None, None, *param_grads)


class ReversibleSequence(nn.Module):
    """A stack of :class:`Reversible` blocks whose training memory does not grow with depth.

    In training (with grad enabled) only the output is kept for backward; each block's input is
    rebuilt from its output during backward. In eval it is a plain sequence.

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
        if not (self.training and torch.is_grad_enabled()):
            for block in self.blocks:
                x = block(x)
            return x
        params = [p for p in self.parameters() if p.requires_grad]
        blocks = list(self.blocks)
        out: Tensor = _ReversibleFunction.apply(x, blocks, params, *params)
        return out

    def inverse(self, y: Tensor) -> Tensor:
        """Recover the input from the output, block by block in reverse."""
        blocks: list[Reversible] = list(self.blocks)  # type: ignore[arg-type]
        for block in reversed(blocks):
            y = block.inverse(y)
        return y
