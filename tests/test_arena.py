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


def test_arena_merges_variants_into_an_earlier_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import arena

    out = tmp_path / "arena.json"
    tiny = ["--quick", "--d-model", "16", "--layers", "1", "--context", "16"]
    tiny += ["--char-steps", "10", "--digits-steps", "10"]
    arena.main([*tiny, "--variants", "pre-norm,post-norm", "--json", str(out)])
    first = json.loads(out.read_text())
    arena.main([*tiny, "--variants", "pre-norm,layerscale", "--merge-into", str(out)])
    merged = json.loads(out.read_text())
    for task, res in merged["tasks"].items():
        assert set(res["variants"]) == {*first["tasks"][task]["variants"], "layerscale"}
        assert res["best"] == first["tasks"][task]["best"]
    (entry,) = merged["added"]
    assert entry["variants"] == ["layerscale"]
    assert "--merge-into" in entry["command"]
    for task, pre_norm in entry["pre-norm"].items():  # seeded: the baseline trains the same
        assert pre_norm["then"] == pre_norm["now"], task
    wrong = [*tiny[:-1], "11", "--variants", "pre-norm,rezero", "--merge-into", str(out)]
    try:
        arena.main(wrong)
    except SystemExit as refused:
        assert "use the same configuration" in str(refused)
    else:
        raise AssertionError("a run of another configuration was merged")
    assert json.loads(out.read_text()) == merged


def test_arena_refuses_a_merge_that_would_change_the_best(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    import arena

    saved = {
        "config": {"seeds": 1},
        "tasks": {"char": {"metric": "bpc", "best": "a", "variants": {"a": {"mean": {"bpc": 2}}}}},
    }
    path = tmp_path / "arena.json"
    path.write_text(json.dumps(saved))
    result = {"config": {"seeds": 1}, "tasks": {"char": {"variants": {"b": {"mean": {"bpc": 1}}}}}}
    try:
        arena.merge_into(path, result, ["b"])
    except SystemExit as refused:
        assert str(refused) == (
            "--merge-into: b would beat a on char, whose stochastic depth row was trained on "
            "it; run every variant again instead"
        )
    else:
        raise AssertionError("a merge that changes the best went through")
