"""Torch version quirks and private entry points, kept in one place (private).

Features are detected, never read off version strings.
"""

from __future__ import annotations

import torch
from torch import Tensor

HAS_FUSED_ENCODER_LAYER = hasattr(torch, "_transformer_encoder_layer_fwd")
"""torch's fused inference kernel behind ``nn.TransformerEncoderLayer``'s fast path."""


def fused_encoder_layer(
    src: Tensor,
    nhead: int,
    in_proj: tuple[Tensor, Tensor],
    out_proj: tuple[Tensor, Tensor],
    linear1: tuple[Tensor, Tensor],
    linear2: tuple[Tensor, Tensor],
    norm1: tuple[Tensor, Tensor],
    norm2: tuple[Tensor, Tensor],
    eps: float,
    gelu: bool,
    norm_first: bool,
    mask: Tensor | None,
) -> Tensor:
    """One encoder layer in torch's fused inference kernel; ``mask`` is additive (N, H, L, L)."""
    return torch._transformer_encoder_layer_fwd(
        src,
        src.shape[-1],
        nhead,
        in_proj[0],
        in_proj[1],
        out_proj[0],
        out_proj[1],
        gelu,
        norm_first,
        eps,
        norm1[0],
        norm1[1],
        norm2[0],
        norm2[1],
        linear1[0],
        linear1[1],
        linear2[0],
        linear2[1],
        mask,
        None if mask is None else 2,
    )
