"""torchinfo shows the branch layers and the shortcut as rows, with the right counts."""

from __future__ import annotations

import torch
import torchinfo
from torch import nn

from conftest import MySelfAttention
from residual import Residual, ResidualBlock


def _rows(stats: torchinfo.ModelStatistics) -> list[tuple[str, int, int]]:
    return [(info.class_name, info.depth, info.num_params) for info in stats.summary_list]


def test_residual_block_rows_and_counts() -> None:
    stats = torchinfo.summary(
        ResidualBlock(64, 128, stride=2), input_size=(1, 64, 32, 32), verbose=0
    )
    rows = _rows(stats)
    assert ("ProjectionShortcut", 1, 8_192 + 256) in rows
    assert ("Conv2d", 2, 64 * 128 * 9) in rows
    assert ("Conv2d", 2, 64 * 128) in rows  # the shortcut's 1x1 conv
    assert ("ReLU", 1, 0) in rows  # post
    assert stats.total_params == 64 * 128 * 9 + 128 * 128 * 9 + 2 * 256 + 64 * 128 + 256
    out = next(i for i in stats.summary_list if i.depth == 0).output_size
    assert list(out) == [1, 128, 16, 16]


def test_identity_shortcut_is_a_row() -> None:
    stats = torchinfo.summary(ResidualBlock(16, 16), input_size=(1, 16, 8, 8), verbose=0)
    assert ("IdentityShortcut", 1, 0) in _rows(stats)


def test_mlp_lstm_attention_rows() -> None:
    mlp = Residual(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)))
    stats = torchinfo.summary(mlp, input_size=(2, 32), verbose=0)
    assert stats.total_params == 64 + 32 * 64 + 64 + 64 * 32 + 32
    lstm = Residual(nn.LSTM(16, 16, batch_first=True))
    stats = torchinfo.summary(lstm, input_size=(2, 5, 16), verbose=0)
    assert ("LSTM", 1, 4 * (16 * 16 * 2 + 2 * 16)) in _rows(stats)
    attn = Residual(MySelfAttention(16, 4))
    stats = torchinfo.summary(attn, input_data=[torch.randn(2, 5, 16)], verbose=0)
    assert stats.total_params == 3 * 16 * 16 + 3 * 16 + 16 * 16 + 16
