"""Stochastic depth: the random draws and rate schedules behind ``Residual(drop_path=...)``.

Three modes (``Residual(fn, drop_path=p, drop_mode=...)``), all rescaled by ``1 / (1 - p)`` in
training so that eval (no drop) is the identity on the expected value:

- ``"row"``: a per-sample mask on the branch output (timm / torchvision ``DropPath``); the branch
  is computed for every sample.
- ``"batch"``: the whole branch is dropped for the whole mini-batch (Huang et al. 2016) and its
  forward and backward are skipped. The draw comes from a CPU generator: seed it the same on every
  rank with :func:`set_drop_seed` so that DDP / FSDP ranks agree.
- ``"subset"``: the branch runs on a random ``(1 - p)`` share of the samples, added back with
  rescaling (DINOv2); compute falls with ``p`` and every parameter still gets a gradient.

Draws use torch ops only, and rates live in tensor buffers.

>>> rates = linear_drop_rates(0.5, 4)
>>> [round(r, 3) for r in rates]
[0.125, 0.25, 0.375, 0.5]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual.errors import ResidualError

__all__ = [
    "DROP_MODES",
    "apply_drop_schedule",
    "check_drop_rate",
    "drop_path",
    "linear_drop_rates",
    "row_mask",
    "set_drop_seed",
]

DROP_MODES: tuple[str, ...] = ("row", "batch", "subset")
"""The stochastic depth modes ``Residual`` accepts."""

_generator = torch.Generator(device="cpu")
_generator.seed()
_seeded = False


def set_drop_seed(seed: int) -> None:
    """Seed the CPU generator behind ``drop_mode="batch"`` draws.

    Call it with the same seed on every rank (before training) so that all ranks drop the same
    blocks at the same step: DDP and FSDP then neither hang nor need ``find_unused_parameters``.

    >>> set_drop_seed(0)
    """
    global _seeded, _checked_ranks
    _generator.manual_seed(int(seed))
    _seeded = True
    _checked_ranks = False  # check the ranks again at the next draw


_checked_ranks = False


def _check_ranks_agree() -> None:
    """Once per process under torch.distributed: all ranks must share the drop seed."""
    global _checked_ranks
    _checked_ranks = True
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    seeds: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(seeds, (_generator.initial_seed(), _seeded))
    if len(set(seeds)) != 1 or not _seeded:
        raise ResidualError(
            "drop_mode='batch' under torch.distributed: the ranks would skip different blocks "
            f"(their drop seeds, seeded: {seeds}); call residual.set_drop_seed(seed) with the "
            "same seed on every rank before training"
        )


def batch_keep(rate: float) -> bool:
    """Draw whether the branch runs this step (probability ``1 - rate``), from the shared seed."""
    if not _checked_ranks:
        _check_ranks_agree()
    return bool(torch.rand((), generator=_generator).item() >= rate)


def check_drop_rate(caller: str, p: object) -> float:
    """Return ``p`` as a float if it is a rate in [0, 1), else raise naming it."""
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise TypeError(f"{caller}: drop_path must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ResidualError(
            f"{caller}: drop_path must be in [0, 1), got {p}; 0 disables stochastic depth "
            "and 1 would drop the branch for good (remove the block instead)"
        )
    return float(p)


def row_mask(branch: Tensor, keep: Tensor) -> Tensor:
    """A (N, 1, ..., 1) mask of 0 and ``1 / keep``, one draw per sample along dim 0.

    ``keep`` is the keep probability ``1 - p`` (a tensor, so that changing it recompiles
    nothing). Two kernels: a Bernoulli draw and a division.

    >>> import torch
    >>> m = row_mask(torch.ones(1000, 3), torch.tensor(0.75))
    >>> m.shape, sorted({round(v, 4) for v in m.flatten().tolist()})
    (torch.Size([1000, 1]), [0.0, 1.3333])
    """
    shape = (branch.shape[0],) + (1,) * (branch.dim() - 1)
    mask = torch.empty(shape, dtype=branch.dtype, device=branch.device)
    return mask.bernoulli_(keep).div_(keep)


def drop_path(x: Tensor, p: float | Tensor, training: bool = True) -> Tensor:
    """Drop whole samples of ``x`` with probability ``p`` and rescale the rest ("row" mode).

    The functional twin of ``Residual(fn, drop_path=p)`` for users who write their own add.

    >>> import torch
    >>> drop_path(torch.ones(2, 3), 0.5, training=False)
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """
    if not training:
        return x
    rate = p if isinstance(p, Tensor) else torch.tensor(check_drop_rate("drop_path", p))
    return x * row_mask(x, (1.0 - rate).to(x.device))


def linear_drop_rates(p_last: float, num_blocks: int) -> list[float]:
    """Rates ``p_l = p_last * l / L`` for blocks l = 1..L (Huang et al. 2016's linear decay).

    >>> linear_drop_rates(0.2, 2)
    [0.1, 0.2]
    """
    check_drop_rate("linear_drop_rates", p_last)
    if num_blocks < 1:
        raise ResidualError(f"linear_drop_rates: num_blocks must be >= 1, got {num_blocks}")
    return [p_last * (i + 1) / num_blocks for i in range(num_blocks)]


def apply_drop_schedule(model: nn.Module, p_last: float, mode: str | None = None) -> list[float]:
    """Give every ``Residual`` in ``model`` (in module order) a linearly decaying drop rate.

    The first block gets ``p_last / L``, the deepest ``p_last``. Nested residuals count as blocks
    too. Returns the rates set.

    >>> from torch import nn
    >>> from residual import Residual
    >>> net = nn.Sequential(Residual(nn.Linear(4, 4)), Residual(nn.Linear(4, 4)))
    >>> apply_drop_schedule(net, 0.3, mode="row")
    [0.15, 0.3]
    """
    from residual.core import Residual

    blocks = [m for m in model.modules() if isinstance(m, Residual)]
    if not blocks:
        raise ResidualError(
            f"apply_drop_schedule: {type(model).__name__} holds no Residual block to drop"
        )
    rates = linear_drop_rates(p_last, len(blocks))
    for block, rate in zip(blocks, rates, strict=True):
        block.set_drop_path(rate, mode=mode)
    return rates
