"""Calling a branch, with activation checkpointing that updates norm statistics once (private).

Plain ``torch.utils.checkpoint`` re-runs the branch in backward, so a BatchNorm in training mode
would update its running statistics twice per step. In eager the recomputation runs under
:class:`FrozenNormStats`, a thread-local torch function mode that hands the norms copies of
their running statistics to update (they normalise with the batch's, as in the forward: the
same ops, the same saved tensors) and skips their ``num_batches_tracked`` increment. No module
attribute or buffer is touched, so another thread or another use of the same module sees
nothing.

Under ``torch.compile`` (and ``torch.export``) the branch goes through torch's own
``checkpoint(use_reentrant=False)``, which Dynamo turns into one region that AOTAutograd
recomputes (inductor, aot_eager: the norm statistics and the random draws of the forward are
kept, so they move once and dropout matches). Two things of that path are mended here, for
Dynamo's ``backend="eager"``, which runs the region with eager checkpointing:

* The norms update copies of their statistics inside the region and the copies are written
  back once, after it: the region's inputs are never modified in place (torch saves them for
  the recomputation and would refuse the backward), and the recomputation moves nothing.
* torch runs that region with ``preserve_rng_state=False``; the contexts given here replay the
  forward's generator states in the recomputation, so dropout draws the same mask.

Under ``torch.func.grad`` / ``vjp`` / ``jacrev`` (which allow no saved-tensor hooks, the
mechanism of non-reentrant checkpointing) the branch is called plainly: same numbers, the
activations stored.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import partial
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

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


class _RngStates:
    """The CPU and (when initialised) CUDA generator states, taken when entered."""

    def __init__(self) -> None:
        self.cpu: Tensor | None = None
        self.cuda: list[Tensor] | None = None

    def take(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def put(self) -> None:
        if self.cpu is not None:
            torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)

    def __enter__(self) -> None:
        self.take()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        return None


class _ReplayRng:
    """While entered, the generators are where ``forward`` found them; restored on exit."""

    def __init__(self, forward: _RngStates) -> None:
        self.forward, self.outside = forward, _RngStates()

    def __enter__(self) -> None:
        self.outside.take()
        self.forward.put()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.outside.put()


def _recompute(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _traced_contexts() -> tuple[Any, Any]:
    """The contexts of a checkpointed region that Dynamo captured.

    Called by torch at AOTAutograd's trace (``torch.compiler.is_compiling()``), where it wants
    dispatch modes: those of plain recomputation, what torch uses without a ``context_fn``.
    Called at run time under ``backend="eager"``, where torch recomputes the region eagerly
    without restoring the generators: record them in the forward and replay them.
    """
    if torch.compiler.is_compiling():
        return create_selective_checkpoint_contexts(_recompute)
    states = _RngStates()
    return states, _ReplayRng(states)


def _norm_statistics(fn: nn.Module) -> list[tuple[str, Tensor]]:
    """The buffers of the norms in ``fn`` that count batches (BatchNorm, InstanceNorm)."""
    found = []
    for prefix, m in fn.named_modules():
        if isinstance(getattr(m, "num_batches_tracked", None), Tensor):
            for name, b in m.named_buffers(prefix=prefix, recurse=False):
                found.append((name, b))
    return found


def _traced_checkpoint(
    fn: nn.Module, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The checkpointed call that Dynamo captures as one recomputed region.

    The norms update copies of their statistics, passed into the region as copies (its inputs
    are saved for the recomputation, which must find them unmodified) and written back once.
    """
    stats = _norm_statistics(fn)
    if not stats:
        return checkpoint(
            partial(fn, **kwargs) if kwargs else fn,
            x,
            *args,
            use_reentrant=False,
            context_fn=_traced_contexts,
        )
    names = [name for name, _ in stats]

    def region(x: Tensor, *inputs: Any) -> tuple[Any, tuple[Tensor, ...]]:
        *rest, frozen = inputs
        moving = {name: t.clone() for name, t in zip(names, frozen, strict=True)}
        out = functional_call(fn, moving, (x, *rest), kwargs, strict=False)
        return out, tuple(moving.values())

    out, moved = checkpoint(
        region,
        x,
        *args,
        tuple(b.clone() for _, b in stats),
        use_reentrant=False,
        context_fn=_traced_contexts,
    )
    with torch.no_grad():
        for (_, b), new in zip(stats, moved, strict=True):
            b.copy_(new)
    return out


def _saved_tensor_hooks_allowed() -> bool:
    """False under ``torch.func.grad`` / ``vjp`` / ``jacrev``, which disable them."""
    try:
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            return True
    except RuntimeError:
        return False


def _same(t: Any) -> Any:
    return t


def checkpointed_call(
    fn: nn.Module, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``fn(x, *args, **kwargs)``, storing no activations: recomputed in backward.

    Non-reentrant, RNG state preserved (dropout matches). The branch's kwargs are bound before
    the call, so none of them can be taken by ``torch.utils.checkpoint`` itself (a branch kwarg
    named ``use_reentrant`` or ``context_fn`` reaches the branch).
    """
    if torch.compiler.is_compiling():
        return _traced_checkpoint(fn, x, args, kwargs)
    if not _saved_tensor_hooks_allowed():
        return fn(x, *args, **kwargs)
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
