"""Type aliases shared by the package (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeAlias

from torch import nn

Layout: TypeAlias = Literal["channels_first", "channels_last"]
ModuleFactory: TypeAlias = Callable[..., nn.Module]
DropMode: TypeAlias = Literal["row", "batch", "subset"]
Stride: TypeAlias = int | tuple[int, ...]
"""A stride: one int for every spatial dim, or one per spatial dim (``(2, 1)``)."""

LAYOUTS: tuple[str, ...] = ("channels_first", "channels_last")


def check_layout(caller: str, layout: str) -> Layout:
    """Return ``layout`` if it is a known layout, else raise a ResidualError naming both."""
    from residual.errors import ResidualError

    if layout not in LAYOUTS:
        raise ResidualError(
            f"{caller}: unknown layout {layout!r}; use 'channels_first' (N, C, *spatial: conv) "
            "or 'channels_last' (..., C: MLP, RNN, Transformer)"
        )
    return layout  # type: ignore[return-value]


def check_positive_int(caller: str, name: str, value: object) -> int:
    """Return ``value`` if it is a positive int (not a bool), else raise naming it."""
    from residual.errors import ResidualError

    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{caller}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ResidualError(f"{caller}: {name} must be a positive int, got {value}")
    return value
