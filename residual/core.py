"""``Residual``: the combinator, and the single place where shortcut and branch are merged.

    H(x) = post( merge( S(pre(x)), drop( F(pre(x), *args, **kwargs) ) ) )

``F`` is any module (the branch), ``S`` a shortcut strategy, ``merge`` how the two meet (plain add
when None), ``drop`` the stochastic-depth policy and ``post`` an optional module after the merge
(the ReLU of the classic block). ``pre`` is rarely needed: a module shared by both paths (the
pre-activation of He et al. 2016's projection blocks).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from residual._checkpoint import checkpointed_call
from residual._inspect import BranchDims, infer_branch_dims
from residual._types import DropMode
from residual.drop import DROP_MODES, batch_keep, check_drop_rate, row_mask
from residual.errors import ResidualError
from residual.merges import merge_dim
from residual.shortcuts import SHORTCUTS, IdentityShortcut, NoShortcut, resolve_shortcut

__all__ = ["Residual"]


def _check_module(name: str, value: object, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, nn.Module):
        hint = (
            "; wrap a function in an nn.Module (lambdas cannot be pickled)"
            if callable(value)
            else ""
        )
        raise TypeError(
            f"Residual: {name} must be a torch.nn.Module, got {type(value).__name__}{hint}"
        )


def _shape_hint(branch: torch.Size, short: torch.Size, channel_dim: int) -> str:
    """The shortcut that would turn ``short`` into ``branch``, for the mismatch message."""
    if len(branch) != len(short):
        return "the branch must keep the input's rank; check the layout and any reshape in fn"
    c_in, c_out = short[channel_dim], branch[channel_dim]
    spatial = [i for i in range(len(branch)) if i not in (0, channel_dim % len(branch))]
    ratios = {short[i] / max(branch[i], 1) for i in spatial if short[i] != branch[i]}
    stride = f" with stride={round(max(ratios))}" if ratios else ""
    if c_out < c_in:
        return f'use shortcut="projection"{stride} to reduce channels'
    return f'use shortcut="projection" or "zero_pad"{stride}'


class Residual(nn.Module):
    """A residual block around any module: ``H(x) = post(merge(S(x), drop(F(x))))``.

    The main tensor is the first positional argument; further args and kwargs (masks, states) go
    to ``fn`` untouched. If ``fn`` returns a tuple, its first element is the branch output and the
    rest is passed through: ``Residual(nn.LSTM(...))(x)`` returns ``(x + out, (h, c))``. Shortcut
    and branch must have the same shape: no broadcasting, a mismatch raises. The add is out of
    place, so in-place activations around the block are safe.

    Args:
        fn: the branch F, any ``nn.Module``.
        shortcut: a module, or a name: ``"identity"`` (default), ``"projection"``,
            ``"zero_pad"``, ``"pooled_projection"`` or ``"auto"`` (identity when the shapes match,
            else projection). For names that need them, the channel counts, stride and layout are
            read from ``fn``'s first and last Linear / Conv / RNN / attention layers at
            construction, so every parameter exists before the first forward.
        merge: how S and F meet, called as ``merge(shortcut, branch)``; None adds.
        post: module applied after the merge (the ReLU of the classic block).
        pre: module applied to the input before both paths (shared pre-activation).
        drop_path: stochastic depth rate in [0, 1) (see :mod:`residual.drop`).
        drop_mode: ``"row"``, ``"batch"`` (compute skipped) or ``"subset"`` (compute on a share).
        checkpoint: recompute the branch in backward instead of storing its activations.
        residual_in_fp32: keep the residual stream in float32 (merge in fp32, output fp32) for
            mixed-precision training.

    Raises:
        TypeError: ``fn``, ``merge``, ``post`` or ``pre`` is not a module.
        ResidualError: unknown shortcut name or drop mode, a rate outside [0, 1), or channel
            counts that the chosen shortcut cannot join.

    State dict keys: ``fn.*``, ``shortcut.*``, ``merge.*``, ``post.*``, ``pre.*`` (only those that
    hold parameters or buffers appear).

    >>> import torch
    >>> from torch import nn
    >>> block = Residual(nn.Linear(16, 16))
    >>> block(torch.randn(4, 16)).shape
    torch.Size([4, 16])
    >>> wide = Residual(nn.Linear(16, 32), shortcut="projection")
    >>> wide(torch.randn(4, 16)).shape
    torch.Size([4, 32])
    >>> out, (h, c) = Residual(nn.LSTM(8, 8, batch_first=True))(torch.randn(2, 5, 8))
    >>> out.shape, h.shape
    (torch.Size([2, 5, 8]), torch.Size([1, 2, 8]))
    """

    fn: nn.Module
    shortcut: nn.Module
    merge: nn.Module | None
    post: nn.Module | None
    pre: nn.Module | None
    drop_rate: Tensor
    keep_rate: Tensor

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
        checkpoint: bool = False,
        residual_in_fp32: bool = False,
    ) -> None:
        super().__init__()
        _check_module("fn", fn, optional=False)
        for name, value in (("merge", merge), ("post", post), ("pre", pre)):
            _check_module(name, value, optional=True)
        dims = infer_branch_dims(fn)
        self.fn = fn
        self.shortcut = self._build_shortcut(shortcut, dims)
        self.register_module("merge", merge)  # registered even when None: see forward
        self.register_module("post", post)
        self.register_module("pre", pre)
        self._check_merge(merge, dims)
        if merge is not None and isinstance(self.shortcut, NoShortcut):
            raise ResidualError("Residual: shortcut='none' adds nothing, so it takes no merge")
        self.checkpoint = bool(checkpoint)
        self.residual_in_fp32 = bool(residual_in_fp32)
        self._channel_dim = 1 if (dims is None or dims.layout == "channels_first") else -1
        self.register_buffer("drop_rate", torch.tensor(0.0), persistent=False)
        self.register_buffer("keep_rate", torch.tensor(1.0), persistent=False)
        self.drop_path = 0.0
        self.drop_mode: DropMode = "row"
        self.set_drop_path(drop_path, mode=drop_mode)

    @staticmethod
    def _build_shortcut(shortcut: str | nn.Module | None, dims: BranchDims | None) -> nn.Module:
        if isinstance(shortcut, nn.Module):
            return shortcut
        name = "identity" if shortcut is None else shortcut
        if not isinstance(name, str) or name not in SHORTCUTS:
            return resolve_shortcut(name)  # raises, listing the valid names
        if dims is None:
            if name in ("identity", "none"):
                return resolve_shortcut(name)
            raise ResidualError(
                f"Residual: cannot read the channel counts of the branch to build shortcut "
                f"{name!r} (no Linear, Conv, RNN or attention layer found); pass a module, "
                "e.g. shortcut=ProjectionShortcut(in_channels, out_channels, stride=...)"
            )
        if name == "none":
            return NoShortcut()
        if name == "identity" and (dims.in_channels != dims.out_channels or dims.stride != 1):
            change = f"{dims.in_channels} -> {dims.out_channels} channels, stride {dims.stride}"
            raise ResidualError(
                f"Residual: the branch maps {change} ({dims.layout}), so an identity shortcut "
                'cannot be added to it; use shortcut="projection" or "zero_pad" (or pass '
                "shortcut=IdentityShortcut() if the branch really keeps the shape)"
            )
        return resolve_shortcut(
            name,
            in_channels=dims.in_channels,
            out_channels=dims.out_channels,
            stride=dims.stride,
            layout=dims.layout,
            spatial_dims=dims.spatial_dims,
        )

    @staticmethod
    def _check_merge(merge: nn.Module | None, dims: BranchDims | None) -> None:
        want = merge_dim(merge) if merge is not None else None
        if want is not None and dims is not None and want != dims.out_channels:
            raise ResidualError(
                f"Residual: merge {type(merge).__name__} was built for {want} channels but the "
                f"branch outputs {dims.out_channels}; build it with dim={dims.out_channels}"
            )

    def set_drop_path(self, p: float, *, mode: str | None = None) -> None:
        """Set the stochastic depth rate (and optionally the mode) in place.

        The rate lives in the ``drop_rate`` buffer: changing it between non-zero values does not
        recompile a ``torch.compile``-d model ("subset" excepted: its sample count is a shape).

        >>> from torch import nn
        >>> block = Residual(nn.Linear(4, 4))
        >>> block.set_drop_path(0.2, mode="batch")
        >>> block.drop_path, block.drop_mode
        (0.2, 'batch')
        """
        rate = check_drop_rate("Residual", p)
        if rate > 0 and isinstance(self.shortcut, NoShortcut):
            raise ResidualError(
                "Residual: drop_path needs a shortcut; with shortcut='none' dropping the branch "
                "would drop the whole layer"
            )
        mode = self.drop_mode if mode is None else mode
        if mode not in DROP_MODES:
            raise ResidualError(
                f"Residual: unknown drop_mode {mode!r}; valid modes are {', '.join(DROP_MODES)}"
            )
        with torch.no_grad():
            self.drop_rate.fill_(rate)
            self.keep_rate.fill_(1.0 - rate)
        self.drop_path = rate
        self.drop_mode = mode  # type: ignore[assignment]
        self._drop_active = rate > 0.0

    # --------------------------------------------------------------------------------- forward
    # Submodules are read from ``self._modules`` directly: ``nn.Module.__getattr__`` costs about
    # half a microsecond a lookup, which is most of a small block's overhead.
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"Residual: the first argument must be the main tensor, got {type(x).__name__}; "
                "call block(x, *args, **kwargs)"
            )
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(
                f"Residual: the main tensor must be floating point, got {x.dtype}; convert it "
                "(x.float()) or embed token ids first (nn.Embedding) and wrap what follows"
            )
        modules = self._modules
        pre = modules["pre"]
        if pre is not None:
            x = pre(x)
        dropping = self._drop_active and self.training
        if dropping and self.drop_mode != "row":
            if self.drop_mode == "batch":
                return self._forward_batch_drop(x, args, kwargs)
            return self._forward_subset(x, args, kwargs)
        fn: nn.Module = modules["fn"]  # type: ignore[assignment]
        if self.checkpoint and self.training and torch.is_grad_enabled():
            out = checkpointed_call(fn, x, args, kwargs)
        else:
            out = fn(x, *args, **kwargs)
        if type(out) is not Tensor and not isinstance(out, Tensor):
            out, rest = self._split(out)
            if dropping:
                out = out * row_mask(out, self.keep_rate)
            return (self._merge(self._shortcut(x), out), *rest)
        if dropping:  # the mask multiplies inside the merge: one pass instead of two
            return self._merge(self._shortcut(x), out, row_mask(out, self.keep_rate))
        return self._merge(self._shortcut(x), out)

    def _shortcut(self, x: Tensor) -> Tensor | None:
        sc = self._modules["shortcut"]
        if type(sc) is IdentityShortcut and not (sc._forward_hooks or sc._forward_pre_hooks):
            return x  # skip an empty module call; hooks (torchinfo) still see the identity run
        return sc(x)  # type: ignore[misc]

    def _merge(self, s: Tensor | None, out: Tensor, mask: Tensor | None = None) -> Tensor:
        """The one place where shortcut and branch meet; shapes must match exactly.

        ``mask`` is the per-sample stochastic-depth mask ("row" mode), applied to the branch.
        """
        if s is None:  # NoShortcut: a plain (non-residual) layer, for ablations
            post = self._modules["post"]
            return out if post is None else post(out)
        if out.shape != s.shape:
            self._raise_mismatch(out, s)
        if self.residual_in_fp32:
            s = s.float()
            out = out.float()
        modules = self._modules
        merge, post = modules["merge"], modules["post"]
        if merge is None:
            y = s + out if mask is None else torch.addcmul(s, out, mask.to(out.dtype))
        else:
            y = merge(s, out if mask is None else out * mask)
        return y if post is None else post(y)

    def _split(self, out: Any) -> tuple[Tensor, tuple[Any, ...]]:
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            return out[0], tuple(out[1:])
        got = type(out).__name__ if not isinstance(out, tuple) else "a tuple not led by a tensor"
        raise TypeError(
            f"Residual: branch {type(self.fn).__name__} returned {got}; it must return a tensor, "
            "or a tuple whose first element is the tensor to add (the rest is passed through)"
        )

    def _raise_mismatch(self, out: Tensor, s: Tensor) -> None:
        last = getattr(self.shortcut, "layout", None) == "channels_last"
        hint = _shape_hint(out.shape, s.shape, -1 if last else self._channel_dim)
        raise ResidualError(
            f"Residual: branch output {tuple(out.shape)} does not match shortcut output "
            f"{tuple(s.shape)} ({type(self.shortcut).__name__}); {hint}"
        )

    def _forward_batch_drop(
        self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Huang et al.: drop the branch for the whole batch; its compute is skipped."""
        s = cast(Tensor, self._shortcut(x))  # drop_path is refused with shortcut="none"
        keep = self.keep_rate

        def run(x: Tensor, s: Tensor) -> Tensor:
            return self._merge(s, self._tensor_branch(x, args, kwargs) / keep)

        def skip(x: Tensor, s: Tensor) -> Tensor:
            return self._merge(s, torch.zeros_like(s))

        if torch.compiler.is_compiling():
            pred = torch.rand((), device=x.device) < keep
            if any(True for _ in self.fn.buffers()):
                # torch.cond forbids the buffer updates of a norm in training: mask instead.
                return self._merge(s, self._tensor_branch(x, args, kwargs) * (pred / keep))
            return torch.cond(pred, run, skip, (x, s))
        if batch_keep(self.drop_path):
            return run(x, s)
        y = skip(x, s)
        return y + self._unused_params_anchor(y)

    def _forward_subset(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """DINOv2: run the branch on a random (1 - p) share of the samples, scale it back in."""
        if args or kwargs:
            raise ResidualError(
                "Residual: drop_mode='subset' runs the branch on a subset of the samples and "
                "cannot know which extra arguments are per-sample; use drop_mode='row' or "
                "'batch' for branches that take extra arguments"
            )
        n = x.shape[0]
        k = max(1, int(n * (1.0 - self.drop_path)))
        # Drawn on the CPU (microseconds; drawn on a GPU they added two kernels per block, about
        # 50 us each in an H200 profile) and sorted for a sequential gather.
        # index_select, not x[idx]: its backward is a parallel index_add, where advanced
        # indexing's is a serial index_put on the CPU (4.7% of a ResNet-110 CPU step, profiled).
        idx = torch.randperm(n)[:k].sort().values.to(x.device, non_blocking=True)
        out = self._tensor_branch(x.index_select(0, idx), (), {})
        s = cast(Tensor, self._shortcut(x))  # drop_path is refused with shortcut="none"
        if out.shape[1:] != s.shape[1:]:
            self._raise_mismatch(out, s.index_select(0, idx))
        scale = n / k
        if self.merge is None and not self.residual_in_fp32:
            y = torch.index_add(s, 0, idx, out.to(s.dtype), alpha=scale)
            return y if self.post is None else self.post(y)
        full = torch.zeros_like(s, dtype=out.dtype).index_copy(0, idx, out * scale)
        return self._merge(s, full)

    def _tensor_branch(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            out = checkpointed_call(self.fn, x, args, kwargs)
        else:
            out = self.fn(x, *args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Residual: drop_mode={self.drop_mode!r} needs a branch that returns a tensor, "
                f"got {type(out).__name__}; use drop_mode='row' for branches returning tuples"
            )
        return out

    def _unused_params_anchor(self, y: Tensor) -> Tensor | float:
        """Under torch.distributed, tie a skipped branch's parameters into the graph with 0.

        DDP then sees every parameter used (zero gradients) and needs no find_unused_parameters.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0.0
        params = [p for p in self.fn.parameters() if p.requires_grad]
        if not params:
            return 0.0
        return torch.stack([p.flatten()[0] for p in params]).sum().to(y.dtype) * 0.0

    def extra_repr(self) -> str:
        parts = []
        if self.drop_path:
            parts.append(f"drop_path={self.drop_path}, drop_mode={self.drop_mode!r}")
        if self.checkpoint:
            parts.append("checkpoint=True")
        if self.residual_in_fp32:
            parts.append("residual_in_fp32=True")
        return ", ".join(parts)
