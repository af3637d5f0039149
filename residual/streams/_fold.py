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
from residual.core import Residual
from residual.drop import SampleAxis
from residual.errors import ResidualError


def stream_residual(
    branch: nn.Module, mix: nn.Module, streams: int, post: nn.Module | None, drop_path: float
) -> Residual:
    """A stream layer: ``Residual(branch, shortcut=mix)`` over ``(streams * N, ...)`` tensors,
    whose stochastic depth keeps or drops a sample's streams together."""
    return Residual(
        branch,
        shortcut=mix,
        post=post,
        drop_path=drop_path,
        sample_axis=SampleAxis(streams=streams),
    )


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


def check_channels(
    x: Tensor, dim: int, layout: Layout, caller: str, like: Tensor, fracs: int = 0
) -> None:
    """Raise unless ``x`` holds ``dim`` channels where ``layout`` puts them (the last axis, or
    axis 1) and has the dtype of ``like`` (a parameter of the layer; any dtype under autocast).

    ``fracs`` > 0: ``x`` is a frac-connection's hidden state, which may be one unbatched
    ``(C,)``; otherwise a stream tensor ``(streams * N, ..., C)``. An FX leaf.
    """
    _check_dtype(x, caller, like)
    first = layout == "channels_first"
    lowest = 1 if fracs and not first else 2  # the least rank with a channel axis
    with _branch.shape_checks():  # reads the rank and the channel axis only (no guard on N)
        rank = x.dim()
        fits = rank >= lowest and bool(x.shape[1 if first else -1] == dim)
    if fits:
        return
    with _branch.shape_checks():
        shape = tuple(int(size) for size in x.shape)
    built = f"{caller}: built with dim={dim}, layout={layout!r}"
    if rank < lowest:
        if fracs:
            raise ResidualError(
                f"{built}: expects a tensor (N, C, ...), got shape {shape}; build it with "
                "layout='channels_last' for one unbatched hidden state (C,)"
            )
        raise ResidualError(
            f"{built}: expects a stream tensor (streams * N, ..., C), got shape {shape}; give "
            "each row its channels, x.unsqueeze(-1), and build it with dim=1"
        )
    got = shape[1 if first else -1]
    fixes = []
    if rank > 2 and shape[-1 if first else 1] == dim:  # the other layout fits
        fixes.append("layout='channels_last'" if first else "layout='channels_first'")
    if fracs and got % fracs:  # the largest count below fracs that splits the width
        fixes.append(f"dim={got} and fracs={max(k for k in range(1, fracs) if got % k == 0)}")
    else:
        fixes.append(f"dim={got}")
    raise ResidualError(
        f"{built}: {'axis 1' if first else 'the last axis'} must be {dim}, got {got} "
        f"(shape {shape}); build it with {' or '.join(fixes)}"
    )


def _check_dtype(x: Tensor, caller: str, like: Tensor) -> None:
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{caller}: a {x.dtype} stream into a layer of {like.dtype} parameters; cast the "
            f"layer (layer.to({x.dtype})) or the stream (x.to({like.dtype})), or run it under "
            "torch.autocast"
        )


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


def mix_streams(w: Tensor, s: Tensor, layout: Layout) -> Tensor:
    """``w @ s.view(n, -1)``: one small matmul over the flat streams ``s`` ``(n, N, ...)``,
    ``w`` ``(k, n)`` -> ``(k, N, ...)`` or ``(n,)`` -> ``(N, ...)``, in the memory layout of
    ``s``: a channel-first stream stored channels last (``torch.channels_last``) is read through
    its contiguous channels-last view, so the result is stored the same way (no copy). An FX
    leaf: it reads strides.

    >>> import torch
    >>> w, s = torch.rand(3, 2), torch.randn(2, 4, 5)
    >>> bool(torch.allclose(mix_streams(w, s, "channels_last"), torch.einsum("ki,inc->knc", w, s)))
    True
    """
    last = channels_last(s, layout)
    flat = last if last is not s and not s.is_contiguous() and last.is_contiguous() else s
    out = (w @ flat.reshape(flat.shape[0], -1)).view(*w.shape[:-1], *flat.shape[1:])
    return native(out, layout, dim=w.dim()) if flat is last and last is not s else out


