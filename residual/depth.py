"""Connections across depth: one stack that owns its blocks, its depth weights and the state that
crosses blocks (DenseFormer, LAuReL-PA, value residual learning).

A :class:`DepthStack` runs its blocks in order and keeps their history; after block i a depth
connection builds the next block's input from that history::

    x_0 = input
    o_i = block_i(x_i)                                   (each block is a Residual, or a few)
    x_{i+1} = connection_i(outputs=[x_0, o_0 .. o_i], inputs=[x_0 .. x_i])   (none: o_i)

and returns ``x_L``. With ``values=True`` every block is called ``block(x_i, first_values=v_0)``
and returns ``(o_i, v_i)``; the stack keeps the first block's ``v_0`` (its attention values)
for the others: value residual learning. No block carries cross-depth logic of its own.

>>> import torch
>>> from torch import nn
>>> from residual import Residual
>>> stack = denseformer([Residual(nn.Linear(8, 8)) for _ in range(3)])
>>> plain = nn.Sequential(*stack.blocks)
>>> x = torch.randn(2, 8)
>>> bool(torch.equal(stack(x), plain(x)))  # at init, DenseFormer is the plain stack
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from residual._types import check_positive_int
from residual.errors import ResidualError, check_module
from residual.shortcuts import LowRankShortcut

__all__ = [
    "DepthStack",
    "DepthWeightedAverage",
    "LastOutput",
    "PreviousActivations",
    "denseformer",
    "laurel_pa",
]


class LastOutput(nn.Module):
    """The plain connection: the next block's input is the last block's output, ``o_i``.

    >>> import torch
    >>> LastOutput()([torch.zeros(1), torch.ones(1)], [torch.zeros(1)])
    tensor([1.])
    """

    def forward(self, outputs: list[Tensor], inputs: list[Tensor]) -> Tensor:
        return outputs[-1]


class DepthWeightedAverage(nn.Module):
    """DenseFormer's DWA (Pagliardini et al. 2024): ``x_{i+1} = sum_j alpha_ij o_j``, learned.

    ``o_0`` is the stack's input, ``o_j`` block j's output. Over ``j <= i`` with
    ``(i - j) mod dilation == 0`` (the paper's dilation k); ``alpha`` starts at 1 on the block's
    own output and 0 elsewhere, so the stack starts as the plain one.

    Args:
        index: i, the number of blocks before this connection (1 after the first block).
        dilation: k; 1 averages over every earlier output.

    >>> import torch
    >>> dwa = DepthWeightedAverage(2)
    >>> outs = [torch.full((1,), float(v)) for v in (1, 2, 3)]
    >>> dwa(outs, outs[:2])  # weights (0, 0, 1) at init
    tensor([3.], grad_fn=<AddBackward0>)
    """

    def __init__(self, index: int, *, dilation: int = 1) -> None:
        super().__init__()
        self.index = check_positive_int("DepthWeightedAverage", "index", index)
        self.dilation = check_positive_int("DepthWeightedAverage", "dilation", dilation)
        self.sources = tuple(j for j in range(index + 1) if (index - j) % dilation == 0)
        init = torch.zeros(len(self.sources))
        init[-1] = 1.0
        self.alpha = nn.Parameter(init)

    def forward(self, outputs: list[Tensor], inputs: list[Tensor]) -> Tensor:
        _check_history("DepthWeightedAverage", outputs, self.index + 1)
        alpha = self.alpha.to(outputs[-1].dtype)
        acc = alpha[0] * outputs[self.sources[0]]
        for k in range(1, len(self.sources)):
            acc = acc + alpha[k] * outputs[self.sources[k]]
        return acc

    def extra_repr(self) -> str:
        return f"{self.index}, dilation={self.dilation}, sources={self.sources}"


class PreviousActivations(nn.Module):
    """LAuReL-PA (Menghani et al., ICML 2025): ``x_{i+1} = o_i + sum_{j<k} gamma_j h(x_{i-j})``.

    ``o_i = x_i + f(x_i)`` is the block's residual output, ``x_{i-j}`` the inputs of the last k
    blocks (fewer near the bottom), ``h(x) = A B x`` low rank (:class:`LowRankShortcut`'s map,
    ``B = 0`` at init, so the stack starts as the plain one) and ``gamma`` learned scalars
    (1 at init; the paper does not fix them).

    Args:
        dim: channels (last dim); rank: r of ``h``; index: i (1 after the first block);
        window: k, the number of previous activations.

    >>> import torch
    >>> pa = PreviousActivations(8, rank=2, index=2, window=2)
    >>> xs = [torch.randn(1, 8) for _ in range(2)]
    >>> o = torch.randn(1, 8)
    >>> bool(torch.equal(pa([xs[0], xs[1], o], xs), o))  # h = 0 at init
    True
    """

    def __init__(self, dim: int, rank: int, index: int, *, window: int = 2) -> None:
        super().__init__()
        self.index = check_positive_int("PreviousActivations", "index", index)
        self.window = check_positive_int("PreviousActivations", "window", window)
        self.h = LowRankShortcut(dim, rank)
        self.terms = min(window, index)  # fewer previous activations near the bottom
        self.gamma = nn.Parameter(torch.ones(self.terms))

    def forward(self, outputs: list[Tensor], inputs: list[Tensor]) -> Tensor:
        _check_history("PreviousActivations", inputs, self.index)
        gamma = self.gamma.to(outputs[-1].dtype)
        acc = outputs[-1]
        for j in range(self.terms):
            acc = acc + gamma[j] * self.h.low_rank(inputs[self.index - 1 - j])
        return acc

    def extra_repr(self) -> str:
        return f"index={self.index}, window={self.window}"


def _check_history(caller: str, history: list[Tensor], needed: int) -> None:
    if len(history) < needed:
        raise ResidualError(
            f"{caller}: built for a stack position that needs {needed} earlier tensors, got "
            f"{len(history)}; use it inside the DepthStack it was built for"
        )


class DepthStack(nn.Module):
    """Blocks with connections across depth (see the module docstring for the recurrence).

    Args:
        blocks: the blocks, in order (any modules that keep the stream's shape).
        connections: one per block, called ``connection(outputs, inputs)`` after it; None (the
            default, or an entry) is :class:`LastOutput`, the plain stack.
        values: call ``block(x, first_values=v)`` and expect ``(output, values)`` back; ``v``
            is None for the first block and its values for every later one (value residual).

    Raises:
        TypeError: a block or connection is not a module; at call time, a block returns a
            tuple (say ``(output, values)``) without ``values=True``, or not that pair with it.
        ResidualError: no blocks, or not one connection per block.

    State dict keys: ``blocks.<i>.*``, ``connections.<i>.*``.

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> stack = DepthStack([Residual(nn.Linear(4, 4)) for _ in range(2)])
    >>> stack(torch.randn(3, 4)).shape
    torch.Size([3, 4])
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        connections: Sequence[nn.Module | None] | None = None,
        *,
        values: bool = False,
    ) -> None:
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ResidualError("DepthStack: give at least one block")
        conns = [None] * len(blocks) if connections is None else list(connections)
        if len(conns) != len(blocks):
            raise ResidualError(
                f"DepthStack: {len(blocks)} blocks but {len(conns)} connections; give one per "
                "block (None for the plain connection)"
            )
        for i, block in enumerate(blocks):
            check_module("DepthStack", f"blocks[{i}]", block)
        for i, conn in enumerate(conns):
            if conn is not None:
                check_module("DepthStack", f"connections[{i}]", conn)
        self.blocks = nn.ModuleList(blocks)
        self.connections = nn.ModuleList(LastOutput() if c is None else c for c in conns)
        self.values = bool(values)

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = [x]
        inputs: list[Tensor] = []
        first: Any = None
        for i, (block, connection) in enumerate(zip(self.blocks, self.connections, strict=True)):
            inputs.append(x)
            if self.values:
                result = block(x, first_values=first)
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise TypeError(
                        f"DepthStack(values=True): {type(block).__name__} must return "
                        "(output, values), e.g. a ValueResidualGPTBlock"
                    )
                out, v = result
                first = v if first is None else first
            else:
                out = block(x)
                if isinstance(out, tuple):  # (output, values): a value-residual block
                    raise TypeError(
                        f"DepthStack: blocks[{i}] ({type(block).__name__}) returned a tuple, not "
                        "a tensor; build the stack with values=True for blocks that return "
                        "(output, values) (value residual learning), or have each block return "
                        "its output alone"
                    )
            outputs.append(out)
            x = connection(outputs, inputs)
        return x

    def extra_repr(self) -> str:
        return "values=True" if self.values else ""


def denseformer(
    blocks: Sequence[nn.Module], *, dilation: int = 1, period: int = 1, values: bool = False
) -> DepthStack:
    """DenseFormer (Pagliardini et al. 2024): a depth-weighted average after every block.

    After block i (1-based) whose index is a multiple of ``period`` (the paper's p), the next
    input is :class:`DepthWeightedAverage` over the input and the outputs so far, every
    ``dilation``-th (the paper's k); other blocks pass their output on. At init the stack
    equals the plain one exactly.

    >>> import torch
    >>> from torch import nn
    >>> stack = denseformer([nn.Linear(4, 4) for _ in range(4)], dilation=2, period=2)
    >>> [type(c).__name__ for c in stack.connections]
    ['LastOutput', 'DepthWeightedAverage', 'LastOutput', 'DepthWeightedAverage']
    >>> stack.connections[3].sources
    (0, 2, 4)
    """
    check_positive_int("denseformer", "period", period)
    conns: list[nn.Module | None] = [
        DepthWeightedAverage(i, dilation=dilation) if i % period == 0 else None
        for i in range(1, len(blocks) + 1)
    ]
    return DepthStack(blocks, conns, values=values)


def laurel_pa(
    blocks: Sequence[nn.Module],
    dim: int,
    *,
    rank: int = 16,
    window: int = 2,
    values: bool = False,
) -> DepthStack:
    """LAuReL-PA (Menghani et al., ICML 2025): each block's output plus the low-rank previous
    activations, :class:`PreviousActivations` after every block. The blocks are residuals
    (``x + f(x)``); at init the stack equals the plain one exactly. ``values``: blocks that
    return ``(output, values)`` (value residual learning, as in :class:`DepthStack`).

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> stack = laurel_pa([Residual(nn.Linear(8, 8)) for _ in range(3)], 8, rank=2)
    >>> x = torch.randn(2, 8)
    >>> bool(torch.equal(stack(x), nn.Sequential(*stack.blocks)(x)))
    True
    """
    return DepthStack(
        blocks,
        [PreviousActivations(dim, rank, i, window=window) for i in range(1, len(blocks) + 1)],
        values=values,
    )
