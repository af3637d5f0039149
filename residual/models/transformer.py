"""Transformer layers as two residuals each: ``torch.nn.TransformerEncoderLayer``'s equal, and a
GPT-style pre-norm causal decoder.

>>> import torch
>>> layer = TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
>>> layer(torch.randn(2, 7, 32)).shape
torch.Size([2, 7, 32])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import _branch
from residual._types import DropMode, check_positive_int
from residual.core import Residual
from residual.drop import SampleAxis, apply_drop_schedule, check_drop_rate
from residual.errors import ResidualError
from residual.models.attention import (
    AttentionBranch,
    FeedForward,
    SelfAttention,
    ValueResidualAttention,
    _Activation,
    check_sequence,
)

__all__ = [
    "CausalTransformerLM",
    "TransformerEncoderLayer",
    "ValueResidualGPTBlock",
    "gpt_block",
]


class TransformerEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer``, built from two :class:`~residual.Residual` s.

    Post-norm (``norm_first=False``): ``x = norm1(x + SA(x)); x = norm2(x + FF(x))``, the norms
    being each residual's ``post``. Pre-norm (``norm_first=True``): ``x = x + SA(norm1(x));
    x = x + FF(norm2(x))``, the norms sitting inside the branches so the shortcut carries the
    un-normed stream. A drop-in: torch's arguments and defaults (``batch_first=False``: input
    (S, N, E); ``batch_first=True``: (N, S, E); unbatched (S, E) either way), ``device`` /
    ``dtype``, torch's forward signature and mask semantics (bool ``True`` = may not attend,
    float masks added), and the same outputs and gradients as torch's layer with the same
    weights; in training too: with the same seed, each dropout draws torch's mask on the same
    elements, in every layout (the attention output keeps ``nn.MultiheadAttention``'s
    (S, N, E) memory order, batch-first too, since dropout draws along memory). Extras,
    keyword-only: ``drop_path`` (stochastic depth of both residuals) and ``checkpoint``.

    There is one code path: torch's fused inference "fast path" does not exist here, so
    ``torch.backends.mha.set_fastpath_enabled`` changes nothing (the numbers are the same
    either way, up to float rounding). Nested tensor input is refused: pass a padded tensor
    with ``src_key_padding_mask``. Inside ``torch.nn.TransformerEncoder`` the layer runs (the
    encoder then skips its nested-tensor path, and warns so when ``enable_nested_tensor``).
    A ``self_attn`` view answers the ``nn.MultiheadAttention`` attributes the encoder reads;
    ``linear1``, ``linear2``, ``norm1``, ``norm2``, ``dropout*`` and ``activation`` are the
    submodules under torch's names (views: they add no state_dict keys).

    Keys: ``self_attn_block.fn.attention.in_proj.weight``, ``...out_proj``, ``ff_block.fn.linear1``,
    ``ff_block.fn.linear2``; the norms at ``self_attn_block.post`` / ``ff_block.post``
    (post-norm) or ``self_attn_block.fn.norm`` / ``ff_block.fn.norm`` (pre-norm).
    ``load_state_dict`` also takes torch's keys (``self_attn.in_proj_weight``, ``linear1.*``,
    ...); :meth:`torch_state_dict` gives them, :meth:`to_torch` / :meth:`from_torch` convert.

    >>> import torch
    >>> ref = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    >>> ours = TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    >>> ours.load_state_dict(ref.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(5, 2, 16)  # (S, N, E): batch_first=False, as torch
    >>> bool((ours(x) - ref(x)).abs().max() < 1e-5)
    True
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] | nn.Module = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        drop_path: float = 0.0,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("TransformerEncoderLayer", "dim_feedforward", dim_feedforward)
        _check_dropout("TransformerEncoderLayer", dropout)
        self.norm_first = norm_first
        self.batch_first = bool(batch_first)
        attention = SelfAttention(
            d_model, nhead, dropout, bias, batch_first=self.batch_first, device=device, dtype=dtype
        )
        norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, device=device, dtype=dtype)
        norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, device=device, dtype=dtype)
        attn_branch = AttentionBranch(attention, dropout, norm1 if norm_first else None)
        ff_branch = FeedForward(
            d_model,
            dim_feedforward,
            dropout,
            _torch_activation(activation),
            bias,
            norm2 if norm_first else None,
            device=device,
            dtype=dtype,
        )
        samples = SampleAxis(0 if self.batch_first else 1, batched_ndim=3)
        self.self_attn_block = Residual(
            attn_branch,
            post=None if norm_first else norm1,
            drop_path=drop_path,
            checkpoint=checkpoint,
            sample_axis=samples,
        )
        self.ff_block = Residual(
            ff_branch,
            post=None if norm_first else norm2,
            drop_path=drop_path,
            checkpoint=checkpoint,
            sample_axis=samples,
        )
        self.register_load_state_dict_pre_hook(_accept_torch_keys)

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """torch's forward: ``src`` (S, N, E), (N, S, E) with ``batch_first``, or (S, E).

        ``src_mask`` (S, S) or (N * nhead, S, S); ``src_key_padding_mask`` (N, S), or (S,)
        for an unbatched ``src``; bool (``True`` = ignored) or float (added).
        ``is_causal=True`` means causal, always: the causal mask is combined with
        ``src_mask`` and ``src_key_padding_mask`` (a no-op for a ``src_mask`` that is itself
        causal, so torch's usage gives torch's numbers), and applied alone where there is no
        ``src_mask`` (torch raises there). torch reads it as a hint instead: given a
        ``src_mask`` that is not causal, torch's layer drops that mask when there is no
        padding mask and drops the causal mask when there is one. A query left with no key
        (its own position padded, the rest in its future) gets a zero attention output, as
        in torch's layer outside its fused inference fast path (which gives NaN there).
        """
        _check_src(src, self.self_attn.d_model, self.batch_first)
        x = self.self_attn_block(
            src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, is_causal=is_causal
        )
        return cast(Tensor, self.ff_block(x))

    # torch's attribute names, as views of our modules (no extra state_dict keys).
    @property
    def self_attn(self) -> SelfAttention:
        """The attention (with ``nn.MultiheadAttention``'s attribute names)."""
        return cast(AttentionBranch, self.self_attn_block.fn).attention

    @property
    def linear1(self) -> nn.Linear:
        return cast(FeedForward, self.ff_block.fn).linear1

    @property
    def linear2(self) -> nn.Linear:
        return cast(FeedForward, self.ff_block.fn).linear2

    @property
    def norm1(self) -> nn.Module:
        return self._norm(1)

    @property
    def norm2(self) -> nn.Module:
        return self._norm(2)

    @property
    def dropout1(self) -> nn.Dropout:
        return cast(AttentionBranch, self.self_attn_block.fn).dropout

    @property
    def dropout(self) -> nn.Dropout:
        return cast(FeedForward, self.ff_block.fn).dropout

    @property
    def dropout2(self) -> nn.Dropout:
        return cast(FeedForward, self.ff_block.fn).dropout2

    @property
    def activation(self) -> nn.Module:
        return cast(FeedForward, self.ff_block.fn).activation

    @property
    def activation_relu_or_gelu(self) -> int:
        """As torch's: 1 for ReLU, 2 for GELU, 0 otherwise."""
        act = self.activation
        fn = act.fn if isinstance(act, _Activation) else None
        if isinstance(act, nn.ReLU) or fn is F.relu:
            return 1
        if isinstance(act, nn.GELU) or fn is F.gelu:
            return 2
        return 0

    def torch_state_dict(self) -> dict[str, Tensor]:
        """This layer's state under ``torch.nn.TransformerEncoderLayer``'s keys.

        >>> import torch
        >>> ours = TransformerEncoderLayer(16, 2, 32)
        >>> torch.nn.TransformerEncoderLayer(16, 2, 32).load_state_dict(ours.torch_state_dict())
        <All keys matched successfully>
        """
        ours = self.state_dict()
        return {t: ours[o] for t, o in _torch_key_map(self.norm_first).items() if o in ours}

    def to_torch(self) -> nn.TransformerEncoderLayer:
        """The equal ``torch.nn.TransformerEncoderLayer``, weights copied (drop_path and
        checkpoint have no equal there and are left out)."""
        weight = self.self_attn.in_proj.weight
        ref = nn.TransformerEncoderLayer(
            self.self_attn.d_model,
            self.self_attn.nhead,
            self.linear1.out_features,
            self.dropout1.p,
            _to_torch_activation(self.activation),
            cast(nn.LayerNorm, self.norm1).eps,
            self.batch_first,
            self.norm_first,
            self.linear1.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        ref.load_state_dict(self.torch_state_dict(), strict=True)
        return ref.train(self.training)

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer) -> TransformerEncoderLayer:
        """Build the equal of a ``torch.nn.TransformerEncoderLayer``, weights copied."""
        if not isinstance(layer, nn.TransformerEncoderLayer):
            raise TypeError(
                f"from_torch: expected torch.nn.TransformerEncoderLayer, got {type(layer).__name__}"
            )
        attn = layer.self_attn
        if attn.in_proj_weight is None:
            raise ResidualError("from_torch: separate q/k/v projection weights are not supported")
        ours = cls(
            attn.embed_dim,
            attn.num_heads,
            layer.linear1.out_features,
            layer.dropout.p,
            layer.activation,
            layer.norm1.eps,
            attn.batch_first,
            layer.norm_first,
            layer.linear1.bias is not None,
            device=attn.in_proj_weight.device,
            dtype=attn.in_proj_weight.dtype,
        )
        ours.load_state_dict(layer.state_dict(), strict=True)
        return ours.train(layer.training)

    def _norm(self, index: int) -> nn.Module:
        block = self.self_attn_block if index == 1 else self.ff_block
        norm = cast(AttentionBranch | FeedForward, block.fn).norm if self.norm_first else block.post
        return cast(nn.Module, norm)  # both layouts always hold both norms


def _check_dropout(caller: str, p: object) -> None:
    """Raise unless ``p`` is a dropout probability in [0, 1] (1 included, as ``nn.Dropout``)."""
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise TypeError(f"{caller}: dropout must be a float in [0, 1], got {type(p).__name__}")
    if not 0.0 <= p <= 1.0:
        raise ResidualError(f"{caller}: dropout must be in [0, 1], got {p}")


def _check_src(src: Tensor, d_model: int, batch_first: bool) -> None:
    """The layer's input check, before any norm sees it (an FX leaf)."""
    check_sequence("TransformerEncoderLayer", src, d_model, batch_first)


def _torch_key_map(norm_first: bool) -> dict[str, str]:
    """torch's TransformerEncoderLayer keys -> ours, in torch's order."""
    attn = "self_attn_block.fn.attention."
    norm1 = "self_attn_block.fn.norm." if norm_first else "self_attn_block.post."
    norm2 = "ff_block.fn.norm." if norm_first else "ff_block.post."
    return {
        "self_attn.in_proj_weight": attn + "in_proj.weight",
        "self_attn.in_proj_bias": attn + "in_proj.bias",
        "self_attn.out_proj.weight": attn + "out_proj.weight",
        "self_attn.out_proj.bias": attn + "out_proj.bias",
        "linear1.weight": "ff_block.fn.linear1.weight",
        "linear1.bias": "ff_block.fn.linear1.bias",
        "linear2.weight": "ff_block.fn.linear2.weight",
        "linear2.bias": "ff_block.fn.linear2.bias",
        "norm1.weight": norm1 + "weight",
        "norm1.bias": norm1 + "bias",
        "norm2.weight": norm2 + "weight",
        "norm2.bias": norm2 + "bias",
    }


def _accept_torch_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """A ``load_state_dict`` pre hook: torch's TransformerEncoderLayer keys are renamed to ours
    (so torch's checkpoints load, ``strict=True`` included)."""
    for theirs, ours in _torch_key_map(cast(TransformerEncoderLayer, module).norm_first).items():
        if prefix + theirs in state_dict and prefix + ours not in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)


