"""The oracle: the residual formula written out plainly, in float64, from the papers.

    H(x) = post( merge( S(pre x), drop( F(pre x) ) ) )

Nothing here comes from ``residual/`` (no import of it at all): every function is a few lines of
``torch`` / ``torch.nn.functional`` that takes its weights, masks and keep bits explicitly, so
that a configuration of the library can be rebuilt from its parameters and a drawn mask replayed.
Each function cites the equation it implements; review it against that, line by line.

Conventions: "channels-first" tensors are (N, C, *spatial) (or unbatched (C, *spatial)), with
the channel axis 1 (0 unbatched); "channels-last" ones are (..., C). Sequences are (N, L, E)
batch-first, (L, N, E) sequence-first (torch's ``batch_first=False``) or unbatched (L, E).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------
# Branches F
# ------------------------------------------------------------------------------------------


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A fully connected layer on the last axis: ``y = x W^T + b``."""
    y = x @ weight.transpose(0, 1)
    return y if bias is None else y + bias


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """An N-d convolution (cross-correlation, as torch's ``ConvNd``), N read from the weight's
    rank; ``x`` is (N, C, *spatial) or unbatched (C, *spatial)."""
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return fn(x, weight, bias, stride=stride, padding=padding)


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
) -> tuple[Tensor, Tensor]:
    """One LSTM step (Hochreiter & Schmidhuber 1997 with Gers et al. 2000's forget gate; the
    gate order i, f, g, o of torch's weights):

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)
        f = sigmoid(W_if x + b_if + W_hf h + b_hf)
        g = tanh(W_ig x + b_ig + W_hg h + b_hg)
        o = sigmoid(W_io x + b_io + W_ho h + b_ho)
        c' = f * c + i * g,  h' = o * tanh(c')
    """
    i, f, g, o = (linear(x, w_ih, b_ih) + linear(h, w_hh, b_hh)).chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm(
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
    *,
    batch_first: bool,
    hx: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A one-layer unidirectional LSTM over a sequence, returning ``(out, (h_n, c_n))`` as
    ``nn.LSTM``: out (N, L, H) / (L, N, H) / (L, H); h_n, c_n (1, N, H) or unbatched (1, H).
    ``hx`` (the initial state) has h_n's layout; zeros when None."""
    unbatched = x.dim() == 2
    seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)  # (L, N, I)
    n, hidden = seq.shape[1], w_hh.shape[1]
    if hx is None:
        h = c = seq.new_zeros(n, hidden)
    else:
        h, c = hx[0].reshape(n, hidden), hx[1].reshape(n, hidden)
    outs = []
    for x_t in seq.unbind(0):
        h, c = lstm_cell(x_t, h, c, w_ih, w_hh, b_ih, b_hh)
        outs.append(h)
    out = torch.stack(outs)  # (L, N, H)
    if unbatched:
        return out.squeeze(1), (h, c)  # h: (1, H)
    return (out.transpose(0, 1) if batch_first else out), (h.unsqueeze(0), c.unsqueeze(0))


