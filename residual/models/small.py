"""The small models that ``examples/`` train, kept here so that a checkpoint reloads without them.

``PatchTransformer`` and ``HyperPatchTransformer`` read small images as overlapping patches,
``RowLSTM`` reads them row by row, ``LSTMLanguageModel`` is a residual LSTM over tokens. Each
is a plain module with JSON-friendly constructor arguments, so that
:func:`residual.save_pretrained` can record how to build it.

>>> import torch
>>> PatchTransformer(d_model=32, layers=2)(torch.randn(3, 1, 8, 8)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual._types import check_positive_int
from residual.errors import ResidualError
from residual.hyper import expand_streams, hyper_residual, reduce_streams
from residual.models.attention import AttentionBranch, FeedForward, SelfAttention
from residual.models.mlp import Rearrange
from residual.models.recurrent import ResidualLSTM
from residual.models.transformer import TransformerEncoderLayer

__all__ = ["HyperPatchTransformer", "LSTMLanguageModel", "PatchTransformer", "RowLSTM"]


def _patch_embedding(caller: str, in_channels: int, d_model: int, image_size: int) -> nn.Module:
    """Overlapping 4x4 patches, stride 2: (N, C, S, S) -> (N, (S / 2)^2, d_model)."""
    if image_size < 2 or image_size % 2:
        raise ResidualError(f"{caller}: image_size must be even and >= 2, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, d_model, 4, stride=2, padding=1), Rearrange("b d h w -> b (h w) d")
    )


class PatchTransformer(nn.Module):
    """Overlapping 4x4 patches (a stride-2 conv), positions, pre-norm encoder layers, a head.

    Input (N, in_channels, image_size, image_size) -> logits (N, num_classes). The encoder
    layers are :class:`~residual.models.TransformerEncoderLayer` s (``norm_first=True``,
    feed-forward width ``2 * d_model``, no dropout); tokens are averaged before the head.

    >>> import torch
    >>> model = PatchTransformer(d_model=32, layers=2, nhead=4)
    >>> model(torch.randn(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        d_model: int = 64,
        layers: int = 3,
        nhead: int = 4,
        *,
        image_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        check_positive_int("PatchTransformer", "layers", layers)
        self.patches = _patch_embedding("PatchTransformer", in_channels, d_model, image_size)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // 2) ** 2, d_model))
        self.layers = nn.Sequential(
            *(
                TransformerEncoderLayer(
                    d_model, nhead, 2 * d_model, dropout=0.0, norm_first=True, batch_first=True
                )
                for _ in range(layers)
            )
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.layers(self.patches(x) + self.pos)
        return self.head(self.norm(tokens).mean(dim=1))


class HyperPatchTransformer(nn.Module):
    """:class:`PatchTransformer` with every residual hyper-connected over ``streams`` streams.

    Each layer is a pre-norm attention and a pre-norm feed-forward :func:`residual.hyper.
    hyper_residual`; ``streams=1`` is exactly the plain residual.

    >>> import torch
    >>> model = HyperPatchTransformer(4, d_model=32, layers=2)
    >>> model(torch.randn(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self,
        streams: int,
        d_model: int = 64,
        layers: int = 3,
        nhead: int = 4,
        *,
        image_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.streams = check_positive_int("HyperPatchTransformer", "streams", streams)
        check_positive_int("HyperPatchTransformer", "layers", layers)
        self.patches = _patch_embedding("HyperPatchTransformer", in_channels, d_model, image_size)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // 2) ** 2, d_model))
        blocks: list[nn.Module] = []
        for i in range(layers):
            attention = AttentionBranch(SelfAttention(d_model, nhead), 0.0, nn.LayerNorm(d_model))
            ff = FeedForward(d_model, 2 * d_model, 0.0, "relu", norm=nn.LayerNorm(d_model))
            blocks.append(hyper_residual(attention, streams, d_model, layer_index=2 * i))
            blocks.append(hyper_residual(ff, streams, d_model, layer_index=2 * i + 1))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = expand_streams(self.patches(x) + self.pos, self.streams)
        tokens = reduce_streams(self.blocks(h), self.streams)
        return self.head(self.norm(tokens).mean(dim=1))


class RowLSTM(nn.Module):
    """Reads an image row by row: ``Linear(width -> hidden)``, a residual LSTM stack, a head.

    Input (N, 1, height, width) -> logits (N, num_classes); the LSTM's outputs are averaged
    over the rows. Layers after the first are ``Residual(nn.LSTM)``.

    >>> import torch
    >>> RowLSTM(hidden=32, layers=2)(torch.randn(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(
        self, width: int = 8, hidden: int = 128, layers: int = 3, *, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.rows = Rearrange("b 1 h w -> b h w")
        self.embed = nn.Linear(width, hidden)
        self.lstm = ResidualLSTM(hidden, hidden, layers, residual_from=1)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(self.rows(x)))
        return self.head(out.mean(dim=1))


class LSTMLanguageModel(nn.Module):
    """Token embedding, a residual LSTM stack, a linear head: (N, L) ids -> (N, L, vocab_size).

    >>> import torch
    >>> lm = LSTMLanguageModel(50, hidden_size=32, num_layers=2)
    >>> lm(torch.randint(0, 50, (2, 7))).shape
    torch.Size([2, 7, 50])
    """

    def __init__(self, vocab_size: int, hidden_size: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lstm = ResidualLSTM(hidden_size, hidden_size, num_layers, residual_from=1)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(idx))[0])
