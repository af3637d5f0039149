"""Shared fixtures and reference modules for the test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class MySelfAttention(nn.Module):
    """A user's attention module: fused qkv, extra kwargs (a padding mask)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        out, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        return out


def assert_close(a: Tensor, b: Tensor, atol: float = 0.0, rtol: float = 0.0) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
