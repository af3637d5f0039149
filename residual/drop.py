"""Stochastic depth: ``drop_path`` and the three policies ``Residual`` runs its branch through.

Each policy is a small module that ``Residual`` calls in training as
``policy(branch, x, shortcut, args, kwargs, checkpoint)``; it decides how (and whether) the
branch runs and returns the branch's contribution, which ``Residual`` then merges. All rescale
by ``1 / (1 - p)`` in training, so that eval (no drop) is the identity on the expected value
(``scale_by_keep=False``, as timm's, leaves the kept outputs unscaled). ``p = 1`` drops the
branch in every training step (torchvision's ``StochasticDepth(1.0)``): the block trains as
``merge(S(x), 0)``; eval is unaffected.

- :class:`RowDrop` (``drop_mode="row"``): a per-sample mask on the branch output (timm's
  ``DropPath``, torchvision's ``StochasticDepth(mode="row")``); the branch runs for every sample,
  also at ``p = 1`` (all-zero mask), so tuple outputs pass through as at any rate.
- :class:`BatchDrop` (``"batch"``): the branch is dropped for the whole mini-batch (Huang et al.
  2016) and its forward and backward are skipped (at ``p = 1``: never run). Draws come from a
  counter-based hash of a ``seed`` and a ``step`` buffer (in the state_dict): reproducible from
  ``torch.manual_seed`` (which draws the seed), the same eager and compiled, continued by a
  resumed checkpoint, and the same on every rank that holds the same buffers (DDP broadcasts
  them; see :func:`residual.distributed.check_drop_agreement`).
- :class:`SubsetDrop` (``"subset"``): the branch runs on a random ``(1 - p)`` share of the
  samples, scattered back with rescaling (DINOv2); compute falls with ``p`` (none at ``p = 1``).

Rates live in buffers: changing a rate between non-zero values, 1 included, recompiles nothing
("subset" excepted: its sample count is a shape).

>>> rates = linear_drop_rates(0.5, 4)
>>> [round(r, 3) for r in rates]
[0.125, 0.25, 0.375, 0.5]
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import _branch
from residual._checkpoint import call_branch
from residual._dims import read_branch_spatial_dims
from residual.errors import ResidualError

__all__ = [
    "BatchDrop",
    "DROP_MODES",
    "RowDrop",
    "SampleAxis",
    "SubsetDrop",
    "apply_drop_schedule",
    "drop_path",
    "linear_drop_rates",
    "make_drop_policy",
    "optional_drop_state",
    "read_sample_axis",
    "returns_tuple",
]

DROP_MODES: tuple[str, ...] = ("row", "batch", "subset")
"""The stochastic depth modes: ``Residual(fn, drop_path=p, drop_mode=...)``."""

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def check_drop_rate(caller: str, p: object, *, allow_one: bool = False) -> float:
    """Return ``p`` as a float if it is a rate in [0, 1) ([0, 1] with ``allow_one``)."""
    interval = "[0, 1]" if allow_one else "[0, 1)"
    if isinstance(p, Tensor) and p.numel() == 1 and p.is_floating_point():
        p = p.item()  # a 0-dim (or one-element) float tensor: its value
    if isinstance(p, bool) or not isinstance(p, numbers.Real):  # numpy floats are Real
        raise TypeError(
            f"{caller}: drop_path must be a float in {interval}, got {type(p).__name__}"
        )
    top_ok = float(p) <= 1.0 if allow_one else float(p) < 1.0
    if not (float(p) >= 0.0 and top_ok):
        one = (
            "1 drops the branch in every training step"
            if allow_one
            else "1 would drop the branch for good (remove the block instead)"
        )
        raise ResidualError(
            f"{caller}: drop_path must be in {interval}, got {p}; 0 disables stochastic depth "
            f"and {one}"
        )
    return float(p)


def _safe_divisor(keep: Tensor) -> Tensor:
    """``keep`` with 0 (``p = 1``) raised to the dtype's tiny: a dropped 0 stays 0, never 0 / 0.

    Any other keep of a rate in float32 is at least ~6e-8, far above tiny: unchanged.
    """
    return keep.clamp_min(torch.finfo(keep.dtype).tiny)


@dataclass(frozen=True)
class SampleAxis:
    """Which axis of the main tensor holds the samples: what stochastic depth keeps or drops.

    Stochastic depth keeps or drops whole samples. Most layouts hold them on dim 0 (the
    default: batch-first sequences, channels-first images, channels-last features); torch's
    sequence-first layers (``batch_first=False``, inputs ``(L, N, E)``) hold them on dim 1.

    Args:
        dim: the axis of a batched input that indexes the samples.
        batched_ndim: the rank of a batched input. An input of lower rank is one unbatched
            sample (torch's layers take ``(L, E)`` next to ``(N, L, E)``): it is kept or
            dropped whole. None: every input is batched.
        streams: the sample axis holds ``streams`` stream-major copies of each sample, as the
            stream tensors ``(streams * N, ...)`` of hyper-connections and mHC do: sample ``b``
            is rows ``b, N + b, ..., (streams - 1) N + b``, kept or dropped together.

    ``Residual(fn, drop_path=p, sample_axis=SampleAxis(dim=1, batched_ndim=3))`` is what
    :class:`residual.models.TransformerEncoderLayer` builds for ``batch_first=False``; an int
    means ``SampleAxis(dim=that)``.

    >>> import torch
    >>> x = torch.ones(5, 4, 8)  # (L, N, E): sequence-first
    >>> y = drop_path(x, 0.5, sample_axis=SampleAxis(dim=1))
    >>> bool(((y == 0).all(0).all(-1) | (y == 2).all(0).all(-1)).all())  # whole samples
    True
    """

    dim: int = 0
    batched_ndim: int | None = None
    streams: int = 1

    def __post_init__(self) -> None:
        for name in ("dim", "streams"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SampleAxis: {name} must be an int, got {value!r}")
        if self.dim < 0:
            raise ResidualError(
                f"SampleAxis: dim must be >= 0 (counted from the front), got {self.dim}"
            )
        if self.streams < 1:
            raise ResidualError(f"SampleAxis: streams must be >= 1, got {self.streams}")
        nd = self.batched_ndim
        if nd is not None and (isinstance(nd, bool) or not isinstance(nd, int) or nd <= self.dim):
            raise ResidualError(
                f"SampleAxis: batched_ndim must be an int above dim={self.dim} (the rank of a "
                f"batched input) or None, got {nd!r}"
            )

    @staticmethod
    def of(axis: int | SampleAxis) -> SampleAxis:
        """``axis`` itself, or ``SampleAxis(dim=axis)`` for an int."""
        return axis if isinstance(axis, SampleAxis) else SampleAxis(axis)

    def samples(self, x: Tensor) -> int | None:
        """How many samples ``x`` holds; None for one unbatched sample.

        >>> import torch
        >>> SampleAxis(1, batched_ndim=3).samples(torch.zeros(5, 4, 8))
        4
        >>> SampleAxis(1, batched_ndim=3).samples(torch.zeros(5, 8)) is None
        True
        >>> SampleAxis(streams=2).samples(torch.zeros(6, 8))
        3
        """
        if self.batched_ndim is not None and x.dim() < self.batched_ndim:
            return None
        if x.dim() <= self.dim:
            raise ResidualError(
                f"stochastic depth: the samples are on dim {self.dim} (sample_axis), but the "
                f"input has shape {tuple(x.shape)}; pass sample_axis=SampleAxis(dim=...) for "
                "this layout, or SampleAxis(..., batched_ndim=...) if lower-rank inputs are "
                "unbatched"
            )
        rows = x.shape[self.dim]
        if rows % self.streams:
            raise ResidualError(
                f"stochastic depth: dim {self.dim} holds {rows} rows, not a multiple of "
                f"streams={self.streams}; expand the input with expand_streams(x, "
                f"{self.streams}) first"
            )
        return rows // self.streams

    def spread(self, t: Tensor) -> Tensor:
        """A per-sample tensor (samples on ``dim``) copied to every stream of its sample."""
        return t if self.streams == 1 else torch.cat([t] * self.streams, self.dim)


def read_sample_axis(fn: nn.Module) -> SampleAxis:
    """The sample axis that a branch's own layout states, else dim 0 (always batched).

    Read where it is certain: a module with a bool ``batch_first`` (torch's RNN, LSTM, GRU,
    ``nn.MultiheadAttention``, ``nn.Transformer*``; its attention's for a Transformer layer)
    takes ``(N, L, E)`` or ``(L, N, E)`` and unbatched ``(L, E)``; a branch whose convs or
    pools fix its spatial dims takes ``(N, C, *spatial)`` and unbatched ``(C, *spatial)``; an
    ``nn.Sequential`` takes what its first module takes; a residual block what its own
    ``sample_axis`` says.

    >>> from torch import nn
    >>> read_sample_axis(nn.LSTM(8, 8))  # batch_first=False: (L, N, E)
    SampleAxis(dim=1, batched_ndim=3, streams=1)
    >>> read_sample_axis(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    SampleAxis(dim=0, batched_ndim=4, streams=1)
    """
    first = fn
    while isinstance(first, nn.Sequential) and len(first):
        first = first[0]
    found = getattr(first, "sample_axis", None)
    if isinstance(found, SampleAxis):
        return found
    for owner in (first, getattr(first, "self_attn", None)):
        batch_first = getattr(owner, "batch_first", None)
        if isinstance(owner, nn.Module) and isinstance(batch_first, bool):
            return SampleAxis(0 if batch_first else 1, batched_ndim=3)
    spatial = read_branch_spatial_dims(fn)
    return SampleAxis(0, batched_ndim=spatial + 2) if spatial else SampleAxis()


def returns_tuple(fn: nn.Module) -> bool:
    """Whether a branch is known to return a tuple (the tensor to add, then more).

    torch's RNNs and ``nn.MultiheadAttention`` do, and an ``nn.Sequential`` that ends in one;
    so does a module whose ``returns_tuple`` attribute is True (a residual block around such a
    branch, value-residual attention).
    "batch" and "subset" drop refuse these: a skipped branch cannot give the rest of its tuple.

    >>> from torch import nn
    >>> returns_tuple(nn.LSTM(4, 4)), returns_tuple(nn.Linear(4, 4))
    (True, False)
    """
    if isinstance(fn, nn.Sequential):  # what its last module returns
        return bool(len(fn)) and returns_tuple(fn[-1])
    if isinstance(fn, nn.RNNBase | nn.MultiheadAttention):
        return True
    flag = getattr(fn, "returns_tuple", False)
    return flag if isinstance(flag, bool) else False


def _refuse_trace(x: Any, mode: str) -> None:
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            f"Residual: drop_mode={mode!r} decides at run time whether (or on which samples) "
            "the branch runs, which torch.fx.symbolic_trace cannot record; trace the model in "
            "eval mode (model.eval()), or use drop_mode='row' (traceable), or torch.compile / "
            "torch.export, which record the skip as a torch.cond"
        )


def _check_main(x: Any, caller: str) -> None:
    if not isinstance(x, Tensor) or not (x.is_floating_point() or x.is_complex()):
        got = f"dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"{caller}: stochastic depth scales a floating point tensor, got {got}; convert it "
            "first (x.float())"
        )


def _row_mask(x: Tensor, keep: Tensor | float, scale_by_keep: bool, axis: SampleAxis) -> Tensor:
    """A mask of 0 and ``1 / keep`` (1 unscaled), one Bernoulli draw per sample of ``x``.

    Its shape is x's with every axis but the sample axis at 1 (``(N, 1, ..., 1)``
    batch-first), in x's (real) dtype. With a float ``keep`` the draws are timm's and
    torchvision's (``empty(shape).bernoulli_(keep)``: the same masks after the same
    ``torch.manual_seed``), taken through ``F.dropout`` of ones, which draws exactly those and
    which ``torch.func.vmap(..., randomness="different")`` draws per member.
    ``bernoulli_`` with a tensor probability, what a compiled graph needs, draws another
    stream. An FX leaf.
    """
    n = axis.samples(x)
    shape = [1] * x.dim()
    if n is not None:
        shape[axis.dim] = n
    dtype = x.real.dtype if x.is_complex() else x.dtype
    if isinstance(keep, Tensor) or keep == 0.0:
        mask = torch.empty(shape, dtype=dtype, device=x.device).bernoulli_(keep)
    else:
        ones = torch.ones(shape, dtype=dtype, device=x.device)
        mask = (F.dropout(ones, 1.0 - keep) != 0).to(dtype)
    if scale_by_keep:
        if isinstance(keep, Tensor):
            mask = mask.div_(_safe_divisor(keep))
        elif keep > 0.0:
            mask = mask.div_(keep)
    return mask if n is None else axis.spread(mask)


def drop_path(
    x: Tensor,
    p: float | Tensor = 0.0,
    training: bool = True,
    scale_by_keep: bool = True,
    *,
    sample_axis: int | SampleAxis = 0,
) -> Tensor:
    """Drop whole samples of ``x`` with probability ``p`` and rescale the rest ("row" mode).

    The functional twin of ``Residual(fn, drop_path=p)`` for users who write their own add.
    Unlike timm's ``drop_path(x, drop_prob=0.0, training=False)``, the rate is named ``p`` and
    ``training`` defaults to True: pass ``training=self.training`` when moving a call from
    timm. ``p = 1`` drops every sample; ``scale_by_keep=False`` leaves the kept samples
    unscaled; ``sample_axis`` says where the samples are (:class:`SampleAxis`: dim 1 for
    sequence-first tensors). ``p`` may be a 0-dim tensor (no recompile when it changes).

    >>> import torch
    >>> drop_path(torch.ones(2, 3), 0.5, training=False)
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """
    _check_main(x, "drop_path")
    axis = SampleAxis.of(sample_axis)
    if not training:
        return x
    if isinstance(p, Tensor):
        if not p.is_floating_point() or p.numel() != 1:
            raise TypeError(
                f"drop_path: a tensor rate must be one floating point value, got "
                f"{p.dtype} of shape {tuple(p.shape)}; pass torch.tensor(0.1) or a float"
            )
        if not torch.compiler.is_compiling():
            check_drop_rate("drop_path", p.item(), allow_one=True)
        keep: Tensor | float = (1.0 - p.reshape(())).to(device=x.device, dtype=x.real.dtype)
    else:
        rate = check_drop_rate("drop_path", p, allow_one=True)
        if rate == 0.0:
            return x
        keep = 1.0 - rate
    return x * _row_mask(x, keep, scale_by_keep, axis)


_BATCH_FIRST = SampleAxis()


class _Policy(nn.Module):
    """What the three policies share: a rate, in a buffer, ``scale_by_keep`` and a repr."""

    keep: Tensor

    def __init__(self, p: float, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.p = check_drop_rate(type(self).__name__, p, allow_one=True)
        self.scale_by_keep = bool(scale_by_keep)
        self.register_buffer("keep", torch.tensor(1.0 - self.p), persistent=False)
        self.register_load_state_dict_post_hook(_refill_rate)  # after to_empty + load

    def set_rate(self, p: float, scale_by_keep: bool | None = None) -> None:
        """Change the rate in place (a buffer write: no recompile), and the scaling if given."""
        self.p = check_drop_rate(type(self).__name__, p, allow_one=True)
        if scale_by_keep is not None:
            self.scale_by_keep = bool(scale_by_keep)
        with torch.no_grad():
            self.keep.fill_(1.0 - self.p)

    def reset_rate(self) -> None:
        """Refill the rate buffer from ``p`` (after ``to_empty`` from the meta device)."""
        self.set_rate(self.p)

    def reset_parameters(self) -> None:
        """What ``to_empty`` leaves unset: the rate buffer."""
        self.reset_rate()

    def extra_repr(self) -> str:
        return f"p={self.p}" + ("" if self.scale_by_keep else ", scale_by_keep=False")


def _refill_rate(policy: nn.Module, keys: Any) -> None:
    """``keep`` is not in the state_dict: refill it from the rate whenever the policy loads."""
    if isinstance(policy, _Policy):
        policy.reset_rate()


class RowDrop(_Policy):
    """Per-sample stochastic depth: the branch output of each sample is dropped with prob. p.

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> block = Residual(nn.Linear(4, 4), drop_path=0.2)
    >>> block.drop
    RowDrop(p=0.2)
    """

    def forward(
        self,
        branch: nn.Module,
        x: Tensor,
        shortcut: Tensor,
        args: Args,
        kwargs: Kwargs,
        ckpt: bool,
        axis: SampleAxis = _BATCH_FIRST,
    ) -> Any:
        out = call_branch(branch, x, args, kwargs, ckpt)
        head = _branch.branch_head(out, type(branch).__name__)
        # Eager draws as timm / torchvision (a float rate); compiled reads the rate buffer, so a
        # new rate recompiles nothing.
        keep = self.keep if torch.compiler.is_compiling() else 1.0 - self.p
        mask = _row_mask(head, keep, self.scale_by_keep, axis)
        return _branch.replace_head(out, head * mask)


def _mix32(x: Tensor) -> Tensor:
    """One round of a 32-bit integer hash (lowbias32), exact in int64 arithmetic."""
    mask = 0xFFFFFFFF
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        lo, hi = mult & 0xFFFF, mult >> 16  # split so that no product leaves int64
        x = (x * lo + (((x * hi) & 0xFFFF) << 16)) & mask
    return x ^ (x >> 16)


def _uniform(seed: Tensor, step: Tensor) -> Tensor:
    """A uniform draw in [0, 1) that depends only on (seed, step): the same eager and compiled."""
    h = _mix32((seed & 0xFFFFFFFF) ^ _mix32(step & 0xFFFFFFFF))
    return h.to(torch.float64) / 4294967296.0


class BatchDrop(_Policy):
    """Whole-batch stochastic depth (Huang et al. 2016): skip the branch with probability p.

    A skipped branch costs nothing: its forward and backward do not run. Its parameters get
    zero gradients (a zero-valued tie into the graph), so DDP needs no
    ``find_unused_parameters`` and an optimizer step is the same with or without
    ``torch.distributed``. Training branches that return tuples need ``"row"``.

    Buffers (in the state_dict): ``seed`` (drawn from torch's RNG at construction) and ``step``
    (one per training call).

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> _ = torch.manual_seed(0)
    >>> block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode="batch")
    >>> first = [block.drop.draw(step) for step in range(4)]
    >>> _ = torch.manual_seed(0)
    >>> again = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode="batch")
    >>> [again.drop.draw(step) for step in range(4)] == first
    True
    """

    seed: Tensor
    step: Tensor

    def __init__(self, p: float, scale_by_keep: bool = True) -> None:
        super().__init__(p, scale_by_keep)
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._draw_seed()

    def _draw_seed(self) -> None:
        with torch.no_grad():
            self.seed.copy_(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
            self.step.zero_()

    def reset_parameters(self) -> None:
        """Refill the rate, draw a new seed from torch's RNG and restart the step count."""
        super().reset_parameters()
        self._draw_seed()

    def draw(self, step: int | None = None) -> float:
        """The uniform draw of ``step`` (default: the next one); the branch runs if < 1 - p."""
        at = self.step if step is None else torch.tensor(step, device=self.step.device)
        return float(_uniform(self.seed, at))

    def forward(
        self,
        branch: nn.Module,
        x: Tensor,
        shortcut: Tensor,
        args: Args,
        kwargs: Kwargs,
        ckpt: bool,
        axis: SampleAxis = _BATCH_FIRST,
    ) -> Tensor:
        _refuse_trace(x, "batch")
        keep = _uniform(self.seed, self.step) < self.keep  # the rate as a buffer: no recompile
        with torch.no_grad():
            self.step.add_(1)
        scale = _safe_divisor(self.keep) if self.scale_by_keep else None

        def ran(x: Tensor, s: Tensor) -> Tensor:
            out = _tensor_output(call_branch(branch, x, args, kwargs, ckpt), "batch", branch)
            return out if scale is None else out / scale

        def skipped(x: Tensor, s: Tensor) -> Tensor:
            return torch.zeros_like(s)

        if torch.compiler.is_compiling():
            keep = keep.to(x.device)
            if not any(True for _ in branch.buffers()):
                return torch.cond(keep, ran, skipped, (x, shortcut))
            if ckpt:  # the recomputation needs the module's own buffers: run, then undo
                return _run_then_undo(keep, branch, ran, x, shortcut)
            return _cond_on_copies(keep, branch, args, kwargs, scale, x, shortcut)
        if bool(keep):
            return ran(x, shortcut)
        return _no_branch(branch, shortcut)


