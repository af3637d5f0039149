"""Residual MLP and MLP-Mixer (Tolstikhin et al. 2021), both stacks of ``Residual`` s.

>>> import torch
>>> MLPMixer(8, 2, 1, dim=32, depth=2, num_classes=10)(torch.randn(3, 1, 8, 8)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import einops.layers.torch
import torch
from torch import Tensor, nn

from residual import _branch
from residual._types import DropMode, check_positive_int
from residual.core import Residual
from residual.drop import apply_drop_schedule, check_drop_rate
from residual.errors import ResidualError

__all__ = ["MLPMixer", "ResidualMLP", "mlp_block"]


def _rearrange(layer: Rearrange, x: Tensor) -> Tensor:
    return einops.layers.torch.Rearrange.forward(layer, x)


def _reduce(layer: Reduce, x: Tensor) -> Tensor:
    return einops.layers.torch.Reduce.forward(layer, x)


class Rearrange(einops.layers.torch.Rearrange):
    """einops' ``Rearrange`` as one FX leaf call.

    einops picks its recipe by ``x.ndim``, which ``torch.fx.symbolic_trace`` cannot read: the
    call is recorded instead and runs on the real tensor. Same name, pattern, repr and (no)
    state as einops' layer, of which it is a subclass.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _rearrange(self, x)


class Reduce(einops.layers.torch.Reduce):
    """einops' ``Reduce``, one FX leaf call (as :class:`Rearrange`)."""

    def forward(self, x: Tensor) -> Tensor:
        return _reduce(self, x)


def _check_mixer_images(x: Tensor, channels: int, size: int) -> None:
    """Raise unless ``x`` is (N, channels, size, size). An FX leaf."""
    with _branch.shape_checks():
        fits = bool(x.dim() == 4 and x.shape[1:] == (channels, size, size))
    if not fits:
        raise ResidualError(
            f"MLPMixer: expected images (N, {channels}, {size}, {size}), got {tuple(x.shape)}"
        )


def mlp_block(dim: int, hidden: int, dropout: float = 0.0, drop_path: float = 0.0) -> Residual:
    """A pre-norm MLP residual: ``x + Linear(GELU(Linear(LayerNorm(x))))``.

    >>> [type(m).__name__ for m in mlp_block(8, 32).fn]
    ['LayerNorm', 'Linear', 'GELU', 'Dropout', 'Linear']
    """
    return Residual(
        nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        ),
        drop_path=drop_path,
    )


class ResidualMLP(nn.Module):
    """``Linear`` stem, ``depth`` pre-norm MLP residuals, LayerNorm, linear head.

    Input (N, in_features) -> (N, num_classes); with ``flatten=True`` any (N, *) input whose
    trailing dimensions hold ``in_features`` values (an image). ``drop_path`` is the stochastic
    depth rate of the deepest block, decayed linearly to the first; ``drop_mode`` as
    :class:`Residual`.

    >>> import torch
    >>> ResidualMLP(64, 10, dim=32, depth=3)(torch.randn(4, 64)).shape
    torch.Size([4, 10])
    >>> ResidualMLP(64, 10, dim=32, depth=3, flatten=True)(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        dim: int = 256,
        depth: int = 4,
        expansion: int = 4,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
        flatten: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int("ResidualMLP", "depth", depth)
        self.flatten = bool(flatten)
        check_drop_rate("ResidualMLP", drop_path)
        self.stem = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(
            *(mlp_block(dim, expansion * dim, dropout) for _ in range(depth))
        )
        apply_drop_schedule(self.blocks, drop_path, drop_mode)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.flatten:
            x = x.flatten(1)
        return self.head(self.norm(self.blocks(self.stem(x))))

    def extra_repr(self) -> str:
        return "flatten=True" if self.flatten else ""


class MLPMixer(nn.Module):
    """MLP-Mixer: patch embedding, ``depth`` x (token-mixing residual, channel-mixing residual).

    Token mixing transposes with einops' ``Rearrange`` so that a ``Linear`` mixes the patches.

    Args:
        image_size: side of the square input; patch_size: side of a patch (must divide it).
        in_channels: image channels; dim: patch embedding width; depth: mixer layers.
        num_classes: classifier outputs; token_hidden / channel_hidden: MLP widths
            (default dim / 2 and 4 * dim, as the paper's S/16 ratios).
        dropout: dropout inside the MLPs.
        drop_path: stochastic depth rate of the deepest residual, decayed linearly to the first
            (token and channel mixing count as one residual each); drop_mode as ``Residual``.

    Input (N, C, H, W) -> (N, num_classes).

    >>> import torch
    >>> mixer = MLPMixer(32, 8, 3, dim=32, depth=2)  # 16 patches of 8x8
    >>> mixer(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> len(mixer.blocks)  # a token-mixing and a channel-mixing Residual per layer
    4
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        *,
        dim: int = 128,
        depth: int = 4,
        num_classes: int = 10,
        token_hidden: int | None = None,
        channel_hidden: int | None = None,
        dropout: float = 0.0,
        drop_path: float = 0.0,
        drop_mode: DropMode = "row",
    ) -> None:
        super().__init__()
        check_positive_int("MLPMixer", "patch_size", patch_size)
        check_drop_rate("MLPMixer", drop_path)
        if image_size % patch_size:
            raise ResidualError(
                f"MLPMixer: patch_size={patch_size} must divide image_size={image_size}"
            )
        tokens = (image_size // patch_size) ** 2
        token_hidden = token_hidden or max(dim // 2, 1)
        channel_hidden = channel_hidden or 4 * dim
        self.image_size, self.in_channels = image_size, in_channels
        self.patches = nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(patch_size * patch_size * in_channels, dim),
        )
        layers: list[nn.Module] = []
        for _ in range(depth):
            token_mixing = nn.Sequential(
                nn.LayerNorm(dim),
                Rearrange("b n d -> b d n"),
                nn.Linear(tokens, token_hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(token_hidden, tokens),
                Rearrange("b d n -> b n d"),
            )
            layers.append(Residual(token_mixing))
            layers.append(mlp_block(dim, channel_hidden, dropout))
        self.blocks = nn.Sequential(*layers)
        apply_drop_schedule(self.blocks, drop_path, drop_mode)
        self.norm = nn.LayerNorm(dim)
        self.pool = Reduce("b n d -> b d", "mean")
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        _check_mixer_images(x, self.in_channels, self.image_size)
        return self.head(self.pool(self.norm(self.blocks(self.patches(x)))))


for _name in ("_rearrange", "_reduce", "_check_mixer_images"):
    torch.fx.wrap(_name)
