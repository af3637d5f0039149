"""The public names that users and outside tests rely on (DESIGN.md)."""

from __future__ import annotations

import importlib

import pytest

import residual

PUBLIC = [
    "Add",
    "Bottleneck",
    "GRUGate",
    "HighwayGate",
    "IdentityShortcut",
    "LayerScale",
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
    "deepnorm_scales",
    "drop_path",
    "linear_drop_rates",
    "resolve_shortcut",
    "set_drop_seed",
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
        "residual.blocks",
    ],
)
def test_every_public_module_has_a_sorted_all(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name)


def test_block_is_a_residual() -> None:
    assert isinstance(residual.ResidualBlock(64, 64), residual.Residual)
