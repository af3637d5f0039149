"""Gradient flow through depth: per-block gradient and activation norms from a real backward.

Works on any model made of :class:`~residual.Residual` blocks (plain ones, built with
``shortcut="none"``, included) or on any list of modules you name.

>>> import torch
>>> from residual.models import cifar_resnet
>>> profile = gradient_flow(cifar_resnet(20), torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
>>> len(profile.names), profile.names[0]
(9, 'layer1.0')
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from residual.core import Residual
from residual.errors import ResidualError

__all__ = ["DepthProfile", "gradient_flow", "plot_gradient_flow"]


@dataclass
class DepthProfile:
    """Norms per block, first block first.

    Attributes:
        names: the blocks' qualified names in the model.
        output_grad_norms: L2 norm of d loss / d (block output), the gradient that flows back
            into the block from above.
        param_grad_norms: L2 norm of the gradient of the block's own parameters.
        activation_norms: root mean square of the block's output (the residual stream).
        loss: the loss the backward pass started from.

    >>> profile = DepthProfile(names=["layer1.0", "layer3.2"], param_grad_norms=[0.5, 2.0])
    >>> profile.ratio_last_to_first()
    4.0
    """

    names: list[str] = field(default_factory=list)
    output_grad_norms: list[float] = field(default_factory=list)
    param_grad_norms: list[float] = field(default_factory=list)
    activation_norms: list[float] = field(default_factory=list)
    loss: float = float("nan")

    def ratio_last_to_first(self) -> float:
        """How many times larger the last block's parameter gradient is than the first's."""
        return self.param_grad_norms[-1] / max(self.param_grad_norms[0], 1e-30)


def _first_tensor(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _left_as_found(model: nn.Module, inputs: Tensor) -> Iterator[None]:
    """Restore on exit what a forward and backward of ``model`` change.

    Every buffer's value (BatchNorm statistics and counters, stochastic depth's step, the
    non-persistent ones too), every module's train/eval flag, every parameter's ``.grad``,
    the global random generators of the devices in use (CPU always), and the grad mode.
    """
    buffers = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m.named_buffers(recurse=False)
    ]
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    tensors = [*model.parameters(), *model.buffers(), inputs]
    devices: dict[str, set[int]] = {}
    for t in tensors:
        if t.device.type != "cpu":
            devices.setdefault(t.device.type, set()).add(t.device.index or 0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))  # the CPU generator
        for kind, indices in devices.items():
            stack.enter_context(torch.random.fork_rng(devices=sorted(indices), device_type=kind))
        try:
            yield
        finally:
            with torch.no_grad():
                for m, name, b, value in buffers:
                    b.copy_(value)
                    setattr(m, name, b)  # the same tensor object, in case one was reassigned
            for m, training in modes:
                m.training = training
            for p, g in grads:
                p.grad = g


def gradient_flow(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    blocks: Sequence[nn.Module] | None = None,
) -> DepthProfile:
    """Run one forward and backward pass and read the norms of every block.

    The model runs in the mode it is in (training: batch statistics, dropout, stochastic
    depth). A diagnosis changes nothing: the model's buffers (BatchNorm statistics, stochastic
    depth's step), train/eval flags, ``.grad`` s and ``requires_grad`` flags, the caller's
    ``inputs`` and the global random generators are as they were before the call, so two
    calls give the same profile and training continues as if none had been made. It runs
    under ``torch.no_grad()`` too, and on a frozen model (the gradient still reaches the
    input).

    Args:
        model: the network.
        inputs: a batch.
        target: labels for ``loss_fn`` (cross-entropy by default); without a target the loss
            is the mean square of the output.
        blocks: the modules to profile, in depth order; default every ``Residual`` in
            ``model.modules()`` order.

    Returns:
        A :class:`DepthProfile`.

    >>> import torch
    >>> from torch import nn
    >>> from residual import Residual
    >>> model = nn.Sequential(*(Residual(nn.Linear(8, 8)) for _ in range(3)))
    >>> profile = gradient_flow(model, torch.randn(4, 8))  # no target: mean-square loss
    >>> profile.names, len(profile.param_grad_norms)
    (['0', '1', '2'], 3)
    >>> model[0].fn.weight.grad is None  # the model's own grads are left alone
    True
    """
    names_of = {m: n for n, m in model.named_modules()}
    chosen = (
        list(blocks)
        if blocks is not None
        else [m for m in model.modules() if isinstance(m, Residual)]
    )
    if not chosen:
        raise ResidualError(
            f"gradient_flow: {type(model).__name__} holds no Residual block; pass blocks=[...]"
        )
    outputs: dict[int, Tensor] = {}
    handles = []
    for i, block in enumerate(chosen):

        def keep(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            t = _first_tensor(out)
            if t.requires_grad:
                t.retain_grad()
            outputs[i] = t

        handles.append(block.register_forward_hook(keep))
    if inputs.is_floating_point() or inputs.is_complex():  # the gradient reaches the input
        inputs = inputs.detach().requires_grad_()  # even in a frozen model; not the caller's
    try:
        with _left_as_found(model, inputs), torch.enable_grad():
            for p in model.parameters():
                p.grad = None
            out = _first_tensor(model(inputs))
            if target is not None:
                loss = (loss_fn or nn.functional.cross_entropy)(out, target)
            else:
                loss = out.float().square().mean()
            loss.backward()
            profile = DepthProfile(loss=loss.item())
            for i, block in enumerate(chosen):
                t = outputs[i]
                grads = [p.grad for p in block.parameters() if p.grad is not None]
                profile.names.append(names_of.get(block, f"block{i}"))
                profile.output_grad_norms.append(
                    float(t.grad.norm()) if t.grad is not None else 0.0
                )
                profile.param_grad_norms.append(
                    float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
                    if grads
                    else 0.0
                )
                profile.activation_norms.append(float(t.detach().float().square().mean().sqrt()))
            return profile
    finally:
        for h in handles:
            h.remove()


def plot_gradient_flow(
    profiles: dict[str, DepthProfile],
    path: str | Path | None = None,
    *,
    attribute: str = "param_grad_norms",
    title: str = "gradient norm per block",
) -> Any:
    """Plot one line per profile on a log scale (matplotlib, the optional extra, imported here).

    Returns a ``matplotlib.figure.Figure`` built without pyplot, so the user's backend and
    pyplot's global figure list are left alone; saves it to ``path`` if given.

    >>> import tempfile
    >>> from pathlib import Path
    >>> profile = DepthProfile(names=["a", "b", "c"], param_grad_norms=[1.0, 0.1, 0.01])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     fig = plot_gradient_flow({"plain": profile}, Path(tmp) / "flow.png")
    ...     (Path(tmp) / "flow.png").is_file()
    True
    >>> type(fig).__name__, fig.axes[0].get_yscale()
    ('Figure', 'log')
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError(
            "plot_gradient_flow needs matplotlib: pip install 'pytorch-residual[examples]'"
        ) from e
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, profile in profiles.items():
        values = getattr(profile, attribute)
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("block (input side -> output side)")
    ax.set_ylabel(attribute.replace("_", " "))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