def _carried(buffer: Tensor) -> Tensor:
    """A buffer's new value as a ``torch.cond`` output: a fresh copy, integers as float64.

    cond's autograd wants floating outputs; float64 holds every counter value exactly (below
    2 ** 53) and every float buffer value.
    """
    return buffer.detach().clone() if buffer.is_floating_point() else buffer.double()


def _cond_on_copies(
    keep: Tensor,
    branch: nn.Module,
    args: Args,
    kwargs: Kwargs,
    scale: Tensor | None,
    x: Tensor,
    shortcut: Tensor,
) -> Tensor:
    """Compiled "batch" drop of a branch with buffers: skipped compute and no side effects.

    ``torch.cond`` forbids in-place updates of a branch's buffers (a BatchNorm's statistics),
    so the kept side runs the branch on copies of them (``torch.func.functional_call``) and
    returns their new values; the dropped side returns them as they were. They are written
    back after the cond: the statistics move only on steps the branch ran.
    """
    names = [name for name, _ in branch.named_buffers()]
    buffers = [b for _, b in branch.named_buffers()]

    def ran_on(x: Tensor, s: Tensor, *copies: Tensor) -> tuple[Tensor, ...]:
        fresh = {n: c.clone() for n, c in zip(names, copies, strict=True)}
        out = torch.func.functional_call(branch, fresh, (x, *args), kwargs, strict=False)
        out = _tensor_output(out, "batch", branch)
        out = out if scale is None else out / scale
        return (out, *(_carried(t) for t in fresh.values()))

    def skipped_on(x: Tensor, s: Tensor, *copies: Tensor) -> tuple[Tensor, ...]:
        return (torch.zeros_like(s), *(_carried(c) for c in copies))

    copies = [b.detach().clone() for b in buffers]
    out, *new = torch.cond(keep, ran_on, skipped_on, (x, shortcut, *copies))
    with torch.no_grad():
        for buffer, value in zip(buffers, new, strict=True):
            buffer.copy_(value)
    return cast(Tensor, out)


