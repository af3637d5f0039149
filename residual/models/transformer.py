"""Transformer layers as two residuals each: ``torch.nn.TransformerEncoderLayer``'s equal, and a
GPT-style pre-norm causal decoder.

>>> import torch
>>> layer = TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0)
>>> layer(torch.randn(2, 7, 32)).shape
torch.Size([2, 7, 32])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from residual import _branch
from residual._types import DropMode, check_positive_int
from residual.core import Residual
from residual.drop import apply_drop_schedule, check_drop_rate
from residual.errors import ResidualError
from residual.models.attention import AttentionBranch, FeedForward, SelfAttention

__all__ = ["CausalTransformerLM", "TransformerEncoderLayer", "gpt_block"]


class TransformerEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer``, built from two :class:`~residual.Residual` s.

    Post-norm (``norm_first=False``): ``x = norm1(x + SA(x)); x = norm2(x + FF(x))``, the norms
    being each residual's ``post``. Pre-norm (``norm_first=True``): ``x = x + SA(norm1(x));
    x = x + FF(norm2(x))``, the norms sitting inside the branches so the shortcut carries the
    un-normed stream. Same arguments, same forward signature and, after :meth:`from_torch`, the
    same outputs and gradients as torch's layer. Batch-first only.

    Keys: ``self_attn_block.fn.attention.in_proj.weight``, ``...out_proj``, ``ff_block.fn.linear1``,
    ``ff_block.fn.linear2``; the norms at ``self_attn_block.post`` / ``ff_block.post``
    (post-norm) or ``self_attn_block.fn.norm`` / ``ff_block.fn.norm`` (pre-norm).

    >>> import torch
    >>> ref = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    >>> ours = TransformerEncoderLayer.from_torch(ref)
    >>> x = torch.randn(2, 5, 16)
    >>> bool((ours(x) - ref(x)).abs().max() < 1e-5)
    True
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] | nn.Module = "relu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        norm_first: bool = False,
        bias: bool = True,
        *,
        drop_path: float = 0.0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not batch_first:
            raise ResidualError(
                "TransformerEncoderLayer: only batch_first=True is supported; transpose the "
                "input to (batch, length, d_model)"
            )
        check_positive_int("TransformerEncoderLayer", "dim_feedforward", dim_feedforward)
        check_drop_rate("TransformerEncoderLayer", dropout)
        self.norm_first = norm_first
        attention = SelfAttention(d_model, nhead, dropout, bias)
        norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        attn_branch = AttentionBranch(attention, dropout, norm1 if norm_first else None)
        ff_branch = FeedForward(
            d_model, dim_feedforward, dropout, activation, bias, norm2 if norm_first else None
        )
        self.self_attn_block = Residual(
            attn_branch,
            post=None if norm_first else norm1,
            drop_path=drop_path,
            checkpoint=checkpoint,
        )
        self.ff_block = Residual(
            ff_branch,
            post=None if norm_first else norm2,
            drop_path=drop_path,
            checkpoint=checkpoint,
        )

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = self.self_attn_block(
            src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, is_causal=is_causal
        )
        return self.ff_block(x)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
        """Build the equal of a ``torch.nn.TransformerEncoderLayer``, weights copied."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(
                f"from_torch: expected torch.nn.TransformerEncoderLayer, got {type(layer).__name__}"
            )
        attn = layer.self_attn
        if not attn.batch_first:
            raise ResidualError("from_torch: the torch layer must be built with batch_first=True")
        if attn.in_proj_weight is None:
            raise ResidualError("from_torch: separate q/k/v projection weights are not supported")
        activation = layer.activation
        ours = cls(
            attn.embed_dim,
            attn.num_heads,
            layer.linear1.out_features,
            layer.dropout.p,
            activation if isinstance(activation, nn.Module) else _torch_activation(activation),
            layer.norm1.eps,
            True,
            layer.norm_first,
            layer.linear1.bias is not None,
        ).to(device=attn.in_proj_weight.device, dtype=attn.in_proj_weight.dtype)
        theirs = {
            "in_proj.weight": attn.in_proj_weight,
            "in_proj.bias": attn.in_proj_bias,
            "out_proj.weight": attn.out_proj.weight,
            "out_proj.bias": attn.out_proj.bias,
        }
        with torch.no_grad():
            attention = cast(AttentionBranch, ours.self_attn_block.fn).attention
            for name, p in attention.named_parameters():
                p.copy_(theirs[name])
            ff = cast(FeedForward, ours.ff_block.fn)
            ff.linear1.load_state_dict(layer.linear1.state_dict())
            ff.linear2.load_state_dict(layer.linear2.state_dict())
            ours._norm(1).load_state_dict(layer.norm1.state_dict())
            ours._norm(2).load_state_dict(layer.norm2.state_dict())
        return ours.train(layer.training)

    def _norm(self, index: int) -> nn.Module:
        block = self.self_attn_block if index == 1 else self.ff_block
        norm = cast(AttentionBranch | FeedForward, block.fn).norm if self.norm_first else block.post
        if norm is None:  # pragma: no cover - both layouts always hold both norms
            raise RuntimeError("TransformerEncoderLayer: norm missing")
        return norm


