"""Hyper-connections (Zhu et al. 2024): n residual streams with learned width and depth
connections, static and input-dependent, as a ``Residual`` with a stream-mixing shortcut.

The n streams are folded into the batch dim, stream-major: a stream tensor has shape
``(n * N, ...)``; :func:`expand_streams` makes it from a plain one, :func:`reduce_streams` sums it
back. For one layer with streams ``H = (H_1..H_n)``::

    h      = sum_i Am_i(H) H_i                  (width connection: the branch's input)
    H'_j   = sum_i Ar_ij(H) H_i  +  B_j(H) fn(h)   (shortcut: stream mixing; depth connection)

with ``Am = e_(k mod n)``, ``Ar = I``, ``B = 1`` at init (layer k), and, when ``dynamic``, each
coefficient plus ``s * tanh(norm(H_i) W)`` (W = 0 at init). With ``n = 1`` a hyper-connected
layer is exactly the plain residual ``x + fn(x)``.

The constrained and fractional variants live in :mod:`residual.streams` and are re-exported
here: :func:`mhc_residual` (mHC, Xie et al. 2025: ``H_res`` doubly stochastic by Sinkhorn-Knopp,
on the same stream tensors) and :func:`frac_residual` (frac-connections, Zhu et al. 2025: the
hidden state split into fractions, no expand/reduce). See docs/hyper.md.

>>> import torch
>>> from torch import nn
>>> block = hyper_residual(nn.Linear(8, 8), streams=1, dim=8)
>>> x = torch.randn(2, 8)
>>> bool(torch.equal(block(x), x + block.fn.fn(x)))
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from residual import _branch
from residual._types import Layout, check_layout, check_positive_int
from residual.core import Residual
from residual.errors import ResidualError, check_module
from residual.streams import (
    FracBranch,
    FracMix,
    MHCBranch,
    MHCMix,
    frac_residual,
    mhc_residual,
    sinkhorn,
)
from residual.streams._fold import (
    along_streams,
    channels_last,
    check_branch_shape,
    check_channels,
    check_stream_batch,
    layer_normed_matmul,
    mix_streams,
    native,
    per_stream,
    stream_residual,
    stream_spread,
    stream_sum,
    token_mix,
)

__all__ = [
    "FracBranch",
    "FracMix",
    "HyperBranch",
    "MHCBranch",
    "MHCMix",
    "StreamMix",
    "expand_streams",
    "frac_residual",
    "hyper_residual",
    "mhc_residual",
    "reduce_streams",
    "sinkhorn",
]


def expand_streams(x: Tensor, streams: int) -> Tensor:
    """``(N, ...)`` -> ``(streams * N, ...)``: every stream starts as a copy of ``x``.

    >>> import torch
    >>> expand_streams(torch.ones(2, 3), 4).shape
    torch.Size([8, 3])
    """
    check_positive_int("expand_streams", "streams", streams)
    return torch.cat([x] * streams)  # x.repeat(streams, 1, ...), without reading the rank


def reduce_streams(h: Tensor, streams: int) -> Tensor:
    """``(streams * N, ...)`` -> ``(N, ...)``: the sum of the streams.

    >>> import torch
    >>> reduce_streams(torch.ones(8, 3), 4)[0]
    tensor([4., 4., 4.])
    """
    check_positive_int("reduce_streams", "streams", streams)
    check_stream_batch(h, streams, "reduce_streams", "")
    return h.unflatten(0, (streams, -1)).sum(0)


class _Dynamic(nn.Module):
    """``s * tanh(layer_norm(H) W)``: the input-dependent part of a connection (0 at init)."""

    def __init__(self, dim: int, outputs: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, outputs))
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, streams: Tensor) -> Tensor:
        return self.scale * torch.tanh(layer_normed_matmul(streams, self.weight))


class StreamMix(nn.Module):
    """The shortcut of a hyper-connected layer: ``H'_j = sum_i Ar_ij(H) H_i`` (``Ar = I`` at init).

    Args:
        streams: n; dim: channels per stream; dynamic: add the input-dependent part;
        layout: where the channels are.

    >>> import torch
    >>> mix = StreamMix(streams=2, dim=8)
    >>> h = expand_streams(torch.randn(3, 8), 2)
    >>> mix(h).shape, bool(torch.equal(mix(h), h))  # the identity at init
    (torch.Size([6, 8]), True)
    """

    def __init__(
        self, streams: int, dim: int, *, dynamic: bool = True, layout: Layout = "channels_last"
    ) -> None:
        super().__init__()
        self.streams = check_positive_int("StreamMix", "streams", streams)
        self.dim = check_positive_int("StreamMix", "dim", dim)
        self.layout = check_layout("StreamMix", layout)
        self.mix = nn.Parameter(torch.eye(streams))
        self.dynamic = _Dynamic(dim, streams, 0.01) if dynamic else None

    def forward(self, h: Tensor) -> Tensor:
        check_channels(h, self.dim, self.layout, "StreamMix", self.mix)
        s = per_stream(h, self.streams)  # (n, N, ...) in the input's layout
        if self.dynamic is None:  # one (n, n) matmul over the flat streams, any layout
            return mix_streams(self.mix.t(), s, self.layout).flatten(0, 1)
        last = channels_last(s, self.layout)
        mix = along_streams(self.mix, last) + self.dynamic(last)  # (n, N, ..., n): row i
        if self.streams == 1:  # a scale of the one stream: exactly x when it is 1
            return h * native(mix, self.layout).flatten(0, 1)
        mixed = token_mix(mix.movedim(0, -1), last)  # matrix[..., j, i] = mix[i, ..., j]
        return native(mixed, self.layout).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, dim={self.dim}, layout={self.layout!r}"


class HyperBranch(nn.Module):
    """The branch of a hyper-connected layer: ``B_j(H) fn(sum_i Am_i(H) H_i)``.

    ``fn`` sees one stream-sized tensor ``(N, ...)``; its output goes back to every stream,
    weighted by the depth connection ``B`` (1 at init). ``Am`` (the width connection) starts as
    the one-hot of stream ``layer_index mod n``. Extra arguments, ``branch(h, *args,
    **kwargs)``, go to ``fn`` untouched: masks are per sample, for the ``(N, ...)`` input.

    >>> import torch
    >>> from torch import nn
    >>> branch = HyperBranch(nn.Linear(8, 8), streams=2, dim=8)
    >>> x = torch.randn(3, 8)
    >>> out = branch(expand_streams(x, 2))  # at init: fn(x), copied to both streams
    >>> out.shape, bool(torch.equal(out, expand_streams(branch.fn(x), 2)))
    (torch.Size([6, 8]), True)
    """

    def __init__(
        self,
        fn: nn.Module,
        streams: int,
        dim: int,
        *,
        layer_index: int = 0,
        dynamic: bool = True,
        layout: Layout = "channels_last",
    ) -> None:
        super().__init__()
        check_module("HyperBranch", "fn", fn)
        self.streams = check_positive_int("HyperBranch", "streams", streams)
        self.dim = check_positive_int("HyperBranch", "dim", dim)
        self.layout = check_layout("HyperBranch", layout)
        self.fn = fn
        width = torch.zeros(streams)
        width[layer_index % streams] = 1.0
        self.width = nn.Parameter(width)
        self.depth = nn.Parameter(torch.ones(streams))
        self.width_dynamic = _Dynamic(dim, 1, 0.01) if dynamic else None
        self.depth_dynamic = _Dynamic(dim, 1, 0.01) if dynamic else None

    def forward(self, h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if type(args) is not tuple:  # torch.fx.symbolic_trace(branch): *args is one Proxy
            _branch.check_no_extra_args(args, kwargs)
            args, kwargs = (), {}
        check_channels(h, self.dim, self.layout, "HyperBranch", self.width)
        s = per_stream(h, self.streams)  # (n, N, ...) in the input's layout
        if self.width_dynamic is None or self.depth_dynamic is None:
            x = mix_streams(self.width, s, self.layout)
            depth = along_streams(self.depth, s)
        else:  # both dynamic parts from one pass over the streams
            last = channels_last(s, self.layout)
            weight = torch.cat([self.width_dynamic.weight, self.depth_dynamic.weight], 1)
            dyn = torch.tanh(layer_normed_matmul(last, weight))  # (n, N, ..., 2)
            width = self.width_dynamic.scale * dyn[..., :1] + along_streams(self.width, last)
            depth = self.depth_dynamic.scale * dyn[..., 1:] + along_streams(self.depth, last)
            width, depth = native(width, self.layout), native(depth, self.layout)
            x = stream_sum(width, s)  # (N, ...): the branch's input
        out = self.fn(x, *args, **kwargs)
        check_branch_shape(x, out, "HyperBranch")
        return stream_spread(depth, out).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, dim={self.dim}, layout={self.layout!r}"


def hyper_residual(
    fn: nn.Module,
    streams: int,
    dim: int,
    *,
    layer_index: int = 0,
    dynamic: bool = True,
    layout: Layout = "channels_last",
    post: nn.Module | None = None,
    drop_path: float = 0.0,
) -> Residual:
    """A hyper-connected layer: ``Residual(HyperBranch(fn), shortcut=StreamMix)``.

    Inputs and outputs are stream tensors ``(streams * N, ...)``: wrap the stack in
    :func:`expand_streams` / :func:`reduce_streams`.

    Raises:
        ResidualError: ``streams < 1``, or ``dim`` not positive.

    >>> import torch
    >>> from torch import nn
    >>> stack = nn.Sequential(
    ...     *(hyper_residual(nn.Linear(8, 8), streams=4, dim=8, layer_index=i) for i in range(3))
    ... )
    >>> h = stack(expand_streams(torch.randn(2, 8), 4))
    >>> h.shape, reduce_streams(h, 4).shape
    (torch.Size([8, 8]), torch.Size([2, 8]))
    """
    check_module("hyper_residual", "fn", fn)
    if isinstance(streams, int) and not isinstance(streams, bool) and streams < 1:
        raise ResidualError(f"hyper_residual: streams must be >= 1, got {streams}")
    branch = HyperBranch(fn, streams, dim, layer_index=layer_index, dynamic=dynamic, layout=layout)
    mix = StreamMix(streams, dim, dynamic=dynamic, layout=layout)
    return stream_residual(branch, mix, streams, post, drop_path)


for _name in (
    "along_streams",
    "check_branch_shape",
    "check_channels",
    "check_stream_batch",
    "layer_normed_matmul",
    "mix_streams",
    "stream_spread",
    "stream_sum",
    "token_mix",
):
    torch.fx.wrap(_name)
