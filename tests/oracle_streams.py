"""Plain float64 references for multi-stream and cross-depth residual connections.

Written from the papers' equations with torch's functional ops and nothing from ``residual``:
every function below states the equation it computes and where it comes from, so that it can be
reviewed line by line against the paper. Nothing here is fast or clever; einsum spells out every
index.

Conventions shared by all functions:

* **Stream tensors** are folded stream-major into the sample axis: ``(n * N, ...)``, stream ``i``
  of sample ``b`` is row ``i * N + b``. :func:`unfold` / :func:`fold` go to and from
  ``(n, N, ...)``.
* **Layouts**: ``"channels_last"`` ``(N, ..., C)`` or ``"channels_first"`` ``(N, C, ...)``. The
  connection formulas act on channels-last token vectors; :func:`to_last` / :func:`from_last`
  move the channels.
* **Stochastic depth** is given explicitly: ``keep`` is a ``(N,)`` tensor of per-SAMPLE branch
  multipliers (0 for a dropped sample; 1, ``1 / (1 - p)`` or ``N / k`` for a kept one), so a
  drawn mask can be replayed. All streams of a sample share its multiplier (:func:`per_sample`).
  Eval is ``keep = 1``.
* **Branches** ``fn`` are callables on one stream-sized tensor ``(N, ...)``; extra arguments
  (masks) are bound by the caller.

Connection parameters are passed as tensors, named as in the papers; the test maps the modules'
parameters onto these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Fn = Callable[[Tensor], Tensor]

# Layout and stochastic depth -------------------------------------------------------------------


def unfold(h: Tensor, n: int) -> Tensor:
    """``(n * N, ...)`` -> ``(n, N, ...)``: stream i of sample b is row ``i * N + b``."""
    return h.reshape(n, h.shape[0] // n, *h.shape[1:])


def fold(s: Tensor) -> Tensor:
    """``(n, N, ...)`` -> ``(n * N, ...)``, the inverse of :func:`unfold`."""
    return s.reshape(s.shape[0] * s.shape[1], *s.shape[2:])


def to_last(t: Tensor, layout: str, dim: int) -> Tensor:
    """Move the channels (at ``dim`` when channels-first) to the last axis."""
    return t.movedim(dim, -1) if layout == "channels_first" else t


def from_last(t: Tensor, layout: str, dim: int) -> Tensor:
    """The inverse of :func:`to_last`."""
    return t.movedim(-1, dim) if layout == "channels_first" else t


def per_sample(keep: Tensor, like: Tensor, streams: int = 1) -> Tensor:
    """The per-sample multipliers ``keep`` ``(N,)`` as a factor of ``like`` ``(streams * N, ...)``:
    row ``i * N + b`` gets ``keep[b]``, so every stream of a sample is kept or dropped with it."""
    return keep.repeat(streams).reshape(-1, *[1] * (like.dim() - 1))


def residual(shortcut: Tensor, branch: Tensor, keep: Tensor, streams: int = 1) -> Tensor:
    """``S + drop(F)``: the merge of every connection here, with stochastic depth per sample
    (Huang et al. 2016; "drop path": a dropped sample's branch is 0, a kept one's scaled)."""
    return shortcut + per_sample(keep, branch, streams) * branch


def layer_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the last axis, no affine (Ba et al. 2016)."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def affine_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """:func:`layer_norm` with its learned gain and bias (``nn.LayerNorm``)."""
    return layer_norm(x, eps) * weight + bias


def _tokens(v: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A static per-stream coefficient ``(n, *rest)`` broadcast to every token ``shape``
    ``(n, N, ..., *rest)``."""
    middle = len(shape) - v.dim()
    return v.reshape(v.shape[0], *[1] * middle, *v.shape[1:]).expand(shape)


# Hyper-connections (Zhu et al. 2024, arXiv 2409.19606) -----------------------------------------


