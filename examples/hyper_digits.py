"""Hyper-connections on real data: the digits Transformer with n = 1 (exactly the plain
residual) vs n = 4 residual streams, same seed, same schedule.

    python examples/hyper_digits.py
"""

from __future__ import annotations

import argparse

import torch
import train_digits
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from residual.hyper import expand_streams, hyper_residual, reduce_streams
from residual.models import AttentionBranch, FeedForward, SelfAttention


class HyperPatchTransformer(nn.Module):
    """The digits Transformer (pre-norm) with every residual hyper-connected over n streams."""

    def __init__(self, streams: int, d_model: int = 64, layers: int = 3, nhead: int = 4) -> None:
        super().__init__()
        self.streams = streams
        self.patches = nn.Sequential(
            nn.Conv2d(1, d_model, 4, stride=2, padding=1), Rearrange("b d h w -> b (h w) d")
        )
        self.pos = nn.Parameter(torch.zeros(1, 16, d_model))
        blocks: list[nn.Module] = []
        for i in range(layers):
            attention = AttentionBranch(SelfAttention(d_model, nhead), 0.0, nn.LayerNorm(d_model))
            ff = FeedForward(d_model, 2 * d_model, 0.0, "relu", norm=nn.LayerNorm(d_model))
            blocks.append(hyper_residual(attention, streams, d_model, layer_index=2 * i))
            blocks.append(hyper_residual(ff, streams, d_model, layer_index=2 * i + 1))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = expand_streams(self.patches(x) + self.pos, self.streams)
        tokens = reduce_streams(self.blocks(h), self.streams)
        return self.head(self.norm(tokens).mean(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = []
    for n in args.streams:
        name = f"hyper{n}"
        train_digits.SETTINGS[name] = (lambda n=n: HyperPatchTransformer(n), args.epochs, 2e-3)
        params = sum(p.numel() for p in HyperPatchTransformer(n).parameters())
        acc, seconds = train_digits.train(
            name, epochs=args.epochs, seed=args.seed, progress=False, summary=False
        )
        rows.append((n, params, acc, seconds))
        print(f"n={n}: {params:,} parameters, test accuracy {acc:.2%}, {seconds:.1f} s", flush=True)
    print("\n| streams n | parameters | test accuracy | training time |")
    print("| --- | --- | --- | --- |")
    for n, params, acc, seconds in rows:
        print(f"| {n} | {params:,} | {acc:.2%} | {seconds:.1f} s |")


if __name__ == "__main__":
    main()
