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

__all__ = ["ResidualError"]


class ResidualError(ValueError):
    """A wrong value given to this library: a shape, a name, a rate or a state_dict.

    Subclasses ``ValueError`` so that ``except ValueError`` keeps working.

    >>> issubclass(ResidualError, ValueError)
    True
    """