@dataclass
class HyperDynamic:
    """The dynamic parts of one hyper-connected layer: ``W_m`` (d, 1), ``W_r`` (d, n), ``W_b``
    (d, 1) and their scales. The paper shares one ``s_alpha`` between ``A_m`` and ``A_r``
    (``s_m = s_r``); the scales are kept apart here so that either reading can be fed."""

    w_m: Tensor
    s_m: Tensor
    w_r: Tensor
    s_r: Tensor
    w_b: Tensor
    s_b: Tensor


def hyper_connection(
    h: Tensor,
    fn: Fn,
    n: int,
    *,
    a_m: Tensor,
    a_r: Tensor,
    b: Tensor,
    dynamic: HyperDynamic | None,
    layout: str,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """One hyper-connected layer on the stream tensor ``h`` ``(n * N, ...)``: returns the
    shortcut and the branch halves ``(A_r^T H, B^T T(h_0))`` folded, so that
    ``residual(*halves, keep, n)`` is the layer's output.

    Static (the HC matrix ``[[0, B], [A_m, A_r]]``): per token, with ``H = (H_1..H_n)``::

        h_0   = A_m^T H        = sum_i A_m[i] H_i         (width connection)
        H'_j  = (A_r^T H)_j + B_j T(h_0)
              = sum_i A_r[i, j] H_i + B[j] T(h_0)          (residual mix, depth connection)

    Dynamic: ``H_bar = norm(H)`` (layer norm of each stream, no affine), then
    ``A_m(H) = s_alpha tanh(H_bar W_m) + A_m``, ``A_r(H) = s_alpha tanh(H_bar W_r) + A_r``,
    ``B(H) = s_beta tanh(H_bar W_beta)^T + B``: row i of each from stream i's token.
    """
    s = to_last(unfold(h, n), layout, 2)  # (n, N, ..., d): s[i] = H_i
    tokens = s.shape[:-1]  # (n, N, ...)
    am = _tokens(a_m, tokens)  # A_m[i] per token
    ar = _tokens(a_r, (*tokens, n))  # A_r[i, j] per token: [i, ..., j]
    bb = _tokens(b, tokens)  # B[j] per token
    if dynamic is not None:
        h_bar = layer_norm(s, eps)
        am = am + dynamic.s_m * torch.tanh(h_bar @ dynamic.w_m)[..., 0]
        ar = ar + dynamic.s_r * torch.tanh(h_bar @ dynamic.w_r)
        bb = bb + dynamic.s_b * torch.tanh(h_bar @ dynamic.w_b)[..., 0]
    h0 = torch.einsum("i...,i...c->...c", am, s)
    t = to_last(fn(from_last(h0, layout, 1)), layout, 1)  # T(h_0), (N, ..., d)
    shortcut = torch.einsum("i...j,i...c->j...c", ar, s)
    branch = torch.einsum("j...,...c->j...c", bb, t)
    return fold(from_last(shortcut, layout, 2)), fold(from_last(branch, layout, 2))


# mHC: manifold-constrained hyper-connections (Xie et al. 2025, arXiv 2512.24880) ---------------


def sinkhorn(logits: Tensor, iters: int = 20) -> Tensor:
    """Sinkhorn-Knopp (Sinkhorn & Knopp 1967) as mHC uses it for ``H_res``:
    ``M = exp(logits)``, then ``iters`` times: rows scaled to sum 1, then columns. Plain float64.
    """
    m = torch.exp(logits.to(torch.float64))
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)  # rows
        m = m / m.sum(-2, keepdim=True)  # columns
    return m


@dataclass
class MHCDynamic:
    """The dynamic part of one mHC layer: the projections ``phi_pre``, ``phi_post`` (nC, n) and
    ``phi_res`` (nC, n*n) of ``vec(x)``, and their gates ``a_pre``, ``a_post``, ``a_res``."""

    phi_pre: Tensor
    phi_post: Tensor
    phi_res: Tensor
    a_pre: Tensor
    a_post: Tensor
    a_res: Tensor


