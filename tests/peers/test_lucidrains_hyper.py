"""Parity with lucidrains' ``hyper-connections`` package (PyPI; the ``peers`` extra).

With their weights copied across (every one of their parameters drawn at random first), ours
computes the same outputs, input gradients and gradients of their parameters, for:

* hyper-connections, static (a stack of layers) and dynamic (a stack whose streams stay
  zero-mean per token, where their RMSNorm and our LayerNorm agree);
* mHC, static (a stack) and dynamic (the first layer on expanded copies, where their per-stream
  RMSNorm and our RMSNorm over all n*C values agree);
* frac-connections (their ``HyperConnections(1, num_fracs=m)``), static and dynamic (zero-mean
  fractions), a stack.

Our parameters are built as differentiable functions of theirs (``torch.func.functional_call``),
so one backward through ours lands in their ``.grad``. Their layout is batch-major ``(b s)``,
ours stream-major ``(s b)``; their RMSNorm gain folds into our projection rows. docs/hyper.md
lists the differences by design.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from residual.hyper import expand_streams, frac_residual, hyper_residual, mhc_residual

hc = pytest.importorskip("hyper_connections")
from hyper_connections.hyper_connections import HyperConnections  # noqa: E402
from hyper_connections.manifold_constrained_hyper_connections import (  # noqa: E402
    ManifoldConstrainedHyperConnections,
)

DTYPE = torch.float64


@contextlib.contextmanager
def float_is_a_no_op() -> Iterator[None]:
    """Their mHC casts to float32 inside (``t.float()``); here it keeps float64, so that the
    comparison shows the formula, not float32 rounding (~1e-7 relative, measured without it)."""
    cast = torch.Tensor.float
    torch.Tensor.float = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.float = cast  # type: ignore[method-assign]


class TheirGainLayerNorm(nn.Module):
    """Their norm with our HC/frac normalisation (LayerNorm, eps 1e-5), their gain kept."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.gamma = norm.gamma

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, x.shape[-1:]) * (self.gamma + 1)


