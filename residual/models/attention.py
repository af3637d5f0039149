"""Attention and feed-forward branches for Transformer residuals (fused qkv, SDPA).

These are *branches*: they hold no residual logic. A Transformer layer is two ``Residual`` s
around them; the norm placement is chosen by where the norm goes (inside the branch for
pre-norm, ``post=`` for post-norm).

>>> import torch
>>> attn = SelfAttention(16, 4)
>>> attn(torch.randn(2, 5, 16)).shape
torch.Size([2, 5, 16])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import _branch
from residual._types import check_positive_int
from residual.errors import ResidualError

__all__ = [
    "AttentionBranch",
    "FeedForward",
    "SelfAttention",
    "ValueResidualAttention",
    "resolve_activation",
]


def _additive(mask: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    if not mask.is_floating_point():
        raise TypeError(
            f"SelfAttention: {name} must be bool or floating, got {mask.dtype}; pass "
            f"mask.bool() (True = may not attend) or an additive float mask (-inf = blocked)"
        )
    return mask.to(dtype)


def _merge_masks(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    length: int,
    dtype: torch.dtype,
    unbatched: bool,
) -> Tensor | None:
    """Merge torch-style masks (bool True = masked out, or additive floats) into one SDPA mask.

    ``attn_mask`` is (L, L) or (N * heads, L, L); ``key_padding_mask`` is (N, L), or (L,) for
    an unbatched input.
    """
    mask: Tensor | None = None
    if attn_mask is not None:
        with _branch.shape_checks():
            square = bool(attn_mask.dim() == 2 and attn_mask.shape == (length, length))
            per_head = bool(
                attn_mask.dim() == 3 and attn_mask.shape == (batch * heads, length, length)
            )
        if square:
            mask = _additive(attn_mask, dtype, "attn_mask")
        elif per_head:
            mask = _additive(attn_mask, dtype, "attn_mask").view(batch, heads, length, length)
        else:
            raise ResidualError(
                f"SelfAttention: attn_mask of shape {tuple(attn_mask.shape)} does not fit; "
                f"expected ({length}, {length}) or ({batch * heads}, {length}, {length})"
            )
    if key_padding_mask is not None:
        with _branch.shape_checks():
            expected = (length,) if unbatched else (batch, length)
            fits = bool(key_padding_mask.shape == expected)
        if not fits:
            layout = "(length,)" if unbatched else "(batch, length)"
            raise ResidualError(
                f"SelfAttention: key_padding_mask of shape {tuple(key_padding_mask.shape)} "
                f"does not fit; expected {layout} = {expected}"
            )
        pad = _additive(key_padding_mask, dtype, "key_padding_mask").view(batch, 1, 1, length)
        mask = pad if mask is None else mask + pad
    return mask


def sdpa_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    causal: bool,
    x: Tensor,
    heads: int,
    batch_first: bool,
) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for ``scaled_dot_product_attention`` on ``x``: (N, L, D) when
    ``batch_first``, else (L, N, D); or unbatched (L, D).

    The masks merged by :func:`_merge_masks`. ``is_causal=True`` (or a layer that is always
    ``causal``) means causal whatever else is given: the causal mask is combined with the
    other masks (a no-op when ``attn_mask`` is itself causal), or SDPA is asked for it when
    there are none. (torch reads ``is_causal`` as a hint that ``attn_mask`` is causal: it
    drops ``attn_mask`` when there is no padding mask, and drops the hint when there is one.)
    An FX leaf: the masks are optional inputs, so whether they are present is known only when
    the traced graph runs.
    """
    unbatched = x.dim() == 2
    if unbatched:
        batch, length = 1, x.shape[0]
    else:
        batch, length = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    mask = _merge_masks(attn_mask, key_padding_mask, batch, heads, length, x.dtype, unbatched)
    if mask is None:
        return None, causal or is_causal
    if causal or is_causal:
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        return mask.masked_fill(causal_mask, float("-inf")), False
    return mask, False


def check_sequence(caller: str, x: Tensor, d_model: int, batch_first: bool = True) -> None:
    """Raise unless ``x`` is a batch of sequences, (N, L, d_model) when ``batch_first`` else
    (L, N, d_model), or one unbatched sequence (L, d_model). An FX leaf."""
    if x.is_nested:
        raise TypeError(
            f"{caller}: nested tensor input is not supported; pass a padded tensor and mark the "
            "padding with src_key_padding_mask (e.g. x.to_padded_tensor(0.0))"
        )
    with _branch.shape_checks():
        fits = bool(x.dim() in (2, 3) and x.shape[-1] == d_model)
    if not fits:
        layout = "batch, length" if batch_first else "length, batch"
        raise ResidualError(
            f"{caller}: expected input ({layout}, {d_model}) or unbatched (length, {d_model}), "
            f"got {tuple(x.shape)}"
        )


