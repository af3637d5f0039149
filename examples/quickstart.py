"""Quickstart: the classic block as one Residual, and torchinfo summaries of four residuals.

    python examples/quickstart.py

Builds ResidualBlock(64, 64) and prints its input and output shapes, then the torchinfo
summaries of a strided conv block, a pre-norm MLP, an LSTM and a self-attention with a padding
mask, each wrapped in Residual. Finally saves the conv block as a checkpoint folder (--out,
default checkpoints/quickstart: model.safetensors + config.json) and reloads it with
residual.load_pretrained. Runs in a few seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torchinfo
from reproducible import parser
from torch import Tensor, nn

from residual import Residual, ResidualBlock, load_pretrained, save_pretrained


class SelfAttention(nn.Module):
    """Multi-head self-attention that takes a padding mask as a keyword."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]


def main(out: Path | None = None) -> None:
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

    folder = out if out is not None else Path(tempfile.mkdtemp()) / "quickstart"
    kwargs = {"in_channels": 64, "out_channels": 128, "stride": 2}
    save_pretrained(conv, folder, builder="ResidualBlock", kwargs=kwargs)
    again = load_pretrained(folder)
    x = torch.randn(2, 64, 32, 32)
    same = torch.equal(again(x), conv.eval()(x))
    print(f"saved {folder} and reloaded it: identical outputs = {same}")


if __name__ == "__main__":
    args_parser = parser(__doc__)
    args_parser.add_argument(
        "--out", type=Path, default=Path("checkpoints") / "quickstart", help="checkpoint folder"
    )
    main(args_parser.parse_args().out)
