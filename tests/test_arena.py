"""The arena's quick mode on a tiny configuration: every variant builds, trains and reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_arena_quick_trains_every_variant(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import arena

    out = tmp_path / "arena.json"
    argv = ["--quick", "--d-model", "16", "--layers", "1", "--context", "16"]
    argv += ["--char-steps", "15", "--digits-steps", "15", "--json", str(out)]
    arena.main(argv)
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"char", "digits"}
    built, skipped = arena.available(list(arena.VARIANTS))
    assert set(result["skipped"]) == set(skipped)
    for name, res in result["tasks"].items():
        metric = res["metric"]
        expected = {*built, f"stochastic-depth:{res['best']}"}
        assert set(res["variants"]) == expected, name
        assert res["best"] == min(built, key=lambda n: res["variants"][n]["mean"][metric])
        for variant, v in res["variants"].items():
            assert v["params"] > 0 and v["ratio"] > 0 and v["step_ms"] > 0, variant
            (run,) = v["runs"]
            assert run["finite"], variant
            assert math.isfinite(run["final"][metric]), variant
            assert run["final"][metric] < run["initial"][metric], (name, variant, run)
            (step0, first), (last, end) = run["curve"][0], run["curve"][-1]
            assert (step0, last) == (0, 15) and end < first, (name, variant, run["curve"])
            assert v["mean"][metric] == run["final"][metric] and v["std"][metric] == 0.0
