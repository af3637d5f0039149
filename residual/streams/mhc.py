"""mHC: manifold-constrained hyper-connections (Xie et al. 2025, arXiv 2512.24880).

Hyper-connections whose maps are constrained so that a deep stack of them stays a stack of
residuals. With the streams ``x = (x_1..x_n)`` of one token (each ``C`` channels)::

    x'    = vec(x) / rms(vec(x))                      (RMSNorm over all n*C values, no gain)
    H_pre  = sigmoid(a_pre * x' phi_pre + b_pre)           (n,)    non-negative
    H_post = 2 sigmoid(a_post * x' phi_post + b_post)      (n,)    in (0, 2)
    H_res  = Sinkhorn(a_res * mat(x' phi_res) + b_res)     (n, n)  doubly stochastic
    x_i   <- sum_j H_res[i, j] x_j  +  H_post[i] fn(sum_j H_pre[j] x_j)

``dynamic=False`` keeps the biases only (static, per layer). Init: ``b_pre`` the one-hot of
stream ``layer_index mod n`` (logits), ``b_post = 0`` (``H_post = 1``), ``b_res = I`` (logits),
``a = 0.01``, ``phi = 0``. The shortcut (:class:`MHCMix`) is ``H_res`` alone, so with the
branch's contribution zero the sum of the streams is kept (the columns of ``H_res`` sum to 1
after each Sinkhorn round, to rounding) and every stream is a convex combination of the input
streams up to the rows' convergence. :func:`sinkhorn` computes in float32 at least, so a
float16 or bfloat16 layer rounds ``H_res`` once, to its own dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from residual import _branch
from residual._types import Layout, check_layout, check_positive_int
from residual.core import Residual
from residual.errors import ResidualError
from residual.streams._fold import (
    along_streams,
    channels_last,
    check_branch_shape,
    check_channels,
    mix_streams,
    native,
    per_stream,
    stream_residual,
    stream_spread,
    stream_sum,
    thin_product,
    token_mix,
)

__all__ = ["MHCBranch", "MHCMix", "mhc_residual", "sinkhorn"]


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp over the last two dims: ``exp(logits)``, then rows and columns scaled to
    sum 1, in turn, ``iters`` times (rows first, columns last).

    Computed in float32 at least (float64 stays float64) and returned in the input's dtype. The
    first round runs in the log domain (``logits - logsumexp``), so no row or column of
    ``exp(logits)`` underflows to zeros: finite logits never give NaN, whatever their size
    (float16 ``[[20, 0], [20, 0]]`` or float32 logits of 200 would otherwise). After it every
    row and column sum lies in ``[1/n, n]``, and the later rounds scale in the linear domain.

    The result is non-negative; its columns sum to 1 (to the rounding of the computation and of
    the cast back to the input's dtype) and its rows to within the convergence after ``iters``
    rounds. Differentiable once: the backward runs through every round, written out (a
    gradient of the gradient raises instead).

    Raises:
        ResidualError: ``logits`` is not a (batch of) square matrix, or ``iters < 1``.

    >>> import torch
    >>> m = sinkhorn(torch.randn(4, 4))
    >>> bool(torch.allclose(m.sum(0), torch.ones(4))), bool(torch.allclose(m.sum(1), torch.ones(4)))
    (True, True)
    >>> sinkhorn(torch.tensor([[20.0, 0.0], [20.0, 0.0]], dtype=torch.float16))
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]], dtype=torch.float16)
    """
    check_positive_int("sinkhorn", "iters", iters)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ResidualError(
            f"sinkhorn: expected (..., n, n) logits, got shape {tuple(logits.shape)}"
        )
    return _sinkhorn(logits, iters)


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp with its backward written out, on matrices moved token-last.

    With the batch of matrices as ``(n, n, ...)`` every row/column sum is a vectorised add of
    contiguous slices (measured ~10x faster than summing ``(..., n, n)``'s inner dims of 4).
    The first round is in the log domain: ``u = x - logsumexp_rows(x)``, ``v = u -
    logsumexp_cols(u)``, ``m = exp(v)``; its backward is ``du = m (dm - sum_cols(dm m))`` and
    ``dx = du - p sum_rows(du)`` with ``p = exp(u)``. Each later scaling ``y = x / r`` (``r``:
    sums over rows or columns, in ``[1/n, n]`` after the first round) gets the backward
    ``dx = (dy - sum(dy * y)) / r``: 4 kernels, where autograd's chain takes ~7. The forward
    keeps ``p`` and every step's ``y`` and ``r``, as autograd would: extra outputs, not
    differentiable, so that ``setup_context`` can save them (``torch.func``); the last ``y`` is
    the result itself. Once differentiable.
    """

    @staticmethod
    def forward(logits: Tensor, iters: int) -> tuple[Tensor, ...]:
        first = logits.movedim((-2, -1), (0, 1)).contiguous()  # (n, n, ...): row i, column j
        rows = first - first.logsumexp(1, keepdim=True)
        m = torch.exp(rows - rows.logsumexp(0, keepdim=True))
        ys, rs = [m], []
        for _ in range(iters - 1):
            for dim in (1, 0):  # rows, then columns
                r = m.sum(dim, keepdim=True)
                m = m / r
                ys.append(m)
                rs.append(r)
        return (m.movedim((0, 1), (-2, -1)), torch.exp(rows), *ys[:-1], *rs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: tuple[Tensor, ...]) -> None:
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor | None, *_: Tensor | None) -> tuple[Tensor | None, None]:
        if grad is None:  # no gradient reached the result (the other outputs have none)
            return None, None
        out, p, *saved = ctx.saved_tensors
        steps = len(saved) // 2  # the scalings after the first round
        ys = [*saved[:steps], out.movedim((-2, -1), (0, 1))]  # m after round 1, then each y
        g = grad.movedim((-2, -1), (0, 1)).contiguous()
        for k in reversed(range(steps)):
            g = (g - (g * ys[k + 1]).sum(1 - k % 2, keepdim=True)) / saved[steps + k]
        m = ys[0]
        g = m * (g - (g * m).sum(0, keepdim=True))  # through the first column step
        g = g - p * g.sum(1, keepdim=True)  # through the first row step
        return g.movedim((0, 1), (-2, -1)), None


def _sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """:class:`_Sinkhorn` in float32 at least, cast back to the logits' dtype. An FX leaf."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    out: Tensor = _Sinkhorn.apply(wide, iters)[0]
    return out.to(logits.dtype)


def _rms_projection(last: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``rsqrt(mean(x²) + eps) * sum_i x_i @ phi_i`` per token, and that rsqrt (float32 at
    least): ``last`` ``(n, N, ..., C)``, ``weight`` ``(n, C, K)`` -> ``(N, ..., K)``."""
    n, channels = last.shape[0], last.shape[-1]
    flat = last.reshape(n, -1, channels)
    dtype = torch.promote_types(last.dtype, torch.float32)
    squares = torch.linalg.vector_norm(flat, dim=2, dtype=dtype).square().sum(0)  # (M,)
    rstd = torch.rsqrt(squares / (n * channels) + eps)
    raw = thin_product(flat, weight).sum(0)  # (M, K)
    out = (raw * rstd.unsqueeze(1)).to(raw.dtype)
    return out.unflatten(0, last.shape[1:-1]), rstd


class _RmsProjection(torch.autograd.Function):
    """``RMSNorm(vec(x)) @ phi`` per token: the norm spans all n streams of a token and is
    applied after the matmul (a scalar per token), so no normalised copy is written; the
    backward folds the norm's term into one multiply-add on the matmul's input gradient
    (autograd would write a second stream-sized gradient for it), computed in the norm's dtype
    (autograd casts the gradients back). The rsqrt is an extra output, not differentiable, so
    that ``setup_context`` can save it (``torch.func``).
    """

    @staticmethod
    def forward(last: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return _rms_projection(last, weight, eps)

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, Tensor, float], output: tuple[Tensor, Tensor]
    ) -> None:
        last, weight, eps = inputs
        out, rstd = output
        ctx.mark_non_differentiable(rstd)
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.save_for_backward(last, weight, out, rstd)

    @staticmethod
    def backward(
        ctx: Any, grad: Tensor | None, _: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        if grad is None:  # no gradient reached the projection (the rsqrt has none)
            return None, None, None
        last, weight, out, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the norm as a function of the streams
            out, rstd = _rms_projection(last, weight, ctx.eps)
        n, channels, k = weight.shape
        flat = last.reshape(n, -1, channels).to(rstd.dtype)
        weight, g = weight.to(rstd.dtype), grad.reshape(-1, k)
        g_raw = g * rstd.unsqueeze(1)  # d/d(sum_i x_i @ phi_i)
        g_ms = -0.5 * rstd.square() * (g * out.reshape(-1, k)).sum(1)  # d/d mean(x²)
        grad_last = grad_weight = None
        if ctx.needs_input_grad[0]:
            scale = (2 / (n * channels) * g_ms).unsqueeze(1)
            grad_last = torch.matmul(g_raw, weight.mT).addcmul_(scale, flat).view(last.shape)
        if ctx.needs_input_grad[1]:  # (g_rawᵀ x_i)ᵀ: the fast orientation on CPU BLAS
            grad_weight = torch.matmul(g_raw.t(), flat).mT
        return grad_last, grad_weight, None


def _flat_rms_projection(last: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``RMSNorm(vec(x)) @ phi`` per token: ``last`` ``(n, N, ..., C)``, ``weight`` ``(n, C, K)``.
    Returns ``(N, ..., K)`` (see :class:`_RmsProjection`)."""
    out: Tensor = _RmsProjection.apply(last, weight, eps)[0]
    return out


def _stream_first(coef: Tensor, layout: Layout) -> Tensor:
    """Per-token per-stream coefficients ``(N, ..., n)`` -> ``(n, N, ...)`` broadcastable."""
    return native(coef.movedim(-1, 0).unsqueeze(-1), layout)


class MHCBranch(nn.Module):
    """The branch of an mHC layer: ``H_post(x)[i] * fn(sum_j H_pre(x)[j] x_j)`` to stream i.

    Args:
        fn: the layer, called on one stream-sized tensor ``(N, ...)`` (it must keep the shape),
            with the extra arguments of ``branch(h, *args, **kwargs)`` untouched (masks are
            per sample, for that ``(N, ...)`` input).
        streams: n; dim: channels per stream; dynamic: input-dependent ``H_pre``/``H_post``;
        layer_index: the stream ``b_pre`` favours at init (``layer_index mod n``);
        layout: where the channels are.

    >>> import torch
    >>> from torch import nn
    >>> from residual.hyper import expand_streams
    >>> branch = MHCBranch(nn.Linear(8, 8), streams=2, dim=8, dynamic=False)
    >>> branch(expand_streams(torch.randn(3, 8), 2)).shape
    torch.Size([6, 8])
    """

    def __init__(
        self,
        fn: nn.Module,
        streams: int,
        dim: int,
        *,
        dynamic: bool = True,
        layer_index: int = 0,
        layout: Layout = "channels_last",
    ) -> None:
        super().__init__()
        self.streams = check_positive_int("MHCBranch", "streams", streams)
        self.dim = check_positive_int("MHCBranch", "dim", dim)
        self.layout = check_layout("MHCBranch", layout)
        self.fn = fn
        pre = torch.zeros(streams)
        pre[layer_index % streams] = 1.0
        self.pre_bias = nn.Parameter(pre)  # b_pre: logits of H_pre
        self.post_bias = nn.Parameter(torch.zeros(streams))  # b_post: H_post = 2 sigmoid(0) = 1
        self.weight: nn.Parameter | None = None  # phi_pre | phi_post, a (C, 2n) block per stream
        self.pre_scale: nn.Parameter | None = None  # a_pre
        self.post_scale: nn.Parameter | None = None  # a_post
        if dynamic:
            self.weight = nn.Parameter(torch.zeros(streams, dim, 2 * streams))
            self.pre_scale = nn.Parameter(torch.tensor(0.01))
            self.post_scale = nn.Parameter(torch.tensor(0.01))

    def forward(self, h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if type(args) is not tuple:  # torch.fx.symbolic_trace(branch): *args is one Proxy
            _branch.check_no_extra_args(args, kwargs)
            args, kwargs = (), {}
        n = self.streams
        check_channels(h, self.dim, self.layout, "MHCBranch", self.pre_bias)
        s = per_stream(h, n, "MHCBranch")  # (n, N, ...) in the input's layout
        if self.weight is None or self.pre_scale is None or self.post_scale is None:
            pre = torch.sigmoid(self.pre_bias)
            x = mix_streams(pre, s, self.layout)
            post = along_streams(2 * torch.sigmoid(self.post_bias), s)
        else:
            last = channels_last(s, self.layout)
            proj = _flat_rms_projection(last, self.weight)  # (N, ..., 2n)
            pre = torch.sigmoid(self.pre_scale * proj[..., :n] + self.pre_bias)
            post = 2 * torch.sigmoid(self.post_scale * proj[..., n:] + self.post_bias)
            x = stream_sum(_stream_first(pre, self.layout), s)
            post = _stream_first(post, self.layout)
        out = self.fn(x, *args, **kwargs)
        check_branch_shape(x, out, "MHCBranch")
        return stream_spread(post, out).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, dim={self.dim}, layout={self.layout!r}"


class MHCMix(nn.Module):
    """The shortcut of an mHC layer: ``x_i <- sum_j H_res(x)[i, j] x_j``, ``H_res`` doubly
    stochastic (:func:`sinkhorn` of ``b_res = I`` at init, plus the dynamic part).

    >>> import torch
    >>> from residual.hyper import expand_streams, reduce_streams
    >>> mix = MHCMix(streams=4, dim=8)
    >>> h = torch.randn(4 * 3, 8)
    >>> bool(torch.allclose(reduce_streams(mix(h), 4), reduce_streams(h, 4), atol=1e-5))
    True
    """

    def __init__(
        self,
        streams: int,
        dim: int,
        *,
        dynamic: bool = True,
        sinkhorn_iters: int = 20,
        layout: Layout = "channels_last",
    ) -> None:
        super().__init__()
        self.streams = check_positive_int("MHCMix", "streams", streams)
        self.dim = check_positive_int("MHCMix", "dim", dim)
        self.sinkhorn_iters = check_positive_int("MHCMix", "sinkhorn_iters", sinkhorn_iters)
        self.layout = check_layout("MHCMix", layout)
        self.res_bias = nn.Parameter(torch.eye(streams))  # b_res: logits of H_res[i, j]
        self.weight: nn.Parameter | None = None  # phi_res, a (C, n*n) block per stream
        self.res_scale: nn.Parameter | None = None  # a_res
        if dynamic:
            self.weight = nn.Parameter(torch.zeros(streams, dim, streams * streams))
            self.res_scale = nn.Parameter(torch.tensor(0.01))

    def matrix(self, h: Tensor | None = None) -> Tensor:
        """``H_res``: ``(n, n)`` when static, per token ``(N, ..., n, n)`` when dynamic.

        >>> MHCMix(2, 4, dynamic=False).matrix().shape
        torch.Size([2, 2])
        """
        if self.weight is None or self.res_scale is None:
            return _sinkhorn(self.res_bias, self.sinkhorn_iters)
        if h is None:
            raise ResidualError("MHCMix.matrix: a dynamic H_res depends on the streams; pass h")
        check_channels(h, self.dim, self.layout, "MHCMix", self.res_bias)
        last = channels_last(per_stream(h, self.streams, "MHCMix"), self.layout)
        return self._dynamic_matrix(last, self.weight, self.res_scale)

    def _dynamic_matrix(self, last: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
        proj = _flat_rms_projection(last, weight).unflatten(-1, (self.streams, -1))
        return _sinkhorn(scale * proj + self.res_bias, self.sinkhorn_iters)

    def forward(self, h: Tensor) -> Tensor:
        n = self.streams
        check_channels(h, self.dim, self.layout, "MHCMix", self.res_bias)
        s = per_stream(h, n, "MHCMix")
        if self.weight is None or self.res_scale is None:
            res = _sinkhorn(self.res_bias, self.sinkhorn_iters)
            return mix_streams(res, s, self.layout).flatten(0, 1)
        last = channels_last(s, self.layout)
        mix = self._dynamic_matrix(last, self.weight, self.res_scale)  # (N, ..., n, n)
        mixed = token_mix(mix, last)
        return native(mixed, self.layout).flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"streams={self.streams}, dim={self.dim}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"layout={self.layout!r}"
        )


def mhc_residual(
    fn: nn.Module,
    streams: int,
    dim: int,
    *,
    dynamic: bool = True,
    sinkhorn_iters: int = 20,
    layer_index: int = 0,
    layout: Layout = "channels_last",
    post: nn.Module | None = None,
    drop_path: float = 0.0,
) -> Residual:
    """An mHC layer: ``Residual(MHCBranch(fn), shortcut=MHCMix)`` over stream tensors.

    Inputs and outputs are stream tensors ``(streams * N, ...)`` (``expand_streams`` /
    ``reduce_streams``). With ``streams=1`` the constrained maps are degenerate (``H_res = 1``,
    ``H_pre = sigmoid(.) < 1``), so the layer is the plain ``Residual(fn)``: exactly
    ``x + fn(x)``, with no connection parameters (as the peer package does).

    Raises:
        ResidualError: ``streams < 1``, ``dim`` or ``sinkhorn_iters`` not positive.

    >>> import torch
    >>> from torch import nn
    >>> from residual.hyper import expand_streams, reduce_streams
    >>> stack = nn.Sequential(
    ...     *(mhc_residual(nn.Linear(8, 8), streams=4, dim=8, layer_index=i) for i in range(3))
    ... )
    >>> h = stack(expand_streams(torch.randn(2, 8), 4))
    >>> h.shape, reduce_streams(h, 4).shape
    (torch.Size([8, 8]), torch.Size([2, 8]))
    """
    check_positive_int("mhc_residual", "streams", streams)
    if streams == 1:
        return Residual(fn, post=post, drop_path=drop_path)
    branch = MHCBranch(fn, streams, dim, dynamic=dynamic, layer_index=layer_index, layout=layout)
    mix = MHCMix(streams, dim, dynamic=dynamic, sinkhorn_iters=sinkhorn_iters, layout=layout)
    return stream_residual(branch, mix, streams, post, drop_path)


for _name in (
    "along_streams",
    "check_branch_shape",
    "check_channels",
    "_flat_rms_projection",
    "_sinkhorn",
    "mix_streams",
    "stream_spread",
    "stream_sum",
    "token_mix",
):
    torch.fx.wrap(_name)
