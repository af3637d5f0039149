"""Shared fixtures and reference modules for the test suite."""

from __future__ import annotations

import inspect
import os
import re

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=25, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Tests that hand our code to a compiler or a symbolic tracer (dynamo, export, ONNX, TorchScript's
# script, torch.fx). Mutation runs (.ci/mutation.py) deselect them with `-m "not compiles"`:
# mutmut wraps every function in a trampoline that these cannot trace, so they would fail on
# every mutant and count as kills. (jit.trace runs the Python code and stays in.)
_COMPILES = re.compile(
    r"torch\.compile|torch\.export|torch\.onnx|_dynamo|jit\.script|symbolic_trace|torch\.fx"
)
_COMPILING_MODULES = {"test_compile.py", "test_export.py", "test_fx.py"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compiles: the test compiles or exports our modules")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "function", None)
        if fn is None:
            continue
        if item.path.name in _COMPILING_MODULES or _COMPILES.search(inspect.getsource(fn)):
            item.add_marker(pytest.mark.compiles)


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
