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
from residual._dims import read_branch_dims
from residual._types import Layout, check_layout, check_positive_int
from residual.errors import ResidualError

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


def _channel_dim(layout: Layout) -> int:
    return 1 if layout == "channels_first" else -1


def _check_dim(caller: str, t: Tensor, dim: int, layout: Layout) -> None:
    axis = _channel_dim(layout)
    with _branch.shape_checks():
        has_channels = t.dim() > max(axis, 0)  # dim 1 needs 2 dims, the last dim needs 1
        fits = bool(has_channels and t.shape[axis] == dim)
    if not fits:
        fix = f"build it with dim={t.shape[axis]}" if has_channels else "give it a channel dim"
        raise ResidualError(
            f"{caller}: built for {dim} channels ({layout}), got a branch output of shape "
            f"{tuple(t.shape)}; {fix} or fix the layout"
        )


def _to_last(t: Tensor, layout: Layout) -> Tensor:
    return t.movedim(1, -1) if layout == "channels_first" else t


def _from_last(t: Tensor, layout: Layout) -> Tensor:
    return t.movedim(-1, 1) if layout == "channels_first" else t


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


class LayerScale(nn.Module):
    """``shortcut + gamma * branch`` with a learned per-channel ``gamma`` (CaiT, DINOv2).

    Args:
        dim: channels of the branch output.
        init: initial value of every ``gamma`` (1e-5 as CaiT for deep stacks).
        layout: where the channels are: dim 1 (``"channels_first"``) or last.

    >>> import torch
    >>> LayerScale(4, init=0.5, layout="channels_first")(torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2))[0, :, 0, 0]
    tensor([0.5000, 0.5000, 0.5000, 0.5000], grad_fn=<SelectBackward0>)
    """  # noqa: E501

    def __init__(self, dim: int, init: float = 1e-5, *, layout: Layout = "channels_last") -> None:
        super().__init__()
        self.dim = check_positive_int("LayerScale", "dim", dim)
        self.layout = check_layout("LayerScale", layout)
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        _check_dim("LayerScale", branch, self.dim, self.layout)
        if self.layout == "channels_first":
            return shortcut + self.gamma.view((-1,) + (1,) * (branch.dim() - 2)) * branch
        return shortcut + self.gamma * branch

    def extra_repr(self) -> str:
        return f"{self.dim}, layout={self.layout!r}"


class HighwayGate(nn.Module):
    """``g * branch + (1 - g) * shortcut`` with ``g = sigmoid(W shortcut + b)`` (Highway nets).

    The gate reads the block's input as it arrives on the shortcut; ``bias_init < 0`` starts the
    block close to the identity (Srivastava et al. 2015 use -1 to -3).

    >>> import torch
    >>> gate = HighwayGate(2, bias_init=-2.0)
    >>> _ = torch.nn.init.zeros_(gate.proj.weight)  # g = sigmoid(-2): 12% branch, 88% shortcut
    >>> gate(torch.zeros(1, 2), torch.ones(1, 2))
    tensor([[0.1192, 0.1192]], grad_fn=<LerpBackward1>)
    """

    def __init__(
        self, dim: int, *, layout: Layout = "channels_last", bias_init: float = -1.0
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("HighwayGate", "dim", dim)
        self.layout = check_layout("HighwayGate", layout)
        self.proj = nn.Linear(dim, dim)
        nn.init.constant_(self.proj.bias, bias_init)

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        _check_dim("HighwayGate", branch, self.dim, self.layout)
        gate = _from_last(torch.sigmoid(self.proj(_to_last(shortcut, self.layout))), self.layout)
        return torch.lerp(shortcut, branch, gate)

    def extra_repr(self) -> str:
        return f"{self.dim}, layout={self.layout!r}"


class GRUGate(nn.Module):
    """GRU-style gating (Parisotto et al. 2019, GTrXL): ``GRUCell(branch, hidden=shortcut)``.

    As x-transformers' ``GRUGating``: the branch output is the GRU's input, the shortcut its
    hidden state, every position gated independently.

    >>> import torch
    >>> GRUGate(8)(torch.randn(2, 5, 8), torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, dim: int, *, layout: Layout = "channels_last") -> None:
        super().__init__()
        self.dim = check_positive_int("GRUGate", "dim", dim)
        self.layout = check_layout("GRUGate", layout)
        self.gru = nn.GRUCell(dim, dim)

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        _check_dim("GRUGate", branch, self.dim, self.layout)
        s = _to_last(shortcut, self.layout)
        out = self.gru(_to_last(branch, self.layout).reshape(-1, self.dim), s.reshape(-1, self.dim))
        return _from_last(out.view(s.shape), self.layout)

    def extra_repr(self) -> str:
        return f"{self.dim}, layout={self.layout!r}"


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
        alpha, beta = self.logits.softmax(0).to(branch.dtype).unbind()
        return alpha * branch + beta * shortcut


def check_merge_fits(merge: nn.Module, branch: nn.Module) -> None:
    """Raise if a merge with per-channel parameters cannot fit the branch's output.

    Merges that hold per-channel parameters declare ``dim`` and ``layout``; where the branch's
    output channels and layout can be read for certain, both must agree (otherwise the merge
    checks the shapes it gets at call time).
    """
    dim, layout = getattr(merge, "dim", None), getattr(merge, "layout", None)
    dims = read_branch_dims(branch)
    if not isinstance(dim, int) or dims is None:
        return
    if dim != dims.out_channels or (layout is not None and layout != dims.layout):
        raise ResidualError(
            f"Residual: merge {type(merge).__name__} was built for {dim} channels ({layout}) "
            f"but the branch outputs {dims.out_channels} ({dims.layout}); build it with "
            f"{type(merge).__name__}({dims.out_channels}, layout={dims.layout!r})"
        )


torch.fx.wrap("_check_dim")  # an FX leaf: it reads shapes
