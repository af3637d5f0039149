"""Seams of the multi-stream and cross-depth connections: every option against one oracle.

A Hypothesis-driven differential test. Each example draws one :class:`Config` across the option
space (variant: hyper-connections / mHC / frac-connections, static or dynamic, n = 1..4 streams
or fractions, connection logits moderate or "sharp" as after training; LAuReL RW / LR / RW+LR /
PA, DenseFormer, value residual, ResiDual; layout and branch: channels-last linear or attention
with a padding mask passed as an extra argument, channels-first 1x1 / 3x3 convolution; 1-3
layers; drop mode, rate 0 / 0.5 / 1 and ``scale_by_keep``; checkpointing; float64, float32,
bfloat16, float16; execution: eager, ``torch.fx.symbolic_trace``, meta -> ``to_empty`` -> load,
deepcopy, pickle; train or eval), builds the model through the public builders (:func:`build`)
and compares it with the float64 references of ``tests/oracle_streams.py``, which import nothing
from ``residual`` (:func:`reference` maps the parameters onto them):

* eval: outputs (the stream tensor and its reduction) and the gradients of the input and every
  parameter, to dtype tolerance (:data:`TOLERANCE`);
* training: each SAMPLE's keep decisions are read off the output (:func:`infer_decisions`):
  every stream of a sample must equal, all at once, the oracle with one keep bit per residual
  (a sample whose streams take different decisions fails, as does one that matches none); the
  decisions must fit the mode (all kept at rate 0, none at rate 1, one decision for the whole
  batch in "batch", exactly ``max(1, int(N (1 - p)))`` samples in "subset"); they are then
  replayed in the oracle and outputs and gradients compared; an eval pass after the training
  pass must match the eval oracle;
* bfloat16 / float16: outputs within a loose tolerance (training at rate 0.5: finite only),
  gradients finite;
* combinations the library documents as refused (:func:`refusal`: ``drop_mode="subset"`` with
  extra arguments, "batch" / "subset" with tuple outputs) must raise an error naming the fix.

:data:`FIXED` holds the smallest configuration found for each seam so far and the
``torch.export`` / ``torch.compile`` cases (compiling is too slow to draw).

Profiles (environment variable ``SEAMS_PROFILE``):

* ``ci`` (default): Hypothesis profile ``seams-streams-ci``, 150 derandomized examples. The whole
  file: about 30 s of CPU time on one thread (measured 27 s user + 2 s sys; 64 s wall on a
  loaded 2-core machine), most of it compiling the :data:`FIXED` cases.
* ``long``: profile ``seams-streams-long``, 2500 random examples, for a deeper run:
  ``SEAMS_PROFILE=long python -m pytest tests/test_seams_streams.py``.

A failing example prints as ``Config(...)``; ``check(Config(...))`` reruns it alone. Hypothesis
stops at the first failure kinds it meets; to list them all, ``PYTHONPATH=. python
tests/test_seams_streams.py 2000`` runs 2000 drawn configurations without stopping or shrinking
and prints each kind of failure with its smallest configuration (:func:`catalogue`).
"""

from __future__ import annotations

import copy
import itertools
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import oracle_streams as oracle
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from residual import Residual
from residual.depth import DepthStack, denseformer, laurel_pa
from residual.hyper import expand_streams, hyper_residual, mhc_residual, reduce_streams
from residual.merges import LaurelRW
from residual.models import ValueResidualGPTBlock
from residual.resi_dual import ResiDualOutput, resi_dual_residual
from residual.shortcuts import LowRankShortcut
from residual.streams import frac_residual

settings.register_profile(
    "seams-streams-ci",
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "seams-streams-long",
    max_examples=2500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile(f"seams-streams-{os.environ.get('SEAMS_PROFILE', 'ci')}")

DIM = 12  # channels: every n in 1..4 divides it (frac-connections)
LENGTH = 3  # tokens of a channels-last sample
SIDE = 3  # spatial side of a channels-first sample
HEADS = 2  # value residual attention
STREAM_VARIANTS = ("hyper", "mhc", "frac")
DEPTH_VARIANTS = (
    "laurel_rw",
    "laurel_lr",
    "laurel_rw_lr",
    "laurel_pa",
    "denseformer",
    "value_residual",
    "resi_dual",
)
# Relative to max(1, max |reference|): (outputs, gradients). Each is a few times what the same
# formula computed plainly in that dtype gives on the worst drawn configurations (measured: f32
# up to 1e-5 / 1e-3 with sharp connections; bf16 10% and f16 0.1% on outputs). Half types:
# gradients only finite.
TOLERANCE: dict[torch.dtype, tuple[float, float | None]] = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (1e-4, 5e-3),
    torch.bfloat16: (0.25, None),
    torch.float16: (0.03, None),
}


