"""Zero-cost abstraction: our models vs hand-written baselines with the same weights.

Train step (forward + backward + SGD step) and eval forward, interleaved, medians and ratios
(ours / baseline). Baselines: a torchvision-style ResNet-18 and a hand-written CIFAR ResNet-56
(tests/reference.py), torch.nn.TransformerEncoderLayer (eval: its fused inference fast path),
and ``x + lin(x)`` for the micro case.

    python benchmarks/overhead.py --quick
    python benchmarks/overhead.py --compile --json overhead.json
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _timing import interleaved, ms, print_header, print_table, write_json
from reference import BasicBlock, HandCifarResNet, TorchvisionResNet, hand_cifar_to_ours
from torch import Tensor, nn

from residual import Residual
from residual.models import TransformerEncoderLayer, cifar_resnet, load_torchvision, resnet18


class HandResidualLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.lin(x)


@dataclass
class Case:
    name: str
    ours: nn.Module
    baseline: nn.Module
    input: Tensor


def cases(selected: list[str]) -> list[Case]:
    out: list[Case] = []
    if "resnet18" in selected:
        ref = TorchvisionResNet(BasicBlock, [2, 2, 2, 2])
        ours = resnet18()
        load_torchvision(ours, ref.state_dict())
        out.append(Case("resnet18 64x64 b8", ours, ref, torch.randn(8, 3, 64, 64)))
    if "cifar56" in selected:
        ref = HandCifarResNet(56)
        ours = cifar_resnet(56)
        ours.load_state_dict(hand_cifar_to_ours(ref.state_dict()))
        out.append(Case("cifar_resnet56 32x32 b32", ours, ref, torch.randn(32, 3, 32, 32)))
    if "transformer" in selected:
        for norm_first in (False, True):
            ref = nn.TransformerEncoderLayer(
                256, 8, 1024, dropout=0.0, batch_first=True, norm_first=norm_first
            )
            ours = TransformerEncoderLayer.from_torch(ref)
            kind = "pre" if norm_first else "post"
            out.append(
                Case(f"transformer {kind}-norm d256 L64 b16", ours, ref, torch.randn(16, 64, 256))
            )
    if "micro" in selected:
        ref = HandResidualLinear()
        ours = Residual(copy.deepcopy(ref.lin))
        out.append(Case("micro Residual(Linear(64,64)) b8", ours, ref, torch.randn(8, 64)))
    return out


def train_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def eval_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller set")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile pairs")
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["resnet18", "cifar56", "transformer", "micro"],
        choices=["resnet18", "cifar56", "transformer", "micro"],
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    info = print_header(
        f"overhead on {args.device}: ours vs hand-written, same weights (ratio = ours / baseline)"
    )
    # Many short rounds: this kind of machine drifts between fast and slow states over about a
    # second, and alternating often lets both candidates see both states alike.
    rounds = args.rounds or (5 if args.quick else 41)
    modes = ["eager"] + (["compiled"] if args.compile else [])
    rows, results = [], []
    for case in cases(args.cases):
        case.ours.to(args.device)
        case.baseline.to(args.device)
        case.input = case.input.to(args.device)
        micro = case.name.startswith("micro")
        for mode in modes:
            ours, base = case.ours, case.baseline
            if mode == "compiled":
                ours, base = torch.compile(ours), torch.compile(base)
            for phase, make in (("train", train_step), ("eval", eval_step)):
                calls = (200 if micro else 3) if args.quick else (100 if micro else 2)
                t = interleaved(
                    {"ours": make(ours, case.input), "baseline": make(base, case.input)},
                    rounds=rounds,
                    calls=calls,
                )
                ratio = t["ours"].median / t["baseline"].median
                rows.append(
                    [
                        case.name,
                        mode,
                        phase,
                        ms(t["ours"].median),
                        ms(t["baseline"].median),
                        f"{ratio:.3f}",
                    ]
                )
                results.append(
                    {
                        "case": case.name,
                        "mode": mode,
                        "phase": phase,
                        "ours_s": t["ours"].median,
                        "baseline_s": t["baseline"].median,
                        "ratio": ratio,
                        "rounds": {k: v.rounds for k, v in t.items()},
                    }
                )
                print_table(["case", "mode", "phase", "ours ms", "baseline ms", "ratio"], rows[-1:])
    print()
    print_table(["case", "mode", "phase", "ours ms", "baseline ms", "ratio"], rows)
    write_json(args.json, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
