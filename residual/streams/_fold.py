"""How stream tensors are laid out, and the per-token statistics their connections read (private).

A tensor of n streams is folded into the batch dim, stream-major: ``(n * N, ...)``, so that
stream ``i`` is the contiguous block ``h[i * N:(i + 1) * N]`` and a per-layer ``n x n`` mix is
one matmul over ``h.view(n, -1)``. Helpers that read shapes are FX leaves (registered by the
modules that call them, as ``torch.fx.wrap`` patches the caller's globals).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual import _branch
from residual._types import Layout
from residual.errors import ResidualError


def check_stream_batch(h: Tensor, streams: int, caller: str, hint: str) -> None:
    """Raise unless the batch dim of ``h`` is a multiple of ``streams``. An FX leaf."""
    with _branch.shape_checks():
        fits = bool(h.shape[0] % streams == 0)
    if not fits:
        raise ResidualError(
            f"{caller}: batch dim {h.shape[0]} is not a multiple of streams={streams}{hint}"
        )


def per_stream(h: Tensor, streams: int, caller: str = "hyper-connections") -> Tensor:
    """``(n * N, ...)`` -> ``(n, N, ...)``, a view in the input's own layout."""
    check_stream_batch(
        h, streams, caller, "; expand the input with expand_streams(x, streams) first"
    )
    return h.unflatten(0, (streams, -1))


def check_branch_shape(x: Tensor, out: Tensor, caller: str) -> None:
    """Raise unless the branch kept the stream's shape. An FX leaf."""
    with _branch.shape_checks():
        same = bool(out.shape == x.shape)
    if not same:
        raise ResidualError(
            f"{caller}: fn turned {tuple(x.shape)} into {tuple(out.shape)}; "
            "a hyper-connected branch must keep the stream's shape"
        )


def along_streams(p: Tensor, like: Tensor) -> Tensor:
    """A per-stream parameter as a view that broadcasts against ``like``, ``(n, N, ...)``.

    ``(n,)`` -> ``(n, 1, ..., 1)``; ``(n, n)`` -> ``(n, 1, ..., 1, n)``. An FX leaf: it reads
    the rank, which a symbolic trace does not know.
    """
    return p.view(p.shape[0], *([1] * (like.dim() - p.dim())), *p.shape[1:])


def channels_last(s: Tensor, layout: Layout, dim: int = 2) -> Tensor:
    """Move the channels of a channel-first tensor (at ``dim``) to the end; a view."""
    return s.movedim(dim, -1) if layout == "channels_first" else s


def native(t: Tensor, layout: Layout, dim: int = 2) -> Tensor:
    """The inverse of :func:`channels_last`."""
    return t.movedim(-1, dim) if layout == "channels_first" else t


def layer_normed_matmul(s: Tensor, weight: Tensor) -> Tensor:
    """``layer_norm(s) @ weight`` over the last dim (no affine, eps 1e-5): the input-dependent
    part of a hyper-/frac-connection reads the streams through this one call.

    (Normalising after the matmul, ``(s @ W - mean * 1ᵀW) / std``, would not write the
    normalised copy, but ``torch.var_mean`` costs ~15x ``layer_norm`` on CPU and the skinny
    matmul dominates anyway: measured, not faster.)

    >>> import torch
    >>> s, w = torch.randn(5, 8), torch.randn(8, 3)
    >>> ref = (s - s.mean(-1, keepdim=True)) / (s.var(-1, correction=0, keepdim=True) + 1e-5).sqrt()
    >>> bool(torch.allclose(layer_normed_matmul(s, w), ref @ w, atol=1e-5))
    True
    """
    return nn.functional.layer_norm(s, s.shape[-1:]) @ weight


torch.fx.wrap("check_stream_batch")  # called by per_stream, through this module's globals