def mhc_connection(
    h: Tensor,
    fn: Fn,
    n: int,
    *,
    b_pre: Tensor,
    b_post: Tensor,
    b_res: Tensor,
    dynamic: MHCDynamic | None,
    layout: str,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """One mHC layer on ``h`` ``(n * N, ...)``: the halves ``(H_res x, H_post^T F(H_pre x))``.

    Per token, ``x`` ``(n, C)``, the paper's equations::

        x'     = RMSNorm(vec(x))                                   (over all n*C values)
        H_pre  = sigmoid(a_pre * x' phi_pre + b_pre)               (1, n)
        H_post = 2 sigmoid(a_post * x' phi_post + b_post)          (1, n)
        H_res  = Sinkhorn-Knopp(a_res * mat(x' phi_res) + b_res)   (n, n), doubly stochastic
        x_{l+1} = H_res x  +  H_post^T F(H_pre x)

    Static: the biases alone (``H_pre = sigmoid(b_pre)`` ...). ``mat`` is row-major.
    """
    x = to_last(unfold(h, n), layout, 2).movedim(0, -2)  # (N, ..., n, C)
    if dynamic is None:
        pre = torch.sigmoid(b_pre)
        post = 2 * torch.sigmoid(b_post)
        res = sinkhorn(b_res, sinkhorn_iters)
    else:
        d = dynamic
        vec = x.flatten(-2)  # vec(x): (N, ..., n*C), stream-major
        xr = vec / torch.sqrt((vec**2).mean(-1, keepdim=True) + eps)  # RMSNorm, no gain
        pre = torch.sigmoid(d.a_pre * (xr @ d.phi_pre) + b_pre)
        post = 2 * torch.sigmoid(d.a_post * (xr @ d.phi_post) + b_post)
        res = sinkhorn(d.a_res * (xr @ d.phi_res).unflatten(-1, (n, n)) + b_res, sinkhorn_iters)
    shape = x.shape[:-1]  # (N, ..., n)
    pre, post, res = pre.expand(shape), post.expand(shape), res.expand((*shape, n))
    branch_in = torch.einsum("...j,...jc->...c", pre, x)  # H_pre x
    f = to_last(fn(from_last(branch_in, layout, 1)), layout, 1)
    shortcut = torch.einsum("...ij,...jc->...ic", res, x)  # H_res x
    branch = torch.einsum("...i,...c->...ic", post, f)  # H_post^T F(H_pre x)
    return (
        fold(from_last(shortcut.movedim(-2, 0), layout, 2)),
        fold(from_last(branch.movedim(-2, 0), layout, 2)),
    )


# Frac-connections (Zhu et al. 2025, arXiv 2503.14125) ------------------------------------------


@dataclass
class FracDynamic:
    """The dynamic rows of one frac-connected layer: ``W`` (d/m, m) and ``s`` for each of
    ``Y``, ``A``, ``B``."""

    w_y: Tensor
    s_y: Tensor
    w_a: Tensor
    s_a: Tensor
    w_b: Tensor
    s_b: Tensor


def frac_connection(
    x: Tensor,
    fn: Fn,
    m: int,
    *,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    dynamic: FracDynamic | None,
    layout: str,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """One frac-connected layer on the hidden state ``x`` ``(N, ..., d)``: the halves.

    ``F_1..F_m`` are the m fractions of ``d / m`` channels of each token; ``T = fn(concat(in))``
    split the same way::

        in_j = sum_i Y[i, j] F_i                (width connection)
        F'_j = sum_i A[i, j] F_i + sum_i B[i, j] T_i

    Dynamic, as in hyper-connections: row i of each matrix plus ``s tanh(norm(F_i) W)``.
    """
    f = to_last(x, layout, 1).unflatten(-1, (m, -1))  # (N, ..., m, d/m)
    tokens = (*f.shape[:-1], m)  # (N, ..., m, m): [..., i, j]
    yy, aa, bb = (v.expand(tokens) for v in (y, a, b))
    if dynamic is not None:
        f_bar = layer_norm(f, eps)
        yy = yy + dynamic.s_y * torch.tanh(f_bar @ dynamic.w_y)
        aa = aa + dynamic.s_a * torch.tanh(f_bar @ dynamic.w_a)
        bb = bb + dynamic.s_b * torch.tanh(f_bar @ dynamic.w_b)
    inputs = torch.einsum("...ij,...ic->...jc", yy, f).flatten(-2)
    t = to_last(fn(from_last(inputs, layout, 1)), layout, 1).unflatten(-1, (m, -1))
    shortcut = torch.einsum("...ij,...ic->...jc", aa, f).flatten(-2)
    branch = torch.einsum("...ij,...ic->...jc", bb, t).flatten(-2)
    return from_last(shortcut, layout, 1), from_last(branch, layout, 1)


# Cross-depth connections -----------------------------------------------------------------------


def laurel_rw(x: Tensor, fn: Fn, logits: Tensor, keep: Tensor) -> Tensor:
    """LAuReL-RW (Menghani et al. 2024): ``x_{i+1} = alpha f(x_i) + beta x_i``, with
    ``(alpha, beta) = softmax(logits)``; the drop acts on ``f(x_i)``."""
    alpha, beta = torch.softmax(logits, 0)
    return alpha * per_sample(keep, x) * fn(x) + beta * x


def low_rank(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LAuReL's low-rank map ``A B x`` (``A`` (d, r), ``B`` (r, d)), on row vectors."""
    return x @ b.t() @ a.t()


def laurel_lr(x: Tensor, fn: Fn, a: Tensor, b: Tensor, keep: Tensor) -> Tensor:
    """LAuReL-LR: ``x_{i+1} = f(x_i) + x_i + A B x_i``."""
    return residual(x + low_rank(x, a, b), fn(x), keep)


def laurel_rw_lr(x: Tensor, fn: Fn, logits: Tensor, a: Tensor, b: Tensor, keep: Tensor) -> Tensor:
    """LAuReL-RW+LR: ``x_{i+1} = alpha f(x_i) + beta (x_i + A B x_i)``."""
    alpha, beta = torch.softmax(logits, 0)
    return alpha * per_sample(keep, x) * fn(x) + beta * (x + low_rank(x, a, b))


def laurel_pa(
    x: Tensor,
    fns: Sequence[Fn],
    gammas: Sequence[Tensor],
    lows: Sequence[tuple[Tensor, Tensor]],
    keeps: Sequence[Tensor],
) -> Tensor:
    """LAuReL-PA, a stack: ``x_{i+1} = f_i(x_i) + x_i + sum_{j<k_i} gamma_ij h_i(x_{i-j})`` with
    ``h_i = A_i B_i`` low rank, ``k_i = len(gammas[i])`` previous activations (fewer near the
    bottom)."""
    inputs: list[Tensor] = []
    for fn, gamma, (a, b), keep in zip(fns, gammas, lows, keeps, strict=True):
        inputs.append(x)
        x = residual(x, fn(x), keep)
        for j in range(len(gamma)):
            x = x + gamma[j] * low_rank(inputs[-1 - j], a, b)
    return x


def denseformer(
    x: Tensor,
    fns: Sequence[Fn],
    alphas: Sequence[Tensor | None],
    sources: Sequence[Sequence[int]],
    keeps: Sequence[Tensor],
) -> Tensor:
    """DenseFormer (Pagliardini et al. 2024), a stack of residual blocks ``o_i = x_i + f_i(x_i)``
    with a depth-weighted average after block i where ``alphas[i]`` is given::

        x_{i+1} = sum_{j in sources[i]} alpha_ij o_j        (o_0 = the input)

    and ``x_{i+1} = o_i`` elsewhere."""
    outputs = [x]
    for fn, alpha, src, keep in zip(fns, alphas, sources, keeps, strict=True):
        outputs.append(residual(x, fn(x), keep))
        if alpha is None:
            x = outputs[-1]
        else:
            x = sum((alpha[k] * outputs[j] for k, j in enumerate(src)), torch.zeros_like(x))
    return x


def attention(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor,
    w_out: Tensor,
    b_out: Tensor,
    heads: int,
    *,
    causal: bool,
    first_values: Tensor | None = None,
    lam: tuple[float, float] = (0.5, 0.5),
) -> tuple[Tensor, Tensor]:
    """Multi-head self-attention (Vaswani et al. 2017) on ``(N, L, d)``, returning its output
    and its values ``V`` ``(N, heads, L, d / heads)``; with ``first_values`` the value residual
    of Zhou et al. 2024 (ResFormer): ``V'_n = lambda_1 V_n + lambda_2 V_1``."""
    n, length, d = x.shape
    q, k, v = (x @ w_in.t() + b_in).reshape(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    mixed = v if first_values is None else lam[0] * v + lam[1] * first_values
    scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    if causal:
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    out = (torch.softmax(scores, -1) @ mixed).transpose(1, 2).reshape(n, length, d)
    return out @ w_out.t() + b_out, v


def value_residual_stack(
    x: Tensor,
    blocks: Sequence[dict[str, Tensor]],
    heads: int,
    lam: tuple[float, float],
    keeps: Sequence[tuple[Tensor, Tensor]],
    *,
    causal: bool = True,
) -> Tensor:
    """A stack of pre-norm GPT blocks with value residual learning (Zhou et al. 2024)::

        x = x + Attn(LN_1(x); V'_n = lambda_1 V_n + lambda_2 V_1)
        x = x + MLP_gelu(LN_2(x))

    ``V_1`` is the first block's values. ``blocks[i]`` holds ``ln1_w``, ``ln1_b``, ``w_in``,
    ``b_in``, ``w_out``, ``b_out``, ``ln2_w``, ``ln2_b``, ``w1``, ``b1``, ``w2``, ``b2``;
    ``keeps[i]`` the per-sample multipliers of its two residuals."""
    first: Tensor | None = None
    for p, (keep_attn, keep_mlp) in zip(blocks, keeps, strict=True):
        normed = affine_layer_norm(x, p["ln1_w"], p["ln1_b"])
        out, v = attention(
            normed, p["w_in"], p["b_in"], p["w_out"], p["b_out"], heads,
            causal=causal, first_values=first, lam=lam,
        )  # fmt: skip
        first = v if first is None else first
        x = residual(x, out, keep_attn)
        hidden = F.gelu(affine_layer_norm(x, p["ln2_w"], p["ln2_b"]) @ p["w1"].t() + p["b1"])
        x = residual(x, hidden @ p["w2"].t() + p["b2"], keep_mlp)
    return x


def resi_dual(
    x: Tensor,
    fns: Sequence[Fn],
    norms: Sequence[tuple[Tensor, Tensor]],
    final_norm: tuple[Tensor, Tensor],
    keeps: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """ResiDual (Xie et al. 2023): a post-norm stream ``x_a`` and a dual stream ``x_d``, both
    starting as the input::

        x_a <- LN_k(x_a + F_k(x_a))
        x_d <- x_d + F_k(x_a)
        out  = x_a + LN(x_d)

    A dropped sample drops ``F_k(x_a)`` from both of its streams. Returns ``(out, the final
    stream pair folded (2 * N, ...))``."""
    xa, xd = x, x
    for fn, (w, b), keep in zip(fns, norms, keeps, strict=True):
        f = per_sample(keep, xa) * fn(xa)
        xa, xd = affine_layer_norm(xa + f, w, b), xd + f
    return xa + affine_layer_norm(xd, *final_norm), torch.cat([xa, xd])
