"""Activation checkpointing: activation memory and step time of a 56-block residual stack.

Activation memory is measured exactly as the bytes autograd keeps for backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once); on a GPU the peak
allocated memory is reported too. Step = forward + backward, timed interleaved.

    python benchmarks/checkpointing.py --quick
    python benchmarks/checkpointing.py --json ckpt.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import interleaved, memory_time_table, print_header, write_json
from torch import Tensor, nn

from residual import ResidualBlock


def stack(blocks: int, channels: int, checkpoint: bool) -> nn.Sequential:
    return nn.Sequential(
        *(ResidualBlock(channels, channels, checkpoint=checkpoint) for _ in range(blocks))
    )


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd stores during one forward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(seen.values())


def peak_cuda_bytes(model: nn.Module, x: Tensor) -> int | None:
    if not x.is_cuda:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model(x).sum().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller input")
    parser.add_argument("--blocks", type=int, default=56)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    batch, size = (16, 16) if args.quick else (args.batch, args.size)
    torch.manual_seed(0)
    info = print_header(
        f"checkpointing: {args.blocks} x ResidualBlock({args.channels}, {args.channels}), "
        f"input ({batch}, {args.channels}, {size}, {size}), {args.device}"
    )
    x = torch.randn(batch, args.channels, size, size, device=args.device, requires_grad=True)
    plain = stack(args.blocks, args.channels, checkpoint=False).to(args.device)
    ckpt = stack(args.blocks, args.channels, checkpoint=True).to(args.device)
    ckpt.load_state_dict(plain.state_dict())
    memory = {"stored": saved_bytes(plain, x), "checkpoint=True": saved_bytes(ckpt, x)}
    peaks = {"stored": peak_cuda_bytes(plain, x), "checkpoint=True": peak_cuda_bytes(ckpt, x)}
    t = interleaved(
        {"stored": step(plain, x), "checkpoint=True": step(ckpt, x)},
        rounds=4 if args.quick else 8,
        calls=1 if args.quick else 2,
        warmup=1,
    )
    memory_time_table(memory, peaks, t, "stored")
    write_json(
        args.json,
        {
            "machine": info,
            "activation_bytes": memory,
            "cuda_peak_bytes": peaks,
            "step_s": {k: v.median for k, v in t.items()},
            "rounds": {k: v.rounds for k, v in t.items()},
        },
    )


if __name__ == "__main__":
    main()
