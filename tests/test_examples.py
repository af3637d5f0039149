"""The examples run (tiny settings): they are the first thing a new user executes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytest.importorskip("sklearn", reason="examples need the 'examples' extra (scikit-learn)")
pytest.importorskip("tqdm", reason="examples need the 'examples' extra (tqdm)")
pytest.importorskip("safetensors", reason="examples need the 'examples' extra (safetensors)")

EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.py") if p.stem != "reproducible")
RESULT_KEYS = ["example", "command", "threads", "seed", "torch", "metrics"]


def run_example(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_results(path: Path, example: str, metrics: set[str]) -> dict[str, float]:
    """The flat results schema of examples/reproducible.py; returns the metrics."""
    results = json.loads(path.read_text())
    assert list(results) == RESULT_KEYS
    assert results["example"] == example
    assert results["command"].split()[:2] in (
        ["python", f"examples/{example}.py"],
        ["torchrun", "--nproc_per_node=2"],
    )
    assert results["threads"] == 1 and results["seed"] == 0
    assert results["torch"] == torch.__version__
    assert set(results["metrics"]) == metrics
    assert all(isinstance(v, int | float) for v in results["metrics"].values())
    return results["metrics"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("example", EXAMPLES)
def test_help_shows_the_whole_docstring(example: str) -> None:
    import importlib

    doc = importlib.import_module(example).__doc__
    out = run_example(str(ROOT / "examples" / f"{example}.py"), "--help").stdout
    for line in doc.strip().splitlines():  # as written: nothing cut, nothing re-wrapped
        assert line.rstrip() in out, line


def test_quickstart_prints_the_shapes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import quickstart

    quickstart.main(tmp_path / "q")
    out = capsys.readouterr().out
    assert "input (8, 64, 32, 32) -> output (8, 64, 32, 32)" in out
    for title in ("conv:", "MLP:", "LSTM:", "attention:"):
        assert title in out
    assert out.count("Total params") == 4
    assert "reloaded it: identical outputs = True" in out
    assert "None" not in out  # print(model) and the summaries list no unset parts


@pytest.mark.parametrize("model", ["resnet", "preact", "lstm", "transformer", "mixer", "mlp"])
def test_train_digits_one_epoch_reloads_without_the_script(model: str, tmp_path: Path) -> None:
    import train_digits

    import residual

    out = tmp_path / model
    acc, _ = train_digits.train(model, epochs=1, out=out, progress=False, summary=False)
    reloaded = residual.load_pretrained(out)  # no class from the script is needed
    # the checkpoint is the trained model: it scores what training reported on the test split
    _, _, x_test, y_test = train_digits.load_data(0)
    assert train_digits.accuracy(reloaded, x_test, y_test) == acc
    assert "None" not in repr(reloaded)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_train_digits_writes_its_results_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    script = str(ROOT / "examples" / "train_digits.py")
    args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "ck")]
    first = run_example(script, *args, "--json", str(path), cwd=tmp_path)
    assert "test accuracy" in first.stdout
    metrics = check_results(
        path, "train_digits", {"test_accuracy", "parameters", "epochs", "train_seconds"}
    )
    assert metrics["epochs"] == 1 and metrics["parameters"] == 405_770
    again = tmp_path / "again.json"
    run_example(script, *args, "--json", str(again), cwd=tmp_path)
    assert json.loads(again.read_text())["metrics"]["test_accuracy"] == metrics["test_accuracy"]


def test_char_lm_runs(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    script = str(ROOT / "examples" / "char_lm.py")
    result = run_example(
        script, "--steps", "3", "--no-progress", "--model", "lstm", "--json", str(path)
    )
    assert "bits/char (unigram baseline" in result.stdout
    assert "sample:" in result.stdout
    metrics = check_results(
        path,
        "char_lm",
        {
            "val_bits_per_char",
            "unigram_bits_per_char",
            "steps",
            "characters",
            "vocab_size",
            "train_seconds",
        },
    )
    assert metrics["steps"] == 3 and metrics["val_bits_per_char"] > 0


def test_ddp_digits_runs_under_torchrun(tmp_path: Path) -> None:
    import residual

    out = tmp_path / "ddp"
    path = tmp_path / "r.json"
    result = run_example(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        str(ROOT / "examples" / "ddp_digits.py"),
        "--epochs",
        "1",
        "--out",
        str(out),
        "--json",
        str(path),
        cwd=tmp_path,
    )
    assert "on 2 processes: test accuracy" in result.stdout
    metrics = check_results(
        path, "ddp_digits", {"test_accuracy", "processes", "train_seconds", "ms_per_step"}
    )
    assert metrics["processes"] == 2
    model = residual.load_pretrained(out)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_hyper_digits_runs(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    script = str(ROOT / "examples" / "hyper_digits.py")
    run_example(
        script, "--epochs", "1", "--streams", "1", "2", "--no-progress", "--json", str(path)
    )
    metrics = check_results(
        path,
        "hyper_digits",
        {
            f"streams_{n}_{m}"
            for n in (1, 2)
            for m in ("test_accuracy", "parameters", "train_seconds")
        },
    )
    assert metrics["streams_1_parameters"] == 104_494


def test_committed_results_files_follow_the_schema() -> None:
    """examples/results/*.json: what the README's and the docs' tables are generated from."""
    files = sorted((ROOT / "examples" / "results").glob("*.json"))
    assert files
    for path in files:
        results = json.loads(path.read_text())
        assert list(results) == RESULT_KEYS, path.name
        assert results["threads"] == 1, path.name
        assert path.stem.startswith(results["example"]), path.name
        assert "--json" not in results["command"], (
            path.name
        )  # the default file, as the README runs it