def _torch_activation(fn: Callable[[Tensor], Tensor]) -> str | Callable[[Tensor], Tensor]:
    if fn is torch.nn.functional.relu:
        return "relu"
    if fn is torch.nn.functional.gelu:
        return "gelu"
    return fn


def gpt_block(
    d_model: int,
    nhead: int,
    dim_feedforward: int | None = None,
    dropout: float = 0.0,
    *,
    bias: bool = True,
    drop_path: float = 0.0,
) -> nn.Sequential:
    """A GPT-style pre-norm causal decoder block: two residuals, LayerNorm inside each branch.

    ``x = x + SA_causal(LN(x)); x = x + MLP_gelu(LN(x))``.

    >>> import torch
    >>> gpt_block(16, 2)(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """
    hidden = dim_feedforward or 4 * d_model
    attention = SelfAttention(d_model, nhead, dropout, bias, causal=True)
    return nn.Sequential(
        Residual(AttentionBranch(attention, dropout, nn.LayerNorm(d_model)), drop_path=drop_path),
        Residual(
            FeedForward(d_model, hidden, dropout, "gelu", bias, nn.LayerNorm(d_model)),
            drop_path=drop_path,
        ),
    )


def _check_token_ids(idx: Tensor, max_len: int) -> None:
    """Raise unless ``idx`` is (batch, length <= max_len). An FX leaf."""
    with _branch.shape_checks():
        fits = bool(idx.dim() == 2 and idx.shape[1] <= max_len)
    if not fits:
        raise ResidualError(
            f"CausalTransformerLM: expected token ids (batch, length <= {max_len}), "
            f"got {tuple(idx.shape)}"
        )


class CausalTransformerLM(nn.Module):
    """A small GPT: token + position embeddings, ``num_layers`` :func:`gpt_block` s, LN, head.

    Input (N, L) token ids -> logits (N, L, vocab_size). ``drop_path`` is the stochastic depth
    rate of the deepest residual, decayed linearly to the first (attention and MLP count as one
    residual each); ``drop_mode`` as :class:`Residual`.

    >>> import torch
    >>> lm = CausalTransformerLM(50, d_model=32, nhead=4, num_layers=2, max_len=16)
    >>> lm(torch.randint(0, 50, (2, 10))).shape
    torch.Size([2, 10, 50])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 4,
        max_len: int = 256,
        dropout: float = 0.0,
        *,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
    ) -> None:
        super().__init__()
        self.max_len = check_positive_int("CausalTransformerLM", "max_len", max_len)
        check_drop_rate("CausalTransformerLM", drop_path)
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(
            *(gpt_block(d_model, nhead, dropout=dropout) for _ in range(num_layers))
        )
        apply_drop_schedule(self.blocks, drop_path, drop_mode)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        _check_token_ids(idx, self.max_len)
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.norm(self.blocks(self.tok(idx) + self.pos(pos))))


torch.fx.wrap("_check_token_ids")