class TheirGainFlatRMSNorm(nn.Module):
    """Their norm with our mHC normalisation (RMS over all n*C values of a token), gain kept."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.gamma = norm.gamma

    def forward(self, x: Tensor) -> Tensor:  # (b, ..., s, d)
        ms = x.square().mean((-2, -1), keepdim=True)
        return x * torch.rsqrt(ms + 1e-6) * (self.gamma + 1)


def randomise(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def gain(t: nn.Module) -> Tensor:
    return t.norm.gamma + 1  # their RMSNorm: F.normalize(x) * sqrt(d) * (gamma + 1)


def hc_params(t: nn.Module) -> dict[str, Tensor]:
    g = gain(t)[:, None]
    return {
        "fn.width": t.static_alpha[:, 0],
        "shortcut.mix": t.static_alpha[:, 1:],  # [source, target] in both
        "fn.depth": t.static_beta,
        "fn.width_dynamic.weight": g * t.dynamic_alpha_fn[:, :1],
        "fn.width_dynamic.scale": t.dynamic_alpha_scale,
        "shortcut.dynamic.weight": g * t.dynamic_alpha_fn[:, 1:],
        "shortcut.dynamic.scale": t.dynamic_alpha_scale,  # theirs: one scale for both
        "fn.depth_dynamic.weight": g * t.dynamic_beta_fn[:, None],
        "fn.depth_dynamic.scale": t.dynamic_beta_scale,
    }


def mhc_params(t: nn.Module) -> dict[str, Tensor]:
    n = t.num_residual_streams
    eye = torch.eye(n, dtype=t.static_beta.dtype)
    g = gain(t)
    w = t.dynamic_alpha_fn[0] * g[:, None]  # (C, 1 + n), one proposal
    pre = torch.einsum("jk,c->jck", eye, w[:, 0])  # stream j's rows feed only H_pre[j]
    post = torch.einsum("jk,c->jck", eye, t.dynamic_beta_fn * g)
    res = torch.einsum("jl,ci->jcil", eye, w[:, 1:]).flatten(2)  # H_res[i, j] reads stream j
    return {
        "fn.pre_bias": t.static_alpha[:, 0],
        "fn.post_bias": t.static_beta,
        "shortcut.res_bias": t.static_alpha[:, 1:].t(),  # theirs [source, target]
        "fn.weight": torch.cat([pre, post], -1),
        "fn.pre_scale": t.pre_branch_scale[0],
        "fn.post_scale": t.h_post_scale,
        "shortcut.weight": res,
        "shortcut.res_scale": t.residual_scale[0],
    }


def frac_params(t: nn.Module) -> dict[str, Tensor]:
    g = gain(t)[:, None]
    sa, da = t.static_alpha, t.dynamic_alpha_fn  # columns: (fraction out, [input, residual])
    return {
        "fn.width": sa[:, 0::2],
        "shortcut.mix": sa[:, 1::2],
        "fn.depth": t.static_beta.expand(len(sa), -1),  # theirs: the same row for every f1
        "fn.width_dynamic.weight": g * da[:, 0::2],
        "fn.width_dynamic.scale": t.dynamic_alpha_scale,
        "shortcut.dynamic.weight": g * da[:, 1::2],
        "shortcut.dynamic.scale": t.dynamic_alpha_scale,
        "fn.depth_dynamic.weight": g * t.dynamic_beta_fn,
        "fn.depth_dynamic.scale": t.dynamic_beta_scale,
    }


def compare(
    theirs: list[nn.Module],
    ours: list[nn.Module],
    params: Callable[[nn.Module], dict[str, Tensor]],
    x: Tensor,
    their_in: Callable[[Tensor], Tensor],
    our_in: Callable[[Tensor], Tensor],
    our_out: Callable[[Tensor], Tensor],
    static: bool,
) -> dict[str, float]:
    """Differences of outputs, input grads and their parameters' grads, each as
    ``max |ours - theirs| / max(max |theirs|, 1)`` (the worst parameter for the grads).

    ``ours`` uses only the parameters mapped from ``theirs`` (and the shared branches), so the
    gradients of ours flow into their parameters.
    """
    x = x.clone().requires_grad_()
    out_t = x
    h = their_in(x)
    for layer in theirs:
        h = layer(h)
    out_t = h
    probe = torch.randn(out_t.shape, dtype=out_t.dtype)
    (out_t * probe).sum().backward()
    grads_t = {name: p.grad.clone() for name, p in nn.ModuleList(theirs).named_parameters()}
    grad_x_t = x.grad.clone()
    for p in nn.ModuleList(theirs).parameters():
        p.grad = None
    x.grad = None
    h = our_in(x)
    for t, o in zip(theirs, ours, strict=True):
        h = torch.func.functional_call(o, params(t), (h,), strict=False)
    out_o = our_out(h)
    (out_o * probe).sum().backward()
    grads_o = {name: p.grad for name, p in nn.ModuleList(theirs).named_parameters()}

    def rel(a: Tensor, b: Tensor) -> float:  # max abs difference, relative where |b| > 1
        return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()

    used = [name for name, g in grads_o.items() if g is not None]
    assert used, "no parameter of theirs was used by ours"
    missing = [k for k in grads_t if grads_o[k] is None and grads_t[k].abs().max() > 0]
    if static:  # their projections (set to 0) have gradients; a static layer of ours has none
        missing = [k for k in missing if not k.endswith(("dynamic_alpha_fn", "dynamic_beta_fn"))]
    assert not missing, f"their parameters that ours does not use: {missing}"
    return {
        "output": rel(out_o, out_t),
        "input grad": rel(x.grad, grad_x_t),
        "param grads": max(rel(grads_o[k], grads_t[k]) for k in used),
    }


def their_layers(
    make: Callable[[int, nn.Module], nn.Module], fns: list[nn.Module], dynamic: bool, seed: int
) -> list[nn.Module]:
    """Their layers around ``fns``, every parameter random; static: the projections zeroed."""
    layers = [make(i, f) for i, f in enumerate(fns)]
    for i, t in enumerate(layers):
        randomise(t, seed=seed + i)
        if not dynamic:
            with torch.no_grad():
                t.dynamic_alpha_fn.zero_(), t.dynamic_beta_fn.zero_()
    return layers


def compare_streams(
    theirs: list[nn.Module],
    ours: list[nn.Module],
    params: Callable[[nn.Module], dict[str, Tensor]],
    x: Tensor,
    dynamic: bool,
) -> dict[str, float]:
    """:func:`compare` for n-stream layers: theirs batch-major ``(b s)``, ours ``(s b)``."""
    n = theirs[0].num_residual_streams
    keys = {k for k, _ in ours[0].named_parameters()}
    return compare(
        theirs,
        [o.to(DTYPE) for o in ours],
        lambda t: {k: v for k, v in params(t).items() if k in keys},
        x,
        lambda x: x.repeat_interleave(n, 0),  # theirs: every stream a copy
        lambda x: expand_streams(x, n),
        lambda h: h.unflatten(0, (n, -1)).transpose(0, 1).flatten(0, 1),  # ours -> (b s)
        static=not dynamic,
    )


def hyper_case(dynamic: bool, layers: int = 3) -> dict[str, float]:
    n, d = 4, 8
    torch.manual_seed(0)
    fns = [nn.Linear(d, d).to(DTYPE) for _ in range(layers)]
    theirs = their_layers(
        lambda i, f: HyperConnections(n, dim=d, branch=f, layer_index=i).to(DTYPE), fns, dynamic, 10
    )
    for t in theirs:  # the one difference by design: the HC paper's LayerNorm, their RMSNorm
        t.norm = TheirGainLayerNorm(t.norm)
    ours = [hyper_residual(f, n, d, layer_index=i, dynamic=dynamic) for i, f in enumerate(fns)]
    return compare_streams(theirs, ours, hc_params, torch.randn(3, 5, d, dtype=DTYPE), dynamic)


def mhc_case(dynamic: bool, their_norm: bool = False) -> dict[str, float]:
    """``their_norm``: their per-stream RMSNorm unchanged, on the first layer (expanded copies:
    the same as ours); else their norm spans the token's n*C values as ours, on a stack."""
    n, d = 4, 8
    layers = 1 if their_norm else 3
    torch.manual_seed(1)
    fns = [nn.Linear(d, d).to(DTYPE) for _ in range(layers)]
    theirs = their_layers(
        lambda i, f: ManifoldConstrainedHyperConnections(n, dim=d, branch=f, layer_index=i).to(
            DTYPE
        ),
        fns,
        dynamic,
        20,
    )
    if not their_norm:
        for t in theirs:
            t.norm = TheirGainFlatRMSNorm(t.norm)
    ours = [mhc_residual(f, n, d, layer_index=i, dynamic=dynamic) for i, f in enumerate(fns)]
    # x 1e3 with their norm: our RMSNorm's eps (1e-6 on the mean square) is below rounding
    x = torch.randn(3, 5, d, dtype=DTYPE) * (1e3 if their_norm else 1.0)
    return compare_streams(theirs, ours, mhc_params, x, dynamic)