def _normed_matmul(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``layer_norm(x) @ w`` as ``rstd * ((x - mean) @ w)``, with the row statistics (float32
    at least). The centred rows serve both the variance (exact where ``E[x²] - E[x]²`` would
    cancel) and the thin product (no ``mean * 1ᵀw`` to subtract, which would cancel in a
    bfloat16 product); they are the one stream-sized temporary, never saved."""
    flat = x.reshape(-1, w.shape[0])
    channels = flat.shape[1]
    mean = flat.sum(1, dtype=torch.promote_types(flat.dtype, torch.float32)) / channels
    centred = (flat - mean.unsqueeze(1)).to(flat.dtype)
    var = torch.linalg.vector_norm(centred, dim=1, dtype=mean.dtype).square() / channels
    rstd = torch.rsqrt(var + eps)
    raw = thin_product(centred, w)
    return (raw * rstd.unsqueeze(1)).to(raw.dtype).unflatten(0, x.shape[:-1]), mean, rstd


class _NormedMatmul(torch.autograd.Function):
    """``layer_norm(x) @ w`` (no affine) that never writes the normalised copy of ``x``; the
    backward is layer norm's, folded into one ``(tokens, K+1) @ (K+1, C)`` product and one
    multiply-add, computed in the statistics' dtype (autograd casts the gradients back).
    Measured at 4096 x 256, K = 6, one thread: 0.7 ms forward and 1.8 ms forward + backward
    against 1.9 ms and 5.7-7.8 ms for ``layer_norm`` then ``matmul``. The statistics are extra
    outputs, not differentiable, so that ``setup_context`` can save them (``torch.func``).
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _normed_matmul(x, w, eps)

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor, float], output: tuple[Tensor, Tensor, Tensor]
    ) -> None:
        x, w, eps = inputs
        out, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.save_for_backward(x, w, out, mean, rstd)

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, *_: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        if grad is None:  # no gradient reached the product (the statistics have none)
            return None, None, None
        x, w, out, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the statistics as functions of x
            out, mean, rstd = _normed_matmul(x, w, ctx.eps)
        channels, k = w.shape
        flat, w = x.reshape(-1, channels).to(rstd.dtype), w.to(rstd.dtype)
        g = grad.reshape(-1, k)
        g_raw = g * rstd.unsqueeze(1)  # d/d(x @ w)
        g_var = -0.5 * rstd.square() * (g * out.reshape(-1, k)).sum(1)
        g_mean = -(g_raw @ w.sum(0)) - 2 * mean * g_var
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [g_raw, g_mean / C] @ [wᵀ; 1] + (2 g_var / C) x
            lhs = torch.cat([g_raw, (g_mean / channels).unsqueeze(1)], 1)
            rhs = torch.cat([w.t(), w.new_ones(1, channels)])
            grad_x = (lhs @ rhs).addcmul_((2 / channels * g_var).unsqueeze(1), flat)
            grad_x = grad_x.view(x.shape)
        if ctx.needs_input_grad[1]:  # through x @ w and through the mean's 1ᵀw
            grad_w = (g_raw.t() @ flat).t() - mean @ g_raw
        return grad_x, grad_w, None


