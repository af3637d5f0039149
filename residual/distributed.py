"""Distributed training helpers: FSDP2 applied per residual block, and a drop agreement check.

DDP needs nothing from this module: ``"row"`` and ``"subset"`` stochastic depth use every
parameter on every step, and ``"batch"`` ties a skipped branch's parameters into the graph with a
zero, so ``find_unused_parameters`` stays off. A ``"batch"`` policy draws from its ``seed`` and
``step`` buffers only: ranks that hold the same buffers skip the same blocks. DDP broadcasts
rank 0's buffers when it wraps the model; under FSDP (which does not) build the model after the
same ``torch.manual_seed`` on every rank, or load the same checkpoint. Nothing is checked behind
your back: call :func:`check_drop_agreement` once after wrapping to be sure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from residual.core import Residual
from residual.drop import BatchDrop
from residual.errors import ResidualError

__all__ = ["check_drop_agreement", "shard_residual_blocks"]


def shard_residual_blocks(
    model: nn.Module,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to every outermost ``Residual`` block, then to the root.

    A residual block is the natural unit: its parameters are gathered together, used together
    and freed together. Blocks built with ``residual_in_fp32=True`` get the same policy but
    with ``cast_forward_inputs=False``, so the float32 residual stream that enters them is not
    cast down to the policy's ``param_dtype``.

    Args:
        model: the model; sharded in place and returned.
        mesh: a ``DeviceMesh``; default the whole world.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy``; default full precision.
        reshard_after_forward: free gathered parameters after each block's forward.

    Returns:
        The same model, sharded.

    Raises:
        ResidualError: the process group is not initialised, or the model holds no Residual.

    Run it on every rank, after ``torch.distributed.init_process_group`` (e.g. under
    ``torchrun``); the blocks become ``FSDPResidual`` modules with ``DTensor`` parameters.
    Without a process group it refuses:

    >>> from torch import nn
    >>> from residual import Residual
    >>> model = nn.Sequential(Residual(nn.Linear(8, 8)), Residual(nn.Linear(8, 8)))
    >>> shard_residual_blocks(model)
    Traceback (most recent call last):
        ...
    residual.errors.ResidualError: shard_residual_blocks: initialise the process group first ...
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ResidualError(
            "shard_residual_blocks: initialise the process group first "
            "(torch.distributed.init_process_group), e.g. under torchrun"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    blocks = _outermost_residuals(model)
    if not blocks:
        raise ResidualError(
            f"shard_residual_blocks: {type(model).__name__} holds no Residual block to shard"
        )
    for block in blocks:
        block_policy = policy
        if block.residual_in_fp32 and policy.cast_forward_inputs and policy.param_dtype:
            block_policy = MixedPrecisionPolicy(
                param_dtype=policy.param_dtype,
                reduce_dtype=policy.reduce_dtype,
                output_dtype=policy.output_dtype,
                cast_forward_inputs=False,
            )
            # The stream stays float32 on the shortcut; the branch computes in param_dtype.
            block.fn.register_forward_pre_hook(_CastInputs(policy.param_dtype))
        fully_shard(
            block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard_after_forward
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def check_drop_agreement(model: nn.Module) -> None:
    """Raise on every rank if the ranks' batch-mode drop policies would skip different blocks.

    One ``all_gather_object`` of every ``BatchDrop``'s ``(seed, step)``; call it once after the
    model is wrapped (not inside the training step). Without an initialised process group, or on
    one rank, it returns at once.

    >>> from torch import nn
    >>> from residual import Residual
    >>> check_drop_agreement(Residual(nn.Linear(4, 4), drop_path=0.1, drop_mode="batch"))
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = [
        (name, int(m.seed), int(m.step))
        for name, m in model.named_modules()
        if isinstance(m, BatchDrop)
    ]
    every: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if any(other != mine for other in every):
        raise ResidualError(
            "check_drop_agreement: the ranks' drop_mode='batch' policies differ (seed, step), so "
            "they would skip different blocks; build the model after the same "
            "torch.manual_seed(seed) on every rank, or load the same checkpoint (DDP broadcasts "
            f"rank 0's buffers when it wraps the model). Per rank: {every}"
        )


class _CastInputs:
    """Forward pre-hook: cast a module's floating-point tensor arguments to ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )


def _outermost_residuals(model: nn.Module) -> list[Residual]:
    found: list[Residual] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, Residual):
                found.append(child)
            else:
                visit(child)

    if isinstance(model, Residual):
        return [model]
    visit(model)
    return found