def additive(mask: Tensor) -> Tensor:
    """torch's mask convention as numbers to add to the scores: bool True = may not attend
    (-inf), a float mask is added as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, -math.inf)
    return mask.to(torch.float64)


def attention_mask(
    n: int,
    heads: int,
    length: int,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
) -> Tensor:
    """The (N, heads, L, L) additive mask: ``attn_mask`` (L, L) or (N * heads, L, L), plus the
    padded keys (``key_padding_mask`` (N, L), or (L,) unbatched), plus -inf above the diagonal
    when ``causal`` (key j > query i: Vaswani et al. 2017, sec. 3.2.3's decoder mask)."""
    mask = torch.zeros(n, heads, length, length, dtype=torch.float64)
    if attn_mask is not None and attn_mask.dim() == 2:
        mask = mask + additive(attn_mask)  # (L, L): the same for every sample and head
    elif attn_mask is not None:
        mask = mask + additive(attn_mask).reshape(n, heads, length, length)
    if key_padding_mask is not None:
        mask = mask + additive(key_padding_mask).reshape(n, 1, 1, length)
    if causal:
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        mask = mask.masked_fill(future, -math.inf)
    return mask


def self_attention(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    heads: int,
    *,
    batch_first: bool,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Multi-head self-attention (Vaswani et al. 2017, eq. 1 and sec. 3.2.2):
    ``head_i = softmax(Q_i K_i^T / sqrt(d) + M) V_i``, ``out = concat(head_i) W_O^T + b_O``,
    with ``[Q, K, V] = x W_in^T + b_in`` (torch's fused in-projection) and ``M`` the masks."""
    unbatched = x.dim() == 2
    xb = x.unsqueeze(0) if unbatched else (x if batch_first else x.transpose(0, 1))  # (N, L, E)
    n, length, embed = xb.shape
    d = embed // heads

    def split(t: Tensor) -> Tensor:  # (N, L, E) -> (N, heads, L, d)
        return t.reshape(n, length, heads, d).transpose(1, 2)

    q, k, v = (split(t) for t in linear(xb, w_in, b_in).chunk(3, dim=-1))
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    scores = scores + attention_mask(n, heads, length, attn_mask, key_padding_mask, causal)
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(n, length, embed)
    out = linear(out, w_out, b_out)
    return out.squeeze(0) if unbatched else (out if batch_first else out.transpose(0, 1))


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The Transformer's position-wise MLP (Vaswani et al. 2017, eq. 2): ``max(0, x W1 + b1) W2
    + b2``."""
    return linear(torch.relu(linear(x, w1, b1)), w2, b2)


# ------------------------------------------------------------------------------------------
# Norms
# ------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Layer normalisation over the last axis (Ba et al. 2016, sec. 3; the variance biased, as
    torch's): ``(x - mean) / sqrt(var + eps) * w + b``."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over (N, C, *spatial)."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def batch_norm_train(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch normalisation in training (Ioffe & Szegedy 2015, Algorithm 1), x (N, C, *spatial):
    normalise with the mean and biased variance over every axis but the channel axis; the
    running estimates move as torch documents, ``r <- (1 - momentum) r + momentum * stat``, the
    variance there unbiased (times m / (m - 1), m values per channel). Returns
    ``(y, new_running_mean, new_running_var)``."""
    axes = [a for a in range(x.dim()) if a != 1]
    m = x.numel() // x.shape[1]
    mean = x.mean(axes)
    var = ((x - _channel_view(mean, x)) ** 2).mean(axes)
    y = (x - _channel_view(mean, x)) / torch.sqrt(_channel_view(var, x) + eps)
    y = y * _channel_view(weight, x) + _channel_view(bias, x)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    return y, new_mean, new_var


def batch_norm_eval(
    x: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    """Batch normalisation at inference (Ioffe & Szegedy 2015, Algorithm 2): the running
    estimates in place of the batch's."""
    y = (x - _channel_view(running_mean, x)) / torch.sqrt(_channel_view(running_var, x) + eps)
    return y * _channel_view(weight, x) + _channel_view(bias, x)


# ------------------------------------------------------------------------------------------
# Shortcuts S
# ------------------------------------------------------------------------------------------


def identity(x: Tensor) -> Tensor:
    """``S(x) = x`` (He et al. 2016, eq. 1)."""
    return x


def subsample(x: Tensor, stride: int, channels_last: bool) -> Tensor:
    """Every ``stride``-th position of each spatial axis, from the first: ``x[..., ::s, ::s]``,
    so a size H becomes ceil(H / s), as a padded strided conv gives. Batched tensors only."""
    every = slice(None, None, stride)
    spatial = x.dim() - 2
    if channels_last:
        return x[(slice(None),) + (every,) * spatial + (slice(None),)]
    return x[(slice(None), slice(None)) + (every,) * spatial]


def zero_pad(
    x: Tensor, out_channels: int, stride: int, *, channels_last: bool, before: int = 0
) -> Tensor:
    """He et al. 2016 (ResNet, sec. 3.3), option A: the identity, subsampled by the stride,
    with zero channels added to reach ``out_channels`` (``before`` in front, the rest after)."""
    sub = subsample(x, stride, channels_last)
    axis = -1 if channels_last else 1
    shape_before, shape_after = list(sub.shape), list(sub.shape)
    shape_before[axis] = before
    shape_after[axis] = out_channels - x.shape[axis] - before
    return torch.cat([sub.new_zeros(shape_before), sub, sub.new_zeros(shape_after)], dim=axis)


def projection(
    x: Tensor, weight: Tensor, stride: int, *, channels_last: bool, bias: Tensor | None = None
) -> Tensor:
    """He et al. 2016, eq. 2 (option B): ``S(x) = W_s x``, a learned 1x1 projection (a map of
    the channels at every position) on the input subsampled by the stride. ``weight`` is
    (C_out, C_in) channels-last or (C_out, C_in, 1, ...) channels-first; its norm (BatchNorm by
    default for convolutions) is applied by the caller."""
    sub = subsample(x, stride, channels_last)
    w = weight.reshape(weight.shape[0], weight.shape[1])
    if channels_last:
        return linear(sub, w, bias)
    out = linear(sub.movedim(1, -1), w, bias)
    return out.movedim(-1, 1)


def pooled_projection(x: Tensor, weight: Tensor, stride: int) -> Tensor:
    """ResNet-D's shortcut (He et al. 2019, "Bag of Tricks", fig. 2c): average pooling with
    kernel = stride (windows cut at the border: ceil_mode, count_include_pad=False), then the
    1x1 projection; ``S(x) = W_s avgpool(x)``. Channels-first, batched."""
    if stride > 1:
        pool = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}[x.dim()]
        x = pool(x, stride, stride, ceil_mode=True, count_include_pad=False)
    return projection(x, weight, 1, channels_last=False)


# ------------------------------------------------------------------------------------------
# Merges
# ------------------------------------------------------------------------------------------


def add(s: Tensor, f: Tensor) -> Tensor:
    """``y = S(x) + F(x)`` (He et al. 2016, eq. 1-2)."""
    return s + f


def scaled_add(s: Tensor, f: Tensor, alpha: float, beta: float) -> Tensor:
    """DeepNorm (Wang et al. 2022, DeepNet, sec. 3): ``x_{l+1} = LN(alpha x_l + G(x_l))``, the
    shortcut scaled by alpha (the LN is the block's post); ``beta`` scales the branch (1 in
    the paper)."""
    return alpha * s + beta * f


def rezero(s: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
    """ReZero (Bachlechner et al. 2020): ``x_{i+1} = x_i + alpha_i F(x_i)``, one scalar."""
    return s + alpha * f


def channel_view(t: Tensor, like: Tensor, channel_axis: int) -> Tensor:
    """A per-channel vector shaped to broadcast along ``channel_axis`` of ``like``."""
    shape = [1] * like.dim()
    shape[channel_axis] = -1
    return t.reshape(shape)


def layer_scale(s: Tensor, f: Tensor, gamma: Tensor, channel_axis: int) -> Tensor:
    """LayerScale (Touvron et al. 2021, CaiT, sec. 2.1): ``x + diag(gamma) F(x)``, one learned
    factor per channel, the channels along ``channel_axis``."""
    return s + channel_view(gamma, f, channel_axis) * f


def highway(s: Tensor, f: Tensor, weight: Tensor, bias: Tensor, channel_axis: int) -> Tensor:
    """Highway gate (Srivastava et al. 2015, eq. 3 with C = 1 - T): ``y = H(x) T(x) + x (1 -
    T(x))``, ``T(x) = sigmoid(W_T x + b_T)`` read from the shortcut, per position."""
    t = torch.sigmoid(linear(s.movedim(channel_axis, -1), weight, bias)).movedim(-1, channel_axis)
    return f * t + s * (1 - t)


def gru_gate(
    s: Tensor,
    f: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor,
    bias_hh: Tensor,
    channel_axis: int,
) -> Tensor:
    """GRU gating of a residual (Parisotto et al. 2019, GTrXL, sec. 3.2: the branch output y is
    the GRU's input, the stream x its hidden state), with the GRU cell that ``GRUGate``
    documents (torch's ``GRUCell``: Cho et al. 2014 with the reset gate applied after the
    hidden projection), per position; weights in the order r, z, n:

        r = sigmoid(W_ir y + b_ir + W_hr x + b_hr)
        z = sigmoid(W_iz y + b_iz + W_hz x + b_hz)
        n = tanh(W_in y + b_in + r * (W_hn x + b_hn))
        g = (1 - z) * n + z * x

    (GTrXL's own gate differs: ``h = tanh(W_g y + U_g (r * x))``, ``g = (1 - z) x + z h`` with
    a bias b_g subtracted inside z.)"""
    x, y = s.movedim(channel_axis, -1), f.movedim(channel_axis, -1)
    ir, iz, in_ = linear(y, weight_ih, bias_ih).chunk(3, dim=-1)
    hr, hz, hn = linear(x, weight_hh, bias_hh).chunk(3, dim=-1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return ((1 - z) * n + z * x).movedim(-1, channel_axis)


# ------------------------------------------------------------------------------------------
# Stochastic depth
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Stochastic depth with its draws given (Huang et al. 2016): which samples keep the branch.

    ``mode``: "row" (the branch runs on every sample; dropped samples get 0: timm's DropPath),
    "batch" (one bit for the whole batch; a dropped branch is not evaluated at all: Huang et
    al.'s original), "subset" (the branch is evaluated only on the kept samples: DINOv2).
    ``keep``: bool (N,), one bit per sample ("batch": all equal). ``scale``: the factor of a kept
    branch output (1 / (1 - p), N / k for "subset", or 1). ``sample_axis``: where the N samples
    are in x (None: an unbatched x, one sample).
    """

    mode: str
    keep: Tensor
    scale: float
    sample_axis: int | None = 0


def _per_sample(keep: Tensor, like: Tensor, sample_axis: int | None) -> Tensor:
    """The keep bits as 0. / 1., shaped to broadcast along the sample axis of ``like``."""
    bits = keep.to(torch.float64)
    if sample_axis is None:
        return bits.reshape((1,) * like.dim())
    return channel_view(bits, like, sample_axis)


def _head(out: Any) -> tuple[Tensor, tuple[Any, ...]]:
    """A branch output as (the tensor to merge, what passes through): the tuple rule."""
    return (out, ()) if isinstance(out, Tensor) else (out[0], tuple(out[1:]))


def dropped_branch(
    branch: Callable[[Tensor], Any], x: Tensor, like: Tensor, drop: Drop
) -> tuple[Tensor, tuple[Any, ...]]:
    """``drop(F(x))``: the branch's contribution under the given keep bits (and what passes
    through); ``like`` is the shortcut output, the shape of a contribution that is all zero."""
    if drop.mode == "row":
        head, rest = _head(branch(x))
        return head * _per_sample(drop.keep, head, drop.sample_axis) * drop.scale, rest
    if drop.mode == "batch":
        if bool(drop.keep.all()):
            head, rest = _head(branch(x))
            return head * drop.scale, rest
        return torch.zeros_like(like), ()
    if drop.mode == "subset":
        axis = 0 if drop.sample_axis is None else drop.sample_axis
        kept = drop.keep.nonzero().flatten()
        full = torch.zeros_like(like)
        if len(kept) == 0:
            return full, ()
        if drop.sample_axis is None:  # one unbatched sample, kept
            return _head(branch(x))[0] * drop.scale, ()
        head, _ = _head(branch(x.index_select(axis, kept)))
        return full.index_copy(axis, kept, head * drop.scale), ()
    raise ValueError(f"unknown drop mode {drop.mode!r}")


# ------------------------------------------------------------------------------------------
# The residual
# ------------------------------------------------------------------------------------------

Fn = Callable[[Tensor], Tensor]


def residual(
    x: Tensor,
    branch: Callable[[Tensor], Any],
    *,
    shortcut: Fn = identity,
    merge: Callable[[Tensor, Tensor], Tensor] = add,
    pre: Fn | None = None,
    post: Fn | None = None,
    drop: Drop | None = None,
) -> Any:
    """``H(x) = post(merge(S(pre x), drop(F(pre x))))``. ``pre`` is shared by both paths
    (He et al. 2016b's pre-activation of projection blocks); a pre-norm puts its norm inside
    ``branch`` (the shortcut carries the un-normed x), a post-norm is ``post``. A branch that
    returns a tuple contributes its first element; the rest is returned after the output."""
    if pre is not None:
        x = pre(x)
    s = shortcut(x)
    if drop is None:
        f, rest = _head(branch(x))
    else:
        f, rest = dropped_branch(branch, x, s, drop)
    y = merge(s, f)
    if post is not None:
        y = post(y)
    return (y, *rest) if rest else y
