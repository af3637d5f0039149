"""Merges: how the shortcut S(x) and the branch F(x) meet.

A merge is a module called as ``merge(shortcut, branch)``; its learned parameters live in it, so
they show in torchinfo and in the state_dict under ``merge.*``. ``Residual(fn)`` with no merge
adds, without calling any module at all.

>>> import torch
>>> from residual.merges import ScaledAdd
>>> ScaledAdd(alpha=2.0)(torch.ones(2), torch.ones(2))
tensor([3., 3.])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from residual import _branch
from residual._dims import read_branch_dims, read_branch_layout, read_branch_spatial_dims
from residual._types import LAYOUTS, Layout, check_layout, check_positive_int
from residual.errors import ResidualError

_CHANNELS_FIRST = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

__all__ = [
    "Add",
    "DeepNormScales",
    "GRUGate",
    "HighwayGate",
    "LaurelRW",
    "LayerScale",
    "ReZero",
    "ScaledAdd",
    "deepnorm_scales",
]


def _check_merge_layout(caller: str, layout: Layout | None) -> Layout | None:
    return None if layout is None else check_layout(caller, layout)


def _channel_axis(
    caller: str, t: Tensor, dim: int, layout: Layout | None, spatial_dims: int | None
) -> int:
    """The axis of ``t`` that holds the ``dim`` channels; raise if it does not (an FX leaf).

    Channels first it is dim 1, or dim 0 of one unbatched (C, *spatial) sample when the spatial
    dims are known (``Residual`` reads them from the branch or the shortcut); channels last
    (and with no layout) the last dim.
    """
    with _branch.shape_checks():
        shape = tuple(t.shape)
        if layout != "channels_first":
            axis, fits = -1, len(shape) >= 1 and shape[-1] == dim
        elif spatial_dims is not None and len(shape) == spatial_dims + 1:
            axis, fits = 0, shape[0] == dim
        else:
            axis, fits = 1, len(shape) >= 2 and shape[1] == dim
    if not fits:
        if axis == 0:
            raise ResidualError(
                f"{caller}: built for {dim} channels (channels_first), got the branch output "
                f"{shape} of one unbatched (C, *spatial) sample; build it as "
                f"{caller}({shape[0]}, layout='channels_first')"
            )
        raise ResidualError(_mismatch(caller, shape, dim, layout))
    return axis


def _per_channel(gamma: Tensor, t: Tensor, axis: int) -> Tensor:
    """``gamma`` (C,) shaped to broadcast along ``axis`` of ``t`` (an FX leaf)."""
    if axis == -1:
        return gamma
    with _branch.shape_checks():
        rank = t.dim()
    return gamma.view((-1,) + (1,) * (rank - axis - 1))


def _mismatch(caller: str, shape: tuple[int, ...], dim: int, layout: Layout | None) -> str:
    """The problem, and for each reading of ``shape`` the constructor that fits it."""
    built = f"built for {dim} channels ({layout or 'layout not set: read as channels_last'})"
    got = f"{caller}: {built}, got a branch output of shape {shape}"
    fixes = []
    if len(shape) >= 3:  # (N, C, *spatial): a conv branch
        first = f"{caller}({shape[1]}, layout='channels_first')"
        fixes.append((shape[1] == dim, f"if its channels are at dim 1 (N, C, *spatial: a conv "
                      f"branch), build it as {first}"))  # fmt: skip
    if shape:
        last = f"{caller}({shape[-1]}, layout='channels_last')"
        fixes.append((shape[-1] == dim, f"if its channels are last (..., C), build it as {last}"))
    if layout == "channels_first" and shape and shape[0] == dim:  # (C, *spatial), unbatched?
        fixes.append((True, f"if it is one unbatched (C, *spatial) sample, tell the block its "
                      f"batched rank: Residual(..., sample_axis=SampleAxis(0, batched_ndim="
                      f"{len(shape) + 1}))"))  # fmt: skip
    if not fixes or (len(shape) == 1 and layout == "channels_first"):
        return f"{got}; give it a channel dim or fix the layout"
    fixes.sort(key=lambda fix: not fix[0])  # the reading that keeps the channel count first
    return f"{got}; " + "; ".join(text for _, text in fixes)


def _stream_dtype(shortcut: Tensor, branch: Tensor) -> torch.dtype:
    """The dtype the plain add ``shortcut + branch`` gives: what every merge returns."""
    return torch.promote_types(shortcut.dtype, branch.dtype)


class _PerChannelMerge(nn.Module):
    """A merge with ``dim`` per-channel parameters on the axis ``layout`` names (private base).

    ``layout=None`` follows the block: :func:`check_merge_fits` (called by ``Residual``) sets it.
    """

    dim: int
    layout: Layout | None
    spatial_dims: int | None = None  # set by Residual where known: a rank below is unbatched

    def extra_repr(self) -> str:
        return f"{self.dim}" if self.layout is None else f"{self.dim}, layout={self.layout!r}"


class Add(nn.Module):
    """``shortcut + branch``, out of place: the plain residual merge.

    >>> import torch
    >>> Add()(torch.ones(2), torch.full((2,), 2.0))
    tensor([3., 3.])
    """

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return shortcut + branch


class ScaledAdd(nn.Module):
    """``alpha * shortcut + beta * branch`` with fixed scales (DeepNet's alpha; a branch scale).

    Args:
        alpha: scale of the shortcut (DeepNorm's alpha > 1 for deep post-norm stacks).
        beta: scale of the branch.

    >>> import torch
    >>> ScaledAdd(alpha=2.0, beta=0.5)(torch.ones(1), torch.ones(1))
    tensor([2.5000])
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        if self.beta == 1.0:
            return torch.add(branch, shortcut, alpha=self.alpha)
        return torch.add(shortcut * self.alpha, branch, alpha=self.beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"


class DeepNormScales(NamedTuple):
    """DeepNorm's shortcut scale ``alpha`` and the init gain ``beta`` of the branch's weights.

    Returned by :func:`deepnorm_scales`; a named tuple, so it unpacks as ``alpha, beta``.

    >>> alpha, beta = DeepNormScales(alpha=2.0, beta=0.5)
    >>> ScaledAdd(alpha=alpha)  # the merge; beta is a Xavier gain, not ScaledAdd's beta
    ScaledAdd(alpha=2.0, beta=1.0)
    """

    alpha: float
    beta: float


def deepnorm_scales(
    encoder_layers: int = 0, decoder_layers: int = 0
) -> tuple[DeepNormScales | None, DeepNormScales | None]:
    """DeepNorm's scales (alpha, beta) for an encoder, a decoder or both (Wang et al. 2022).

    Use ``alpha`` as the merge (``ScaledAdd(alpha=...)``, post-norm) and ``beta`` as the gain of
    the Xavier init of the FFN, value and output projections.

    Returns:
        ``(encoder_scales, decoder_scales)``; each is None where that stack has 0 layers.

    >>> enc, dec = deepnorm_scales(encoder_layers=18)
    >>> round(enc.alpha, 4), round(enc.beta, 4), dec
    (2.4495, 0.2887, None)
    """
    if encoder_layers < 0 or decoder_layers < 0 or encoder_layers + decoder_layers == 0:
        raise ResidualError(
            "deepnorm_scales: give a positive encoder_layers and/or decoder_layers, got "
            f"encoder_layers={encoder_layers}, decoder_layers={decoder_layers}"
        )
    n, m = encoder_layers, decoder_layers
    if n and m:
        enc = DeepNormScales(0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16))
        return enc, DeepNormScales((3 * m) ** 0.25, (12 * m) ** -0.25)
    if n:
        return DeepNormScales((2 * n) ** 0.25, (8 * n) ** -0.25), None
    return None, DeepNormScales((2 * m) ** 0.25, (8 * m) ** -0.25)


class ReZero(nn.Module):
    """``shortcut + a * branch`` with one learned scalar ``a``, 0 at init (ReZero / SkipInit).

    >>> import torch
    >>> ReZero()(torch.ones(2), torch.ones(2))
    tensor([1., 1.], grad_fn=<AddBackward0>)
    """

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(init)))

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return shortcut + self.alpha * branch


