"""Checkpoints without pickle: a folder with ``model.safetensors`` and ``config.json``.

:func:`save_pretrained` writes the weights with `safetensors <https://huggingface.co/docs/
safetensors>`_ and a small JSON naming the builder and its keyword arguments;
:func:`load_pretrained` rebuilds the model from that folder, so reloading needs no class from
the script that trained it. Builders are the public names of :mod:`residual.models` and
:mod:`residual.blocks`, plus any the caller passes as ``builders={"name": callable}``. Nothing
is unpickled and nothing is imported by name from the file.

Saving is atomic at the folder level: the complete new checkpoint is first written, flushed
and fsynced into a hidden subfolder (``.residual-save-*``) of the target; only then are its
two files renamed over the old ones, weights first, config last, and the subfolder removed.
Until the new checkpoint is complete the old one is untouched; an error while renaming puts
the old weights back. A crash between the two renames leaves the new weights beside the old
config, and the new config in the subfolder: :func:`load_pretrained` finds it there (it
matches the weights' SHA-256) and loads the new model, and the next save cleans up. The
folder itself is never renamed or replaced, so other files in it stay, and a mount point,
the working directory or a folder whose parent is read-only can be saved into.
``config.json`` records the SHA-256 of the weights, so that a folder whose weights do not
belong to its config (a corrupted or partial copy) is refused.

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
import shutil
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


_JOURNAL_PREFIX = ".residual-save-"
_COMMIT = "commit.json"  # a second copy of the new config: the one renamed into the folder
_PREVIOUS = {WEIGHTS_NAME: "previous.safetensors", CONFIG_NAME: "previous.json"}


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (POSIX; elsewhere renames are as durable as that)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write, flush and fsync ``data`` to the new file ``path``, mode 0644."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)  # whatever the umask: readable by all, like any file you save


def _keep_previous(folder: Path, journal: Path) -> None:
    """Keep the old files in the journal (hard links; copies where links are not allowed)."""
    for name, kept in _PREVIOUS.items():
        old = folder / name
        if old.is_file():
            try:
                os.link(old, journal / kept)
            except OSError:
                shutil.copyfile(old, journal / kept)


def _put_back(folder: Path, journal: Path, name: str) -> None:
    """The old file ``name`` back in ``folder`` (or none, where there was none)."""
    kept = journal / _PREVIOUS[name]
    if kept.exists():
        os.replace(kept, folder / name)
    else:
        os.remove(folder / name)


def _commit(folder: Path, weights: bytes, config: bytes) -> None:
    """Replace the checkpoint in ``folder`` by (weights, config); the old one until it is whole.

    1. the new files are written and fsynced in a fresh journal subfolder, itself fsynced,
       and the old ones linked into it;
    2. the weights are renamed over the old ones, the folders fsynced;
    3. a copy of the config is renamed over the old one, the folder fsynced: the new
       checkpoint is in;
    4. the journal and any left by an earlier interrupted save are removed.

    An error in 1 leaves the folder as it was; an error in 2 or 3 puts the old files back.
    Killed between 2 and 3 (or while putting them back), the folder holds the new weights,
    whose config the journal holds: :func:`load_pretrained` reads it there.
    """
    journal = Path(tempfile.mkdtemp(dir=folder, prefix=_JOURNAL_PREFIX))
    weights_in = config_in = False
    try:
        _write_file(journal / WEIGHTS_NAME, weights)
        _write_file(journal / CONFIG_NAME, config)
        _write_file(journal / _COMMIT, config)
        _keep_previous(folder, journal)
        _fsync_folder(journal)
        try:
            os.replace(journal / WEIGHTS_NAME, folder / WEIGHTS_NAME)
            weights_in = True
            _fsync_folder(folder)
            _fsync_folder(journal)
            os.replace(journal / _COMMIT, folder / CONFIG_NAME)
            config_in = True
            _fsync_folder(folder)
        except BaseException:
            if config_in:
                _put_back(folder, journal, CONFIG_NAME)
                config_in = False
            if weights_in:
                _put_back(folder, journal, WEIGHTS_NAME)
                weights_in = False
            _fsync_folder(folder)
            raise
    finally:
        if not weights_in or config_in:  # the folder does not need the journal's config
            shutil.rmtree(journal, ignore_errors=True)
    for stale in folder.glob(_JOURNAL_PREFIX + "*"):  # earlier interrupted saves: now moot
        shutil.rmtree(stale, ignore_errors=True)


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
        path: the folder; created if missing. The old checkpoint in it is replaced atomically
            (see the module's docstring); other files in it are left alone.
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
    _commit(folder, weights, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


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


def _read_config(folder: Path, config_path: Path | None = None) -> dict[str, Any]:
    config_path = config_path or folder / CONFIG_NAME
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


def _interrupted_config(folder: Path, sha: str) -> dict[str, Any] | None:
    """The config of a save interrupted after its weights were renamed in, if it is there."""
    for journal in sorted(folder.glob(_JOURNAL_PREFIX + "*")):
        path = journal / CONFIG_NAME
        try:
            config = _read_config(folder, path)
        except (OSError, ResidualError):
            continue
        if config.get("sha256") == sha:
            return config
    return None


def _read_checkpoint(folder: Path) -> tuple[dict[str, Any], bytes]:
    """The config and the weights bytes that belong together (see :func:`_commit`)."""
    weights_path = folder / WEIGHTS_NAME
    for _ in range(3):  # a save may rename files between our two reads: read again
        config = _read_config(folder)
        if not weights_path.is_file():
            raise FileNotFoundError(f"load_pretrained: {weights_path} is missing")
        data = weights_path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha == config.get("sha256"):
            return config, data
        pending = _interrupted_config(folder, sha)
        if pending is not None:
            return pending, data
    raise ResidualError(
        f"load_pretrained: {weights_path} does not match the SHA-256 in {CONFIG_NAME} (a "
        "corrupted or partial copy, or weights from another save); copy the folder again"
    )


def _cast_like(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Give each floating parameter and buffer of ``model`` the dtype of its saved tensor.

    A parameter shared by several modules (tied weights) stays one parameter.
    """
    cast: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in own:
            saved = tensors.get(f"{prefix}.{name}" if prefix else name)
            if saved is None or not saved.is_floating_point() or saved.dtype == t.dtype:
                continue
            if id(t) not in cast:
                new = t.detach().to(saved.dtype)
                if isinstance(t, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
                cast[id(t)] = new
            setattr(module, name, cast[id(t)])


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    builders: Mapping[str, Builder] | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild the model saved by :func:`save_pretrained` in the folder ``path``.

    Reads ``config.json``, builds ``builder(**kwargs)``, checks the weights' SHA-256, loads
    ``model.safetensors`` strictly (every key, every shape) and returns the model in eval mode,
    in the dtype its weights were saved in (a model saved in bfloat16 comes back in bfloat16;
    one saved in mixed precision with each tensor's own dtype).

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
    weights_path = folder / WEIGHTS_NAME
    config, data = _read_checkpoint(folder)
    build = _resolve("load_pretrained", config.get("builder"), builders)
    try:
        tensors = st.load(data)
    except Exception as e:  # safetensors raises its own error type for a malformed header
        raise ResidualError(f"load_pretrained: {weights_path} is not readable ({e})") from e
    model = build(**config["kwargs"])
    floats = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floats) == 1:  # a bfloat16 / float16 / float64 model comes back in its dtype
        model = model.to(next(iter(floats)))
    else:  # mixed precision: each tensor in the dtype it was saved in
        _cast_like(model, tensors)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ResidualError(
            f"load_pretrained: the weights in {weights_path} do not fit "
            f"{config['builder']}(**{config['kwargs']}): {e}"
        ) from e
    return model.to(map_location).eval()
