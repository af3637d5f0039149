"""Write the figures of README.md and docs/*.md from the results files that produced them.

A table lives between two markers in any Markdown file of the project::

    <!-- table: overhead_cpu -->
    ...generated: the command that wrote the results, the machine, the table...
    <!-- /table -->

``python docs/gen_tables.py`` rewrites every marked block from ``benchmarks/results/*.json``;
``python docs/gen_tables.py --check`` changes nothing and fails (exit 1) when a block differs
from what its results file says, or names a table this script does not know
(``tests/test_docs.py`` runs the check). To add a table: a function below that reads one or
more results files and returns a :class:`Table`, registered in ``TABLES``; then put its markers
where it belongs. ``examples(pattern)`` tabulates the examples' results files
(``examples/results/<pattern>.json``) without more code.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE_RESULTS = ROOT / "examples" / "results"
BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.DOTALL)
MIB = 2**20


@dataclass
class Table:
    """A generated table: each command that wrote one of its results files (with the machine it
    ran on), then the rows."""

    sources: list[tuple[str, str]]
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"`{command}` ({where})" for command, where in self.sources]
        lines = [line + "  " for line in lines[:-1]] + lines[-1:]  # Markdown line breaks
        lines += [
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join(" --- " for _ in self.header) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RESULTS / f"{name}.json").read_text())
    return data


def describe(machine: dict[str, Any]) -> str:
    """'2026-11-29, torch 2.13.0+cpu, x86_64 with 2 CPUs, 2 threads' (plus the GPU)."""
    where = machine["cuda"] or f"{machine['machine']} with {machine['cpus']} CPUs"
    return f"{machine['date']}, torch {machine['torch']}, {where}, {machine['threads']} threads"


def milliseconds(seconds: float) -> str:
    """Three significant digits or more: 61.5, 1.23, 0.017."""
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def results_command(script: str, name: str, *flags: str) -> str:
    return " ".join(
        ["python", f"benchmarks/{script}.py", *flags, "--json", f"benchmarks/results/{name}.json"]
    )


# -- overhead: ours against hand-written baselines -------------------------------------------

CASES = {
    "resnet18 64x64 b8": "`resnet18` vs a torchvision-style ResNet-18, 64x64, batch 8",
    "cifar_resnet56 32x32 b32": "`cifar_resnet(56)` vs hand-written, 32x32, batch 32",
    "transformer post-norm d256 L64 b16": "`TransformerEncoderLayer` post-norm vs `torch.nn`",
    "transformer pre-norm d256 L64 b16": "`TransformerEncoderLayer` pre-norm vs `torch.nn`",
    "micro Residual(Linear(64,64)) b8": "`Residual(nn.Linear(64, 64))` vs `x + lin(x)`, batch 8",
}


def overhead(names: list[str], mode: str, flags: tuple[str, ...]) -> Table:
    runs = [load(name) for name in names]
    rows: dict[str, dict[str, str]] = {}
    for run in runs:
        for r in run["results"]:
            if r["mode"] == mode:
                ms = f"{milliseconds(r['ours_s'])} / {milliseconds(r['baseline_s'])}"
                rows.setdefault(r["case"], {})[r["phase"]] = f"{r['ratio']:.3f} ({ms} ms)"
    return Table(
        sources=[
            (results_command("overhead", name, *flags), describe(run["machine"]))
            for name, run in zip(names, runs, strict=True)
        ],
        header=["case", "train step: ratio (ours / baseline)", "eval: ratio (ours / baseline)"],
        rows=[[CASES[case], p["train"], p["eval"]] for case, p in rows.items()],
    )


# -- stochastic depth --------------------------------------------------------------------------


def stochastic_depth() -> Table:
    runs = {
        "stochastic_depth_cpu_paired": (),
        "stochastic_depth_cpu_paired_run2": (),
        "stochastic_depth_h200_b64": ("--device", "cuda", "--rounds", "16"),
        "stochastic_depth_h200_b512": ("--device", "cuda", "--batch", "512", "--rounds", "16"),
    }
    rows, sources = [], []
    for name, flags in runs.items():
        run = load(name)
        sources.append(
            (results_command("stochastic_depth", name, *flags), describe(run["machine"]))
        )
        res, machine = run["results"], run["machine"]
        device = machine["cuda"] or f"CPU ({machine['cpus']} cores)"
        cells = [f"`{name}`", f"{device}, batch {run['batch']}"]
        cells.append(f"{res['none']['median_s'] * 1e3:.1f} ms")
        for mode in ("row", "batch", "subset"):
            paired = res[mode].get("paired_ratio")
            cells.append(f"{res[mode]['ratio']:.3f}" + (f" / {paired:.3f}" if paired else ""))
        rows.append(cells)
    return Table(
        sources=sources,
        header=["results file", "device", "no drop (step)", "row", "batch", "subset"],
        rows=rows,
        note="Ratios of the median step time against no drop; where two are given, the second is "
        "the median of the per-round ratios (each mode against no drop in the same round).",
    )


# -- memory: checkpointing and reversible stacks -------------------------------------------


def memory(name: str, script: str, *flags: str) -> Table:
    run = load(name)
    act, step = run["activation_bytes"], run["step_s"]
    rows = [
        [
            f"`{variant}`" if "=" in variant else variant,
            f"{act[variant] / MIB:.1f} MiB ({act[variant] / act['stored']:.3f})",
            f"{step[variant] * 1e3:.1f} ms ({step[variant] / step['stored']:.3f})",
        ]
        for variant in act
    ]
    note = ""
    if "inversion_max_abs" in run:
        note = f"Inversion error after the stack (max abs, eval): {run['inversion_max_abs']:.1e}."
    return Table(
        sources=[(results_command(script, name, *flags), describe(run["machine"]))],
        header=["variant", "activation memory (ratio)", "train step (ratio)"],
        rows=rows,
        note=note,
    )


# -- degradation --------------------------------------------------------------------------


DEGRADATION_COMMAND = (
    "python benchmarks/degradation.py --seeds {seeds} --json benchmarks/results/degradation.json "
    "--figures docs/figures"
)


def seeds(run: dict[str, Any]) -> str:
    return " ".join(str(seed) for seed in run["seeds"])


def degradation() -> Table:
    run = load("degradation")

    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    keys = ("final_train_loss", "train_acc", "test_acc")
    return Table(
        sources=[(DEGRADATION_COMMAND.format(seeds=seeds(run)), describe(run["machine"]))],
        header=["net", "final training loss", "training accuracy", "test accuracy"],
        rows=[
            [net] + [mean_std([r[k] for r in runs]) for k in keys]
            for net, runs in run["runs"].items()
        ],
        note=f"Mean ± standard deviation over {len(run['seeds'])} seeds, {run['epochs']} epochs.",
    )


def gradient_flow() -> Table:
    run = load("degradation")
    rows = []
    for net, profile in run["init_profiles"].items():
        norms = profile["param_grad_norms"]
        rows.append(
            [
                net,
                f"{norms[0]:.3g} ({profile['names'][0]})",
                f"{norms[-1]:.3g} ({profile['names'][-1]})",
                f"{max(norms) / min(norms):.3g}",
            ]
        )
    return Table(
        sources=[(DEGRADATION_COMMAND.format(seeds=seeds(run)), describe(run["machine"]))],
        header=["net", "first block", "last block", "largest / smallest"],
        rows=rows,
        note="Parameter-gradient norm per block at initialisation, one backward pass.",
    )


# -- parity with torchvision ----------------------------------------------------------------


def torchvision_parity() -> Table:
    run = load("gpu_check_h200")
    parity = dict(run["torchvision_parity"])
    version = parity.pop("torchvision")
    rows = [
        [
            f"`{name}`",
            f"{r['params_ours']:,}",
            f"{r['params_torchvision']:,}",
            "yes" if r["same_state_dict_keys"] else "no",
            f"{r['max_abs_diff_train']:g} / {r['max_abs_diff_eval']:g}",
        ]
        for name, r in parity.items()
    ]
    return Table(
        sources=[
            (
                "python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200.json",
                f"torch {run['torch']}, {run['device']}",
            )
        ],
        header=[
            "builder",
            "parameters (ours)",
            f"parameters (torchvision {version})",
            "same state_dict keys",
            "max abs output diff (train / eval)",
        ],
        rows=rows,
    )


# -- examples: one results file per run, {"command", "threads", "seed", "torch", "metrics"} -----


def metric(name: str, value: float) -> str:
    if "accuracy" in name:
        return f"{value:.2%}"
    if name.endswith("seconds"):
        return f"{value:.1f} s"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def examples(pattern: str) -> Table:
    """Rows from ``examples/results/<pattern>.json``: a row per run, a column per metric."""
    paths = sorted(EXAMPLE_RESULTS.glob(f"{pattern}.json"))
    if not paths:
        raise KeyError(f"no results files examples/results/{pattern}.json; run the example")
    runs = [json.loads(path.read_text()) for path in paths]
    names = list(runs[0]["metrics"])
    rows = []
    for run in runs:
        arguments = run["command"].split(" ", 2)[2:] or ["(defaults)"]
        rows.append([f"`{arguments[0]}`"] + [metric(k, run["metrics"][k]) for k in names])
    return Table(
        sources=[
            (
                run["command"],
                f"torch {run['torch']}, {run['threads']} thread(s), seed {run['seed']}",
            )
            for run in runs
        ],
        header=["arguments"] + [name.replace("_", " ") for name in names],
        rows=rows,
        note="Wall times depend on the machine that ran the command; the other figures are "
        "reproduced by the same command with the same thread count.",
    )


TABLES: dict[str, Callable[[], Table]] = {
    "overhead_cpu": lambda: overhead(["overhead_cpu_core2"], "eager", ()),
    "overhead_cpu_compiled": lambda: overhead(
        ["overhead_cpu_compiled_final"],
        "compiled",
        ("--compile", "--cases", "transformer", "micro"),
    ),
    "overhead_h200": lambda: overhead(["overhead_h200_eager"], "eager", ("--device", "cuda")),
    "overhead_h200_compiled": lambda: overhead(
        ["overhead_h200_compiled"],
        "compiled",
        ("--device", "cuda", "--compile", "--cases", "transformer", "micro"),
    ),
    "stochastic_depth": stochastic_depth,
    "checkpointing_cpu": lambda: memory("checkpointing_cpu", "checkpointing"),
    "reversible_cpu": lambda: memory("reversible_cpu", "reversible", "--batch", "16"),
    "degradation": degradation,
    "gradient_flow": gradient_flow,
    "torchvision_parity": torchvision_parity,
    "arena_char": lambda: arena("char"),
    "arena_digits": lambda: arena("digits"),
    # Tables of the examples' results files (examples/results/*.json).
    "train_digits": lambda: examples("train_digits_*"),
    "ddp_digits": lambda: examples("ddp_digits_*"),
    "hyper_digits": lambda: examples("hyper_digits"),
    "char_lm": lambda: examples("char_lm_*"),
}


def arena(task: str) -> Table:
    """One task of ``benchmarks/arena.py``: variants ranked by the task's metric (lower first)."""
    run = load("arena_cpu")
    res = run["tasks"][task]
    metrics = list(next(iter(res["variants"].values()))["mean"])
    order = sorted(res["variants"], key=lambda n: res["variants"][n]["mean"][res["metric"]])
    rows = [
        [
            name,
            *(f"{v['mean'][m]:.4f} ± {v['std'][m]:.4f}" for m in metrics),
            f"{v['params']:,}",
            f"{v['ratio']:.2f}x",
        ]
        for name, v in ((n, res["variants"][n]) for n in order)
    ]
    sources = [(run["command"], describe(run["machine"]))]
    added = run.get("added", [])  # variants trained later by the same script and config
    for extra in [added] if isinstance(added, dict) else added:
        sources.append((extra["command"], describe(extra["machine"])))
    return Table(
        sources=sources,
        header=["variant", *(f"{m} (mean ± std)" for m in metrics), "params", "step time"],
        rows=rows,
        note=f"{run['config']['seeds']} seeds; step time: train step / pre-norm's, same process.",
    )


def markdown_files() -> Iterator[Path]:
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


def render(text: str, path: Path) -> str:
    """``text`` with every marked block regenerated; unknown names raise ``KeyError``."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise KeyError(
                f"{path.relative_to(ROOT)}: unknown table {name!r}; known: {', '.join(TABLES)}"
            )
        return match.group(1) + TABLES[name]().markdown() + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 1 when a table disagrees with its results",
    )
    args = parser.parse_args(argv)
    stale = []
    for path in markdown_files():
        text = path.read_text()
        try:
            new = render(text, path)
        except KeyError as error:
            print(error.args[0])
            return 1
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"{path}: {'out of date' if args.check else 'rewritten'}")
    if stale and args.check:
        print("run: python docs/gen_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
