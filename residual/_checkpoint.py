"""Activation checkpointing of a branch, with norm statistics updated once (private).

Plain ``torch.utils.checkpoint`` re-runs the branch in backward, so a BatchNorm in training mode
updates its running statistics twice per step. Here the recomputation runs with the norms'
momentum at 0, so their statistics move exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint


class _FrozenNormStats:
    """While active, the norms of ``module`` leave their running statistics as they are.

    Their momentum is set to 0 (the update then keeps the old values exactly) and only
    ``num_batches_tracked`` is saved and put back; a norm with ``momentum=None`` (cumulative
    average) has its statistics saved and restored too. The recomputed graph is the forward's,
    as checkpointing requires. Reusable: backward may recompute more than once.
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [
            m for m in module.modules() if isinstance(m, _NormBase) and m.track_running_stats
        ]
        self.saved: list[tuple[Tensor, Tensor]] = []
        self.momenta: list[float | None] = []

    def __enter__(self) -> None:
        self.momenta = [m.momentum for m in self.norms]
        for m in self.norms:
            buffers = [m.num_batches_tracked]
            if m.momentum is None:
                buffers += [m.running_mean, m.running_var]
            self.saved += [(b, b.clone()) for b in buffers if b is not None]
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, momentum in zip(self.norms, self.momenta, strict=True):
            m.momentum = momentum
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def _contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    return contextlib.nullcontext(), _FrozenNormStats(module)


def checkpointed_call(
    fn: nn.Module, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``fn(x, *args, **kwargs)``, storing no activations: recomputed in backward.

    Non-reentrant, RNG state preserved (dropout matches), kwargs passed through.
    """
    run: Callable[..., Any] = fn
    return checkpoint(
        run,
        x,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=partial(_contexts, fn),
        **kwargs,
    )
