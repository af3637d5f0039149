"""``Residual``: the combinator, and the one place where shortcut and branch meet (the one
exception: :mod:`residual.reversible`'s couplings, which are inverted as a pair).

    H(x) = post( merge( S(pre(x)), drop( F(pre(x), *args, **kwargs) ) ) )

``F`` is any module (the branch), ``S`` a shortcut strategy, ``merge`` how the two meet (a plain
add when None), ``drop`` the stochastic-depth policy (:mod:`residual.drop`) and ``post`` an
optional module after the merge (the ReLU of the classic block); ``pre``, rarely needed, is
shared by both paths (the pre-activation of He et al. 2016's projection blocks).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from residual import _branch
from residual._checkpoint import call_branch
from residual._dims import hint_layout
from residual._types import DropMode
from residual.drop import (
    SampleAxis,
    make_drop_policy,
    optional_drop_state,
    read_sample_axis,
    returns_tuple,
)
from residual.errors import ResidualError, check_module
from residual.merges import check_merge_fits
from residual.shortcuts import NoShortcut, shortcut_for

__all__ = ["Residual"]


class _Part:
    """An optional submodule: reads None when absent, and ``print(model)`` lists only those set."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, block: nn.Module | None, owner: type | None = None) -> Any:
        return self if block is None else block._modules.get(self.name)


