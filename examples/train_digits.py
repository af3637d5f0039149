"""Train a residual model on scikit-learn's digits (1797 real 8x8 images), on the CPU.

    python examples/train_digits.py                   # the CIFAR-style ResNet-20
    python examples/train_digits.py --model transformer

Models: resnet (cifar_resnet(20)), preact (its pre-activation twin), lstm (RowLSTM: a residual
LSTM over the image rows), transformer (PatchTransformer: TransformerEncoderLayers over
overlapping 4x4 patches), mixer (MLPMixer), mlp (ResidualMLP). Every model is a builder of
residual.models, so the checkpoint reloads with one call and no code from this script:

    model = residual.load_pretrained("checkpoints/digits_resnet")

Prints the torchinfo summary first and the test accuracy last. Writes the checkpoint folder
(--out, default checkpoints/digits_<model>/: model.safetensors + config.json) and the results
file (--json, default examples/results/train_digits_<model>.json): {"example", "command",
"threads", "seed", "torch", "metrics": {"test_accuracy", "parameters", "epochs",
"train_seconds"}}. With the same --seed and --threads the accuracy is the same on every run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchinfo
from reproducible import (
    add_reproducibility_arguments,
    make_reproducible,
    parser,
    results_path,
    write_results,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import residual

MODELS = ("resnet", "preact", "lstm", "transformer", "mixer", "mlp")


class Setting(NamedTuple):
    """How one model is built (a residual.models builder and its kwargs) and trained."""

    builder: str
    kwargs: dict[str, Any]
    epochs: int
    lr: float


SETTINGS: dict[str, Setting] = {
    "resnet": Setting("cifar_resnet", {"depth": 20, "in_channels": 1}, 30, 2e-3),
    "preact": Setting("cifar_resnet", {"depth": 20, "in_channels": 1, "preact": True}, 30, 2e-3),
    "lstm": Setting("RowLSTM", {}, 40, 3e-3),
    "transformer": Setting("PatchTransformer", {}, 50, 2e-3),
    "mixer": Setting(
        "MLPMixer",
        {"image_size": 8, "patch_size": 2, "in_channels": 1, "dim": 64, "depth": 4},
        60,
        3e-3,
    ),
    "mlp": Setting(
        "ResidualMLP",
        {"in_features": 64, "num_classes": 10, "dim": 128, "depth": 3, "flatten": True},
        60,
        1e-3,
    ),
}


def build(setting: Setting) -> nn.Module:
    """The untrained model of a setting."""
    from residual import models

    return getattr(models, setting.builder)(**setting.kwargs)  # type: ignore[no-any-return]


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as (N, 1, 8, 8) floats in [0, 1]; a fixed, stratified 80 / 20 split."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=seed
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def shift(x: Tensor) -> Tensor:
    """Augment: move each image by up to one pixel (zero fill)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    i, j = torch.randint(0, 3, (2,)).tolist()
    return padded[:, :, i : i + 8, j : j + 8]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train(
    name: str,
    *,
    setting: Setting | None = None,
    epochs: int | None = None,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = True,
    summary: bool = True,
) -> tuple[float, float]:
    """Train one model (``SETTINGS[name]`` unless ``setting`` is given); returns (test accuracy,
    seconds). With ``out``, saves the checkpoint folder there."""
    torch.manual_seed(seed)
    setting = SETTINGS[name] if setting is None else setting
    epochs = setting.epochs if epochs is None else epochs
    lr = setting.lr
    x_train, y_train, x_test, y_test = load_data(seed)
    model = build(setting)
    if summary:
        print(torchinfo.summary(model, input_size=(1, 1, 8, 8), verbose=0, depth=2))
    batch = 64
    steps = epochs * ((len(y_train) + batch - 1) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{name}", disable=not progress, unit="step")
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_train)).split(batch):
            loss = loss_fn(model(shift(x_train[idx])), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test)
    if out is not None:
        residual.save_pretrained(model, out, builder=setting.builder, kwargs=setting.kwargs)
    return acc, seconds


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--model", choices=MODELS, default="resnet")
    args_parser.add_argument("--epochs", type=int, default=None, help="default: the model's own")
    args_parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint folder (default checkpoints/digits_<model>)",
    )
    args_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_reproducibility_arguments(args_parser, "train_digits_<model>.json")
    args = args_parser.parse_args()
    make_reproducible(args.seed, args.threads)
    out = args.out or Path("checkpoints") / f"digits_{args.model}"
    acc, seconds = train(
        args.model, epochs=args.epochs, seed=args.seed, out=out, progress=not args.no_progress
    )
    print(f"saved {out}")
    print(f"{args.model}: test accuracy {acc:.2%} ({seconds:.1f} s training)")
    setting = SETTINGS[args.model]
    metrics = {
        "test_accuracy": round(acc, 6),
        "parameters": sum(p.numel() for p in build(setting).parameters()),
        "epochs": setting.epochs if args.epochs is None else args.epochs,
        "train_seconds": round(seconds, 1),
    }
    path = results_path(args.json, f"train_digits_{args.model}")
    write_results(path, "train_digits", args.seed, metrics)


if __name__ == "__main__":
    main()