def _torch_activation(
    fn: str | Callable[[Tensor], Tensor] | nn.Module,
) -> str | Callable[[Tensor], Tensor] | nn.Module:
    if fn is F.relu:
        return "relu"
    if fn is F.gelu:
        return "gelu"
    return fn


def _to_torch_activation(act: nn.Module) -> Callable[[Tensor], Tensor]:
    if type(act) is nn.ReLU:
        return F.relu
    if type(act) is nn.GELU and act.approximate == "none":
        return F.gelu
    if isinstance(act, _Activation):
        return act.fn
    return act


_BATCH_FIRST_SEQUENCES = SampleAxis(0, batched_ndim=3)  # (N, L, E), or one unbatched (L, E)


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
        Residual(
            AttentionBranch(attention, dropout, nn.LayerNorm(d_model)),
            drop_path=drop_path,
            sample_axis=_BATCH_FIRST_SEQUENCES,
        ),
        Residual(
            FeedForward(d_model, hidden, dropout, "gelu", bias, nn.LayerNorm(d_model)),
            drop_path=drop_path,
            sample_axis=_BATCH_FIRST_SEQUENCES,
        ),
    )


class ValueResidualGPTBlock(nn.Module):
    """:func:`gpt_block` with value residual learning (ResFormer, Zhou et al. 2024).

    ``x = x + SA_causal(LN(x); V' = lam V + (1 - lam) V_1); x = x + MLP_gelu(LN(x))``: two
    residuals, the attention branch a :class:`ValueResidualAttention`. ``forward(x,
    first_values=None)`` returns ``(x, V)``, this block's values; stack the blocks in a
    :class:`~residual.depth.DepthStack` with ``values=True``, which hands the first block's
    values to the others. With ``lam=1`` it computes what :func:`gpt_block` computes;
    ``causal=False`` makes it an encoder layer (bidirectional attention).

    >>> import torch
    >>> from residual.depth import DepthStack
    >>> stack = DepthStack([ValueResidualGPTBlock(16, 2) for _ in range(3)], values=True)
    >>> stack(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        *,
        lam: float = 0.5,
        bias: bool = True,
        drop_path: float = 0.0,
        causal: bool = True,
    ) -> None:
        super().__init__()
        hidden = dim_feedforward or 4 * d_model
        attention = SelfAttention(d_model, nhead, dropout, bias, causal=causal)
        branch = ValueResidualAttention(attention, nn.LayerNorm(d_model), lam=lam, dropout=dropout)
        self.attn = Residual(branch, drop_path=drop_path, sample_axis=_BATCH_FIRST_SEQUENCES)
        self.ff = Residual(
            FeedForward(d_model, hidden, dropout, "gelu", bias, nn.LayerNorm(d_model)),
            drop_path=drop_path,
            sample_axis=_BATCH_FIRST_SEQUENCES,
        )

    def forward(self, x: Tensor, first_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, values = self.attn(x, first_values=first_values)
        return self.ff(x), values


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
torch.fx.wrap("_check_src")