@dataclass(frozen=True)
class Config:
    """One point of the option space."""

    variant: str  # STREAM_VARIANTS or DEPTH_VARIANTS
    dynamic: bool = False  # hyper / mhc / frac
    streams: int = 1  # n (fractions for frac)
    layout: str = "channels_last"
    branch: str = "linear"  # "linear", "attention" (padding mask kwarg), "conv1x1", "conv3x3"
    layers: int = 1
    drop_mode: str = "row"
    drop_rate: float = 0.0
    scale_by_keep: bool = True
    checkpoint: bool = False
    dtype: torch.dtype = torch.float64
    execution: str = "eager"  # "eager", "fx", "meta", "deepcopy", "pickle", "export", "compile"
    training: bool = False
    batch: int = 3
    seed: int = 0
    sharp: bool = False  # connection logits as a trained layer's: mHC's near-hard, tanh saturated
    dilation: int = 1  # denseformer
    period: int = 1  # denseformer

    @property
    def stream_axis(self) -> int:
        """Copies per sample on the sample axis (hyper / mHC streams, ResiDual's pair)."""
        if self.variant in ("hyper", "mhc"):
            return self.streams
        return 2 if self.variant == "resi_dual" else 1

    @property
    def residuals(self) -> int:
        """Residuals in the stack, each with its own keep decision per sample."""
        return 2 * self.layers if self.variant == "value_residual" else self.layers

    @property
    def drops(self) -> bool:
        """Whether stochastic depth draws: training at a rate above 0."""
        return self.training and self.drop_rate > 0


# Failures, one type per kind, so that Hypothesis reports (and shrinks) each kind separately.
class SeamFailure(AssertionError):
    pass


class StreamsDisagree(SeamFailure):
    """A sample's streams took different keep decisions."""


class NoKeepDecision(SeamFailure):
    """A sample's output is neither kept nor dropped, whatever the decisions."""


class WrongDecisions(SeamFailure):
    """The keep decisions do not fit the drop mode and rate."""


class OutputMismatch(SeamFailure):
    pass


class GradientMismatch(SeamFailure):
    pass


class NotFinite(SeamFailure):
    pass


class StateDictMismatch(SeamFailure):
    pass


class UnexpectedError(SeamFailure):
    pass


class MissingRefusal(SeamFailure):
    pass


# The strategy ---------------------------------------------------------------------------------


@st.composite
def configs(draw: st.DrawFn) -> Config:
    variant = draw(st.sampled_from(STREAM_VARIANTS + DEPTH_VARIANTS))
    cfg = Config(variant=variant, seed=draw(st.integers(0, 2**16)))
    if variant in STREAM_VARIANTS:
        layout = draw(st.sampled_from(("channels_last", "channels_first")))
        branches = ("linear", "attention") if layout == "channels_last" else ("conv1x1", "conv3x3")
        cfg = replace(
            cfg,
            dynamic=draw(st.booleans()),
            streams=draw(st.integers(1, 4)),
            layout=layout,
            branch=draw(st.sampled_from(branches)),
            sharp=draw(st.booleans()),
        )
    elif variant == "denseformer":
        cfg = replace(cfg, dilation=draw(st.integers(1, 2)), period=draw(st.integers(1, 2)))
    layers = draw(st.integers(1, 2 if variant == "value_residual" else 3))
    return replace(
        cfg,
        layers=layers,
        drop_mode=draw(st.sampled_from(("row", "batch", "subset"))),
        drop_rate=draw(st.sampled_from((0.0, 0.5, 1.0))),
        scale_by_keep=draw(st.booleans()),
        checkpoint=draw(st.booleans()),
        dtype=draw(st.sampled_from((torch.float64, torch.float32, torch.bfloat16, torch.float16))),
        execution=draw(st.sampled_from(("eager", "fx", "meta", "deepcopy", "pickle"))),
        training=draw(st.booleans()),
        batch=draw(st.integers(2, 4)),
    )


# The model: user branches, the builder --------------------------------------------------------


