"""A character-level language model on text that ships with Python: the standard library's
docstrings. Reports validation bits per character beside a unigram baseline, and a sample.

    python examples/char_lm.py                 # GPT-style pre-norm causal Transformer
    python examples/char_lm.py --model lstm    # residual LSTM stack

Trains a fixed number of --steps (default 300; --seconds adds a time budget, which makes the
result depend on the machine's speed). The models are residual.models.CausalTransformerLM and
residual.models.LSTMLanguageModel. Writes the results file (--json, default
examples/results/char_lm_<model>.json): {"example", "command", "threads", "seed", "torch",
"metrics": {"val_bits_per_char", "unigram_bits_per_char", "steps", "characters",
"vocab_size", "train_seconds"}}. With the same --seed, --steps and --threads the figures are
the same on every run.
"""

from __future__ import annotations

import importlib
import inspect
import math
import time

import torch
import torch.nn.functional as F
from reproducible import (
    add_reproducibility_arguments,
    make_reproducible,
    parser,
    results_path,
    write_results,
)
from torch import Tensor, nn
from tqdm import tqdm

from residual.models import CausalTransformerLM, LSTMLanguageModel

STDLIB_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "fractions", "functools", "heapq", "inspect", "itertools",
    "json", "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest", "zipfile",
)  # fmt: skip


def stdlib_text() -> str:
    """The docstrings of some standard-library modules and their public members, in order."""
    parts: list[str] = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for obj in (module, *(getattr(module, a) for a in sorted(dir(module)) if a[:1] != "_")):
            doc = inspect.getdoc(obj) if not isinstance(obj, str | int | float) else None
            if doc and doc not in parts[-50:]:
                parts.append(doc)
    return "\n\n".join(parts)


def batches(
    data: Tensor, context: int, batch: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
    x = torch.stack([data[s : s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def bits_per_char(model: nn.Module, data: Tensor, context: int) -> float:
    """Mean next-character cross-entropy in bits over non-overlapping windows of ``data``."""
    model.eval()
    n = (len(data) - 1) // context
    x = data[: n * context].view(n, context)
    y = data[1 : n * context + 1].view(n, context)
    total = 0.0
    for xb, yb in zip(x.split(64), y.split(64), strict=True):
        total += F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), reduction="sum").item()
    return total / (n * context) / math.log(2)


def unigram_bits(train: Tensor, val: Tensor, vocab: int) -> float:
    """Bits per character of the best context-free model (training frequencies, add-one)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log2()
    return -logp[val].mean().item()


@torch.no_grad()
def sample(model: nn.Module, prompt: Tensor, length: int, context: int) -> Tensor:
    model.eval()
    idx = prompt.unsqueeze(0)
    for _ in range(length):
        logits = model(idx[:, -context:])[:, -1]
        nxt = torch.multinomial(F.softmax(logits / 0.8, dim=-1), 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx[0]


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--model", choices=("transformer", "lstm"), default="transformer")
    args_parser.add_argument("--steps", type=int, default=300, help="training steps")
    args_parser.add_argument(
        "--seconds", type=float, default=None, help="optional training time budget"
    )
    args_parser.add_argument("--context", type=int, default=64, help="characters per sequence")
    args_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_reproducibility_arguments(args_parser, "char_lm_<model>.json")
    args = args_parser.parse_args()
    make_reproducible(args.seed, args.threads)
    budget = math.inf if args.seconds is None else args.seconds

    text = stdlib_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    print(f"{len(text):,} characters of standard-library docstrings, {len(chars)} distinct")

    vocab = len(chars)
    model: nn.Module
    if args.model == "transformer":
        model = CausalTransformerLM(vocab, d_model=128, nhead=4, num_layers=4, max_len=args.context)
    else:
        model = LSTMLanguageModel(vocab)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    bar = tqdm(total=args.steps, disable=args.no_progress, unit="step")
    step = 0
    while step < args.steps and time.perf_counter() - start < budget:
        model.train()
        x, y = batches(train, args.context, 32, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", bpc=f"{loss.item() / math.log(2):.2f}")
    bar.close()
    seconds = time.perf_counter() - start
    bpc = bits_per_char(model, val, args.context)
    baseline = unigram_bits(train, val, vocab)
    print(f"trained {step} steps in {seconds:.1f} s")
    print(f"validation: {bpc:.3f} bits/char (unigram baseline {baseline:.3f} bits/char)")
    prompt = torch.tensor([lookup[c] for c in "Return the "], dtype=torch.long)
    print("sample:", repr("".join(chars[i] for i in sample(model, prompt, 200, args.context))))
    metrics = {
        "val_bits_per_char": round(bpc, 4),
        "unigram_bits_per_char": round(baseline, 4),
        "steps": step,
        "characters": len(text),
        "vocab_size": vocab,
        "train_seconds": round(seconds, 1),
    }
    path = results_path(args.json, f"char_lm_{args.model}")
    write_results(path, "char_lm", args.seed, metrics)


if __name__ == "__main__":
    main()
