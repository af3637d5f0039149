"""Activation checkpointing of a branch, with norm statistics updated once (private).

Plain ``torch.utils.checkpoint`` re-runs the branch in backward, so a BatchNorm in training mode
updates its running statistics twice per step. Here the recomputation runs inside a context that
saves the running statistics before and puts them back after, so they move exactly once.
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
    """Puts the running statistics of ``module``'s norms back as they were on entry.

    Reusable: backward may recompute more than once (``retain_graph``, gradcheck).
    """

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [
            buf
            for m in module.modules()
            if isinstance(m, _NormBase) and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        self.saved: list[Tensor] = []

    def __enter__(self) -> None:
        self.saved = [buf.clone() for buf in self.buffers]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, value in zip(self.buffers, self.saved, strict=True):
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
