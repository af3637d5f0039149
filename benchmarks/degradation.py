"""The degradation problem, measured: plain vs residual CIFAR-style nets at depth 20 and 56,
trained on scikit-learn's digits with the same optimiser and schedule, several seeds.

Plain nets are the same builders with every shortcut removed (``cifar_resnet(d, plain=True)``).
Prints a table (final training loss, training and test accuracy: mean and spread over seeds),
writes --json, and saves two figures: the training-loss curves of the four nets, and the
gradient norm per block at initialisation (plain vs residual, depth 56).

    python benchmarks/degradation.py --quick
    python benchmarks/degradation.py --seeds 0 1 2 --json degradation.json --figures docs/figures
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _timing import ROOT, print_header, print_table, write_json
from torch import nn

sys.path.insert(0, str(ROOT / "examples"))
from train_digits import accuracy, load_data

from residual.diagnostics import DepthProfile, gradient_flow, plot_gradient_flow
from residual.models import cifar_resnet

NETS = [("plain-20", 20, True), ("plain-56", 56, True), ("residual-20", 20, False),
        ("residual-56", 56, False)]  # fmt: skip


def train(depth: int, plain: bool, seed: int, epochs: int, lr: float) -> dict[str, object]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_data(0)  # one fixed split for every run
    model = cifar_resnet(depth, plain=plain, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = (len(y_train) + 63) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    curve: list[float] = []
    for _ in range(epochs):
        model.train()
        losses = []
        for idx in torch.randperm(len(y_train)).split(64):
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        curve.append(statistics.fmean(losses))
    model.eval()
    with torch.no_grad():
        final_loss = loss_fn(model(x_train), y_train).item()
    return {
        "curve": curve,
        "final_train_loss": final_loss,
        "train_acc": accuracy(model, x_train, y_train),
        "test_acc": accuracy(model, x_test, y_test),
    }


def init_profile(plain: bool, seed: int) -> DepthProfile:
    torch.manual_seed(seed)
    x_train, y_train, _, _ = load_data(0)
    model = cifar_resnet(56, plain=plain, in_channels=1)
    return gradient_flow(model, x_train[:256], y_train[:256])


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 3 epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--json", default=None)
    parser.add_argument("--figures", default=None, help="folder for the two PNG figures")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    seeds = [args.seeds[0]] if args.quick else args.seeds
    epochs = 3 if args.quick else args.epochs
    info = print_header(
        f"degradation on sklearn digits: plain vs residual, {epochs} epochs, SGD lr {args.lr} "
        f"cosine, batch 64, seeds {seeds}"
    )
    runs: dict[str, list[dict[str, object]]] = {name: [] for name, _, _ in NETS}
    start = time.perf_counter()
    for seed in seeds:
        for name, depth, plain in NETS:
            runs[name].append(train(depth, plain, seed, epochs, args.lr))
            print(f"  {name} seed {seed}: done at {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for name, _, _ in NETS:
        r = runs[name]
        rows.append(
            [
                name,
                spread([float(x["final_train_loss"]) for x in r]),  # type: ignore[arg-type]
                spread([float(x["train_acc"]) for x in r]),  # type: ignore[arg-type]
                spread([float(x["test_acc"]) for x in r]),
            ]
        )  # type: ignore[arg-type]
    print_table(["net", "final training loss", "training accuracy", "test accuracy"], rows)
    profiles = {
        "plain-56": init_profile(True, seeds[0]),
        "residual-56": init_profile(False, seeds[0]),
    }
    for label, p in profiles.items():
        print(
            f"{label} at init: parameter-gradient norm, first block {p.param_grad_norms[0]:.3g},"
            f" last block {p.param_grad_norms[-1]:.3g} (last / first = "
            f"{p.ratio_last_to_first():.3g}); gradient into the block output, first "
            f"{p.output_grad_norms[0]:.3g}, last {p.output_grad_norms[-1]:.3g}"
        )
    if args.figures:
        folder = Path(args.figures)
        folder.mkdir(parents=True, exist_ok=True)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, _, _ in NETS:
            curves = torch.tensor([x["curve"] for x in runs[name]])
            ax.plot(
                range(1, epochs + 1),
                curves.mean(0),
                label=name,
                linestyle="--" if name.startswith("plain") else "-",
            )
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (mean over the epoch and seeds)")
        ax.set_title("digits: plain vs residual, depth 20 and 56")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "degradation_loss.png", dpi=120)
        plot_gradient_flow(
            profiles,
            folder / "gradient_flow_init.png",
            title="parameter-gradient norm per block at init, depth 56",
        )
        print(f"wrote {folder / 'degradation_loss.png'} and {folder / 'gradient_flow_init.png'}")
    write_json(
        args.json,
        {
            "machine": info,
            "epochs": epochs,
            "seeds": seeds,
            "lr": args.lr,
            "runs": runs,
            "init_profiles": profiles,
        },
    )


if __name__ == "__main__":
    main()
