"""ResiDual (Xie et al. 2023, "ResiDual: Transformer with Dual Residual Connections"): a
post-norm stream and a pre-norm-like dual stream, fed by the same branch output.

Two streams, folded into the batch dim stream-major as :mod:`residual.hyper`'s: ``h = (x_a,
x_d)``, shape ``(2 * N, ...)``, both starting as the input (``expand_streams(x, 2)``). Layer k::

    x_a' = LN_k(x_a + F_k(x_a))        (the post-norm stream: F reads only it)
    x_d' = x_d + F_k(x_a)              (the dual stream: the un-normed sum of the branch outputs)

and the stack's output is ``x_a + LN(x_d)`` (:class:`ResiDualOutput`). Each layer is one
``Residual``: the branch :class:`ResiDualBranch` sends ``F(x_a)`` to both streams, the identity
shortcut adds, and the ``post`` :class:`ResiDualNorm` normalises the first stream only.

>>> import torch
>>> from torch import nn
>>> from residual.hyper import expand_streams
>>> layers = nn.Sequential(*(resi_dual_residual(nn.Linear(8, 8), 8) for _ in range(3)))
>>> out = ResiDualOutput(8)(layers(expand_streams(torch.randn(2, 8), 2)))
>>> out.shape
torch.Size([2, 8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from residual import _branch
from residual.core import Residual
from residual.drop import SampleAxis
from residual.errors import ResidualError, check_module

__all__ = ["ResiDualBranch", "ResiDualNorm", "ResiDualOutput", "resi_dual_residual"]


def _check_pair(h: Tensor, caller: str) -> None:
    """Raise unless ``h``'s batch dim holds the two streams. An FX leaf."""
    with _branch.shape_checks():
        fits = bool(h.dim() >= 1 and h.shape[0] % 2 == 0)
    if not fits:
        raise ResidualError(
            f"{caller}: expected the two ResiDual streams stacked on dim 0, (2 * N, ...), got "
            f"{tuple(h.shape)}; start the stack with residual.hyper.expand_streams(x, 2)"
        )


class ResiDualBranch(nn.Module):
    """``(x_a, x_d) -> (F(x_a), F(x_a))``: the branch output goes to both streams.

    Extra arguments, ``branch(h, *args, **kwargs)``, go to ``fn`` untouched (masks are per
    sample, for the ``(N, ...)`` stream ``x_a``).

    >>> import torch
    >>> from torch import nn
    >>> ResiDualBranch(nn.Identity())(torch.arange(4.0).view(4, 1)).flatten()
    tensor([0., 1., 0., 1.])
    """

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        check_module("ResiDualBranch", "fn", fn)
        self.fn = fn

    def forward(self, h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if type(args) is not tuple:  # torch.fx.symbolic_trace(branch): *args is one Proxy
            _branch.check_no_extra_args(args, kwargs)
            args, kwargs = (), {}
        _check_pair(h, "ResiDualBranch")
        out = self.fn(h.unflatten(0, (2, -1))[0], *args, **kwargs)
        return torch.cat([out, out])


class ResiDualNorm(nn.Module):
    """``(x_a, x_d) -> (norm(x_a), x_d)``: the post-norm of the first stream only.

    Args:
        norm: the norm module (LayerNorm over the last dim, as the paper).

    >>> import torch
    >>> from torch import nn
    >>> ResiDualNorm(nn.LayerNorm(2))(torch.tensor([[1.0, 3.0], [1.0, 3.0]]))
    tensor([[-1.0000,  1.0000],
            [ 1.0000,  3.0000]], grad_fn=<CatBackward0>)
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        check_module("ResiDualNorm", "norm", norm)
        self.norm = norm

    def forward(self, h: Tensor) -> Tensor:
        _check_pair(h, "ResiDualNorm")
        post, dual = h.unflatten(0, (2, -1)).unbind(0)
        return torch.cat([self.norm(post), dual])


class ResiDualOutput(nn.Module):
    """``(x_a, x_d) -> x_a + LN(x_d)``: the end of a ResiDual stack, one stream of (N, ...).

    Args:
        dim: channels (last dim) of the dual stream's LayerNorm.

    >>> import torch
    >>> ResiDualOutput(4)(torch.ones(6, 4)).shape
    torch.Size([3, 4])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor) -> Tensor:
        _check_pair(h, "ResiDualOutput")
        post, dual = h.unflatten(0, (2, -1)).unbind(0)
        return post + self.norm(dual)


def resi_dual_residual(fn: nn.Module, dim: int, *, norm: nn.Module | None = None) -> Residual:
    """One ResiDual layer: ``Residual(ResiDualBranch(fn), post=ResiDualNorm(LayerNorm(dim)))``.

    ``fn`` is the un-normed branch (attention or MLP, as in a post-norm layer). Input and output
    are the stream pair ``(2 * N, ...)``.

    >>> import torch
    >>> from torch import nn
    >>> layer = resi_dual_residual(nn.Linear(4, 4), 4)
    >>> layer(torch.randn(6, 4)).shape
    torch.Size([6, 4])
    """
    post = ResiDualNorm(nn.LayerNorm(dim) if norm is None else norm)
    # the stream pair: stochastic depth keeps or drops a sample's two streams together
    return Residual(ResiDualBranch(fn), post=post, sample_axis=SampleAxis(streams=2))


torch.fx.wrap("_check_pair")
