"""torchvision ResNet state_dicts <-> this library's ResNets, strictly.

torchvision names a block's layers ``layer{i}.{j}.conv1``, ``bn1``, ..., and its projection
``layer{i}.{j}.downsample.0`` (conv) / ``.1`` (norm). Here a block is a ``Residual`` whose branch
is ``fn`` and whose projection is ``shortcut.conv`` / ``shortcut.norm``; the stem and ``fc`` have
the same names. Only the layout documented by torchvision is used: torchvision is not imported.

>>> from residual.models import resnet18
>>> theirs = to_torchvision_state_dict(resnet18())
>>> [k for k in theirs if k.startswith("layer2.0.")][:2]
['layer2.0.conv1.weight', 'layer2.0.bn1.weight']
>>> load_torchvision(resnet18(), theirs)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from residual.errors import ResidualError
from residual.shortcuts import PooledProjectionShortcut

__all__ = ["load_torchvision", "to_torchvision_state_dict"]

# (torchvision pattern, ours) pairs; each key matches at most one rule, the rest map to itself.
_RULES: list[tuple[str, str]] = [
    (r"^(layer\d+\.\d+)\.downsample\.0\.", r"\1.shortcut.conv."),
    (r"^(layer\d+\.\d+)\.downsample\.1\.", r"\1.shortcut.norm."),
    (r"^(layer\d+\.\d+)\.((?:conv|bn)\d)\.", r"\1.fn.\2."),
]
_REVERSE: list[tuple[str, str]] = [
    (r"^(layer\d+\.\d+)\.shortcut\.conv\.", r"\1.downsample.0."),
    (r"^(layer\d+\.\d+)\.shortcut\.norm\.", r"\1.downsample.1."),
    (r"^(layer\d+\.\d+)\.fn\.((?:conv|bn)\d)\.", r"\1.\2."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def _check_model(model: nn.Module) -> None:
    if any(isinstance(m, PooledProjectionShortcut) for m in model.modules()):
        raise ResidualError(
            "load_torchvision: this model uses ResNet-D shortcuts (avg_down=True), which "
            "torchvision's ResNets do not have; build it with avg_down=False"
        )


def _list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_torchvision(
    model: nn.Module, state_dict: Mapping[str, Tensor] | str | os.PathLike[str]
) -> None:
    """Load a torchvision-layout ResNet state_dict (or a file of one) into ``model``, strictly.

    Every key is used exactly once and every shape is checked before anything is copied;
    files are read with ``torch.load(..., weights_only=True)``. The model then computes what
    torchvision's model computes with those weights. As torch's own strict load, it accepts
    state_dicts without ``*.num_batches_tracked`` (torchvision's older weight files lack them:
    the counters keep their values); a ``module.`` prefix on every key (a DDP checkpoint) is
    stripped, with a warning that says so.

    Raises:
        ResidualError: missing or unexpected keys (named), shapes that differ (both shown), a
            value that is not a tensor (its key named), or a model torchvision has no
            equivalent of.

    >>> from residual.models import resnet18
    >>> model = resnet18()
    >>> theirs = to_torchvision_state_dict(model)  # stands in for torchvision's weights
    >>> load_torchvision(model, theirs)
    >>> del theirs["fc.bias"]
    >>> load_torchvision(model, theirs)
    Traceback (most recent call last):
        ...
    residual.errors.ResidualError: load_torchvision: ... (missing keys: fc.bias); ...
    """
    if isinstance(state_dict, str | os.PathLike):
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_torchvision: expected a state_dict, got {type(state_dict).__name__}")
    _check_model(model)
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from DDP
        warnings.warn(
            "load_torchvision: every key starts with 'module.' (a DistributedDataParallel "
            "checkpoint); the prefix was stripped",
            stacklevel=2,
        )
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise ResidualError(
            f"load_torchvision: the value of {bad[0]!r} is a "
            f"{type(state_dict[bad[0]]).__name__}, not a tensor; pass the model's state_dict "
            "(for a training checkpoint, its 'model' or 'state_dict' entry)"
        )
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        target = _rename(key, _RULES)
        if target not in ours:
            unexpected.append(key)
        elif target in mapped:
            raise ResidualError(f"load_torchvision: two keys map to {target!r}; one is {key!r}")
        else:
            mapped[target] = value
    missing = [
        _rename(k, _REVERSE)
        for k in ours
        if k not in mapped and not k.endswith("num_batches_tracked")  # optional, as for torch
    ]
    wrong = [
        f"{_rename(k, _REVERSE)}: theirs {tuple(v.shape)}, ours {tuple(ours[k].shape)}"
        for k, v in mapped.items()
        if tuple(v.shape) != tuple(ours[k].shape)
    ]
    if unexpected or missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {_list(wrong, 4)}")
        raise ResidualError(
            f"load_torchvision: the state_dict does not fit {type(model).__name__} ("
            + "; ".join(parts)
            + "); is it the same architecture (e.g. resnet50 weights for a resnet50)?"
        )
    model.load_state_dict(mapped, strict=False)  # every other key was checked above


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state_dict in torchvision's layout (the reverse of :func:`load_torchvision`).

    >>> from residual.models import resnet18
    >>> model = resnet18()
    >>> theirs = to_torchvision_state_dict(model)
    >>> len(theirs) == len(model.state_dict())
    True
    >>> theirs["layer2.0.downsample.0.weight"].shape  # ours: layer2.0.shortcut.conv.weight
    torch.Size([128, 64, 1, 1])
    """
    _check_model(model)
    return {_rename(k, _REVERSE): v for k, v in model.state_dict().items()}