class MaskedAttention(nn.Module):
    """A user's attention-like branch on (N, L, d): one head, keys masked by a padding mask
    (N, L), True = padding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(-1, -2) / x.shape[-1] ** 0.5
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        return self.out(torch.softmax(scores, -1) @ v)


def make_branch(kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(DIM, DIM)
    if kind == "attention":
        return MaskedAttention(DIM)
    size = int(kind[-1])  # conv1x1, conv3x3: padded to keep the shape
    return nn.Conv2d(DIM, DIM, size, padding=size // 2)


class Stack(nn.Module):
    """The model under test: ``expand_streams`` (stream variants), the blocks in order, then the
    reduction (``reduce_streams``, ResiDual's output). Returns ``(stream tensor, output)``."""

    def __init__(
        self, blocks: nn.ModuleList | DepthStack, expand: int, head: nn.Module | None
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.expand = expand
        self.head = head

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = expand_streams(x, self.expand) if self.expand else x
        if isinstance(self.blocks, DepthStack):
            h = self.blocks(h)
        else:
            for block in self.blocks:
                h = block(h) if mask is None else block(h, key_padding_mask=mask)
        if self.head is not None:
            return h, self.head(h)
        return h, reduce_streams(h, self.expand) if self.expand else h


def build(cfg: Config) -> tuple[Stack, list[nn.Module]]:
    """The model of ``cfg`` through the public builders, and its user branches in order."""
    n, p, layout = cfg.streams, cfg.drop_rate, cfg.layout
    branches: list[nn.Module] = []

    def branch() -> nn.Module:
        fn = make_branch(cfg.branch)
        branches.append(fn)
        return fn

    blocks: nn.ModuleList | DepthStack
    head: nn.Module | None = None
    expand = 0
    common: dict[str, Any] = {"dynamic": cfg.dynamic, "layout": layout, "drop_path": p}
    if cfg.variant == "hyper":
        blocks = nn.ModuleList(
            hyper_residual(branch(), n, DIM, layer_index=i, **common) for i in range(cfg.layers)
        )
        expand = n
    elif cfg.variant == "mhc":
        blocks = nn.ModuleList(
            mhc_residual(branch(), n, DIM, layer_index=i, **common) for i in range(cfg.layers)
        )
        expand = n
    elif cfg.variant == "frac":
        blocks = nn.ModuleList(frac_residual(branch(), n, DIM, **common) for _ in range(cfg.layers))
    elif cfg.variant == "laurel_rw":
        blocks = nn.ModuleList(Residual(branch(), merge=LaurelRW()) for _ in range(cfg.layers))
    elif cfg.variant == "laurel_lr":
        blocks = nn.ModuleList(
            Residual(branch(), shortcut=LowRankShortcut(DIM, 2)) for _ in range(cfg.layers)
        )
    elif cfg.variant == "laurel_rw_lr":
        blocks = nn.ModuleList(
            Residual(branch(), shortcut=LowRankShortcut(DIM, 2), merge=LaurelRW())
            for _ in range(cfg.layers)
        )
    elif cfg.variant == "laurel_pa":
        blocks = laurel_pa([Residual(branch()) for _ in range(cfg.layers)], DIM, rank=2)
    elif cfg.variant == "denseformer":
        blocks = denseformer(
            [Residual(branch()) for _ in range(cfg.layers)],
            dilation=cfg.dilation,
            period=cfg.period,
        )
    elif cfg.variant == "value_residual":
        blocks = DepthStack(
            [ValueResidualGPTBlock(DIM, HEADS, 2 * DIM) for _ in range(cfg.layers)], values=True
        )
    elif cfg.variant == "resi_dual":
        blocks = nn.ModuleList(resi_dual_residual(branch(), DIM) for _ in range(cfg.layers))
        expand, head = 2, ResiDualOutput(DIM)
    else:
        raise ValueError(cfg.variant)
    model = Stack(blocks, expand, head)
    for block in residuals(model):
        block.set_drop_path(p, drop_mode=cfg.drop_mode, scale_by_keep=cfg.scale_by_keep)
        block.checkpoint = cfg.checkpoint
    return model, branches


def residuals(model: nn.Module) -> list[Residual]:
    return [m for m in model.modules() if isinstance(m, Residual)]


SHARP = {"res_bias": 16.0, "pre_bias": 8.0, "post_bias": 8.0, "dynamic.weight": 8.0}


def randomise(model: nn.Module, seed: int, sharp: bool) -> None:
    """Every parameter random (no init value may hide a wrong formula), scaled by fan-in; with
    ``sharp`` the connection logits (:data:`SHARP`) larger, as training makes them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1] if p.dim() >= 2 else 1
            scale = min(0.6, 1.2 / fan_in**0.5)
            if sharp:
                scale *= next((v for k, v in SHARP.items() if name.endswith(k)), 1.0)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def inputs(cfg: Config) -> tuple[Tensor, Tensor | None, Tensor]:
    """The input (float64), the padding mask (attention only) and the output's cotangent."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    shape = (
        (cfg.batch, DIM, SIDE, SIDE) if cfg.layout == "channels_first" else (cfg.batch, LENGTH, DIM)
    )
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    mask = None
    if cfg.branch == "attention":
        mask = torch.rand(cfg.batch, LENGTH, generator=gen) < 0.4
        mask[:, 0] = False  # every sample attends to something
    return x, mask, torch.randn(shape, generator=gen, dtype=torch.float64)


# The oracle call ------------------------------------------------------------------------------


def reference(
    cfg: Config,
    spec: Stack,
    paths: list[str],
    params: dict[str, Tensor],
    x: Tensor,
    mask: Tensor | None,
    keeps: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """The oracle for ``cfg``: ``(stream tensor, output)`` in float64, with ``keeps[r]`` the
    per-sample multipliers of residual r. ``params`` are the model's parameters by name; the
    functions below map them onto the papers' symbols. The user branches run through
    ``functional_call`` on ``spec`` (a float64 copy of the model) with ``params``."""

    def branch(path: str) -> oracle.Fn:
        own = {k[len(path) + 1 :]: v for k, v in params.items() if k.startswith(path + ".")}
        extra = {} if mask is None else {"key_padding_mask": mask}
        module = spec.get_submodule(path)
        return lambda t: torch.func.functional_call(module, own, (t,), extra)

    fns = [branch(path) for path in paths]
    return REFERENCES[cfg.variant](cfg, params, fns, x, keeps)


Reference = Callable[
    [Config, dict[str, Tensor], list[oracle.Fn], Tensor, list[Tensor]], tuple[Tensor, Tensor]
]


def streams_reference(
    cfg: Config, P: dict[str, Tensor], fns: list[oracle.Fn], x: Tensor, keeps: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """hyper / mhc / frac: expand, the layers, reduce (frac: the hidden state itself)."""
    n, layout = cfg.streams, cfg.layout
    h = x if cfg.variant == "frac" else oracle.fold(x.expand(n, *x.shape))
    for i, fn in enumerate(fns):
        q = f"blocks.{i}."
        if cfg.variant == "hyper":
            dyn = None
            if cfg.dynamic:
                dyn = oracle.HyperDynamic(
                    w_m=P[q + "fn.width_dynamic.weight"],
                    s_m=P[q + "fn.width_dynamic.scale"],
                    w_r=P[q + "shortcut.dynamic.weight"],
                    s_r=P[q + "shortcut.dynamic.scale"],
                    w_b=P[q + "fn.depth_dynamic.weight"],
                    s_b=P[q + "fn.depth_dynamic.scale"],
                )
            a_m, a_r, b = P[q + "fn.width"], P[q + "shortcut.mix"], P[q + "fn.depth"]
            halves = oracle.hyper_connection(
                h, fn, n, a_m=a_m, a_r=a_r, b=b, dynamic=dyn, layout=layout
            )
        elif cfg.variant == "mhc" and n == 1:  # mhc_residual's documented n = 1: x + fn(x)
            halves = (h, fn(h))
        elif cfg.variant == "mhc":
            mdyn = None
            if cfg.dynamic:  # weights (n, C, K): one (C, K) block per stream, rows of vec(x)
                phi = P[q + "fn.weight"].reshape(n * DIM, 2 * n)
                mdyn = oracle.MHCDynamic(
                    phi_pre=phi[:, :n],
                    phi_post=phi[:, n:],
                    phi_res=P[q + "shortcut.weight"].reshape(n * DIM, n * n),
                    a_pre=P[q + "fn.pre_scale"],
                    a_post=P[q + "fn.post_scale"],
                    a_res=P[q + "shortcut.res_scale"],
                )
            halves = oracle.mhc_connection(
                h,
                fn,
                n,
                b_pre=P[q + "fn.pre_bias"],
                b_post=P[q + "fn.post_bias"],
                b_res=P[q + "shortcut.res_bias"],
                dynamic=mdyn,
                layout=layout,
            )
        else:
            fdyn = None
            if cfg.dynamic:
                fdyn = oracle.FracDynamic(
                    w_y=P[q + "fn.width_dynamic.weight"],
                    s_y=P[q + "fn.width_dynamic.scale"],
                    w_a=P[q + "shortcut.dynamic.weight"],
                    s_a=P[q + "shortcut.dynamic.scale"],
                    w_b=P[q + "fn.depth_dynamic.weight"],
                    s_b=P[q + "fn.depth_dynamic.scale"],
                )
            y, a, b = P[q + "fn.width"], P[q + "shortcut.mix"], P[q + "fn.depth"]
            halves = oracle.frac_connection(h, fn, n, y=y, a=a, b=b, dynamic=fdyn, layout=layout)
        h = oracle.residual(*halves, keeps[i], cfg.stream_axis)
    return h, h if cfg.variant == "frac" else oracle.unfold(h, n).sum(0)


def laurel_reference(
    cfg: Config, P: dict[str, Tensor], fns: list[oracle.Fn], x: Tensor, keeps: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """LAuReL-RW, -LR, -RW+LR: one residual per layer, merge LaurelRW, shortcut LowRank."""
    h = x
    for i, fn in enumerate(fns):
        q = f"blocks.{i}."
        if cfg.variant == "laurel_rw":
            h = oracle.laurel_rw(h, fn, P[q + "merge.logits"], keeps[i])
        elif cfg.variant == "laurel_lr":
            h = oracle.laurel_lr(h, fn, P[q + "shortcut.up"], P[q + "shortcut.down"], keeps[i])
        else:
            up, down, logits = P[q + "shortcut.up"], P[q + "shortcut.down"], P[q + "merge.logits"]
            h = oracle.laurel_rw_lr(h, fn, logits, up, down, keeps[i])
    return h, h


def laurel_pa_reference(
    cfg: Config, P: dict[str, Tensor], fns: list[oracle.Fn], x: Tensor, keeps: list[Tensor]
) -> tuple[Tensor, Tensor]:
    c = [f"blocks.connections.{i}." for i in range(cfg.layers)]
    gammas = [P[q + "gamma"] for q in c]
    h = oracle.laurel_pa(x, fns, gammas, [(P[q + "h.up"], P[q + "h.down"]) for q in c], keeps)
    return h, h


def denseformer_reference(
    cfg: Config, P: dict[str, Tensor], fns: list[oracle.Fn], x: Tensor, keeps: list[Tensor]
) -> tuple[Tensor, Tensor]:
    alphas: list[Tensor | None] = []
    sources: list[list[int]] = []
    for i in range(1, cfg.layers + 1):  # the paper's DWA after block i when the period divides i
        dwa = i % cfg.period == 0
        alphas.append(P[f"blocks.connections.{i - 1}.alpha"] if dwa else None)
        sources.append([j for j in range(i + 1) if (i - j) % cfg.dilation == 0])
    h = oracle.denseformer(x, fns, alphas, sources, keeps)
    return h, h


def value_residual_reference(
    cfg: Config, P: dict[str, Tensor], fns: list[oracle.Fn], x: Tensor, keeps: list[Tensor]
) -> tuple[Tensor, Tensor]:
    blocks = []
    for i in range(cfg.layers):
        attn, mlp = f"blocks.blocks.{i}.attn.fn.", f"blocks.blocks.{i}.ff.fn."
        blocks.append(
            {
                "ln1_w": P[attn + "norm.weight"],
                "ln1_b": P[attn + "norm.bias"],
                "w_in": P[attn + "attention.in_proj.weight"],
                "b_in": P[attn + "attention.in_proj.bias"],
                "w_out": P[attn + "attention.out_proj.weight"],
                "b_out": P[attn + "attention.out_proj.bias"],
                "ln2_w": P[mlp + "norm.weight"],
                "ln2_b": P[mlp + "norm.bias"],
                "w1": P[mlp + "linear1.weight"],
                "b1": P[mlp + "linear1.bias"],
                "w2": P[mlp + "linear2.weight"],
                "b2": P[mlp + "linear2.bias"],
            }
        )
    pairs = [(keeps[2 * i], keeps[2 * i + 1]) for i in range(cfg.layers)]
    h = oracle.value_residual_stack(x, blocks, HEADS, (0.5, 0.5), pairs)  # lam = 0.5 default
    return h, h


def resi_dual_reference(
    cfg: Config, P: dict[str, Tensor], fns: list[oracle.Fn], x: Tensor, keeps: list[Tensor]
) -> tuple[Tensor, Tensor]:
    norms = [
        (P[f"blocks.{i}.post.norm.weight"], P[f"blocks.{i}.post.norm.bias"])
        for i in range(cfg.layers)
    ]
    final = (P["head.norm.weight"], P["head.norm.bias"])
    out, pair = oracle.resi_dual(x, fns, norms, final, keeps)
    return pair, out


REFERENCES: dict[str, Reference] = {
    "hyper": streams_reference,
    "mhc": streams_reference,
    "frac": streams_reference,
    "laurel_rw": laurel_reference,
    "laurel_lr": laurel_reference,
    "laurel_rw_lr": laurel_reference,
    "laurel_pa": laurel_pa_reference,
    "denseformer": denseformer_reference,
    "value_residual": value_residual_reference,
    "resi_dual": resi_dual_reference,
}


# Running one configuration --------------------------------------------------------------------


def refusal(cfg: Config) -> str | None:
    """The documented refusal for ``cfg`` (a regex of its message), if any."""
    if cfg.drop_rate == 0 or cfg.drop_mode == "row":
        return None
    if cfg.variant == "value_residual":  # "batch" / "subset" need a tensor output: refused
        return "drop_mode='row'"  # when set, in eval mode too
    if not cfg.drops:
        return None
    if cfg.execution == "fx" and cfg.training:  # a run-time skip is not recordable by FX
        return "torch.fx.symbolic_trace cannot record"
    if cfg.branch == "attention" and cfg.drop_mode == "subset":  # per-sample extra arguments
        return "drop_mode='row' or 'batch'"
    return None


def execute(
    cfg: Config, model: Stack, x: Tensor, mask: Tensor | None
) -> tuple[Callable[..., Any], nn.Module]:
    """``model`` as ``cfg.execution`` runs it: a callable ``(x, mask) -> (streams, output)``
    and the module that holds the parameters it trains (named as ``model``'s)."""
    kwargs = {} if mask is None else {"mask": mask}
    owner: nn.Module = model
    if cfg.execution == "eager":
        run: Any = model
    elif cfg.execution == "deepcopy":
        run = owner = copy.deepcopy(model)
    elif cfg.execution == "pickle":
        run = owner = pickle.loads(pickle.dumps(model))
    elif cfg.execution == "fx":
        concrete = None if mask is not None else {"mask": None}
        run = owner = torch.fx.symbolic_trace(model, concrete_args=concrete)
    elif cfg.execution == "meta":
        with torch.device("meta"):
            fresh, _ = build(cfg)
        fresh.to_empty(device="cpu")
        fresh.load_state_dict(model.state_dict())
        if list(fresh.state_dict()) != list(model.state_dict()):
            raise StateDictMismatch(f"{list(fresh.state_dict())} != {list(model.state_dict())}")
        run = owner = fresh.to(cfg.dtype).train(model.training)
    elif cfg.execution == "export":
        run = owner = torch.export.export(model, (x,), kwargs).module()
    elif cfg.execution == "compile":
        run = torch.compile(model, fullgraph=True, backend="aot_eager")
    else:
        raise ValueError(cfg.execution)
    return (lambda x, mask: run(x) if mask is None else run(x, mask)), owner


def close(got: Tensor, want: Tensor, tol: float) -> Tensor:
    """Per row (sample axis): ``|got - want| <= tol * max(1, max |want|)`` everywhere."""
    bound = tol * max(1.0, float(want.abs().max()))
    diff = (got.to(torch.float64) - want).abs().reshape(got.shape[0], -1)
    return ~(diff > bound).any(1)  # NaN counts as not close


def describe(got: Tensor, want: Tensor) -> str:
    diff = (got.to(torch.float64) - want).abs()
    return f"max |diff| {float(diff.max()):.3g}, max |reference| {float(want.abs().max()):.3g}"


def multiplier(cfg: Config) -> float:
    """A kept sample's branch factor."""
    if not cfg.drops or not cfg.scale_by_keep or cfg.drop_rate == 1.0:
        return 1.0
    if cfg.drop_mode == "subset":
        return cfg.batch / max(1, int(cfg.batch * (1 - cfg.drop_rate)))
    return 1.0 / (1.0 - cfg.drop_rate)


def infer_decisions(
    cfg: Config, got: Tensor, oracle_with: Callable[[list[Tensor]], Tensor], tol: float
) -> Tensor:
    """Each sample's keep bits ``(N, residuals)``, read off the stream tensor ``got``: the one
    decision pattern whose oracle output every stream of the sample matches at once."""
    n, N = cfg.stream_axis, cfg.batch
    patterns = list(itertools.product((0.0, 1.0), repeat=cfg.residuals))
    matches = []  # (patterns, n, N)
    for bits in patterns:
        keeps = [torch.full((N,), b * multiplier(cfg), dtype=torch.float64) for b in bits]
        with torch.no_grad():
            want = oracle_with(keeps)
        matches.append(close(got, want, tol).reshape(n, N))
    match = torch.stack(matches)
    decided = torch.zeros(N, cfg.residuals)
    for b in range(N):
        whole = match[:, :, b].all(1)
        if whole.any():
            decided[b] = torch.tensor(patterns[int(whole.nonzero()[0])])
        elif all(match[:, i, b].any() for i in range(n)):
            per_stream = [
                [patterns[int(c)] for c in match[:, i, b].nonzero().flatten()] for i in range(n)
            ]
            raise StreamsDisagree(
                f"sample {b}: its {n} streams match different keep decisions (per stream, the "
                f"patterns over the {cfg.residuals} residuals they fit: {per_stream})"
            )
        else:
            raise NoKeepDecision(
                f"sample {b} matches no keep decision of its {cfg.residuals} residuals "
                f"(streams matching some decision: {[bool(match[:, i, b].any()) for i in range(n)]})"
            )
    return decided


def check_decisions(cfg: Config, bits: Tensor) -> None:
    """The decisions must fit the mode and the rate (``bits`` ``(N, residuals)``)."""
    if cfg.drop_mode == "batch" and not (bits == bits[:1]).all():
        raise WrongDecisions(f"'batch' drop decided per sample: {bits.tolist()}")
    if cfg.drop_mode == "subset":
        k = max(1, int(cfg.batch * (1 - cfg.drop_rate)))
        kept = bits.sum(0).tolist()
        if any(c != k for c in kept):
            raise WrongDecisions(f"'subset' kept {kept} samples per residual, expected {k}")


def check(cfg: Config) -> None:
    """Build, run and compare one configuration; raises a :class:`SeamFailure` on a seam (any
    other error is one too, unless it is the documented refusal of ``cfg``)."""
    refused = refusal(cfg)
    try:
        compare(cfg)
    except SeamFailure:
        raise
    except Exception as err:
        if refused is not None and re.search(re.escape(refused), str(err)):
            return
        raise UnexpectedError(f"{type(err).__name__}: {err}") from err
    if refused is not None:
        raise MissingRefusal(f"expected an error naming {refused!r}, none was raised")


def compare(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    model, branches = build(cfg)
    randomise(model, cfg.seed, cfg.sharp)
    names = {id(m): name for name, m in model.named_modules()}
    paths = [names[id(b)] for b in branches]
    spec = copy.deepcopy(model).double()
    model = model.to(cfg.dtype).train(cfg.training)
    x64, mask, cotangent = inputs(cfg)
    x = x64.to(cfg.dtype).requires_grad_()
    tol, grad_tol = TOLERANCE[cfg.dtype]
    params64 = {k: v.detach().double().requires_grad_() for k, v in model.named_parameters()}
    x_ref = x.detach().double().requires_grad_()

    def oracle_with(keeps: list[Tensor]) -> Tensor:
        return reference(cfg, spec, paths, params64, x_ref, mask, keeps)[0]

    run, owner = execute(cfg, model, x.detach(), mask)
    streams, out = run(x, mask)
    if not bool(torch.isfinite(streams).all() and torch.isfinite(out).all()):
        raise NotFinite(f"output has {int((~torch.isfinite(out)).sum())} non-finite values")

    # The keep decisions: all kept in eval or at rate 0, none at rate 1, else read off (not in
    # half precision, where a kept branch may be within rounding of a dropped one).
    N = cfg.batch
    if not cfg.drops:
        bits = torch.ones(N, cfg.residuals)
    elif cfg.drop_rate == 1.0:
        bits = torch.zeros(N, cfg.residuals)
    elif grad_tol is None:
        bits = None
    else:
        bits = infer_decisions(cfg, streams.detach(), oracle_with, 2 * tol)
        check_decisions(cfg, bits)
    if bits is None:
        grads = torch.autograd.grad(out.sum(), x)
        if not bool(torch.isfinite(grads[0]).all()):
            raise NotFinite("gradient of input is not finite")
        return
    keeps = [bits[:, r].double() * multiplier(cfg) for r in range(cfg.residuals)]

    want_streams, want_out = reference(cfg, spec, paths, params64, x_ref, mask, keeps)
    for name, got, want in (("stream tensor", streams, want_streams), ("output", out, want_out)):
        if not bool(close(got.detach(), want.detach(), tol).all()):
            raise OutputMismatch(
                f"{name} (keep decisions {bits.tolist()}): {describe(got.detach(), want.detach())}"
            )

    # Gradients of <output, cotangent> for the input and every parameter (a parameter the
    # executed graph does not hold, such as a branch an FX trace never ran, gets none).
    trained = dict(owner.named_parameters())
    keys = [k for k in sorted(params64) if k in trained]
    grads = torch.autograd.grad(
        (out * cotangent.to(out.dtype)).sum(),
        [x, *(trained[k] for k in keys)],
        allow_unused=True,
        materialize_grads=True,
    )
    wants = torch.autograd.grad(
        (want_out * cotangent).sum(),
        [x_ref, *params64.values()],
        allow_unused=True,
        materialize_grads=True,
    )
    got_grads = dict(zip(["input", *keys], grads, strict=True))
    for name, want_g in zip(["input", *params64], wants, strict=True):
        got_g = got_grads.get(name, torch.zeros_like(want_g))
        if not bool(torch.isfinite(got_g).all()):
            raise NotFinite(f"gradient of {name} is not finite")
        if grad_tol is not None and not bool(
            close(got_g.reshape(1, -1), want_g.reshape(1, -1), grad_tol).all()
        ):
            raise GradientMismatch(f"gradient of {name}: {describe(got_g, want_g)}")

    if cfg.training and cfg.execution != "fx":  # a trace keeps the mode it was traced in
        owner.eval()  # a training step leaves eval as the eval oracle says
        with torch.no_grad():
            streams = run(x, mask)[0]
            want = oracle_with([torch.ones(N, dtype=torch.float64)] * cfg.residuals)
        if not bool(close(streams, want, tol).all()):
            raise OutputMismatch(f"eval after training: {describe(streams, want)}")


# The tests ------------------------------------------------------------------------------------


@PROFILE
@given(cfg=configs())
def test_streams_and_cross_depth_match_the_oracle(cfg: Config) -> None:
    check(cfg)


# Fixed configurations: the smallest that show each seam found so far (the test ids name it),
# and the compiled / exported cases (compiling is too slow to draw).
F16 = torch.float16


def dropping(variant: str, **options: Any) -> Config:
    """A training configuration that drops at rate 0.5."""
    return Config(variant, training=True, drop_rate=0.5, **options)


FIXED = {
    # Stochastic depth on stream tensors keeps or drops whole samples (issue item 3).
    "hyper-row-streams-agree": dropping("hyper", streams=2, seed=1),
    "mhc-row-streams-agree": dropping("mhc", streams=2, seed=1),
    "hyper-subset-whole-samples": dropping("hyper", streams=2, drop_mode="subset"),
    "mhc-subset-whole-samples": dropping("mhc", streams=2, drop_mode="subset"),
    "resi-dual-row-streams-agree": dropping("resi_dual", seed=1),
    "resi-dual-subset-whole-samples": dropping("resi_dual", drop_mode="subset"),
    # Sinkhorn in half precision (item 5): a near-hard H_res gives NaN in float16.
    "mhc-float16-sharp": Config("mhc", streams=2, sharp=True, dtype=F16, seed=4),
    "mhc-float16-sharp-dynamic": Config(
        "mhc", dynamic=True, streams=2, sharp=True, dtype=F16, seed=27
    ),
    # Masks and extra arguments reach the branch of every residual (DESIGN.md).
    "hyper-padding-mask": Config("hyper", streams=2, branch="attention"),
    "mhc-padding-mask": Config("mhc", streams=2, branch="attention"),
    "frac-padding-mask": Config("frac", streams=2, branch="attention"),
    # A skipped branch that returns a tuple ("batch" / "subset" drop) must keep the tuple.
    "value-residual-batch-drop-all": Config(
        "value_residual", drop_mode="batch", drop_rate=1.0, training=True, batch=2
    ),
    "value-residual-batch-drop-half": dropping("value_residual", drop_mode="batch"),
    # FX traces training-mode "batch" / "subset" stochastic depth: a refusal naming the fixes.
    "fx-train-batch-drop": dropping("frac", drop_mode="batch", execution="fx"),
    "fx-train-subset-drop": dropping("frac", drop_mode="subset", execution="fx"),
    # torch.export outside no_grad (item 9), torch.compile, checkpointing under compile (item 9).
    "hyper-dynamic-export": Config("hyper", dynamic=True, streams=2, execution="export"),
    "mhc-dynamic-export": Config("mhc", dynamic=True, streams=2, execution="export"),
    "frac-dynamic-export": Config("frac", dynamic=True, streams=2, execution="export"),
    "hyper-dynamic-compile-row-drop": dropping(
        "hyper", dynamic=True, streams=2, execution="compile", batch=4
    ),
    "mhc-dynamic-compile": Config("mhc", dynamic=True, streams=3, execution="compile"),
    "frac-dynamic-compile-checkpoint": Config(
        "frac", dynamic=True, streams=2, execution="compile", training=True, checkpoint=True
    ),
}


@pytest.mark.parametrize("cfg", list(FIXED.values()), ids=list(FIXED))
def test_fixed_configurations_match_the_oracle(cfg: Config) -> None:
    check(cfg)


def catalogue(examples: int) -> dict[str, list[Config]]:
    """Run ``examples`` drawn configurations without stopping or shrinking; the failures grouped
    by kind and message (numbers masked), each group's configurations in draw order."""
    from hypothesis import Phase

    groups: dict[str, list[Config]] = {}

    @settings(max_examples=examples, phases=[Phase.generate], database=None, deadline=None)
    @given(cfg=configs())
    def run(cfg: Config) -> None:
        try:
            check(cfg)
        except SeamFailure as failure:
            kind = f"{type(failure).__name__}: {re.sub(r'[-0-9.e+]*[0-9]', '#', str(failure))}"
            groups.setdefault(kind[:200], []).append(cfg)

    run()
    return groups


if __name__ == "__main__":  # python tests/test_seams_streams.py [EXAMPLES]: the failure kinds
    import sys

    for kind, found in sorted(catalogue(int(sys.argv[1:2][0]) if sys.argv[1:] else 500).items()):
        smallest = min(found, key=lambda c: (c.layers, c.streams, c.batch, c.execution, c.seed))
        print(f"{len(found):5d}  {kind}\n       e.g. {smallest}")
