"""Activation checkpointing of a branch, with norm statistics updated once (private).

Plain ``torch.utils.checkpoint`` re-runs the branch in backward, so a BatchNorm in training mode
updates its running statistics twice per step. Here the recomputation runs inside a context that
saves the running statistics before and puts them back after, so they move exactly once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    saved: list[tuple[Tensor, Tensor]] = []
    for m in module.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    saved.append((buf, buf.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    return contextlib.nullcontext(), _frozen_norm_stats(module)


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
