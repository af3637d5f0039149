"""Checkpoints without pickle: a folder with ``model.safetensors`` and ``config.json``.

:func:`save_pretrained` writes the weights with `safetensors <https://huggingface.co/docs/
safetensors>`_ and a small JSON naming the builder and its keyword arguments;
:func:`load_pretrained` rebuilds the model from that folder, so reloading needs no class from
the script that trained it. Builders are the public names of :mod:`residual.models` and
:mod:`residual.blocks`, plus any the caller passes as ``builders={"name": callable}``. Nothing
is unpickled and nothing is imported by name from the file.

Each file is written durably: to a temporary file in the same folder, flushed and fsynced,
given mode 0644, renamed into place with ``os.replace`` and the folder fsynced, so that a
crash leaves the old file or the new one, never half of one. ``config.json`` is written last
and records the SHA-256 of the weights, so that a folder whose weights do not belong to its
config (a torn overwrite, a corrupted copy) is refused.

``safetensors`` comes with the ``io`` extra: ``pip install "pytorch-residual[io]"``.

>>> import tempfile, torch
>>> from residual.models import ResidualMLP
>>> model = ResidualMLP(16, 4, dim=8, depth=2)
>>> folder = tempfile.mkdtemp()
>>> save_pretrained(model, folder, builder="ResidualMLP", kwargs={"in_features": 16,
...                 "num_classes": 4, "dim": 8, "depth": 2})
>>> x = torch.randn(3, 16)
>>> torch.equal(load_pretrained(folder)(x), model.eval()(x))
True
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from residual.errors import ResidualError, check_module

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_pretrained", "save_pretrained"]

CONFIG_NAME = "config.json"
"""The checkpoint folder's JSON file: format, builder, its kwargs, the weights' SHA-256."""
WEIGHTS_NAME = "model.safetensors"
"""The checkpoint folder's weights file (safetensors: no pickle)."""
_FORMAT = "residual.pretrained"
_FORMAT_VERSION = 1
_NOT_BUILDERS = ("load_torchvision", "to_torchvision_state_dict")

Builder = Callable[..., nn.Module]


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "residual checkpoints need the safetensors package: "
            'pip install "pytorch-residual[io]" (or pip install safetensors)'
        ) from e
    return safetensors.torch


def _builders(extra: Mapping[str, Builder] | None) -> dict[str, Builder]:
    from residual import blocks, models

    known: dict[str, Builder] = {name: getattr(blocks, name) for name in blocks.__all__}
    known.update(
        (name, getattr(models, name)) for name in models.__all__ if name not in _NOT_BUILDERS
    )
    for name, build in (extra or {}).items():
        if not callable(build):
            raise TypeError(f"builders[{name!r}] must be callable, got {type(build).__name__}")
        known[name] = build
    return known


def _resolve(caller: str, name: object, extra: Mapping[str, Builder] | None) -> Builder:
    known = _builders(extra)
    if not isinstance(name, str) or name not in known:
        raise ResidualError(
            f"{caller}: unknown builder {name!r}; known builders are the public names of "
            f"residual.models and residual.blocks ({', '.join(sorted(known))}); for your own "
            "model pass "
            f"builders={{{name!r}: YourModel}}"
        )
    return known[name]


def _write_durably(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, flush + fsync, mode 0644, rename, fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    builder: str,
    kwargs: Mapping[str, Any] | None = None,
    builders: Mapping[str, Builder] | None = None,
) -> None:
    """Write ``model`` to the folder ``path``: ``model.safetensors`` and ``config.json``.

    ``builder(**kwargs)`` must rebuild the model's architecture: the call is checked here,
    on the meta device (no memory, no compute; on the CPU for a builder that cannot run on
    meta), against the model's state_dict keys and shapes, so that a wrong config fails when
    saving rather than when loading.

    Args:
        model: the module to save (its state_dict: parameters and persistent buffers).
        path: the folder; created if missing, its two files replaced atomically.
        builder: a public name of :mod:`residual.models` or :mod:`residual.blocks`
            (``"cifar_resnet"``, ``"PatchTransformer"``, ``"ResidualBlock"``, ...) or a key of
            ``builders``.
        kwargs: the builder's keyword arguments; JSON values only (numbers, strings, bools,
            None, lists, dicts).
        builders: extra builders for your own models, ``{"name": callable}``.

    Raises:
        ResidualError: an unknown builder, kwargs that are not JSON, a builder whose model does
            not match ``model``'s state_dict, or a state entry that is not a tensor.
        ImportError: safetensors is not installed (the ``io`` extra).

    >>> import tempfile, os
    >>> from residual.models import cifar_resnet
    >>> folder = os.path.join(tempfile.mkdtemp(), "resnet20")
    >>> save_pretrained(cifar_resnet(20), folder, builder="cifar_resnet", kwargs={"depth": 20})
    >>> sorted(os.listdir(folder))
    ['config.json', 'model.safetensors']
    """
    check_module("save_pretrained", "model", model)
    st = _safetensors_torch()
    build = _resolve("save_pretrained", builder, builders)
    kwargs = dict(kwargs or {})
    try:
        kwargs_json = json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ResidualError(
            f"save_pretrained: kwargs must hold JSON values only (numbers, strings, bools, "
            f"None, lists, dicts) so that the config can be read back; {e}"
        ) from e
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ResidualError(
                f"save_pretrained: state_dict entry {key!r} is a {type(value).__name__}, not a "
                "tensor; safetensors stores tensors only"
            )
        tensors[key] = value.detach().to("cpu").contiguous().clone()  # clone: no shared memory
    _check_builds(build, builder, kwargs_json, tensors)
    weights = st.save(tensors)
    config = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "builder": builder,
        "kwargs": kwargs_json,
        "weights": WEIGHTS_NAME,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "residual_version": _version(),
        "torch_version": torch.__version__,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    _write_durably(folder / WEIGHTS_NAME, weights)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_durably(folder / CONFIG_NAME, text.encode())


