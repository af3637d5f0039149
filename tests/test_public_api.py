"""The public names that users and outside tests rely on (DESIGN.md)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import residual

PUBLIC = [
    "Bottleneck",
    "GRUGate",
    "HighwayGate",
    "IdentityShortcut",
    "LayerScale",
    "NoShortcut",
    "PooledProjectionShortcut",
    "PreActBlock",
    "ProjectionShortcut",
    "ReZero",
    "Residual",
    "ResidualBlock",
    "ResidualError",
    "ScaledAdd",
    "ZeroPadShortcut",
    "__version__",
    "apply_drop_schedule",
    "drop_path",
    "load_pretrained",
    "save_pretrained",
]


def test_top_level_names_are_pinned() -> None:
    assert residual.__all__ == PUBLIC
    for name in PUBLIC:
        assert hasattr(residual, name), name


@pytest.mark.parametrize(
    "module",
    [
        "residual.core",
        "residual.shortcuts",
        "residual.merges",
        "residual.drop",
        "residual.errors",
        "residual.hyper",
        "residual.streams",
        "residual.reversible",
        "residual.depth",
        "residual.resi_dual",
        "residual.distributed",
        "residual.blocks",
        "residual.diagnostics",
        "residual.models",
        "residual.interop",
        "residual.pretrained",
    ],
)
def test_every_public_module_has_a_sorted_all(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name)


def test_design_md_model_names() -> None:
    from residual import models

    for name in (
        "cifar_resnet",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext50_32x4d",
        "wide_resnet50_2",
        "load_torchvision",
        "TransformerEncoderLayer",
        "ResidualLSTM",
    ):
        assert name in models.__all__, name
    # a classmethod: TransformerEncoderLayer.from_torch(layer) builds an instance
    assert isinstance(
        inspect.getattr_static(models.TransformerEncoderLayer, "from_torch"), classmethod
    )


@pytest.mark.parametrize(
    "block",
    [
        lambda: residual.ResidualBlock(64, 64),
        lambda: residual.Bottleneck(64, 16),
        lambda: residual.PreActBlock(16, 32, stride=2),
    ],
    ids=["ResidualBlock", "Bottleneck", "PreActBlock"],
)
def test_blocks_are_residual_classes(block) -> None:
    built = block()
    assert isinstance(built, residual.Residual)
    assert isinstance(built, getattr(residual, type(built).__name__))


def test_the_top_level_stays_small_and_submodules_load_on_use() -> None:
    assert len(residual.__all__) <= 20
    loads = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, residual; before = 'residual.hyper' in sys.modules; "
            "fn = residual.hyper.hyper_residual; import residual.hyper as h; "
            "print(before, fn is h.hyper_residual)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(residual.__file__).parents[1],
    )
    assert loads.stdout.split() == ["False", "True"]  # not at import; `residual.hyper` on use
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        residual.nope  # noqa: B018


def test_every_submodule_loads_as_an_attribute_in_a_fresh_interpreter() -> None:
    """``import residual; residual.hyper``: nothing imported the submodules before."""
    names = sorted(residual._SUBMODULES)
    code = (
        "import sys, residual\n"
        f"for name in {names!r}:\n"
        "    sys.modules.pop('residual.' + name, None)\n"
        "    delattr(residual, name) if name in vars(residual) else None\n"
        "    module = getattr(residual, name)\n"
        "    assert module.__name__ == 'residual.' + name, module\n"
        "    assert all(hasattr(module, n) for n in module.__all__), name\n"
        "print('ok', len(" + repr(names) + "))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"ok {len(names)}"


DOCUMENTED_MODULES = [
    "residual",
    "residual.drop",
    "residual.shortcuts",
    "residual.merges",
    "residual.distributed",
    "residual.hyper",
    "residual.streams",
    "residual.reversible",
    "residual.depth",
    "residual.resi_dual",
    "residual.models",
    "residual.diagnostics",
    "residual.interop",
    "residual.blocks",
    "residual.pretrained",
]


def test_every_public_name_has_a_runnable_example() -> None:
    """House rule: every public class and function shows a ``>>>`` example in its own docstring.

    The doctests themselves run with the suite (``--doctest-modules``); this checks that none is
    missing. Constants (``__version__``, tuples, strings, dicts) have no docstring of their own.
    """
    missing = []
    for module in DOCUMENTED_MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if name == "__version__" or isinstance(obj, tuple | str | dict | frozenset):
                continue
            assert inspect.isclass(obj) or inspect.isroutine(obj), f"{module}.{name}"
            # Its own docstring: inspect.getdoc would fall back to a base class's.
            doc = inspect.getdoc(obj) if obj.__doc__ else ""
            if ">>>" not in (doc or ""):
                missing.append(f"{module}.{name}")
    assert not missing, f"public names without a >>> example in their docstring: {missing}"