def layer_normed_matmul(s: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """``layer_norm(s) @ weight`` over the last dim (no affine): the input-dependent part of a
    hyper-/frac-connection reads the streams through this one call, which never writes the
    normalised copy (see ``_NormedMatmul``).

    >>> import torch
    >>> s, w = torch.randn(5, 8), torch.randn(8, 3)
    >>> ref = (s - s.mean(-1, keepdim=True)) / (s.var(-1, correction=0, keepdim=True) + 1e-5).sqrt()
    >>> bool(torch.allclose(layer_normed_matmul(s, w), ref @ w, atol=1e-5))
    True
    """
    out: Tensor = _NormedMatmul.apply(s, weight, eps)[0]
    return out


class _SavesInputs(torch.autograd.Function):
    """A two-input kernel whose backward reads both inputs (and not its output)."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)


class _TokenMix(_SavesInputs):
    """``out[i] = sum_j matrix[..., i, j] * streams[j]``, with a backward written out.

    Eager PyTorch runs this per-token ``n x n`` mix as one tiny matmul per token (a batched
    matmul over the tokens) plus a permuted copy each way. Here each output stream is one chain
    of broadcast multiply-adds into its own slice of a stream-major buffer, which stays in cache
    while the chain runs; the backward is the same mix with the matrices transposed plus one
    batched matmul over the tokens for the matrices' gradient.
    """

    @staticmethod
    def forward(matrix: Tensor, streams: Tensor) -> Tensor:
        # (i, j, ..., 1), contiguous: tiny, and each coefficient a broadcastable slice
        m = matrix.movedim((-2, -1), (0, 1)).contiguous().unsqueeze(-1)
        n = streams.shape[0]
        if torch.compiler.is_exporting():
            # The exported program runs these ops, and autograd differentiates them where it
            # runs with grad enabled: no ``out=``, which autograd refuses; the same chains.
            rows = []
            for i in range(n):
                acc = m[i, 0] * streams[0]
                for j in range(1, n):
                    acc = acc.addcmul(m[i, j], streams[j])
                rows.append(acc)
            return torch.stack(rows)
        out = torch.empty_like(streams)  # eager (grad off inside a Function): in place
        for i in range(n):
            torch.mul(m[i, 0], streams[0], out=out[i])
            for j in range(1, n):
                out[i].addcmul_(m[i, j], streams[j])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        matrix, streams = ctx.saved_tensors
        grad_matrix = grad_streams = None
        if ctx.needs_input_grad[0]:  # [t, i, j] = <grad_i, streams_j> over the channels
            n, channels = streams.shape[0], streams.shape[-1]
            g = grad.reshape(n, -1, channels).transpose(0, 1)  # (tokens, n, C), strided
            x = streams.reshape(n, -1, channels).transpose(0, 1)
            grad_matrix = torch.bmm(g, x.mT).view(*streams.shape[1:-1], n, n)
            grad_matrix = grad_matrix.sum_to_size(matrix.shape)
        if ctx.needs_input_grad[1]:
            grad_streams = token_mix(matrix.mT, grad)
        return grad_matrix, grad_streams


def _dots(a: Tensor, b: Tensor, like: Tensor) -> Tensor:
    """``(a * b)`` summed down to ``like``'s shape: per-token dot products over the channels."""
    return (a * b).sum_to_size(like.shape)


class _StreamSum(_SavesInputs):
    """``sum_i w[i] * streams[i]`` as one chain of multiply-adds into a stream-sized buffer (no
    ``(n, ...)`` product is written); its backward spreads the gradient with :class:`_Spread`.
    """

    @staticmethod
    def forward(w: Tensor, streams: Tensor) -> Tensor:
        out = w[0] * streams[0]
        for i in range(1, streams.shape[0]):
            out.addcmul_(w[i], streams[i])
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, streams = ctx.saved_tensors
        grad_w = _dots(streams, grad, w) if ctx.needs_input_grad[0] else None
        grad_streams = stream_spread(w, grad) if ctx.needs_input_grad[1] else None
        return grad_w, grad_streams


class _Spread(_SavesInputs):
    """``w[i] * x`` for every stream i; the gradient of ``x`` is :class:`_StreamSum`'s chain
    (autograd would write the ``(n, ...)`` product and then sum it)."""

    @staticmethod
    def forward(w: Tensor, x: Tensor) -> Tensor:
        return w * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        w, x = ctx.saved_tensors
        grad_w = _dots(grad, x, w) if ctx.needs_input_grad[0] else None
        grad_x = stream_sum(w, grad) if ctx.needs_input_grad[1] else None
        return grad_w, grad_x


def stream_sum(w: Tensor, streams: Tensor) -> Tensor:
    """``sum_i w[i] * streams[i]``: ``w`` ``(n, ...)`` broadcasts against one stream.

    >>> import torch
    >>> w, s = torch.rand(3, 5, 1), torch.randn(3, 5, 8)
    >>> bool(torch.allclose(stream_sum(w, s), (w * s).sum(0), atol=1e-6))
    True
    """
    out: Tensor = _StreamSum.apply(w, streams)
    return out


def stream_spread(w: Tensor, x: Tensor) -> Tensor:
    """``(n, ...)``: stream i is ``w[i] * x``.

    >>> import torch
    >>> w, x = torch.rand(3, 5, 1), torch.randn(5, 8)
    >>> bool(torch.equal(stream_spread(w, x), w * x))
    True
    """
    out: Tensor = _Spread.apply(w, x)
    return out


def thin_product(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w`` for a ``w`` of a few columns, as ``(wᵀ xᵀ)ᵀ``: CPU BLAS runs ``(tokens, C) @
    (C, K)`` for K of a few columns 2.4-5x slower than ``(K, C) @ (C, tokens)`` (measured: 1.2 ms
    against 0.22-0.5 ms at 4096 x 256, K = 2-8). The result is a transposed view, no copy; plain
    ops (the kernels in this module call it inside their forwards, where a nested Function would
    stop ``torch.compile``'s tracing)."""
    if w.dim() == 2:
        return (w.t() @ x.reshape(-1, w.shape[0]).t()).t().unflatten(0, x.shape[:-1])
    return torch.matmul(w.mT, x.mT).mT


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
