"""The examples run (tiny settings): they are the first thing a new user executes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytest.importorskip("sklearn", reason="examples need the 'examples' extra (scikit-learn)")
pytest.importorskip("tqdm", reason="examples need the 'examples' extra (tqdm)")


def test_quickstart_prints_the_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    import quickstart

    quickstart.main()
    out = capsys.readouterr().out
    assert "input (8, 64, 32, 32) -> output (8, 64, 32, 32)" in out
    for title in ("conv:", "MLP:", "LSTM:", "attention:"):
        assert title in out
    assert out.count("Total params") == 4


@pytest.mark.parametrize("model", ["resnet", "preact", "lstm", "transformer", "mixer", "mlp"])
def test_train_digits_one_epoch(model: str, tmp_path: Path) -> None:
    import train_digits

    out = tmp_path / f"{model}.pt"
    acc, _ = train_digits.train(model, epochs=1, out=out, progress=False, summary=False)
    state = torch.load(out, weights_only=True)
    fresh = train_digits.SETTINGS[model][0]()
    fresh.load_state_dict(state)
    # the checkpoint is the trained model: it scores what training reported on the test split
    _, _, x_test, y_test = train_digits.load_data(0)
    assert train_digits.accuracy(fresh, x_test, y_test) == acc
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_char_lm_runs() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "char_lm.py"),
            "--steps",
            "3",
            "--no-progress",
            "--model",
            "lstm",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "bits/char (unigram baseline" in result.stdout
    assert "sample:" in result.stdout


def test_ddp_digits_runs_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "ddp_digits.py"),
            "--epochs",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 processes: test accuracy" in result.stdout
    assert out.exists()


def test_hyper_digits_runs() -> None:
    import hyper_digits

    for streams in (1, 4):
        model = hyper_digits.HyperPatchTransformer(streams)
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
