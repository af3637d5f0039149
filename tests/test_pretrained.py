"""Checkpoint folders: save_pretrained / load_pretrained (safetensors + config.json)."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import residual
from residual import ResidualError, load_pretrained, save_pretrained
from residual.pretrained import CONFIG_NAME, WEIGHTS_NAME

pytest.importorskip("safetensors", reason="checkpoints need the 'io' extra (safetensors)")

# builder, kwargs, input: small instances of every family the examples save.
CASES: dict[str, tuple[str, dict[str, Any], torch.Tensor]] = {
    "cifar_resnet": ("cifar_resnet", {"depth": 8, "in_channels": 1}, torch.randn(2, 1, 8, 8)),
    "ResidualMLP": (
        "ResidualMLP",
        {"in_features": 64, "num_classes": 10, "dim": 16, "depth": 2, "flatten": True},
        torch.randn(2, 1, 8, 8),
    ),
    "PatchTransformer": ("PatchTransformer", {"d_model": 16, "layers": 1}, torch.randn(2, 1, 8, 8)),
    "HyperPatchTransformer": (
        "HyperPatchTransformer",
        {"streams": 2, "d_model": 16, "layers": 1},
        torch.randn(2, 1, 8, 8),
    ),
    "RowLSTM": ("RowLSTM", {"hidden": 16, "layers": 2}, torch.randn(2, 1, 8, 8)),
    "CausalTransformerLM": (
        "CausalTransformerLM",
        {"vocab_size": 20, "d_model": 16, "nhead": 2, "num_layers": 1, "max_len": 8},
        torch.randint(0, 20, (2, 8)),
    ),
    "ResidualBlock": (
        "ResidualBlock",
        {"in_channels": 4, "out_channels": 8, "stride": 2},
        torch.randn(2, 4, 6, 6),
    ),
}


def _trained(builder: str, kwargs: dict[str, Any]) -> nn.Module:
    """A model whose weights and BatchNorm statistics differ from a fresh build's."""
    from residual.pretrained import _builders

    torch.manual_seed(1)
    model = _builders(None)[builder](**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_gives_identical_outputs(case: str, tmp_path: Path) -> None:
    builder, kwargs, x = CASES[case]
    model = _trained(builder, kwargs)
    save_pretrained(model, tmp_path / "ckpt", builder=builder, kwargs=kwargs)
    torch.manual_seed(2)  # the reloaded model must not depend on the RNG
    again = load_pretrained(tmp_path / "ckpt")
    assert type(again) is type(model)
    assert not again.training
    assert torch.equal(again(x), model(x))
    for (k, a), (k2, b) in zip(again.state_dict().items(), model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def _save_small(folder: Path) -> nn.Module:
    model = _trained("PatchTransformer", {"d_model": 16, "layers": 1})
    save_pretrained(model, folder, builder="PatchTransformer", kwargs={"d_model": 16, "layers": 1})
    return model


def test_folder_layout_modes_and_no_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"  # parents are created
    _save_small(folder)
    _save_small(folder)  # overwriting replaces both files
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name


def test_config_json_content(tmp_path: Path) -> None:
    import hashlib

    _save_small(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config == {
        "builder": "PatchTransformer",
        "format": "residual.pretrained",
        "format_version": 1,
        "kwargs": {"d_model": 16, "layers": 1},
        "residual_version": residual.__version__,
        "sha256": hashlib.sha256((tmp_path / WEIGHTS_NAME).read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
        "weights": WEIGHTS_NAME,
    }


def test_weights_are_safetensors_not_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(torch, "save", no_pickle)
    model = _save_small(tmp_path)
    again = load_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again(x), model(x))
    raw = (tmp_path / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:16]  # neither zip nor pickle
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == set(model.state_dict())


def test_user_builders(tmp_path: Path) -> None:
    class Tiny(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.block = residual.Residual(nn.Linear(width, width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    model = Tiny(4)
    save_pretrained(model, tmp_path, builder="Tiny", kwargs={"width": 4}, builders={"Tiny": Tiny})
    x = torch.randn(3, 4)
    assert torch.equal(load_pretrained(tmp_path, builders={"Tiny": Tiny})(x), model(x))
    with pytest.raises(
        ResidualError, match=r"unknown builder 'Tiny'.*builders=\{'Tiny': YourModel\}"
    ):
        load_pretrained(tmp_path)


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    _save_small(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(ResidualError, match="does not match the SHA-256 in config.json"):
        load_pretrained(tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # a truncated copy
    with pytest.raises(ResidualError, match="does not match the SHA-256"):
        load_pretrained(tmp_path)


def test_malformed_weights_with_a_matching_hash_are_refused(tmp_path: Path) -> None:
    import hashlib

    _save_small(tmp_path)
    garbage = b"not a safetensors file"
    (tmp_path / WEIGHTS_NAME).write_bytes(garbage)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["sha256"] = hashlib.sha256(garbage).hexdigest()
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ResidualError, match="model.safetensors is not readable"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file(tmp_path: Path, missing: str) -> None:
    _save_small(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing"):
        load_pretrained(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pretrained(tmp_path / "nope")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(builder="resnet9000"), "unknown builder 'resnet9000'"),
        (lambda c: c.update(builder="load_torchvision"), "unknown builder 'load_torchvision'"),
        (lambda c: c.pop("format"), "not a residual checkpoint config"),
        (lambda c: c.update(format_version=2), "format_version 2; this residual reads 1"),
        (lambda c: c.update(kwargs=[1, 2]), "'kwargs' must be a JSON object"),
        (lambda c: c["kwargs"].update(d_model=32), "do not fit PatchTransformer"),
    ],
    ids=[
        "unknown-builder",
        "not-a-builder",
        "no-format",
        "future-version",
        "kwargs-list",
        "wrong-kwargs",
    ],
)
def test_bad_config_is_named(tmp_path: Path, edit: Any, match: str) -> None:
    _save_small(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    edit(config)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ResidualError, match=match):
        load_pretrained(tmp_path)


def test_config_that_is_not_json(tmp_path: Path) -> None:
    _save_small(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{builder: ")
    with pytest.raises(ResidualError, match="config.json is not valid JSON"):
        load_pretrained(tmp_path)


def test_save_checks_the_config_builds_the_model(tmp_path: Path) -> None:
    model = _trained("PatchTransformer", {"d_model": 16, "layers": 1})
    with pytest.raises(
        ResidualError,
        match=r"PatchTransformer\(\*\*\{'d_model': 16, 'layers': 2\}\) does not build",
    ):
        save_pretrained(
            model, tmp_path, builder="PatchTransformer", kwargs={"d_model": 16, "layers": 2}
        )
    with pytest.raises(ResidualError, match="unknown builder 'PatchTransformr'"):
        save_pretrained(model, tmp_path, builder="PatchTransformr", kwargs={})
    with pytest.raises(ResidualError, match="kwargs must hold JSON values only"):
        save_pretrained(model, tmp_path, builder="PatchTransformer", kwargs={"norm": nn.LayerNorm})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_pretrained(model.state_dict(), tmp_path, builder="PatchTransformer")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing written by a refused save


def test_missing_safetensors_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r'pip install "pytorch-residual\[io\]"'):
        load_pretrained(tmp_path)


def test_a_builder_that_cannot_run_on_meta_is_checked_on_the_cpu(tmp_path: Path) -> None:
    class ReadsValues(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fn = nn.Linear(width, width)
            self.scale = nn.Parameter(torch.ones(int(self.fn.weight.abs().sum().item() > -1)))

    model = ReadsValues(3)
    save_pretrained(model, tmp_path, builder="R", kwargs={"width": 3}, builders={"R": ReadsValues})
    assert torch.equal(
        load_pretrained(tmp_path, builders={"R": ReadsValues}).fn.weight, model.fn.weight
    )
    with pytest.raises(ResidualError, match="does not build this model"):
        save_pretrained(
            model, tmp_path, builder="R", kwargs={"width": 4}, builders={"R": ReadsValues}
        )


# --- atomic overwrite: the old checkpoint loads until the new one is complete -----------------

_STEPS = ("fdopen", "fsync", "replace", "link", "open")  # the os calls a save makes


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return residual.Residual(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def _save_tiny(model: nn.Module, folder: Path) -> None:
    save_pretrained(model, folder, builder="Tiny", builders={"Tiny": lambda: _tiny(0)})


def _load_tiny(folder: Path) -> nn.Module:
    return load_pretrained(folder, builders={"Tiny": lambda: _tiny(0)})


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _count_calls(monkeypatch: pytest.MonkeyPatch, folder: Path, model: nn.Module) -> dict[str, int]:
    """How many times a successful overwrite calls each of the os functions in _STEPS."""
    counts = dict.fromkeys(_STEPS, 0)
    with monkeypatch.context() as m:
        for name in _STEPS:
            real = getattr(os, name)

            def counting(*args: Any, _name: str = name, _real: Any = real, **kw: Any) -> Any:
                counts[_name] += 1
                return _real(*args, **kw)

            m.setattr(os, name, counting)
        _save_tiny(model, folder)
    return counts


def _at_call(name: str, k: int, action: Any) -> Any:
    """``os.<name>`` that runs ``action()`` instead of its ``k``-th call."""
    real, seen = getattr(os, name), [0]

    def wrapper(*args: Any, **kw: Any) -> Any:
        seen[0] += 1
        if seen[0] == k:
            return action()
        return real(*args, **kw)

    return wrapper


def _no_space() -> None:
    raise OSError(28, "No space left on device")


def _user_files(folder: Path) -> None:
    (folder / "notes.txt").write_text("my notes")
    (folder / "logs").mkdir()
    (folder / "logs" / "train.log").write_text("step 1")


def _assert_user_files(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (folder / "logs" / "train.log").read_text() == "step 1"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_with_an_error_at_any_step_loads_the_old_or_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError (disk full, I/O error) at each os call of an overwrite, one at a time.

    The save raises and the folder loads the old checkpoint with its old values, or (a call
    whose failure is recovered, such as a hard link) it succeeds and loads the new one; no
    temporary file or folder is left, and the user's own files in the folder are untouched.
    Before: an error while writing config.json left the new weights beside the old config,
    which loads neither ("does not match the SHA-256").
    """
    old, new = _tiny(1), _tiny(2)
    counts = _count_calls(monkeypatch, tmp_path / "probe", new)
    raised = 0
    for name, calls in counts.items():
        for k in range(1, calls + 1):
            root = tmp_path / f"{name}{k}"
            folder = root / "ckpt"
            _save_tiny(old, folder)
            _user_files(folder)
            before = _listing(root)
            with monkeypatch.context() as m:
                m.setattr(os, name, _at_call(name, k, _no_space))
                try:
                    _save_tiny(new, folder)
                except OSError:
                    raised += 1
                    loaded, expected = _load_tiny(folder), old
                else:
                    loaded, expected = _load_tiny(folder), new
            assert _same_weights(loaded, expected), (name, k)
            assert _listing(root) == before, (name, k)  # nothing left over
            _assert_user_files(folder)
    assert raised >= counts["replace"] + counts["fsync"]  # every rename and fsync is essential


def test_overwrite_killed_at_any_step_loads_the_old_or_the_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed (``os._exit``: no cleanup runs) at each os call of an overwrite.

    The folder loads the old model or the new one, never neither; a later save leaves it clean.
    Before: killed after the weights were renamed in, the folder loaded neither.
    """
    old, new, later = _tiny(1), _tiny(2), _tiny(3)
    counts = _count_calls(monkeypatch, tmp_path / "probe", new)
    outcomes = set()
    for name, calls in counts.items():
        for k in range(1, calls + 1):
            folder = tmp_path / f"{name}{k}"
            _save_tiny(old, folder)
            _user_files(folder)
            pid = os.fork()
            if pid == 0:  # the child saves and dies at the k-th call
                try:
                    setattr(os, name, _at_call(name, k, lambda: os._exit(0)))
                    _save_tiny(new, folder)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
            loaded = _load_tiny(folder)
            is_old, is_new = _same_weights(loaded, old), _same_weights(loaded, new)
            assert is_old or is_new, (name, k)
            outcomes.add("new" if is_new else "old")
            _assert_user_files(folder)
            _save_tiny(later, folder)
            assert _same_weights(_load_tiny(folder), later)
            assert _listing(folder) == sorted(
                [CONFIG_NAME, WEIGHTS_NAME, "logs", "logs/train.log", "notes.txt"]
            ), (name, k)
    assert outcomes == {"old", "new"}


def test_overwrite_loads_the_new_model_and_keeps_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save_tiny(_tiny(1), folder)
    _user_files(folder)
    new = _tiny(2)
    _save_tiny(new, folder)
    assert _same_weights(_load_tiny(folder), new)
    _assert_user_files(folder)
    names = (CONFIG_NAME, WEIGHTS_NAME, "logs", "logs/train.log", "notes.txt")
    assert _listing(tmp_path) == sorted(["ckpt", *(f"ckpt/{n}" for n in names)])


def test_save_into_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is never renamed: saving into "." keeps the process where it was."""
    monkeypatch.chdir(tmp_path)
    _save_tiny(_tiny(1), Path("."))
    new = _tiny(2)
    _save_tiny(new, Path("."))
    assert Path.cwd() == tmp_path and os.path.samefile(".", tmp_path)
    assert _same_weights(_load_tiny(Path(".")), new)


def test_killed_between_the_two_renames_loads_the_new_model(tmp_path: Path) -> None:
    """The new weights are in, the config not yet: the journal's config completes the pair."""
    folder = tmp_path / "ckpt"
    old, new = _tiny(1), _tiny(2)
    _save_tiny(old, folder)
    pid = os.fork()
    if pid == 0:
        try:  # killed once the weights are renamed in, where the config would be next
            os.replace = _at_call("replace", 2, lambda: os._exit(0))
            _save_tiny(new, folder)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    import hashlib

    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["sha256"] != hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert _same_weights(_load_tiny(folder), new)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_model_comes_back_in_its_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """Before: a bfloat16 model came back in float32 ("mat1 and mat2 must have the same dtype")."""
    kwargs: dict[str, Any] = {"in_features": 16, "num_classes": 4, "dim": 8, "depth": 2}
    model = residual.models.ResidualMLP(**kwargs).to(dtype).eval()
    save_pretrained(model, tmp_path, builder="ResidualMLP", kwargs=kwargs)
    again = load_pretrained(tmp_path)
    assert {p.dtype for p in again.parameters()} == {dtype}
    x = torch.randn(3, 16, dtype=dtype)
    assert torch.equal(again(x), model(x))


def test_a_mixed_precision_model_keeps_each_dtype(tmp_path: Path) -> None:
    def build() -> nn.Module:
        return residual.Residual(nn.Linear(4, 4), post=nn.LayerNorm(4), residual_in_fp32=True)

    model = build()
    model.fn.to(torch.bfloat16)
    save_pretrained(model, tmp_path, builder="B", builders={"B": build})
    again = load_pretrained(tmp_path, builders={"B": build})
    assert {n: p.dtype for n, p in again.named_parameters()} == {
        n: p.dtype for n, p in model.named_parameters()
    }
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert torch.equal(again(x), model.eval()(x))


def test_mixed_precision_keeps_tied_weights_tied(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(4, 4), nn.Linear(4, 4)
            self.out.weight = self.inp.weight
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.out(self.inp(x).to(self.norm.weight.dtype)).float())

    model = Tied()
    model.inp.to(torch.bfloat16)
    model.out.bias.data = model.out.bias.data.bfloat16()
    save_pretrained(model, tmp_path, builder="Tied", builders={"Tied": Tied})
    again = load_pretrained(tmp_path, builders={"Tied": Tied})
    assert again.out.weight is again.inp.weight
    assert again.inp.weight.dtype == torch.bfloat16 and again.norm.weight.dtype == torch.float32
    assert torch.equal(again.inp.weight, model.inp.weight)


def test_a_load_racing_a_save_reads_a_whole_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save completes between the load's read of the config and its read of the weights.

    The weights then belong to the next config: the load reads both again rather than refuse.
    """
    folder = tmp_path / "ckpt"
    old, new = _tiny(1), _tiny(2)
    _save_tiny(old, folder)
    real = Path.read_text
    saved = []

    def read_then_save(self: Path, *args: Any, **kwargs: Any) -> str:
        text = real(self, *args, **kwargs)
        if self.name == CONFIG_NAME and not saved:
            saved.append(True)
            _save_tiny(new, folder)  # another process saves right after we read the config
        return text

    monkeypatch.setattr(Path, "read_text", read_then_save)
    assert _same_weights(_load_tiny(folder), new)
    assert saved