class LayerScale(_PerChannelMerge):
    """``shortcut + gamma * branch`` with a learned per-channel ``gamma`` (CaiT, DINOv2).

    Args:
        dim: channels of the branch output.
        init: initial value of every ``gamma`` (1e-5 as CaiT for deep stacks).
        layout: where the channels are: dim 1 (``"channels_first"``: conv branches, ConvNeXt)
            or last (``"channels_last"``). None (default) follows the block:
            ``Residual(fn, merge=...)`` sets it, once, to the layout of ``fn``'s output where
            that reading is certain (a conv, pool or Linear, an ``nn.Sequential`` of readable
            layers, einops ``Rearrange`` between them, a nested residual block), else to the
            layout its shortcut declares (``ProjectionShortcut(..., layout=...)``). Where
            neither is known, a branch that holds convolutions (a conv block with a custom
            ``forward``) is refused when the block is built, asking for the layout: with a
            width equal to ``dim``, no shape could tell the width from the channels. Any other
            branch reads channels last (..., C), and a shape that does not fit raises when
            called, naming the constructor for each reading. Beside a channels-first branch
            whose spatial dims are read (or its shortcut's), one unbatched (C, *spatial)
            sample, as torch's convs take it, is scaled along dim 0: the batch of one.

    ``gamma`` is cast to the stream's dtype (a float32 ``gamma`` on a bfloat16 stream gives a
    bfloat16 output, as the plain add).

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> conv = nn.Conv2d(4, 4, 3, padding=1)
    >>> block = Residual(conv, merge=LayerScale(4, init=0.5))  # follows the conv: channels first
    >>> block.merge
    LayerScale(4, layout='channels_first')
    >>> x = torch.randn(1, 4, 4, 4)  # W == C: the channels are still dim 1
    >>> torch.allclose(block(x), x + 0.5 * conv(x))
    True
    """

    def __init__(self, dim: int, init: float = 1e-5, *, layout: Layout | None = None) -> None:
        super().__init__()
        self.dim = check_positive_int("LayerScale", "dim", dim)
        self.layout = _check_merge_layout("LayerScale", layout)
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        axis = _channel_axis("LayerScale", branch, self.dim, self.layout, self.spatial_dims)
        gamma = self.gamma.to(_stream_dtype(shortcut, branch))
        return shortcut + _per_channel(gamma, branch, axis) * branch


