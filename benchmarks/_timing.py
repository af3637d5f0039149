"""Shared timing helpers for the benchmarks (never imported by the package).

Candidates are timed interleaved (A, B, A, B, ...) after a warm-up, so that drifts of the
machine hit all of them alike; each reports the median of its rounds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the hand-written references live with the tests


@dataclass
class Timing:
    """Per-call seconds of one candidate: every round's mean, and their median."""

    name: str
    rounds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def paired_ratio(self, baseline: Timing) -> float:
        """Median over rounds of this round / the baseline's same round.

        Both ran back to back within each round, so a drift of the machine between rounds
        cancels out of each pair; the ratio of the two medians does not cancel it.
        """
        return statistics.median(a / b for a, b in zip(self.rounds, baseline.rounds, strict=True))


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(
    candidates: dict[str, Callable[[], object]], *, rounds: int, calls: int, warmup: int = 3
) -> dict[str, Timing]:
    """Time each candidate ``calls`` times per round, alternating candidates between rounds."""
    timings = {name: Timing(name) for name in candidates}
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    order = list(candidates)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            fn = candidates[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            timings[name].rounds.append((time.perf_counter() - start) / calls)
    return timings


def print_header(title: str) -> dict[str, Any]:
    info = machine()
    print(f"# {title}")
    print(
        "machine: {machine} ({cpus} CPUs), python {python}, torch {torch}, "
        "{threads} threads, cuda: {cuda}, {date}".format(**info)
    )
    return info


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)))
        print(f"wrote {path}")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def memory_time_table(
    memory: dict[str, int], peaks: dict[str, int | None], timings: dict[str, Timing], baseline: str
) -> None:
    """Print activation memory, CUDA peak and step time per variant, with ratios to baseline."""
    rows = []
    for name in memory:
        peak = peaks[name]
        rows.append(
            [
                name,
                f"{memory[name] / 2**20:.2f}",
                f"{memory[name] / memory[baseline]:.3f}",
                "-" if peak is None else f"{peak / 2**20:.1f}",
                ms(timings[name].median),
                f"{timings[name].median / timings[baseline].median:.3f}",
            ]
        )
    print_table(
        ["variant", "activation MiB", "ratio", "CUDA peak MiB", "step ms", "time ratio"], rows
    )
