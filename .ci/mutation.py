"""Mutation testing for ``residual`` with mutmut: does the suite fail when the code is wrong?

    python .ci/mutation.py                      # every group (long: run it before a release)
    python .ci/mutation.py --groups core,drop   # some groups
    python .ci/mutation.py --quick              # the core's combinator only (CI runs this)
    python .ci/mutation.py --groups merges --table docs/mutation.md   # update the table
    python .ci/mutation.py --groups drop --json out.json                # survivors' diffs
    python .ci/mutation.py --groups drop --rerun out.json   # only those survivors, again

Each group mutates a few modules and runs only the tests that exercise them (mutmut narrows
that further to the tests that call the mutated function). A mutant is *killed* when a test
fails on it; one that no test can kill because it computes the same thing (an optimisation's
guard, a message's casing) is listed in ``.ci/mutation_equivalents.json`` with its diff lines
and the reason; every other survivor fails the run and is printed with its diff. The score is
killed / (mutants - equivalent), compared with the group's target.

Every group runs in its own copy of the working tree under ``--workdir`` (mutmut writes a
``mutants/`` folder next to the code it copies), so nothing in the checkout changes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / ".ci" / "mutation_equivalents.json"
TABLE_START, TABLE_END = "<!-- mutation-table -->", "<!-- /mutation-table -->"


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]  # globs of files to mutate
    tests: tuple[str, ...]  # test files run against them
    target: float  # fraction of non-equivalent mutants that must be killed
    mutants: tuple[str, ...] = ()  # mutmut name globs: only these mutants (default: all)


CORE_TESTS = (
    "tests/test_core.py",
    "tests/test_core_edges.py",
    "tests/test_checkpoint.py",
    "tests/test_misuse.py",
    "tests/test_properties.py",
    "tests/test_fx.py",
    "tests/test_precision.py",
    "tests/test_errors.py",
    "tests/test_mismatch_hints.py",
    "tests/test_core_contract.py",
)
GROUPS = (
    Group(
        "core",
        (
            "residual/core.py",
            "residual/_branch.py",
            "residual/_checkpoint.py",
            "residual/_dims.py",
            "residual/_types.py",
            "residual/errors.py",
        ),
        (*CORE_TESTS, "tests/test_merges.py", "tests/test_blocks.py", "tests/test_hyper.py"),
        0.95,
    ),
    Group(
        "shortcuts",
        ("residual/shortcuts.py",),
        (
            *CORE_TESTS,
            "tests/test_shortcuts_contract.py",
            "tests/test_blocks.py",
            "tests/test_models_cnn.py",
        ),
        0.95,
    ),
    Group(
        "merges",
        ("residual/merges.py",),
        (
            "tests/test_merges.py",
            "tests/test_core.py",
            "tests/test_misuse.py",
            "tests/test_depth.py",
        ),
        0.95,
    ),
    Group(
        "drop",
        ("residual/drop.py",),
        ("tests/test_drop.py", "tests/test_core_edges.py", "tests/test_misuse.py", "tests/peers"),
        0.95,
    ),
    Group(
        "blocks",
        ("residual/blocks/*",),
        (
            "tests/test_blocks.py",
            "tests/test_blocks_nd.py",
            "tests/test_blocks_contract.py",
            "tests/test_models_cnn.py",
            "tests/test_golden.py",
        ),
        0.90,
    ),
    Group(
        "models",
        ("residual/models/*",),
        (
            "tests/test_models_cnn.py",
            "tests/test_models_sequence.py",
            "tests/test_golden.py",
            "tests/test_misuse.py",
            "tests/test_models_contract.py",
            "tests/test_models_small.py",
            "tests/test_depth.py",
            "tests/peers",
        ),
        0.90,
    ),
    Group(
        "streams",
        ("residual/hyper.py", "residual/streams/*", "residual/reversible.py"),
        (
            "tests/test_hyper.py",
            "tests/test_hyper_mhc.py",
            "tests/test_hyper_frac.py",
            "tests/test_reversible.py",
            "tests/test_misuse.py",
            "tests/test_streams_contract.py",
        ),
        0.90,
    ),
)
# --quick: the combinator's forward and the checks it calls, against their own tests (CI).
QUICK = Group(
    "quick-core",
    ("residual/core.py", "residual/_branch.py"),
    ("tests/test_core.py", "tests/test_core_edges.py", "tests/test_checkpoint.py"),
    1.0,
    (
        "residual.core.xǁResidualǁforward__mutmut_*",
        "residual._branch.x_check_*",
        "residual._branch.x_branch_head__mutmut_*",
        "residual._branch.x_with_rest__mutmut_*",
    ),
)


@dataclass
class Outcome:
    group: Group
    statuses: dict[str, str]  # mutant name -> mutmut status
    equivalent: dict[str, str]  # mutant name -> reason (those that survived and are listed)
    stale: list[str]  # listed as equivalent, but the diff no longer matches
    seconds: float
    source: str  # source_hash of the mutated modules
    killed_before: int = 0  # --rerun: killed in the earlier run, not run again

    @property
    def mutants(self) -> int:
        return len(self.statuses) + self.killed_before

    @property
    def survivors(self) -> list[str]:
        return sorted(
            n for n, s in self.statuses.items() if s != "killed" and n not in self.equivalent
        )

    @property
    def killed(self) -> int:
        return sum(s == "killed" for s in self.statuses.values()) + self.killed_before

    @property
    def score(self) -> float:
        live = self.mutants - len(self.equivalent)
        return self.killed / live if live else 1.0


def copy_tree(dest: Path) -> None:
    """Copy the files git knows (tracked, and untracked but not ignored) into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    if dest.exists():
        shutil.rmtree(dest)
    for raw in filter(None, listed):
        src = ROOT / os.fsdecode(raw)
        if src.is_file():
            (dest / os.fsdecode(raw)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / os.fsdecode(raw))


