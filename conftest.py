"""Root pytest configuration: the doctests in ``residual/`` that need an optional extra."""

from __future__ import annotations

import importlib

import pytest

# Doctest item name -> the optional module it needs (and the extra that installs it).
_NEEDS = {
    "residual.diagnostics.plot_gradient_flow": ("matplotlib", "examples"),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        need = _NEEDS.get(item.name)
        if need is not None and not _importable(need[0]):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs {need[0]}: pip install 'pytorch-residual[{need[1]}]'"
                )
            )