class HighwayGate(_PerChannelMerge):
    """``g * branch + (1 - g) * shortcut`` with ``g = sigmoid(W shortcut + b)`` (Highway nets).

    The gate reads the block's input as it arrives on the shortcut; ``bias_init < 0`` starts the
    block close to the identity (Srivastava et al. 2015 use -1 to -3). ``layout`` as in
    :class:`LayerScale` (None follows the block). The gate is computed in the dtype of the
    projection's weight and the output has the stream's dtype (that of ``shortcut + branch``).

    >>> import torch
    >>> gate = HighwayGate(2, bias_init=-2.0)
    >>> _ = torch.nn.init.zeros_(gate.proj.weight)  # g = sigmoid(-2): 12% branch, 88% shortcut
    >>> gate(torch.zeros(1, 2), torch.ones(1, 2))
    tensor([[0.1192, 0.1192]], grad_fn=<LerpBackward1>)
    """

    def __init__(self, dim: int, *, layout: Layout | None = None, bias_init: float = -1.0) -> None:
        super().__init__()
        self.dim = check_positive_int("HighwayGate", "dim", dim)
        self.layout = _check_merge_layout("HighwayGate", layout)
        self.proj = nn.Linear(dim, dim)
        nn.init.constant_(self.proj.bias, bias_init)

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        axis = _channel_axis("HighwayGate", branch, self.dim, self.layout, self.spatial_dims)
        dtype = _stream_dtype(shortcut, branch)
        s = shortcut.movedim(axis, -1).to(self.proj.weight.dtype)
        gate = torch.sigmoid(self.proj(s)).movedim(-1, axis).to(dtype)
        return torch.lerp(shortcut.to(dtype), branch.to(dtype), gate)


