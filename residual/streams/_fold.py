"""How stream tensors are laid out, and the per-token statistics their connections read (private).

A tensor of n streams is folded into the batch dim, stream-major: ``(n * N, ...)``, so that
stream ``i`` is the contiguous block ``h[i * N:(i + 1) * N]`` and a per-layer ``n x n`` mix is
one matmul over ``h.view(n, -1)``. Helpers that read shapes are FX leaves (registered by the
modules that call them, as ``torch.fx.wrap`` patches the caller's globals).
"""

from __future__ import annotations

from typing import Any

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
    return skinny_matmul(nn.functional.layer_norm(s, s.shape[-1:]), weight)


class _TokenMix(torch.autograd.Function):
    """``out[i] = sum_j matrix[..., i, j] * streams[j]``, with a backward written out.

    Eager PyTorch runs this per-token ``n x n`` mix as one tiny matmul per token (a batched
    matmul over the tokens) plus a permuted copy each way, and its autograd backward as two
    more; here the forward is ``n`` broadcast multiply-adds into one stream-major buffer (no
    copy), and the backward is the same mix with the matrices transposed plus one batched
    matmul for the matrices' gradient. Measured: ~2x faster forward and backward at n = 4.
    """

    @staticmethod
    def forward(matrix: Tensor, streams: Tensor) -> Tensor:
        # (j, i, ..., 1), contiguous: tiny, and the products then come out stream-major
        by_column = matrix.movedim(-2, 0).movedim(-1, 0).contiguous().unsqueeze(-1)
        out = by_column[0] * streams[0]  # (i, ..., C)
        for j in range(1, streams.shape[0]):
            out.addcmul_(by_column[j], streams[j])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        matrix, streams = ctx.saved_tensors
        grad_matrix = grad_streams = None
        if ctx.needs_input_grad[0]:
            grad_matrix = torch.einsum("i...c,j...c->...ij", grad, streams)
            grad_matrix = grad_matrix.sum_to_size(matrix.shape)
        if ctx.needs_input_grad[1]:
            grad_streams = token_mix(matrix.transpose(-1, -2), grad)
        return grad_matrix, grad_streams


class _SkinnyMatmul(torch.autograd.Function):
    """``x @ w`` for a thin ``w`` (``(C, K)`` or ``(n, C, K)``, K a few coefficients), whose
    weight gradient is taken as ``(gᵀ x)ᵀ``: autograd's ``xᵀ g``, a ``(C, tokens) @ (tokens, K)``
    product, runs ~10x slower on CPU BLAS (measured: 2.5 ms against 0.18 ms at 4096 x 256 x 4).
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor) -> Tensor:
        return torch.matmul(x, w)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, w.mT)
        if ctx.needs_input_grad[1]:
            if w.dim() == 2:  # every token against one weight: one (K, tokens) @ (tokens, C)
                grad_w = (grad.reshape(-1, w.shape[1]).t() @ x.reshape(-1, w.shape[0])).t()
            else:
                grad_w = torch.matmul(grad.mT, x).mT.sum_to_size(w.shape)
        return grad_x, grad_w


def skinny_matmul(x: Tensor, w: Tensor) -> Tensor:
    """``torch.matmul(x, w)`` for a weight of a few columns, with a faster weight gradient.

    >>> import torch
    >>> x, w = torch.randn(6, 8), torch.randn(8, 2, requires_grad=True)
    >>> skinny_matmul(x, w).sum().backward()
    >>> bool(torch.allclose(w.grad, x.sum(0).unsqueeze(1).expand(8, 2)))
    True
    """
    out: Tensor = _SkinnyMatmul.apply(x, w)
    return out


def token_mix(matrix: Tensor, streams: Tensor) -> Tensor:
    """Mix the streams of every token by its own matrix: ``(..., n, n)`` and ``(n, ..., C)`` ->
    ``(n, ..., C)`` with ``out[i] = sum_j matrix[..., i, j] streams[j]``.

    >>> import torch
    >>> m, s = torch.randn(5, 3, 3), torch.randn(3, 5, 8)
    >>> ref = torch.einsum("tij,jtc->itc", m, s)
    >>> bool(torch.allclose(token_mix(m, s), ref, atol=1e-6))
    True
    """
    out: Tensor = _TokenMix.apply(matrix, streams)
    return out


torch.fx.wrap("check_stream_batch")  # called by per_stream, through this module's globals
