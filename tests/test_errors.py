"""The shared argument checks, message by message: every public entry point raises through them."""

from __future__ import annotations

import re

import pytest
from torch import nn

from residual import Residual
from residual._types import check_layout, check_positive_int
from residual.errors import ResidualError, check_module


class UserBlock(nn.Module):
    """A module class outside torch.nn: its message shows the plain class name."""


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_a_module_instance_passes_and_the_check_returns_nothing() -> None:
    assert check_module("Residual", "fn", nn.Linear(2, 2)) is None


def test_a_callable_that_is_not_a_module_gets_the_wrapping_hint() -> None:
    with pytest.raises(TypeError, match=exactly(
        "Residual: fn must be a torch.nn.Module, got builtin_function_or_method; wrap a "
        "function in an nn.Module (lambdas cannot be pickled)"
    )):  # fmt: skip
        check_module("Residual", "fn", len)


def test_a_value_that_is_not_callable_gets_no_hint() -> None:
    with pytest.raises(TypeError, match=exactly("Block: post must be a torch.nn.Module, got int")):
        check_module("Block", "post", 3)


def test_a_torch_class_as_fn_shows_the_call_with_an_instance() -> None:
    with pytest.raises(TypeError, match=exactly(
        "Residual: fn must be a module instance, got the class nn.Linear; create one first: "
        "Residual(nn.Linear(...))"
    )):  # fmt: skip
        check_module("Residual", "fn", nn.Linear)


def test_a_class_for_another_argument_shows_it_as_a_keyword() -> None:
    with pytest.raises(TypeError, match=exactly(
        "Residual: post must be a module instance, got the class nn.ReLU; create one first: "
        "Residual(..., post=nn.ReLU(...))"
    )):  # fmt: skip
        check_module("Residual", "post", nn.ReLU)


def test_a_user_class_is_named_without_the_nn_prefix() -> None:
    with pytest.raises(TypeError, match=exactly(
        "Residual: fn must be a module instance, got the class UserBlock; create one first: "
        "Residual(UserBlock(...))"
    )):  # fmt: skip
        Residual(UserBlock)  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_a_known_layout_is_returned(layout: str) -> None:
    assert check_layout("Caller", layout) == layout


def test_an_unknown_layout_names_both_layouts_and_their_use() -> None:
    with pytest.raises(ResidualError, match=exactly(
        "Caller: unknown layout 'nhwc'; use 'channels_first' (N, C, *spatial: conv) or "
        "'channels_last' (..., C: MLP, RNN, Transformer)"
    )):  # fmt: skip
        check_layout("Caller", "nhwc")


@pytest.mark.parametrize("value", [1, 7])
def test_a_positive_int_is_returned(value: int) -> None:
    assert check_positive_int("Caller", "dim", value) == value


@pytest.mark.parametrize(
    ("value", "shown"),
    [(True, "bool True"), (2.0, "float 2.0"), ("3", "str '3'"), (None, "NoneType None")],
)
def test_a_non_int_is_a_type_error_naming_the_type_and_value(value: object, shown: str) -> None:
    with pytest.raises(TypeError, match=exactly(f"Caller: dim must be an int, got {shown}")):
        check_positive_int("Caller", "dim", value)


@pytest.mark.parametrize("value", [0, -1])
def test_zero_and_negatives_are_value_errors(value: int) -> None:
    with pytest.raises(
        ResidualError, match=exactly(f"Caller: dim must be a positive int, got {value}")
    ):
        check_positive_int("Caller", "dim", value)
