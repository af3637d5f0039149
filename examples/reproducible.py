"""What every example shares: fixed threads, seeds, deterministic kernels, a results file.

A results file is one flat JSON object (the README's and the docs' tables are generated from
these files, so a figure always names the command that produced it)::

    {
      "example": "train_digits",                  # the script, without .py
      "command": "python examples/train_digits.py --model resnet",
      "threads": 1,                               # torch.get_num_threads() during the run
      "seed": 0,
      "torch": "2.13.0+cpu",                      # torch.__version__
      "metrics": {"test_accuracy": 0.99, ...}     # numbers only; the example documents them
    }

Figures reproduce for one thread count: a different ``--threads`` changes the order of float
sums inside torch's kernels, so the last digits (and after training, the accuracy) can differ.
Wall-clock times (``*_seconds`` metrics) are measured, not reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser whose ``--help`` shows the whole module docstring, as written."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_reproducibility_arguments(parser: argparse.ArgumentParser, default_json: str) -> None:
    """``--seed``, ``--threads`` and ``--json``, with the README's defaults."""
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and random")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the README's figures are measured with 1 thread)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"results file (default: examples/results/{default_json})",
    )


def results_path(given: Path | None, name: str) -> Path:
    """``--json`` if given, else ``examples/results/<name>.json``."""
    return given if given is not None else RESULTS / f"{name}.json"


def make_reproducible(seed: int, threads: int) -> None:
    """Seed every RNG, fix the thread count, and use deterministic kernels where torch has them."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def command(launcher: str = "python") -> str:
    """The command line of this run, as a user would type it from the repository root."""
    script = f"examples/{Path(sys.argv[0]).name}"
    return shlex.join([*shlex.split(launcher), script, *sys.argv[1:]])


def write_results(
    path: Path, example: str, seed: int, metrics: dict[str, float | int], launcher: str = "python"
) -> None:
    """Write the flat results file (see the module docstring) and say where it went."""
    results = {
        "example": example,
        "command": command(launcher),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "torch": torch.__version__,
        "metrics": metrics,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {path}")
