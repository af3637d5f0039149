"""Frac-connections (Zhu et al. 2025, arXiv 2503.14125): hyper-connections over fractions.

Where hyper-connections keep n copies of the hidden state (n times its memory), frac-connections
split the one hidden state ``h`` (``d`` channels) into m fractions ``F_1..F_m`` of ``d / m``
channels and connect those::

    in_j  = sum_i Y_ij(F) F_i                       (width: the layer's input, m fractions)
    F'_j  = sum_i A_ij(F) F_i  +  sum_i B_ij(F) T_i    (T = fn(concat(in)), split the same way)

``Y = A = B = I`` at init, so a frac-connected layer starts as exactly ``h + fn(h)`` (for any
m). When ``dynamic``, row i of each matrix gets ``s * tanh(layer_norm(F_i) W)`` (W = 0 at
init), as in hyper-connections. The stream tensor is the hidden state itself: no expand or
reduce step, a layer takes and returns ``(N, ..., d)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from residual import _branch
from residual._types import Layout, check_layout, check_positive_int
from residual.core import Residual
from residual.errors import ResidualError
from residual.streams._fold import (
    channels_last,
    check_branch_shape,
    check_channels,
    layer_normed_matmul,
    native,
)

__all__ = ["FracBranch", "FracMix", "frac_residual"]


class _FracDynamic(nn.Module):
    """``s * tanh(layer_norm(F_i) W)``: the input-dependent part of row i (0 at init)."""

    def __init__(self, channels: int, fracs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, fracs))
        self.scale = nn.Parameter(torch.tensor(0.01))


def _check_fracs(caller: str, fracs: int, dim: int, layout: str) -> tuple[int, int, Layout]:
    check_positive_int(caller, "fracs", fracs)
    check_positive_int(caller, "dim", dim)
    if dim % fracs:
        raise ResidualError(
            f"{caller}: dim={dim} does not split into fracs={fracs} equal fractions; "
            f"use a fracs that divides {dim}"
        )
    return fracs, dim, check_layout(caller, layout)


def _fractions(x: Tensor, fracs: int, layout: Layout) -> Tensor:
    """``(N, ..., d)`` (or ``(N, d, ...)``) -> ``(N, ..., m, d / m)``: a view, channels last."""
    return channels_last(x, layout, dim=1).unflatten(-1, (fracs, -1))


def _merged(f: Tensor, layout: Layout) -> Tensor:
    """The inverse of :func:`_fractions`."""
    return native(f.flatten(-2), layout, dim=1)


def _mixed(mix: Tensor, f: Tensor) -> Tensor:
    """``out_j = sum_i mix_ij f_i``: ``mix`` ``(m, m)`` or per token ``(..., m, m)``."""
    return torch.matmul(mix.transpose(-1, -2), f)


class FracBranch(nn.Module):
    """The branch of a frac-connected layer: ``B``-mixed fractions of ``fn(Y``-mixed ``F)``.

    Extra arguments, ``branch(x, *args, **kwargs)``, go to ``fn`` untouched (masks as for the
    plain hidden state ``(N, ...)``).

    >>> import torch
    >>> from torch import nn
    >>> branch = FracBranch(nn.Linear(8, 8), fracs=4, dim=8)
    >>> x = torch.randn(3, 8)
    >>> bool(torch.equal(branch(x), branch.fn(x)))  # Y = B = I at init
    True
    """

    def __init__(
        self,
        fn: nn.Module,
        fracs: int,
        dim: int,
        *,
        dynamic: bool = True,
        layout: Layout = "channels_last",
    ) -> None:
        super().__init__()
        self.fracs, self.dim, self.layout = _check_fracs("FracBranch", fracs, dim, layout)
        self.fn = fn
        self.width = nn.Parameter(torch.eye(fracs))  # Y
        self.depth = nn.Parameter(torch.eye(fracs))  # B
        self.width_dynamic = _FracDynamic(dim // fracs, fracs) if dynamic else None
        self.depth_dynamic = _FracDynamic(dim // fracs, fracs) if dynamic else None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if type(args) is not tuple:  # torch.fx.symbolic_trace(branch): *args is one Proxy
            _branch.check_no_extra_args(args, kwargs)
            args, kwargs = (), {}
        m = self.fracs
        check_channels(x, self.dim, self.layout, "FracBranch", self.width, m)
        f = _fractions(x, m, self.layout)
        width: Tensor = self.width
        depth: Tensor = self.depth
        if self.width_dynamic is not None and self.depth_dynamic is not None:
            weight = torch.cat([self.width_dynamic.weight, self.depth_dynamic.weight], 1)
            dyn = torch.tanh(layer_normed_matmul(f, weight))  # (N, ..., m, 2m): row i from F_i
            width = width + self.width_dynamic.scale * dyn[..., :m]
            depth = depth + self.depth_dynamic.scale * dyn[..., m:]
        inputs = _merged(_mixed(width, f), self.layout)
        out = self.fn(inputs, *args, **kwargs)
        check_branch_shape(inputs, out, "FracBranch")
        return _merged(_mixed(depth, _fractions(out, m, self.layout)), self.layout)

    def extra_repr(self) -> str:
        return f"fracs={self.fracs}, dim={self.dim}, layout={self.layout!r}"


class FracMix(nn.Module):
    """The shortcut of a frac-connected layer: ``F'_j = sum_i A_ij(F) F_i`` (``A = I`` at init).

    >>> import torch
    >>> mix = FracMix(fracs=2, dim=8)
    >>> x = torch.randn(3, 8)
    >>> bool(torch.equal(mix(x), x))
    True
    """

    def __init__(
        self, fracs: int, dim: int, *, dynamic: bool = True, layout: Layout = "channels_last"
    ) -> None:
        super().__init__()
        self.fracs, self.dim, self.layout = _check_fracs("FracMix", fracs, dim, layout)
        self.mix = nn.Parameter(torch.eye(fracs))  # A
        self.dynamic = _FracDynamic(dim // fracs, fracs) if dynamic else None

    def forward(self, x: Tensor) -> Tensor:
        check_channels(x, self.dim, self.layout, "FracMix", self.mix, self.fracs)
        f = _fractions(x, self.fracs, self.layout)
        mix: Tensor = self.mix
        if self.dynamic is not None:
            mix = mix + self.dynamic.scale * torch.tanh(layer_normed_matmul(f, self.dynamic.weight))
        return _merged(_mixed(mix, f), self.layout)

    def extra_repr(self) -> str:
        return f"fracs={self.fracs}, dim={self.dim}, layout={self.layout!r}"


def frac_residual(
    fn: nn.Module,
    fracs: int,
    dim: int,
    *,
    dynamic: bool = True,
    layer_index: int = 0,
    layout: Layout = "channels_last",
    post: nn.Module | None = None,
    drop_path: float = 0.0,
) -> Residual:
    """A frac-connected layer: ``Residual(FracBranch(fn), shortcut=FracMix)``.

    Takes and returns the plain hidden state ``(N, ..., dim)`` (``(N, dim, ...)`` channels
    first): the fractions are a view of its channels, so no expand/reduce step is needed.
    ``layer_index`` is accepted for a signature uniform with :func:`hyper_residual` and
    :func:`mhc_residual`; frac-connections start as the identity at every layer, so it changes
    nothing.

    Raises:
        ResidualError: ``fracs`` or ``dim`` not positive, or ``dim`` not a multiple of ``fracs``.

    >>> import torch
    >>> from torch import nn
    >>> block = frac_residual(nn.Linear(8, 8), fracs=4, dim=8)
    >>> x = torch.randn(2, 8)
    >>> bool(torch.allclose(block(x), x + block.fn.fn(x)))  # the plain residual at init
    True
    """
    del layer_index  # see the docstring
    branch = FracBranch(fn, fracs, dim, dynamic=dynamic, layout=layout)
    mix = FracMix(fracs, dim, dynamic=dynamic, layout=layout)
    return Residual(branch, shortcut=mix, post=post, drop_path=drop_path)


for _name in ("check_branch_shape", "check_channels", "layer_normed_matmul"):
    torch.fx.wrap(_name)