def _run_then_undo(
    keep: Tensor, branch: nn.Module, ran: Any, x: Tensor, shortcut: Tensor
) -> Tensor:
    """Compiled "batch" drop of a checkpointed branch with buffers: it runs, and on a dropped
    step its buffers are set back and its output replaced by zeros (select, not multiply: at
    ``p = 1`` the scaled output may be inf, and inf * 0 is nan)."""
    buffers = list(branch.buffers())
    before = [b.detach().clone() for b in buffers]
    out = ran(x, shortcut)
    with torch.no_grad():
        for buffer, old in zip(buffers, before, strict=True):
            buffer.copy_(torch.where(keep, buffer, old))
    return torch.where(keep, out, 0.0)


def _tensor_output(out: Any, policy: str, branch: nn.Module) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Residual: drop_mode={policy!r} needs a branch that returns a tensor, got "
            f"{type(out).__name__} from {type(branch).__name__}; use drop_mode='row' for branches "
            "returning tuples (their other outputs cannot be skipped or subset)"
        )
    return out


def _no_branch(branch: nn.Module, like: Tensor) -> Tensor:
    """A dropped branch's zeros, tied to one element of each trainable parameter.

    The tie gives every parameter a zero gradient, so DDP sees them used (no
    ``find_unused_parameters``) and an optimizer step is the same as with a gradient of zeros.
    """
    zeros = torch.zeros_like(like)
    params = [p for p in branch.parameters() if p.requires_grad]
    if not params:
        return zeros
    return zeros + torch.stack([p.reshape(-1)[0].to(like.dtype) for p in params]).sum() * 0.0