def mutmut_config(group: Group) -> str:
    def toml_list(items: tuple[str, ...] | list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    extra = ["conftest.py", "docs", "README.md", "examples", "benchmarks", ".ci"]
    return "\n".join(
        (
            "",
            "[tool.mutmut]",
            'source_paths = ["residual"]',
            f"only_mutate = {toml_list(group.modules)}",
            f"pytest_add_cli_args_test_selection = {toml_list(group.tests)}",
            # no doctests, no cache, stop at the first failure: a killed mutant costs one test
            # (and no compiler: dynamo cannot trace mutmut's trampolines; see tests/conftest.py)
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "-o", "addopts=",'
            ' "-m", "not compiles"]',
            # torch is not fork-safe once it has run: fork the workers from a clean server
            'process_isolation = "forkserver"',
            f"also_copy = {toml_list(extra)}",
            "",
        )
    )


def load_equivalents() -> dict[str, dict[str, str]]:
    if not EQUIVALENTS.exists():
        return {}
    entries: dict[str, dict[str, str]] = json.loads(EQUIVALENTS.read_text("utf-8"))
    return entries


@functools.cache
def mutant_diff(workdir: Path, name: str) -> str:
    """The changed lines of one mutant, as ``mutmut show`` prints them."""
    shown = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=workdir, capture_output=True, text=True
    ).stdout
    lines = [ln for ln in shown.splitlines() if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    return "\n".join(lines)


def source_hash(group: Group, root: Path = ROOT) -> str:
    """A hash of the group's modules: mutant names are stable while it does not change."""
    digest = hashlib.sha256()
    for path in sorted({p for m in group.modules for p in root.glob(m) if p.is_file()}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_group(group: Group, workroot: Path, children: int) -> Outcome:
    workdir = workroot / group.name
    copy_tree(workdir)
    with (workdir / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write(mutmut_config(group))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"== {group.name}: mutating {', '.join(group.modules)}", flush=True)
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *group.mutants],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    listed = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=workdir,
        capture_output=True,
        text=True,
    ).stdout
    statuses = dict(
        (name.strip(), status.strip())
        for name, _, status in (ln.rpartition(": ") for ln in listed.splitlines() if ": " in ln)
    )
    if group.mutants:  # mutmut lists the mutants it did not run as "not checked"
        statuses = {
            n: st for n, st in statuses.items() if any(fnmatch(n, g) for g in group.mutants)
        }
    if run.returncode != 0 or not statuses:
        tail = (run.stdout + run.stderr).replace("\r", "\n").splitlines()[-30:]
        raise SystemExit(f"mutmut failed for {group.name}:\n" + "\n".join(tail))
    listed_equivalent = load_equivalents()
    equivalent: dict[str, str] = {}
    stale: list[str] = []
    for name, status in statuses.items():
        entry = listed_equivalent.get(name)
        if entry is None or status == "killed":
            continue
        if mutant_diff(workdir, name) == entry["diff"].strip("\n"):
            equivalent[name] = entry["reason"]
        else:
            stale.append(name)
    return Outcome(group, statuses, equivalent, stale, seconds, source_hash(group, workdir))


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| group | modules | mutants | killed | equivalent | survived | score | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.group.name} | {', '.join(f'`{m}`' for m in o.group.modules)} | "
            f"{o.mutants} | {o.killed} | {len(o.equivalent)} | {len(o.survivors)} | "
            f"{100 * o.score:.1f}% | {100 * o.group.target:.0f}% |"
        )
    return "\n".join(rows)


