"""Quickstart: the classic block as one Residual, and torchinfo summaries of four residuals.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import torch
import torchinfo
from torch import Tensor, nn

from residual import Residual, ResidualBlock


class SelfAttention(nn.Module):
    """Multi-head self-attention that takes a padding mask as a keyword."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def main() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(64, 64)
    x = torch.randn(8, 64, 32, 32)
    y = block(x)
    print(f"ResidualBlock(64, 64): input {tuple(x.shape)} -> output {tuple(y.shape)}")
    print(f"isinstance(block, Residual) = {isinstance(block, Residual)}\n")

    conv = ResidualBlock(64, 128, stride=2)
    mlp = Residual(
        nn.Sequential(nn.LayerNorm(256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    )
    lstm = Residual(nn.LSTM(128, 128, batch_first=True))
    attn = Residual(SelfAttention(256, 8))
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, -4:] = True  # the last 4 positions are padding
    summaries = [
        ("conv: ResidualBlock(64, 128, stride=2)", conv, {"input_size": (8, 64, 32, 32)}),
        (
            "MLP: Residual(Sequential(LayerNorm, Linear, GELU, Linear))",
            mlp,
            {"input_size": (4, 256)},
        ),
        ("LSTM: Residual(nn.LSTM(128, 128))", lstm, {"input_size": (4, 16, 128)}),
        (
            "attention: Residual(SelfAttention(256, 8)), with a padding mask",
            attn,
            {"input_data": [torch.randn(4, 16, 256)], "key_padding_mask": mask},
        ),
    ]
    for title, model, kwargs in summaries:
        print(title)
        print(torchinfo.summary(model, verbose=0, depth=3, **kwargs))
        print()


if __name__ == "__main__":
    main()