class SubsetDrop(_Policy):
    """DINOv2's sample subset: the branch runs on ``max(1, int(N (1 - p)))`` random samples.

    Their outputs, scaled by ``N / k``, go back to their rows; the other rows get a zero branch.
    Compute falls with ``p``; every parameter still gets a gradient. At ``p = 1`` the branch
    does not run (zero gradients). Samples are taken whole along the block's
    :class:`SampleAxis` (every stream of a sample of a stream tensor, which the branch then
    gets as a stream tensor of ``k`` samples); an unbatched input is one sample, always kept
    below ``p = 1``. Branches with extra arguments or tuple outputs need ``"row"`` or
    ``"batch"``.

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode="subset")(torch.randn(6, 4)).shape
    torch.Size([6, 4])
    """

    def forward(
        self,
        branch: nn.Module,
        x: Tensor,
        shortcut: Tensor,
        args: Args,
        kwargs: Kwargs,
        ckpt: bool,
        axis: SampleAxis = _BATCH_FIRST,
    ) -> Tensor:
        _refuse_trace(x, "subset")
        if args or kwargs:
            raise ResidualError(
                "Residual: drop_mode='subset' runs the branch on a subset of the samples and "
                "cannot know which extra arguments are per-sample; use drop_mode='row' or "
                "'batch' for branches that take extra arguments"
            )
        if self.p == 1.0:  # a Python rate: the sample count below is one already
            return _no_branch(branch, shortcut)
        n = axis.samples(x)
        if n is None:  # one unbatched sample: k = max(1, int(1 - p)) = 1 keeps it
            return _tensor_output(call_branch(branch, x, (), {}, ckpt), "subset", branch)
        k = max(1, int(n * (1.0 - self.p)))
        # Drawn on the CPU and sorted for a sequential gather; index_select / index_copy, whose
        # backward is a parallel index_add (advanced indexing's is a serial index_put on CPU).
        idx = torch.randperm(n)[:k].sort().values
        if axis.streams > 1:  # the same samples in every stream, stream-major
            idx = (idx + n * torch.arange(axis.streams).unsqueeze(1)).flatten()
        idx = idx.to(x.device, non_blocking=True)
        out = call_branch(branch, x.index_select(axis.dim, idx), (), {}, ckpt)
        out = _tensor_output(out, "subset", branch)
        _check_kept_samples(out, idx.numel(), axis, branch)
        full = out.new_zeros(
            (*out.shape[: axis.dim], x.shape[axis.dim], *out.shape[axis.dim + 1 :])
        )
        return full.index_copy(axis.dim, idx, out * (n / k) if self.scale_by_keep else out)


