"""timm's own tests of ``drop_path`` / ``DropPath``, run on ours.

Source: huggingface/pytorch-image-models ``tests/test_layers_drop.py`` (classes
``TestDropPath`` and ``TestDropPathModule``; each test names its class and test). timm's
``drop_path(x, drop_prob, training, scale_by_keep)`` is ``residual.drop_path(x, p, training,
scale_by_keep)``: the rate's keyword is ``p`` (substituted), the rest is unchanged.

timm's ``DropPath(drop_prob)`` is a module applied to a branch's output before the user's add
(``x + self.drop_path(self.mlp(x))``); ours is the same drop inside ``Residual(mlp,
drop_path=p)``. The stand-in below (the smallest one) reads our drop back as timm's module:
``Residual(nn.Identity(), drop_path=p)(x) - x`` is the dropped branch output.

Deliberate differences (none of them changes a ported test):

* The rate's keyword is ``p`` (torchvision's name), not ``drop_prob``.
* ``residual.drop_path``'s ``training`` defaults to True (it is the training-time op; eval is
  ``Residual``'s business); timm's defaults to False. Every ported test passes it explicitly.
* ``DropPath.extra_repr`` is timm's ``drop_prob=0.123``; ours reads ``drop_path=0.123,
  drop_mode='row'`` (the test only looks for ``0.123``).

Not ported: ``TestDropBlock2d`` (10 tests) and ``TestDropBlock2dModule`` (4 tests): no DropBlock
in residual (it drops spatial blocks of a feature map, not residual branches).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from residual import Residual, drop_path


class DropPath(nn.Module):
    """Stand-in for ``timm.layers.DropPath``: the drop of ``Residual``, read back as a module."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.block = Residual(nn.Identity(), drop_path=drop_prob, scale_by_keep=scale_by_keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) - x

    def extra_repr(self) -> str:
        return self.block.extra_repr()


class TestDropPath:
    """Test drop_path function and DropPath module."""

    def test_no_drop_when_prob_zero(self) -> None:
        # Source: timm tests/test_layers_drop.py, TestDropPath.test_no_drop_when_prob_zero
        x = torch.ones((4, 8, 16, 16))
        result = drop_path(x, p=0.0, training=True)
        assert torch.allclose(result, x)

    def test_no_drop_when_not_training(self) -> None:
        # Source: timm tests/test_layers_drop.py, TestDropPath.test_no_drop_when_not_training
        x = torch.ones((4, 8, 16, 16))
        result = drop_path(x, p=0.5, training=False)
        assert torch.allclose(result, x)

    def test_drop_path_scaling(self) -> None:
        # Source: timm tests/test_layers_drop.py, TestDropPath.test_drop_path_scaling
        torch.manual_seed(42)
        x = torch.ones((100, 8, 4, 4))  # Large batch for statistical stability
        keep_prob = 0.8
        drop_prob = 1 - keep_prob

        result = drop_path(x, p=drop_prob, training=True, scale_by_keep=True)

        # Kept samples should be scaled by 1/keep_prob = 1.25
        kept_mask = result[:, 0, 0, 0] != 0
        if kept_mask.any():
            kept_vals = result[kept_mask, 0, 0, 0]
            expected_scale = 1.0 / keep_prob
            assert torch.allclose(kept_vals, torch.full_like(kept_vals, expected_scale), atol=1e-5)

    def test_drop_path_no_scaling(self) -> None:
        # Source: timm tests/test_layers_drop.py, TestDropPath.test_drop_path_no_scaling
        torch.manual_seed(42)
        x = torch.ones((100, 8, 4, 4))
        result = drop_path(x, p=0.2, training=True, scale_by_keep=False)

        # Kept samples should remain at 1.0
        kept_mask = result[:, 0, 0, 0] != 0
        if kept_mask.any():
            kept_vals = result[kept_mask, 0, 0, 0]
            assert torch.allclose(kept_vals, torch.ones_like(kept_vals))


class TestDropPathModule:
    """Test DropPath nn.Module."""

    def test_training_mode(self) -> None:
        # Source: timm tests/test_layers_drop.py, TestDropPathModule.test_training_mode
        module = DropPath(drop_prob=0.5)
        x = torch.ones((32, 8, 4, 4))  # Larger batch for statistical reliability

        module.eval()
        result = module(x)
        assert torch.allclose(result, x), "Should not drop in eval mode"

        module.train()
        torch.manual_seed(42)
        result = module(x)
        # With 50% drop prob on 32 samples, very unlikely all survive
        # Check that at least one sample has zeros (was dropped)
        has_zeros = (result == 0).any()
        assert has_zeros, "Should drop some paths in train mode"

    def test_extra_repr(self) -> None:
        # Source: timm tests/test_layers_drop.py, TestDropPathModule.test_extra_repr
        module = DropPath(drop_prob=0.123)
        repr_str = module.extra_repr()
        assert "0.123" in repr_str
