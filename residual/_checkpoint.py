"""Calling a branch, with activation checkpointing that updates norm statistics once (private).

Plain ``torch.utils.checkpoint`` re-runs the branch in backward, so a BatchNorm in training mode
would update its running statistics twice per step. Here the recomputation runs under
:class:`FrozenNormStats`, a thread-local torch function mode that hands the norms copies of
their running statistics to update (they normalise with the batch's, as in the forward: the
same ops, the same saved tensors) and skips their ``num_batches_tracked`` increment. No module
attribute or buffer is touched, so another thread or another use of the same module sees
nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

_SIGNATURES = {f: inspect.signature(f) for f in (F.batch_norm, F.instance_norm)}


class FrozenNormStats(TorchFunctionMode):
    """While active (this thread only), the norms of ``module`` leave their statistics alone.

    In training mode their functional call updates copies of ``running_mean`` and
    ``running_var`` (the output, normalised with batch statistics, is the forward's), and the
    increment of their ``num_batches_tracked`` counter is skipped.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.counters = {
            id(c)
            for m in module.modules()
            if isinstance(c := getattr(m, "num_batches_tracked", None), Tensor)
        }

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _SIGNATURES:
            call = _SIGNATURES[func].bind(*args, **kwargs)
            call.apply_defaults()
            given = call.arguments
            if given.get("training", given.get("use_input_stats")):  # updates the statistics
                for name in ("running_mean", "running_var"):  # into throwaway copies
                    if isinstance(given[name], Tensor):
                        given[name] = given[name].clone()
            return func(*call.args, **call.kwargs)
        if func is Tensor.add_ and args and id(args[0]) in self.counters:
            return args[0]
        return func(*args, **kwargs)


def _contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[Any]]:
    return contextlib.nullcontext(), FrozenNormStats(module)


def checkpointed_call(
    fn: nn.Module, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``fn(x, *args, **kwargs)``, storing no activations: recomputed in backward.

    Non-reentrant, RNG state preserved (dropout matches). The branch's kwargs are bound before
    the call, so none of them can be taken by ``torch.utils.checkpoint`` itself (a branch kwarg
    named ``use_reentrant`` or ``context_fn`` reaches the branch).
    """
    return checkpoint(
        partial(fn, **kwargs) if kwargs else fn,
        x,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=partial(_contexts, fn),
    )


def call_branch(
    fn: nn.Module, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], ckpt: bool
) -> Any:
    """``fn(x, *args, **kwargs)``; checkpointed when ``ckpt`` and autograd is recording."""
    if ckpt and torch.is_grad_enabled():
        return checkpointed_call(fn, x, args, kwargs)
    return fn(x, *args, **kwargs)