def split_heads(qkv: Tensor, heads: int, batch_first: bool) -> Tensor:
    """The fused projection (N, L, 3D) / (L, N, 3D) / (L, 3D) -> (3, N, heads, L, D / heads).

    An FX leaf: the layout is read from the rank. The head width is computed, not inferred
    (``-1``), so an empty batch or sequence splits too.
    """
    head_dim = qkv.shape[-1] // (3 * heads)
    if qkv.dim() == 2:
        return qkv.view(qkv.shape[0], 1, 3, heads, head_dim).permute(2, 1, 3, 0, 4)
    if batch_first:
        return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, head_dim).permute(2, 1, 3, 0, 4)


def merge_heads(out: Tensor) -> Tensor:
    """SDPA's (N, heads, L, D / heads) -> (L * N, D), rows in (L, N) order: the 2-D tensor
    ``nn.MultiheadAttention`` gives its out projection (an FX leaf)."""
    batch, heads, length, head_dim = out.shape
    return out.permute(2, 0, 1, 3).reshape(length * batch, heads * head_dim)


def restore_layout(y: Tensor, x: Tensor, batch_first: bool) -> Tensor:
    """The out projection's (L * N, D) back to ``x``'s layout (an FX leaf).

    As ``nn.MultiheadAttention``'s output: (L, N, D) for sequence-first, (L, D) unbatched,
    and for batch-first the (N, L, D) transposed view of (L, N, D), whose memory stays
    (L, N, D). A dropout after it (``empty_like`` keeps the strides) then draws the mask
    torch's layer draws, on the same elements.
    """
    if x.dim() == 2:
        return y
    length, batch = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    out = y.view(length, batch, y.shape[-1])
    return out.transpose(0, 1) if batch_first else out


class SelfAttention(nn.Module):
    """Multi-head self-attention: one fused qkv ``Linear``, ``scaled_dot_product_attention``.

    Weights are laid out as ``nn.MultiheadAttention``'s (``in_proj`` = ``in_proj_weight`` /
    ``in_proj_bias``, ``out_proj``), so they copy over one to one. Masks follow torch's
    conventions: bool ``True`` means "may not attend", floats are added to the scores.

    Args:
        d_model: model width; nhead: heads (must divide d_model); dropout: on attention weights.
        bias: biases in the projections. causal: always apply a causal mask (decoders).

        batch_first: (N, L, d_model) input when True (the default), (L, N, d_model) when False.
        device, dtype: where and in what type the parameters are created.

    Input (N, L, d_model) -> output (N, L, d_model) (or (L, N, d_model) with
    ``batch_first=False``; an unbatched (L, d_model) works either way). As
    ``nn.MultiheadAttention``'s, the output is laid out (L, N, d_model) in memory whatever the
    layout (a transposed view for batch-first), so a dropout after it draws torch's mask.

    ``nn.MultiheadAttention``'s attributes that ``torch.nn.TransformerEncoder`` reads are here
    too: ``batch_first``, ``embed_dim``, ``num_heads``, ``in_proj_weight``, ``in_proj_bias``,
    ``_qkv_same_embed_dim`` (views of the parameters, not copies).

    >>> import torch
    >>> attn = SelfAttention(16, 4)
    >>> pad = torch.tensor([[False, False, True]])  # the last position of the sequence is padding
    >>> attn(torch.randn(1, 3, 16), key_padding_mask=pad).shape
    torch.Size([1, 3, 16])
    """

    _qkv_same_embed_dim = True

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        causal: bool = False,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("SelfAttention", "d_model", d_model)
        check_positive_int("SelfAttention", "nhead", nhead)
        if d_model % nhead:
            raise ResidualError(
                f"SelfAttention: nhead={nhead} must divide d_model={d_model}; "
                f"try nhead in {[h for h in range(1, 17) if d_model % h == 0]}"
            )
        self.d_model, self.nhead, self.dropout, self.causal = d_model, nhead, dropout, causal
        self.batch_first = bool(batch_first)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device, dtype=dtype)

    @property
    def embed_dim(self) -> int:
        return self.d_model

    @property
    def num_heads(self) -> int:
        return self.nhead

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    @property
    def in_proj_weight(self) -> Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        bias: Tensor | None = self.in_proj.bias
        return bias

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        check_sequence("SelfAttention", x, self.d_model, self.batch_first)
        qkv = split_heads(self.in_proj(x), self.nhead, self.batch_first)
        mask, causal = sdpa_mask(
            attn_mask, key_padding_mask, is_causal, self.causal, x, self.nhead, self.batch_first
        )
        out = F.scaled_dot_product_attention(
            qkv[0],
            qkv[1],
            qkv[2],
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
        )
        return restore_layout(self.out_proj(merge_heads(out)), x, self.batch_first)

    def extra_repr(self) -> str:
        extra = "" if self.batch_first else ", batch_first=False"
        return (
            f"{self.d_model}, nhead={self.nhead}, dropout={self.dropout}, causal={self.causal}"
            + extra
        )


