"""The small checks and conversions around a branch call, as FX leaf functions (private).

``torch.fx.symbolic_trace`` records each of these as one ``call_function`` node instead of
tracing into it, so the checks that look at types and shapes run on real tensors when the traced
graph runs, and Python control flow on shapes never meets a ``Proxy``. Eager and
``torch.compile`` simply call them. Other modules call them through the module
(``_branch.check_main_input(x)``): FX patches this module's globals, so a name imported with
``from residual._branch import ...`` would be traced into.

Under ``torch.jit.trace`` a shape reads as traced values, and a check's ``if`` on them would
warn (``TracerWarning``: the comparison is not recorded). A check is meant to run on the example
and not be recorded, so the checks run inside :func:`shape_checks`, which silences exactly that
warning while a trace is running.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from residual.errors import ResidualError

# Public torch.jit names that torch.jit's __all__ leaves out (so mypy calls them private).
_is_tracing: Callable[[], bool] = torch.jit.is_tracing  # type: ignore[attr-defined]
_TracerWarning: type[Warning] = torch.jit.TracerWarning  # type: ignore[attr-defined]


@contextlib.contextmanager
def _no_tracer_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _TracerWarning)
        yield


def shape_checks() -> contextlib.AbstractContextManager[None]:
    """Where an input check reads shapes: quiet under ``torch.jit.trace``, a no-op elsewhere.

    The check still runs (and raises) on the example input; only the warning that its result
    is not recorded in the traced graph is dropped, since not recording it is the intent.
    """
    return _no_tracer_warnings() if _is_tracing() else _NOT_TRACING


_NOT_TRACING = contextlib.nullcontext()  # reusable: eager pays no allocation per check


def check_main_input(x: Any) -> Tensor:
    """Return ``x``; raise unless it is a floating point (or complex) tensor: the residual stream.

    Checks return their input so that, as FX nodes, they carry the tensor on (a node picked as a
    feature-extraction output holds a tensor, not None).
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"Residual: the first argument must be the main tensor, got {type(x).__name__}; "
            "call block(x, *args, **kwargs)"
        )
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(
            f"Residual: the main tensor must be floating point, got {x.dtype}; convert it "
            "(x.float()) or embed token ids first (nn.Embedding) and wrap what follows"
        )
    return x


def check_no_extra_args(args: Any, kwargs: Any) -> None:
    """Raise if a block traced on its own (``torch.fx.symbolic_trace(block)``) gets extra args.

    Such a trace sees ``*args`` and ``**kwargs`` as one opaque value each and records the branch
    called with the main tensor alone; this check, recorded in its place, keeps the traced block
    from silently dropping masks or states passed to it later.
    """
    if args or kwargs:
        raise TypeError(
            "Residual: this block was traced with torch.fx.symbolic_trace on its own, which "
            "records the branch called with the main tensor only, but it got "
            f"{len(args)} extra positional and {len(kwargs)} keyword argument(s); trace a "
            "module that passes them to the block instead"
        )


def branch_head(out: Any, branch: str) -> Tensor:
    """The tensor a branch output contributes: itself, or the first element of its tuple."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        return out[0]
    got = type(out).__name__ if not isinstance(out, tuple) else "a tuple not led by a tensor"
    raise TypeError(
        f"Residual: branch {branch} returned {got}; it must return a tensor, or a tuple whose "
        "first element is the tensor to add (the rest is passed through)"
    )


def with_rest(y: Tensor, out: Any) -> Any:
    """``y`` in place of the branch output's head: ``y``, or ``(y, *out[1:])`` for a tuple."""
    return y if isinstance(out, Tensor) else (y, *out[1:])


def replace_head(out: Any, head: Tensor) -> Any:
    """The branch output with its head replaced (the tensor, or the tuple's first element)."""
    return head if isinstance(out, Tensor) else (head, *out[1:])