def _version() -> str:
    from residual import __version__

    return __version__


def _check_builds(
    build: Builder, name: str, kwargs: dict[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    try:
        with torch.device("meta"):
            fresh = build(**kwargs)
    except Exception:  # a builder that reads values (.item()) cannot run on meta: build for real
        fresh = build(**kwargs)
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing = sorted(expected.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expected.keys())[:3]
        shapes = [k for k in expected.keys() & got.keys() if expected[k] != got[k]][:3]
        raise ResidualError(
            f"save_pretrained: {name}(**{kwargs}) does not build this model (keys only the "
            f"builder has: {missing}, only the model has: {extra}, other shapes: {shapes}); "
            "pass the builder and kwargs that made the model"
        )


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"load_pretrained: {folder} is not a folder")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"load_pretrained: {config_path} is missing; save the folder with "
            "residual.save_pretrained(model, path, builder=..., kwargs=...)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResidualError(f"load_pretrained: {config_path} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        raise ResidualError(
            f"load_pretrained: {config_path} is not a residual checkpoint config (no "
            f"'format': {_FORMAT!r})"
        )
    if config.get("format_version") != _FORMAT_VERSION:
        raise ResidualError(
            f"load_pretrained: {config_path} has format_version "
            f"{config.get('format_version')!r}; this residual reads {_FORMAT_VERSION}"
        )
    if not isinstance(config.get("kwargs"), dict):
        raise ResidualError(f"load_pretrained: {config_path}: 'kwargs' must be a JSON object")
    return config


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    builders: Mapping[str, Builder] | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the model saved by :func:`save_pretrained` in the folder ``path``.

    Reads ``config.json``, builds ``builder(**kwargs)``, checks the weights' SHA-256, loads
    ``model.safetensors`` strictly (every key, every shape) and returns the model in eval mode.

    Args:
        path: the folder.
        builders: extra builders for your own models, as given to :func:`save_pretrained`.
        map_location: the device the weights are loaded to (the model is moved there).

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ResidualError: an unknown builder, a config that is not one of ours, weights that do
            not match their SHA-256 or the built model.
        ImportError: safetensors is not installed (the ``io`` extra).

    >>> import tempfile, torch
    >>> from residual.models import PatchTransformer
    >>> model = PatchTransformer(d_model=16, layers=1)
    >>> folder = tempfile.mkdtemp()
    >>> save_pretrained(model, folder, builder="PatchTransformer", kwargs={"d_model": 16,
    ...                 "layers": 1})
    >>> again = load_pretrained(folder)
    >>> x = torch.randn(2, 1, 8, 8)
    >>> torch.equal(again(x), model.eval()(x)), again.training
    (True, False)
    """
    st = _safetensors_torch()
    folder = Path(path)
    config = _read_config(folder)
    build = _resolve("load_pretrained", config.get("builder"), builders)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"load_pretrained: {weights_path} is missing")
    data = weights_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != config.get("sha256"):
        raise ResidualError(
            f"load_pretrained: {weights_path} does not match the SHA-256 in {CONFIG_NAME} (a "
            "corrupted or partial copy, or weights from another save); copy the folder again"
        )
    try:
        tensors = st.load(data)
    except Exception as e:  # safetensors raises its own error type for a malformed header
        raise ResidualError(f"load_pretrained: {weights_path} is not readable ({e})") from e
    model = build(**config["kwargs"])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ResidualError(
            f"load_pretrained: the weights in {weights_path} do not fit "
            f"{config['builder']}(**{config['kwargs']}): {e}"
        ) from e
    return model.to(map_location).eval()