def update_table(path: Path, outcomes: list[Outcome]) -> None:
    """Replace the rows of the measured groups in the table between the markers of ``path``."""
    text = path.read_text("utf-8")
    head, _, rest = text.partition(TABLE_START)
    old, _, tail = rest.partition(TABLE_END)
    rows = {ln.split("|")[1].strip(): ln for ln in old.strip().splitlines()[2:]}
    new = {ln.split("|")[1].strip(): ln for ln in table(outcomes).splitlines()[2:]}
    rows.update(new)
    order = [g.name for g in (*GROUPS, QUICK)]
    body = table([])
    body += "".join("\n" + rows[n] for n in order if n in rows)
    path.write_text(f"{head}{TABLE_START}\n{body}\n{TABLE_END}{tail}", "utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="only the quick core subset")
    parser.add_argument("--groups", help="comma-separated group names (default: all)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/residual-mutation"))
    parser.add_argument("--table", type=Path, help="update the table in this Markdown file")
    parser.add_argument("--json", type=Path, help="write the outcome (and survivors) here")
    parser.add_argument(
        "--rerun",
        type=Path,
        help="run only the survivors listed in this --json file (after writing their tests)",
    )
    args = parser.parse_args()

    by_name = {g.name: g for g in GROUPS}
    if args.quick:
        groups = [QUICK]
    elif args.groups:
        unknown = sorted(set(args.groups.split(",")) - set(by_name))
        if unknown:
            parser.error(f"unknown groups {unknown}; choose from {sorted(by_name)}")
        groups = [by_name[n] for n in args.groups.split(",")]
    else:
        groups = list(GROUPS)

    earlier: dict[str, Any] = {}
    if args.rerun:  # the mutants an earlier run did not kill (groups not in it are skipped)
        earlier = json.loads(args.rerun.read_text("utf-8"))
        groups = [g for g in groups if g.name in earlier]
        for g in groups:
            if earlier[g.name].get("source", source_hash(g)) != source_hash(g):
                parser.error(
                    f"the modules of group {g.name} changed since {args.rerun} was written, so "
                    "mutmut numbers their mutants differently: run the whole group again"
                )

    outcomes: list[Outcome] = []
    for group in groups:
        if group.name in earlier:
            before = earlier[group.name]
            names = (*before["survivors"], *before.get("equivalent_names", ()))
            if not names:
                continue
            outcome = run_group(replace(group, mutants=names), args.workdir, args.children)
            outcome.killed_before = before["killed"]
        else:
            outcome = run_group(group, args.workdir, args.children)
        outcomes.append(outcome)
        print(
            f"   {outcome.killed}/{outcome.mutants} killed, {len(outcome.equivalent)} "
            f"equivalent, {len(outcome.survivors)} survived in {outcome.seconds:.0f} s"
        )
        for name in outcome.survivors:
            print(f"   SURVIVED {name}\n" + mutant_diff(args.workdir / group.name, name))
        for name in outcome.stale:
            print(f"   STALE equivalent entry (diff changed): {name}")
    print(table(outcomes))
    if args.table:
        update_table(args.table, outcomes)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    o.group.name: {
                        "mutants": o.mutants,
                        "killed": o.killed,
                        "equivalent": len(o.equivalent),
                        "source": o.source,
                        "equivalent_names": sorted(o.equivalent),
                        "survivors": {
                            n: mutant_diff(args.workdir / o.group.name, n) for n in o.survivors
                        },
                        "seconds": round(o.seconds, 1),
                    }
                    for o in outcomes
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    failed = [o.group.name for o in outcomes if o.score < o.group.target]
    if failed:
        print(f"below target: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
