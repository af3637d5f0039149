"""Reversible residuals: activation memory and step time of a 56-block reversible stack vs the
same blocks stored normally vs the same blocks with activation checkpointing.

    python benchmarks/reversible.py --quick
    python benchmarks/reversible.py --json reversible.json
"""

from __future__ import annotations

import argparse

import torch
from _timing import interleaved, memory_time_table, print_header, write_json
from checkpointing import peak_cuda_bytes, saved_bytes, step
from torch import Tensor, nn

from residual._checkpoint import checkpointed_call
from residual.reversible import Reversible, ReversibleSequence


def half(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
    )


class Stored(nn.Module):
    """The same blocks, run one after the other: autograd stores every activation."""

    def __init__(self, seq: ReversibleSequence, checkpoint: bool) -> None:
        super().__init__()
        self.seq, self.checkpoint = seq, checkpoint

    def forward(self, x: Tensor) -> Tensor:
        for block in self.seq.blocks:
            x = checkpointed_call(block, x, (), {}) if self.checkpoint else block(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--blocks", type=int, default=56)
    parser.add_argument("--channels", type=int, default=32, help="total; each half gets half")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batch, size = (8, 16) if args.quick else (args.batch, args.size)
    torch.manual_seed(0)
    info = print_header(
        f"reversible: {args.blocks} blocks, f and g = conv3x3-BN-ReLU on {args.channels // 2} "
        f"channels, input ({batch}, {args.channels}, {size}, {size}), {args.device}"
    )
    c = args.channels // 2
    seq = ReversibleSequence(
        *(Reversible(half(c), half(c), layout="channels_first") for _ in range(args.blocks))
    ).to(args.device)
    variants: dict[str, nn.Module] = {
        "stored": Stored(seq, checkpoint=False),
        "checkpoint=True": Stored(seq, checkpoint=True),
        "reversible": seq,
    }
    x = torch.randn(batch, args.channels, size, size, device=args.device, requires_grad=True)
    memory = {name: saved_bytes(m, x) for name, m in variants.items()}
    peaks = {name: peak_cuda_bytes(m, x) for name, m in variants.items()}
    t = interleaved(
        {name: step(m, x) for name, m in variants.items()},
        rounds=3 if args.quick else 6,
        calls=1,
        warmup=1,
    )
    seq.eval()  # the inverse uses the same (running) statistics as the forward
    with torch.no_grad():
        inversion = (seq.inverse(seq(x)) - x).abs().max().item()
    memory_time_table(memory, peaks, t, "stored")
    print(f"inversion error after {args.blocks} blocks (max abs, eval): {inversion:.2e}")
    write_json(
        args.json,
        {
            "machine": info,
            "activation_bytes": memory,
            "cuda_peak_bytes": peaks,
            "step_s": {k: v.median for k, v in t.items()},
            "inversion_max_abs": inversion,
        },
    )


if __name__ == "__main__":
    main()