class AttentionBranch(nn.Module):
    """``dropout(attention(norm(x), masks...))``: the attention branch of a Transformer layer.

    ``norm`` is None for post-norm layers (the norm is then the residual's ``post``).

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> pre_norm = Residual(AttentionBranch(SelfAttention(16, 4), 0.0, nn.LayerNorm(16)))
    >>> pre_norm(torch.randn(2, 5, 16), is_causal=True).shape
    torch.Size([2, 5, 16])
    """

    def __init__(self, attention: SelfAttention, dropout: float, norm: nn.Module | None) -> None:
        super().__init__()
        self.norm = norm
        self.attention = attention
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(self.attention(x, attn_mask, key_padding_mask, is_causal))


class ValueResidualAttention(nn.Module):
    """Value residual learning (ResFormer, Zhou et al. 2024): an attention branch whose values
    are mixed with the first layer's, ``V' = lam * V + (1 - lam) * V_1``.

    ``forward(x, first_values=None)`` returns ``(dropout(attention(norm(x))), V)``: the branch
    output and this layer's own (unmixed) values, (N, heads, L, head_dim). The first layer gets
    ``first_values=None`` and attends with its own values; later layers get the first layer's.
    ``lam = 0.5`` as the paper; ``lam = 1`` is the plain attention. Inside a
    :class:`~residual.Residual` the values pass through (the tuple rule); a
    :class:`~residual.depth.DepthStack` with ``values=True`` carries them across blocks.
    Batch-first (N, L, d_model) input; the weights are :class:`SelfAttention`'s.

    >>> import torch
    >>> from torch import nn
    >>> attn = ValueResidualAttention(SelfAttention(16, 4, causal=True), nn.LayerNorm(16))
    >>> out, v1 = attn(torch.randn(2, 5, 16))
    >>> out.shape, v1.shape
    (torch.Size([2, 5, 16]), torch.Size([2, 4, 5, 4]))
    >>> attn(torch.randn(2, 5, 16), first_values=v1)[0].shape
    torch.Size([2, 5, 16])
    """

    returns_tuple = True  # (output, values): "batch" / "subset" drop cannot skip it

    def __init__(
        self,
        attention: SelfAttention,
        norm: nn.Module | None = None,
        *,
        lam: float = 0.5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not attention.batch_first:
            raise ResidualError(
                "ValueResidualAttention: needs a batch-first SelfAttention (batch_first=True)"
            )
        self.norm = norm
        self.attention = attention
        self.dropout = nn.Dropout(dropout)
        self.lam = float(lam)

    def forward(self, x: Tensor, first_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        attn = self.attention
        if self.norm is not None:
            x = self.norm(x)
        check_sequence("ValueResidualAttention", x, attn.d_model)
        q, k, v = split_heads(attn.in_proj(x), attn.nhead, True).unbind(0)
        if first_values is None:
            mixed = v
        else:
            _check_values(v, first_values)
            mixed = self.lam * v + (1.0 - self.lam) * first_values
        p = attn.dropout if self.training else 0.0  # no masks: SDPA's own causal flag
        out = F.scaled_dot_product_attention(q, k, mixed, dropout_p=p, is_causal=attn.causal)
        return self.dropout(restore_layout(attn.out_proj(merge_heads(out)), x, True)), v

    def extra_repr(self) -> str:
        return f"lam={self.lam}"


def _check_values(v: Tensor, first: Tensor) -> None:
    """Raise unless the first layer's values have this layer's shape (no broadcast). FX leaf."""
    with _branch.shape_checks():
        same = bool(v.shape == first.shape)
    if not same:
        raise ResidualError(
            f"ValueResidualAttention: first_values {tuple(first.shape)} do not match this "
            f"layer's values {tuple(v.shape)}; pass the values the first layer returned for the "
            "same batch"
        )


class _Activation(nn.Module):
    """A module around an activation function (a top-level function, so it pickles)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def resolve_activation(activation: str | Callable[[Tensor], Tensor] | nn.Module) -> nn.Module:
    """``"relu"`` / ``"gelu"`` / a module / a function -> a module.

    >>> resolve_activation("gelu")
    GELU(approximate='none')
    """
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        table: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in table:
            raise ResidualError(
                f"unknown activation {activation!r}; use 'relu', 'gelu', a module or a function"
            )
        return table[activation]()
    if callable(activation):
        return _Activation(activation)
    raise TypeError(f"activation must be a name, a module or a function, got {activation!r}")


class FeedForward(nn.Module):
    """``dropout(linear2(dropout(act(linear1(norm(x))))))``: a Transformer's MLP branch.

    >>> import torch
    >>> FeedForward(8, 32, dropout=0.0)(torch.randn(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] | nn.Module = "relu",
        bias: bool = True,
        norm: nn.Module | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, device=device, dtype=dtype)
        self.activation = resolve_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, device=device, dtype=dtype)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


for _name in (
    "sdpa_mask",
    "check_sequence",
    "split_heads",
    "merge_heads",
    "restore_layout",
    "_check_values",
):
    torch.fx.wrap(_name)