class Residual(nn.Module):
    """A residual block around any module: ``H(x) = post(merge(S(x), drop(F(x))))``.

    The main tensor is the first positional argument; further args and kwargs (masks, states) go
    to ``fn`` untouched. If ``fn`` returns a tuple, its first element is the branch output and the
    rest is passed through: ``Residual(nn.LSTM(...))(x)`` returns ``(x + out, (h, c))``. Shortcut
    and branch must have the same shape (no broadcasting: a mismatch raises when called). The add
    is out of place.

    Args:
        fn: the branch F, any ``nn.Module``.
        shortcut: a module, or a name: ``"identity"`` (default; never inspects ``fn``),
            ``"projection"``, ``"zero_pad"``, ``"pooled_projection"``, ``"auto"`` (identity when
            the shapes match, else projection) or ``"none"`` (no shortcut: an ablation). Names
            other than identity and none read ``fn``'s channels and stride where that reading
            is certain (known layers, ``nn.Sequential``, nested residual blocks) and otherwise
            raise, asking for the module (``ProjectionShortcut(in, out, stride=...)``).
        merge: how S and F meet, called as ``merge(shortcut, branch)``; None adds.
        post: module applied after the merge (the ReLU of the classic block).
        pre: module applied to the input before both paths (shared pre-activation).
        drop_path: stochastic depth rate in [0, 1]. At 1 the block trains as
            ``merge(S(x), 0)``.
        drop_mode: ``"row"`` (default: a mask per sample), ``"batch"`` (the whole batch;
            compute skipped) or ``"subset"`` (compute on a share of the samples); see
            :mod:`residual.drop`.
        scale_by_keep: rescale kept outputs by ``1 / (1 - p)`` (default; False as timm's
            ``DropPath(scale_by_keep=False)``).
        sample_axis: where the samples are, which stochastic depth keeps or drops whole: an
            int (the axis: 1 for sequence-first ``(L, N, E)``) or a
            :class:`~residual.drop.SampleAxis` (also saying when an input is unbatched, and
            how many streams a stream tensor folds into its sample axis). None (default):
            what ``fn`` states (:func:`~residual.drop.read_sample_axis`: ``batch_first`` of
            torch's sequence layers, a conv's unbatched rank), else dim 0.
        checkpoint: recompute the branch in backward instead of storing its activations.
        residual_in_fp32: merge (and return) at least float32, for mixed-precision streams; a
            ``post`` with parameters runs in their dtype (a bfloat16 post-norm gets the merge
            in bfloat16), and its output is returned in float32.

    Raises:
        TypeError: a part is not a module (or the shortcut not a name).
        ResidualError: an unknown name or mode, a rate outside [0, 1], a branch whose dimensions
            a named shortcut cannot read, or a merge built for other channels.

    State dict keys: ``fn.*``, ``shortcut.*``, ``merge.*``, ``post.*``, ``pre.*``, ``drop.*``.

    >>> import torch
    >>> from torch import nn
    >>> block = Residual(nn.Linear(16, 16))
    >>> block(torch.randn(4, 16)).shape
    torch.Size([4, 16])
    >>> Residual(nn.Linear(16, 32), shortcut="projection")(torch.randn(4, 16)).shape
    torch.Size([4, 32])
    >>> out, (h, c) = Residual(nn.LSTM(8, 8, batch_first=True))(torch.randn(2, 5, 8))
    >>> out.shape, h.shape
    (torch.Size([2, 5, 8]), torch.Size([1, 2, 8]))
    """

    fn: nn.Module
    shortcut: nn.Module
    merge = _Part()
    post = _Part()
    pre = _Part()
    drop = _Part()

    def __init__(
        self,
        fn: nn.Module,
        shortcut: str | nn.Module | None = "identity",
        *,
        merge: nn.Module | None = None,
        post: nn.Module | None = None,
        pre: nn.Module | None = None,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        scale_by_keep: bool = True,
        checkpoint: bool = False,
        residual_in_fp32: bool = False,
        sample_axis: int | SampleAxis | None = None,
    ) -> None:
        super().__init__()
        check_module("Residual", "fn", fn)
        self.sample_axis = (
            read_sample_axis(fn) if sample_axis is None else SampleAxis.of(sample_axis)
        )
        self.fn = fn
        self.shortcut = shortcut_for(shortcut, fn, self.sample_axis.batched_ndim)
        for name, part in (("merge", merge), ("post", post), ("pre", pre)):
            if part is not None:
                check_module("Residual", name, part)
                setattr(self, name, part)
        if merge is not None:
            if isinstance(self.shortcut, NoShortcut):
                raise ResidualError("Residual: shortcut='none' adds nothing, so it takes no merge")
            check_merge_fits(merge, fn, self.shortcut, self.sample_axis.batched_ndim)
        self.checkpoint = bool(checkpoint)
        self.residual_in_fp32 = bool(residual_in_fp32)
        self.drop_mode: str = "row"  # with drop_path and scale_by_keep: set by set_drop_path only
        self.scale_by_keep = True
        self.set_drop_path(drop_path, drop_mode=drop_mode, scale_by_keep=scale_by_keep)
        self.register_load_state_dict_post_hook(optional_drop_state)

    def __setattr__(self, name: str, value: Any) -> None:
        if value is None and isinstance(getattr(type(self), name, None), _Part):
            self._modules.pop(name, None)  # removing a part removes it from the module tree
            return
        super().__setattr__(name, value)
        if name in ("fn", "shortcut") and "shortcut" in self._modules:  # words mismatch hints
            self._hint_layout = hint_layout(self.shortcut, self.fn)

    @property
    def returns_tuple(self) -> bool:
        """Whether the block returns a tuple: its branch is known to (see ``set_drop_path``)."""
        return returns_tuple(self.fn)

    @property
    def drop_path(self) -> float:
        """The stochastic depth rate (0 when the block drops nothing)."""
        return float(self.drop.p) if self.drop is not None else 0.0

    def set_drop_path(
        self, drop_path: float, *, drop_mode: str | None = None, scale_by_keep: bool | None = None
    ) -> None:
        """Set the stochastic depth rate (and optionally the mode or scaling) in place.

        Between non-zero rates of one mode (1 included) only a buffer changes: a
        ``torch.compile``-d model does not recompile ("subset" excepted: its sample count is a
        shape). None keeps the current mode / scaling.

        >>> from torch import nn
        >>> block = Residual(nn.Linear(4, 4))
        >>> block.set_drop_path(0.2, drop_mode="batch")
        >>> block.drop_path, block.drop_mode
        (0.2, 'batch')
        """
        mode = self.drop_mode if drop_mode is None else drop_mode
        if scale_by_keep is not None and not isinstance(scale_by_keep, bool):
            raise TypeError(f"Residual: scale_by_keep must be True or False, got {scale_by_keep!r}")
        scale = self.scale_by_keep if scale_by_keep is None else scale_by_keep
        policy = make_drop_policy(drop_path, mode, scale)
        if policy is not None and mode != "row" and returns_tuple(self.fn):
            raise TypeError(
                f"Residual: drop_mode={mode!r} cannot skip {type(self.fn).__name__}, which "
                "returns a tuple (a skipped branch has no rest to pass on); use drop_mode='row'"
            )
        if policy is not None and isinstance(self.shortcut, NoShortcut):
            raise ResidualError(
                "Residual: drop_path needs a shortcut; with shortcut='none' dropping the branch "
                "would drop the whole layer"
            )
        current = self.drop
        if policy is None:
            self.drop = None
        elif type(current) is type(policy):  # keep its draw state (a BatchDrop's seed, step)
            current.set_rate(policy.p, scale_by_keep=scale)  # type: ignore[operator]
        else:
            self.drop = policy
        self.drop_mode = mode
        self.scale_by_keep = scale

    # Parts come from self._modules: nn.Module.__getattr__ costs ~0.7 us a lookup.
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        x = _branch.check_main_input(x)
        if type(args) is not tuple:  # torch.fx.symbolic_trace(block): *args is one Proxy
            _branch.check_no_extra_args(args, kwargs)
            args, kwargs = (), {}
        parts = self._modules
        fn, shortcut, pre = parts["fn"], parts["shortcut"], parts.get("pre")
        if pre is not None:
            x = pre(x)
        s = shortcut(x)  # type: ignore[misc]
        ckpt = self.checkpoint and self.training
        drop = parts.get("drop")
        if drop is not None and self.training:
            out = drop(fn, x, s, args, kwargs, ckpt, self.sample_axis)
        else:
            out = call_branch(fn, x, args, kwargs, ckpt)  # type: ignore[arg-type]
        y = _branch.branch_head(out, type(fn).__name__)
        if s is not None:  # NoShortcut: a plain layer, for ablations
            y = _branch.check_same_shape(y, s, type(shortcut).__name__, self._hint_layout)
            if self.residual_in_fp32:
                s, y = _branch.promote_fp32(s), _branch.promote_fp32(y)
            merge = parts.get("merge")
            y = s + y if merge is None else merge(s, y)
        post = parts.get("post")
        if post is not None:
            y = _branch.post_in_fp32(post, y) if self.residual_in_fp32 else post(y)
        return _branch.with_rest(y, out)

    def extra_repr(self) -> str:
        parts = []
        if self.drop is not None:
            parts.append(f"drop_path={self.drop_path}, drop_mode={self.drop_mode!r}")
            if not self.scale_by_keep:
                parts.append("scale_by_keep=False")
        if self.checkpoint:
            parts.append("checkpoint=True")
        if self.residual_in_fp32:
            parts.append("residual_in_fp32=True")
        if self.drop is not None and self.sample_axis != SampleAxis():
            parts.append(f"sample_axis={self.sample_axis}")
        return ", ".join(parts)