class GRUGate(_PerChannelMerge):
    """GRU-style gating (Parisotto et al. 2019, GTrXL): ``GRUCell(branch, hidden=shortcut)``.

    As x-transformers' ``GRUGating``: the branch output is the GRU's input, the shortcut its
    hidden state, every position gated independently. ``layout`` as in :class:`LayerScale`
    (None follows the block). The cell runs in its weights' dtype and the output has the
    stream's dtype (that of ``shortcut + branch``).

    >>> import torch
    >>> GRUGate(8)(torch.randn(2, 5, 8), torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, dim: int, *, layout: Layout | None = None) -> None:
        super().__init__()
        self.dim = check_positive_int("GRUGate", "dim", dim)
        self.layout = _check_merge_layout("GRUGate", layout)
        self.gru = nn.GRUCell(dim, dim)

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        axis = _channel_axis("GRUGate", branch, self.dim, self.layout, self.spatial_dims)
        dtype, weights = _stream_dtype(shortcut, branch), self.gru.weight_ih.dtype
        s = shortcut.movedim(axis, -1)
        b = branch.movedim(axis, -1).reshape(-1, self.dim).to(weights)
        out = self.gru(b, s.reshape(-1, self.dim).to(weights))
        return out.view(s.shape).movedim(-1, axis).to(dtype)


class LaurelRW(nn.Module):
    """LAuReL-RW (Menghani et al., ICML 2025): ``alpha * branch + beta * shortcut``, learned.

    ``(alpha, beta) = softmax(logits)``: the paper normalises its two learned residual weights
    with a softmax so that they cannot grow without bound. The logits start at ``init`` (0, 0:
    ``alpha = beta = 1/2``). With :class:`~residual.shortcuts.LowRankShortcut` as the shortcut
    this is LAuReL-RW+LR: ``alpha f(x) + beta (x + B A x)``.

    >>> import torch
    >>> LaurelRW()(torch.ones(2), torch.full((2,), 3.0))  # (1 + 3) / 2 at init
    tensor([2., 2.], grad_fn=<AddBackward0>)
    """

    def __init__(self, init: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        if len(init) != 2:
            raise ResidualError(f"LaurelRW: init holds the two logits (alpha, beta), got {init}")
        self.logits = nn.Parameter(torch.tensor([float(v) for v in init]))  # (alpha, beta)

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        alpha, beta = self.logits.softmax(0).to(_stream_dtype(shortcut, branch)).unbind()
        return alpha * branch + beta * shortcut


def _spatial_dims(
    branch: nn.Module, shortcut: nn.Module | None, batched_ndim: int | None
) -> int | None:
    """The spatial dims of a channels-first block, where the branch or the shortcut fix them,
    or the block's sample axis says its batched rank (``SampleAxis(0, batched_ndim=...)``)."""
    spatial = read_branch_spatial_dims(branch)
    if spatial is None and getattr(shortcut, "layout", None) == "channels_first":
        declared = getattr(shortcut, "spatial_dims", None)
        spatial = declared if isinstance(declared, int) else None
    if spatial is None and batched_ndim is not None and batched_ndim > 2:
        spatial = batched_ndim - 2
    return spatial


def check_merge_fits(
    merge: nn.Module,
    branch: nn.Module,
    shortcut: nn.Module | None = None,
    batched_ndim: int | None = None,
) -> None:
    """Set a per-channel merge's layout from the block, and raise if it cannot fit.

    A :class:`_PerChannelMerge` built with ``layout=None`` takes the layout of the branch's
    output where it can be read for certain, else the one the shortcut declares; neither known,
    a branch that holds convolutions is refused (its output is likely channels first, and a
    width equal to ``dim`` would hide the mismatch), the rest read channels last. Any merge
    that declares an int ``dim`` (and a ``layout``) must then agree with the branch's output
    channels and layout where those are certain; otherwise it checks the shapes it gets when
    called.
    """
    dim, layout = getattr(merge, "dim", None), getattr(merge, "layout", None)
    dims = read_branch_dims(branch)
    known = read_branch_layout(branch)
    declared = getattr(shortcut, "layout", None)
    if known is None and declared in LAYOUTS:
        known = declared
    name = type(merge).__name__
    if isinstance(merge, _PerChannelMerge) and layout is None:
        if known is None and any(isinstance(m, _CHANNELS_FIRST) for m in branch.modules()):
            raise ResidualError(
                f"Residual: merge {name}({merge.dim}) has no layout, and the branch "
                f"{type(branch).__name__} holds convolutions but its output layout cannot be "
                f"read (a custom forward); build it with {name}({merge.dim}, "
                "layout='channels_first') for (N, C, *spatial) outputs, or "
                f"{name}({merge.dim}, layout='channels_last') for (..., C)"
            )
        merge.layout = layout = known
    if isinstance(merge, _PerChannelMerge) and layout == "channels_first":
        merge.spatial_dims = _spatial_dims(branch, shortcut, batched_ndim)
    if isinstance(dim, int) and known is not None and layout is not None and layout != known:
        channels = dims.out_channels if dims is not None else dim
        source = (
            f"the branch outputs {channels} ({known})"
            if read_branch_layout(branch) is not None
            else f"the shortcut {type(shortcut).__name__} is {known}"
        )
        raise ResidualError(
            f"Residual: merge {name} was built for {dim} channels ({layout}) but {source}; "
            f"build it with {name}({channels}, layout={known!r})"
        )
    if isinstance(dim, int) and dims is not None and dim != dims.out_channels:
        raise ResidualError(
            f"Residual: merge {name} was built for {dim} channels ({layout}) but the branch "
            f"outputs {dims.out_channels} ({dims.layout}); build it with "
            f"{name}({dims.out_channels}, layout={dims.layout!r})"
        )


for _name in ("_channel_axis", "_per_channel"):  # FX leaves: they read shapes
    torch.fx.wrap(_name)
