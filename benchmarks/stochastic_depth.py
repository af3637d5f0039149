"""Stochastic depth that saves compute: train-step time of a CIFAR ResNet per drop mode.

Linear decay to p_L (default 0.5) over all blocks, as Huang et al. 2016; all modes timed
interleaved in one run against no drop. Two ratios: the ratio of the medians, and the median of
the per-round ratios (each mode against no drop in the same round, which cancels the drift of a
shared machine between rounds). "batch" skips whole branches, "subset" computes each
branch on a (1 - p_l) share of the batch, "row" masks after computing everything.

    python benchmarks/stochastic_depth.py --quick
    python benchmarks/stochastic_depth.py --depth 110 --json sd.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import interleaved, ms, print_header, print_table, write_json
from torch import nn

from residual.models import cifar_resnet


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, batch 32, few rounds")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--p-last", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    depth, batch = (20, 32) if args.quick else (args.depth, args.batch)
    rounds = args.rounds or (4 if args.quick else 24)  # many short rounds: the machine drifts
    torch.manual_seed(0)
    info = print_header(
        f"stochastic depth: cifar_resnet({depth}) train step, 32x32, batch {batch}, "
        f"linear decay to p_L={args.p_last}, {args.device}"
    )
    x = torch.randn(batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (batch,), device=args.device)
    base = cifar_resnet(depth)
    steps: dict[str, Callable[[], None]] = {}
    for mode in ("none", "row", "batch", "subset"):
        model = cifar_resnet(
            depth,
            drop_path=0.0 if mode == "none" else args.p_last,
            drop_mode="row" if mode == "none" else mode,
        )
        model.load_state_dict(base.state_dict())
        steps[mode] = train_step(model.to(args.device).train(), x, y)
    t = interleaved(steps, rounds=rounds, calls=2 if args.quick else 1, warmup=2)
    none = t["none"].median
    rows = [
        [m, ms(t[m].median), f"{t[m].median / none:.3f}", f"{t[m].paired_ratio(t['none']):.3f}"]
        for m in steps
    ]
    print_table(
        ["drop_mode", "step ms (median)", "ratio of medians", "median of per-round ratios"], rows
    )
    write_json(
        args.json,
        {
            "machine": info,
            "depth": depth,
            "batch": batch,
            "p_last": args.p_last,
            "results": {
                m: {
                    "median_s": t[m].median,
                    "rounds": t[m].rounds,
                    "ratio": t[m].median / none,
                    "paired_ratio": t[m].paired_ratio(t["none"]),
                }
                for m in steps
            },
        },
    )


if __name__ == "__main__":
    main()