def _check_kept_samples(out: Tensor, rows: int, axis: SampleAxis, branch: nn.Module) -> None:
    """Raise unless the branch kept the subset's sample axis (it must not collapse the batch)."""
    with _branch.shape_checks():
        fits = bool(out.dim() > axis.dim and out.shape[axis.dim] == rows)
    if not fits:
        raise ResidualError(
            f"Residual: drop_mode='subset' gave the branch {type(branch).__name__} the samples "
            f"on dim {axis.dim}, and it returned shape {tuple(out.shape)}, which does not keep "
            "them there; a residual branch must keep the sample axis (use drop_mode='row' or "
            "'batch', or set sample_axis to where the branch keeps its samples)"
        )


def optional_drop_state(module: nn.Module, keys: Any) -> None:
    """A ``load_state_dict`` post hook: a BatchDrop's ``seed`` / ``step`` may be absent or extra.

    State dicts of a model with and without batch-mode stochastic depth load into each other; a
    policy whose keys are missing keeps its own draw state. Every ``Residual`` registers it.

    >>> from torch import nn
    >>> from residual import Residual
    >>> batch = Residual(nn.Linear(2, 2), drop_path=0.1, drop_mode="batch")
    >>> Residual(nn.Linear(2, 2)).load_state_dict(batch.state_dict())  # drop.seed, drop.step
    <All keys matched successfully>
    """
    for found in (keys.missing_keys, keys.unexpected_keys):
        found[:] = [
            k for k in found if k.split(".")[-2:] not in (["drop", "seed"], ["drop", "step"])
        ]


