"""Stable checkpoints: the state_dict keys and shapes of every zoo model are pinned in golden
files, so a renamed submodule fails here instead of breaking users' saved weights.

After a deliberate change: RESIDUAL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn

from residual import Bottleneck, PreActBlock, ResidualBlock
from residual.models import (
    CausalTransformerLM,
    MLPMixer,
    ResidualLSTM,
    ResidualMLP,
    TransformerEncoderLayer,
    cifar_resnet,
    gpt_block,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    wide_resnet50_2,
)

GOLDEN = Path(__file__).parent / "golden"
MODELS: dict[str, Callable[[], nn.Module]] = {
    "ResidualBlock_64_128_s2": lambda: ResidualBlock(64, 128, 2),
    "Bottleneck_64_64": lambda: Bottleneck(64, 64),
    "PreActBlock_16_32_s2": lambda: PreActBlock(16, 32, 2),
    "cifar_resnet20": lambda: cifar_resnet(20),
    "cifar_resnet20_projection": lambda: cifar_resnet(20, shortcut="projection"),
    "cifar_resnet20_preact": lambda: cifar_resnet(20, preact=True),
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet50_avg_down": lambda: resnet50(avg_down=True),
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
    "wide_resnet50_2": wide_resnet50_2,
    "TransformerEncoderLayer_post": lambda: TransformerEncoderLayer(32, 4, 64, batch_first=True),
    "TransformerEncoderLayer_pre": lambda: TransformerEncoderLayer(
        32, 4, 64, norm_first=True, batch_first=True
    ),
    "gpt_block": lambda: gpt_block(32, 4),
    "CausalTransformerLM": lambda: CausalTransformerLM(50, 32, 4, 2, 16),
    "ResidualLSTM_gnmt": lambda: ResidualLSTM(16, 32, 4, residual_from=2, bidirectional_first=True),
    "ResidualMLP": lambda: ResidualMLP(64, 10, dim=32, depth=2),
    "MLPMixer": lambda: MLPMixer(8, 2, 1, dim=32, depth=2),
}


def _layout(model: nn.Module) -> list[list[object]]:
    return [[key, list(value.shape)] for key, value in model.state_dict().items()]


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_layout_is_stable(name: str) -> None:
    path = GOLDEN / f"{name}.json"
    layout = _layout(MODELS[name]())
    if os.environ.get("RESIDUAL_UPDATE_GOLDEN") == "1":
        path.write_text(json.dumps(layout, indent=0) + "\n")
    assert path.exists(), f"no golden file for {name}; run with RESIDUAL_UPDATE_GOLDEN=1"
    expected = json.loads(path.read_text())
    assert layout == expected, (
        f"{name}: state_dict keys or shapes changed; saved checkpoints would no longer load"
    )