def frac_case(dynamic: bool, layers: int = 3) -> dict[str, float]:
    m, d = 4, 16
    torch.manual_seed(2)
    fns = [nn.Linear(d, d).to(DTYPE) for _ in range(layers)]
    theirs = their_layers(
        lambda i, f: HyperConnections(1, dim=d, branch=f, num_fracs=m, layer_index=0).to(DTYPE),
        fns,
        dynamic,
        30,
    )
    for t in theirs:
        t.norm = TheirGainLayerNorm(t.norm)
    ours = [frac_residual(f, m, d, dynamic=dynamic).to(DTYPE) for f in fns]
    keys = {k for k, _ in ours[0].named_parameters()}
    identity: Callable[[Tensor], Tensor] = lambda h: h  # noqa: E731
    return compare(
        theirs,
        ours,
        lambda t: {k: v for k, v in frac_params(t).items() if k in keys},
        torch.randn(3, 5, d, dtype=DTYPE),
        identity,
        identity,
        identity,
        static=not dynamic,
    )


CASES = {
    "hyper-static": lambda: hyper_case(dynamic=False),
    "hyper-dynamic": lambda: hyper_case(dynamic=True),
    "mhc-static": lambda: mhc_case(dynamic=False),
    "mhc-dynamic": lambda: mhc_case(dynamic=True),
    "mhc-dynamic-their-norm": lambda: mhc_case(dynamic=True, their_norm=True),
    "frac-static": lambda: frac_case(dynamic=False),
    "frac-dynamic": lambda: frac_case(dynamic=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_outputs_and_gradients_as_lucidrains(case: str) -> None:
    with float_is_a_no_op():
        diffs = CASES[case]()
    assert max(diffs.values()) < 1e-10, diffs


if __name__ == "__main__":  # the figures in docs/hyper.md
    with float_is_a_no_op():
        for name, case in CASES.items():
            print(name, {k: f"{v:.1e}" for k, v in case().items()})