_POLICIES: dict[str, type[_Policy]] = {"row": RowDrop, "batch": BatchDrop, "subset": SubsetDrop}


def make_drop_policy(p: float, drop_mode: str, scale_by_keep: bool = True) -> nn.Module | None:
    """The policy module for a rate in [0, 1] and a mode; None when ``p == 0`` (nothing to drop).

    >>> make_drop_policy(0.1, "subset")
    SubsetDrop(p=0.1)
    >>> make_drop_policy(1.0, "row", scale_by_keep=False)
    RowDrop(p=1.0, scale_by_keep=False)
    """
    if drop_mode not in _POLICIES:
        raise ResidualError(
            f"unknown drop_mode {drop_mode!r}; valid modes are {', '.join(DROP_MODES)}"
        )
    rate = check_drop_rate("drop_path", p, allow_one=True)
    return _POLICIES[drop_mode](rate, scale_by_keep) if rate > 0 else None


def linear_drop_rates(drop_path: float, num_blocks: int) -> list[float]:
    """Rates ``p_l = drop_path * l / L`` for blocks l = 1..L (Huang et al. 2016's linear decay).

    >>> linear_drop_rates(0.2, 2)
    [0.1, 0.2]
    """
    check_drop_rate("linear_drop_rates", drop_path)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ResidualError(
            f"linear_drop_rates: num_blocks must be >= 1 (an int), got {num_blocks}"
        )
    return [drop_path * (i + 1) / num_blocks for i in range(num_blocks)]