def promote_fp32(t: Tensor) -> Tensor:
    """At least float32: half types go up, float64 and complex stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def post_in_fp32(post: torch.nn.Module, y: Tensor) -> Tensor:
    """``post(y)`` for ``residual_in_fp32``: in the dtype of post's first floating point
    parameter (a bfloat16 norm gets bfloat16), returned at least float32. Traced through."""
    for p in post.parameters():
        if p.is_floating_point():
            y = y.to(p.dtype)
            break
    return promote_fp32(post(y))


def check_same_shape(branch: Tensor, shortcut: Tensor, shortcut_name: str, layout: str) -> Tensor:
    """Return ``branch``; raise a ResidualError naming both shapes unless the shapes match."""
    if _is_tracing():  # the per-block hot path stays free of a context manager
        with _no_tracer_warnings():
            same = branch.shape == shortcut.shape
    else:
        same = branch.shape == shortcut.shape
    if not same:
        raise ResidualError(
            f"Residual: branch output {tuple(branch.shape)} does not match shortcut output "
            f"{tuple(shortcut.shape)} ({shortcut_name}); {mismatch_hint(branch, shortcut, layout)}"
        )
    return branch


def _stride_between(sizes: list[tuple[int, int]]) -> int | None:
    """The smallest s with ceil(h / s) == h' for every (h, h'), as a stride-s shortcut gives."""
    for s in range(1, max(h for h, _ in sizes) + 1):
        if all(-(-h // s) == h2 for h, h2 in sizes):
            return s
    return None


def mismatch_hint(branch: Tensor, shortcut: Tensor, layout: str) -> str:
    """A fix that works for the mismatch, or the honest advice when no shortcut can fix it.

    ``layout`` is the shortcut's, or "" when it declares none: then a channel-first reading is
    tried first for tensors of rank 3 and more, and the channel-last one after it.
    """
    b, s = branch.shape, shortcut.shape
    if len(b) != len(s):
        return "the branch must keep the input's rank; check the layout and any reshape in fn"
    if b[0] != s[0]:
        return "the branch changed the batch size; a residual block must keep it"
    tries = [layout] if layout else ["channels_first", "channels_last"][len(b) < 3 :]
    hints = [_hint_for(b, s, t) for t in tries]
    fixes = [h for fix, h in hints if fix]
    if fixes:
        return fixes[0]
    if len(hints) == 1 or hints[0][1] == hints[1][1]:
        return hints[0][1]
    return f"read channel-first: {hints[0][1]}; read channel-last: {hints[1][1]}"


def _hint_for(b: torch.Size, s: torch.Size, layout: str) -> tuple[bool, str]:
    axis = 1 if layout == "channels_first" else len(b) - 1
    other = [i for i in range(1, len(b)) if i != axis]
    if any(b[i] > s[i] for i in other):
        return False, (
            "the branch enlarges a spatial dim (upsampling); no strided shortcut matches it: "
            "pass a shortcut module that upsamples the input the same way"
        )
    stride: int | tuple[int | None, ...] | None = 1
    if other:  # one stride for every dim if one fits, else one per dim (stride=(2, 1))
        stride = _stride_between([(s[i], b[i]) for i in other])
        if stride is None:
            stride = tuple(_stride_between([(s[i], b[i])]) for i in other)
            stride = None if None in stride else stride
    if stride is None:
        return False, (
            "the branch's non-channel sizes are not ceil(size / stride) of the input's (an "
            "unpadded conv, or sequence positions dropped?); keep the sizes in the branch (pad its "
            "convs), or pass a shortcut module that changes them the same way"
        )
    c_in, c_out = s[axis], b[axis]
    dims = f", spatial_dims={len(other)}" if layout == "channels_first" and len(other) != 2 else ""
    fix = f"ProjectionShortcut({c_in}, {c_out}, stride={stride}, layout={layout!r}{dims})"
    if c_out >= c_in:
        pad = f"ZeroPadShortcut({c_in}, {c_out}, stride={stride}, layout={layout!r})"
        return True, (
            f'use a "projection" shortcut, shortcut={fix}, or a "zero_pad" one (no '
            f"parameters), shortcut={pad}"
        )
    return True, f'use a "projection" shortcut to reduce channels: shortcut={fix}'


for _name in (
    "check_main_input",
    "check_no_extra_args",
    "branch_head",
    "with_rest",
    "replace_head",
    "promote_fp32",
    "check_same_shape",
):
    torch.fx.wrap(_name)
