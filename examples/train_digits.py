"""Train a residual model on scikit-learn's digits (1797 real 8x8 images), on the CPU.

    python examples/train_digits.py                   # the CIFAR-style ResNet-20
    python examples/train_digits.py --model transformer

Models: resnet (cifar_resnet(20)), preact (its pre-activation twin), lstm (ResidualLSTM over
the image rows), transformer (TransformerEncoderLayer over overlapping 4x4 patches), mixer
(MLPMixer), mlp (ResidualMLP). Prints the torchinfo summary first and the test accuracy last;
saves the state_dict atomically to checkpoints/digits_<model>.pt.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchinfo
from einops.layers.torch import Rearrange
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

from residual.models import (
    MLPMixer,
    ResidualLSTM,
    ResidualMLP,
    TransformerEncoderLayer,
    cifar_resnet,
)

MODELS = ("resnet", "preact", "lstm", "transformer", "mixer", "mlp")


class RowLSTM(nn.Module):
    """Reads an image row by row: Linear(8 -> hidden), a residual LSTM stack, a linear head."""

    def __init__(self, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        self.rows = Rearrange("b 1 h w -> b h w")
        self.embed = nn.Linear(8, hidden)
        self.lstm = ResidualLSTM(hidden, hidden, layers, residual_from=1)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(self.rows(x)))
        return self.head(out.mean(dim=1))


class PatchTransformer(nn.Module):
    """Overlapping 4x4 patches (a stride-2 conv) -> 16 tokens, positions, encoder layers, head."""

    def __init__(self, d_model: int = 64, layers: int = 3, nhead: int = 4) -> None:
        super().__init__()
        self.patches = nn.Sequential(
            nn.Conv2d(1, d_model, 4, stride=2, padding=1), Rearrange("b d h w -> b (h w) d")
        )
        self.pos = nn.Parameter(torch.zeros(1, 16, d_model))
        self.layers = nn.Sequential(
            *(
                TransformerEncoderLayer(
                    d_model, nhead, 2 * d_model, dropout=0.0, norm_first=True, batch_first=True
                )
                for _ in range(layers)
            )
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.layers(self.patches(x) + self.pos)
        return self.head(self.norm(tokens).mean(dim=1))


# name -> (builder, epochs, learning rate)
SETTINGS: dict[str, tuple[Callable[[], nn.Module], int, float]] = {
    "resnet": (lambda: cifar_resnet(20, in_channels=1), 30, 2e-3),
    "preact": (lambda: cifar_resnet(20, in_channels=1, preact=True), 30, 2e-3),
    "lstm": (RowLSTM, 40, 3e-3),
    "transformer": (PatchTransformer, 50, 2e-3),
    "mixer": (lambda: MLPMixer(8, 2, 1, dim=64, depth=4, num_classes=10), 60, 3e-3),
    "mlp": (lambda: nn.Sequential(nn.Flatten(), ResidualMLP(64, 10, dim=128, depth=3)), 60, 1e-3),
}


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


def save_atomically(state: dict[str, Tensor], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train(
    name: str,
    *,
    epochs: int | None = None,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = True,
    summary: bool = True,
) -> tuple[float, float]:
    """Train one model; returns (test accuracy, seconds)."""
    torch.manual_seed(seed)
    build, default_epochs, lr = SETTINGS[name]
    epochs = default_epochs if epochs is None else epochs
    x_train, y_train, x_test, y_test = load_data(seed)
    model = build()
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
        save_atomically(model.state_dict(), out)
    return acc, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="resnet")
    parser.add_argument("--epochs", type=int, default=None, help="default: the model's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint path")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = args.out or Path("checkpoints") / f"digits_{args.model}.pt"
    acc, seconds = train(
        args.model, epochs=args.epochs, seed=args.seed, out=out, progress=not args.no_progress
    )
    print(f"saved {out}")
    print(f"{args.model}: test accuracy {acc:.2%} ({seconds:.1f} s training)")


if __name__ == "__main__":
    main()