def apply_drop_schedule(
    model: nn.Module, drop_path: float, drop_mode: str | None = None
) -> list[float]:
    """Give every residual block in ``model`` (module order) a linearly decaying drop rate.

    A residual block is any module with a ``set_drop_path(drop_path, drop_mode=...)`` method
    (every ``Residual``). The first gets ``drop_path / L``, the deepest ``drop_path``; nested
    blocks count too. Returns the rates set.

    >>> from torch import nn
    >>> from residual import Residual
    >>> net = nn.Sequential(Residual(nn.Linear(4, 4)), Residual(nn.Linear(4, 4)))
    >>> apply_drop_schedule(net, 0.3, drop_mode="row")
    [0.15, 0.3]
    """
    blocks = [m for m in model.modules() if callable(getattr(m, "set_drop_path", None))]
    if not blocks:
        raise ResidualError(
            f"apply_drop_schedule: {type(model).__name__} holds no Residual block to drop"
        )
    rates = linear_drop_rates(drop_path, len(blocks))
    for block, rate in zip(blocks, rates, strict=True):
        block.set_drop_path(rate, drop_mode=drop_mode)  # type: ignore[operator]
    return rates


for _name in ("_check_main", "_row_mask"):  # FX leaves: they read ranks and shapes
    torch.fx.wrap(_name)
