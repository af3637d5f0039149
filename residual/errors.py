"""The one exception family of the library.

Every mistake a user can make raises either :class:`ResidualError` (a ``ValueError``: the value
is wrong) or a plain ``TypeError`` (the type is wrong). Messages name the call, what was received,
what was expected and the fix.

>>> from residual import Residual, ResidualError
>>> try:
...     Residual(None)  # type: ignore[arg-type]
... except TypeError as e:
...     print(str(e).split(";")[0])
Residual: fn must be a torch.nn.Module, got NoneType
"""

from __future__ import annotations

__all__ = ["ResidualError", "check_module"]


class ResidualError(ValueError):
    """A wrong value given to this library: a shape, a name, a rate or a state_dict.

    Subclasses ``ValueError`` so that ``except ValueError`` keeps working.

    >>> issubclass(ResidualError, ValueError)
    True
    """


def check_module(caller: str, name: str, value: object) -> None:
    """Raise a TypeError naming the argument unless ``value`` is an ``nn.Module`` instance.

    A module class given where an instance belongs (``Residual(nn.Linear)``) gets a message
    that shows the call with an instance.

    >>> check_module("Residual", "fn", len)
    Traceback (most recent call last):
    TypeError: Residual: fn must be a torch.nn.Module, got builtin_function_or_method; wrap a function in an nn.Module (lambdas cannot be pickled)
    >>> from torch import nn
    >>> check_module("Residual", "fn", nn.Linear)
    Traceback (most recent call last):
    TypeError: Residual: fn must be a module instance, got the class nn.Linear; create one first: Residual(nn.Linear(...))
    """  # noqa: E501
    from torch import nn

    if isinstance(value, type) and issubclass(value, nn.Module):
        cls = _class_name(value)
        call = f"{cls}(...)" if name == "fn" else f"..., {name}={cls}(...)"
        raise TypeError(
            f"{caller}: {name} must be a module instance, got the class {cls}; create one "
            f"first: {caller}({call})"
        )
    if not isinstance(value, nn.Module):
        hint = "; wrap a function in an nn.Module (lambdas cannot be pickled)" * callable(value)
        raise TypeError(
            f"{caller}: {name} must be a torch.nn.Module, got {type(value).__name__}{hint}"
        )


def _class_name(cls: type) -> str:
    """``nn.Linear`` for torch's layers, the plain class name otherwise."""
    if cls.__module__.startswith("torch.nn.modules."):
        return f"nn.{cls.__name__}"
    return cls.__name__
