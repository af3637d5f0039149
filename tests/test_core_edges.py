"""Edge cases of the rewritten core: custom branches, nested strides, error hints, the meta device,
stochastic depth reproducibility, hooks, checkpoint, fp32 residuals and the repr."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

import residual
from residual import (
    IdentityShortcut,
    ProjectionShortcut,
    Residual,
    ResidualBlock,
    ResidualError,
    ZeroPadShortcut,
)
from residual.models.cifar import cifar_resnet

NAMED_SHORTCUTS = ["projection", "zero_pad", "pooled_projection", "auto"]


# --- 1. custom modules: the default shortcut works, named ones ask for the module ---------------


class SwiGLU(nn.Module):
    """LLaMA's feed-forward: ``w2(silu(w1 x) * w3 x)``, registered w1, w2, w3 as in LLaMA."""

    def __init__(self, dim: int = 64, hidden: int = 172) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class OutFirstAttention(nn.Module):
    """Self-attention whose ``out_proj`` is registered before its ``in_proj``."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.out_proj = nn.Linear(dim, dim)
        self.in_proj = nn.Linear(dim, 3 * dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, dim = x.shape
        q, k, v = (
            t.view(n, length, self.heads, dim // self.heads).transpose(1, 2)
            for t in self.in_proj(x).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, dim))


CUSTOM = {"swiglu": SwiGLU, "out_proj_first_attention": OutFirstAttention}


@pytest.mark.parametrize("make", CUSTOM.values(), ids=CUSTOM.keys())
def test_custom_module_with_default_shortcut(make: Callable[[], nn.Module]) -> None:
    fn = make()
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(Residual(fn)(x), x + fn(x), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("name", NAMED_SHORTCUTS)
@pytest.mark.parametrize("make", CUSTOM.values(), ids=CUSTOM.keys())
def test_custom_module_named_shortcut_asks_for_the_module(
    make: Callable[[], nn.Module], name: str
) -> None:
    fn = make()
    with pytest.raises(ResidualError, match=rf"{type(fn).__name__}.*ProjectionShortcut\("):
        Residual(fn, shortcut=name)


@pytest.mark.parametrize("make", CUSTOM.values(), ids=CUSTOM.keys())
def test_custom_module_with_the_projection_module(make: Callable[[], nn.Module]) -> None:
    fn = make()
    proj = ProjectionShortcut(64, 64, layout="channels_last")
    block = Residual(fn, shortcut=proj)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(block(x), x @ proj.linear.weight.T + fn(x))


# --- 2. nested strides -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"), [("projection", ProjectionShortcut), ("zero_pad", ZeroPadShortcut)]
)
def test_nested_blocks_compose_their_strides(name: str, kind: type[nn.Module]) -> None:
    fn = nn.Sequential(ResidualBlock(16, 32, stride=2), ResidualBlock(32, 32))
    block = Residual(fn, shortcut=name)
    assert type(block.shortcut) is kind
    assert (block.shortcut.in_channels, block.shortcut.out_channels) == (16, 32)
    assert block.shortcut.stride == 2  # 2 x 1, not 4
    assert block.shortcut.layout == "channels_first"
    x = torch.randn(1, 16, 9, 9)
    out = block(x)
    assert out.shape == (1, 32, 5, 5)
    torch.testing.assert_close(out, block.shortcut(x) + fn(x))


UNREADABLE = {
    "conv_transpose": lambda: nn.ConvTranspose2d(8, 8, 2, stride=2),
    "unpadded_conv": lambda: nn.Conv2d(8, 16, 3),
    "conv_then_upsample": lambda: nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.ConvTranspose2d(16, 16, 2, stride=2)
    ),
    "nested_unpadded": lambda: nn.Sequential(
        ResidualBlock(8, 8), Residual(nn.Conv2d(8, 8, 3), shortcut=nn.Identity())
    ),
}


@pytest.mark.parametrize("name", ["projection", "zero_pad"])
@pytest.mark.parametrize("make", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_spatial_branch_asks_for_the_module(
    make: Callable[[], nn.Module], name: str
) -> None:
    with pytest.raises(ResidualError, match=r"pass the module instead.*ProjectionShortcut\("):
        Residual(make(), shortcut=name)


# --- 3. every hint in a shape-mismatch error is a fix that works --------------------------------


class Strided(nn.Module):
    """A channel-last stream through a strided conv, (N, H, W, C) in and out: a custom forward."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


HINT = re.compile(r"shortcut=((?:Projection|ZeroPad|PooledProjection)Shortcut\([^)]*\))")
CF = "layout='channels_first'"
CL = "layout='channels_last'"
FIXABLE: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], list[str]]] = {
    "widen_channels_first_stride2_odd": (
        lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1),
        (2, 4, 9, 7),
        [
            f"ProjectionShortcut(4, 8, stride=2, {CF})",
            f"ZeroPadShortcut(4, 8, stride=2, {CF})",
        ],
    ),
    "widen_channels_last_rank3": (
        lambda: nn.Linear(4, 8),
        (2, 3, 4),
        [
            f"ProjectionShortcut(4, 8, stride=1, {CL})",
            f"ZeroPadShortcut(4, 8, stride=1, {CL})",
        ],
    ),
    "widen_channels_last_rank4": (
        lambda: nn.Linear(4, 8),
        (2, 3, 5, 4),
        [
            f"ProjectionShortcut(4, 8, stride=1, {CL})",
            f"ZeroPadShortcut(4, 8, stride=1, {CL})",
        ],
    ),
    "widen_channels_last_stride2": (
        lambda: Strided(4, 8),
        (2, 7, 5, 4),
        [
            f"ProjectionShortcut(4, 8, stride=2, {CL})",
            f"ZeroPadShortcut(4, 8, stride=2, {CL})",
        ],
    ),
    "reduce_channels_first": (
        lambda: nn.Conv2d(8, 4, 3, padding=1),
        (2, 8, 5, 5),
        [f"ProjectionShortcut(8, 4, stride=1, {CF})"],
    ),
    "reduce_channels_last_rank2": (
        lambda: nn.Linear(8, 4),
        (3, 8),
        [f"ProjectionShortcut(8, 4, stride=1, {CL})"],
    ),
    "conv1d_stride2": (
        lambda: nn.Conv1d(4, 8, 3, stride=2, padding=1),
        (2, 4, 11),
        [
            f"ProjectionShortcut(4, 8, stride=2, {CF}, spatial_dims=1)",
            f"ZeroPadShortcut(4, 8, stride=2, {CF})",
        ],
    ),
    "conv3d_stride2": (
        lambda: nn.Conv3d(4, 8, 3, stride=2, padding=1),
        (1, 4, 5, 6, 5),
        [
            f"ProjectionShortcut(4, 8, stride=2, {CF}, spatial_dims=3)",
            f"ZeroPadShortcut(4, 8, stride=2, {CF})",
        ],
    ),
    "reduce_channels_last_rank3": (
        lambda: nn.Linear(8, 4),
        (2, 6, 8),
        [f"ProjectionShortcut(8, 4, stride=1, {CL})"],
    ),
}


def _hints(fn: nn.Module, x: Tensor) -> list[str]:
    with pytest.raises(ResidualError, match="does not match shortcut output") as info:
        Residual(fn)(x)
    return HINT.findall(str(info.value))


@pytest.mark.parametrize(
    ("make", "shape", "expected"),
    [pytest.param(*v, id=k) for k, v in FIXABLE.items()],
)
def test_every_hint_is_a_fix_that_works(
    make: Callable[[], nn.Module], shape: tuple[int, ...], expected: list[str]
) -> None:
    fn = make()
    x = torch.randn(shape)
    hints = _hints(fn, x)
    assert hints == expected
    scope = {k: getattr(residual, k) for k in residual.__all__}
    want = fn(x).shape
    for hint in hints:
        shortcut = eval(hint, scope)
        out = Residual(fn, shortcut=shortcut)(x)
        assert out.shape == want, hint
        torch.testing.assert_close(out, shortcut(x) + fn(x))


class DropFirstToken(nn.Module):
    """(N, L, C) -> (N, L - 1, C): a branch that drops the class token of a channel-last stream."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 1:]


UNFIXABLE: dict[str, tuple[Callable[[], nn.Module], nn.Module, tuple[int, ...], str]] = {
    "upsampling_conv_transpose": (
        lambda: nn.ConvTranspose2d(4, 4, 2, stride=2),
        IdentityShortcut(),
        (1, 4, 3, 3),
        "enlarges a spatial dim",
    ),
    "upsampling_widening": (
        lambda: nn.ConvTranspose2d(4, 8, 2, stride=2),
        IdentityShortcut(),
        (1, 4, 3, 3),
        "enlarges a spatial dim",
    ),
    "sequence_length_change_channel_last": (
        DropFirstToken,
        ProjectionShortcut(8, 8, layout="channels_last"),
        (2, 6, 8),
        r"non-channel dim of a channel-last stream|positions",
    ),
    "unpadded_conv": (
        lambda: nn.Conv2d(4, 4, 3),
        IdentityShortcut(),
        (1, 4, 6, 6),
        "not ceil",
    ),
    "unpadded_conv_widening": (
        lambda: nn.Conv2d(4, 8, 3),
        IdentityShortcut(),
        (1, 4, 10, 10),
        "not ceil",
    ),
}


@pytest.mark.parametrize(
    ("make", "shortcut", "shape", "says"), UNFIXABLE.values(), ids=UNFIXABLE.keys()
)
def test_unfixable_mismatch_suggests_no_shortcut_class(
    make: Callable[[], nn.Module], shortcut: nn.Module, shape: tuple[int, ...], says: str
) -> None:
    with pytest.raises(ResidualError, match="does not match shortcut output") as info:
        Residual(make(), shortcut=shortcut)(torch.randn(shape))
    message = str(info.value)
    assert re.search(says, message), message
    assert not re.search(r"\w+Shortcut\(", message.split(";", 1)[1]), message


# --- 4. meta device lifecycle ------------------------------------------------------------------

MODES = ["row", "batch", "subset"]


def _poison(model: nn.Module) -> None:
    """What ``to_empty`` may leave: any value. NaN (or -7) makes every unset entry visible."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else -7)


def _train(model: nn.Module, steps: int = 3) -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    target = torch.arange(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        torch.manual_seed(100 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()


@pytest.mark.parametrize(
    "mode",
    ["row", "batch", "subset"],
)
def test_meta_build_then_load_state_dict_trains_like_the_reference(mode: str) -> None:
    torch.manual_seed(0)
    reference = cifar_resnet(20, drop_path=0.2, drop_mode=mode)
    with torch.device("meta"):
        torch.manual_seed(0)
        model = cifar_resnet(20, drop_path=0.2, drop_mode=mode)
    model.to_empty(device="cpu")
    _poison(model)
    model.load_state_dict(reference.state_dict(), strict=True)
    _train(reference)
    _train(model)
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", MODES)
def test_meta_build_then_reset_parameters_works(mode: str) -> None:
    with torch.device("meta"):
        model = cifar_resnet(20, drop_path=0.2, drop_mode=mode)
    model.to_empty(device="cpu")
    _poison(model)
    torch.manual_seed(5)
    for module in model.modules():
        if callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        assert (t.isfinite() if t.is_floating_point() else t >= 0).all(), name
    drops = [m.drop for m in model.modules() if isinstance(m, Residual) and m.drop is not None]
    assert [round(float(d.keep), 6) for d in drops] == [round(1 - d.p, 6) for d in drops]
    if mode == "batch":
        seeds = [int(d.seed) for d in drops]
        assert len(set(seeds)) == len(seeds)  # redrawn, one per block
        assert all(int(d.step) == 0 for d in drops)
    out = model(torch.randn(4, 3, 8, 8))
    assert out.shape == (4, 10) and out.isfinite().all()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_reset_parameters_redraws_the_batch_seed_from_torch_rng() -> None:
    block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode="batch")
    torch.manual_seed(11)
    block.drop.reset_parameters()
    first = int(block.drop.seed)
    block.drop.step.fill_(9)
    torch.manual_seed(11)
    block.drop.reset_parameters()
    assert int(block.drop.seed) == first and int(block.drop.step) == 0


# --- 5. stochastic depth reproducibility --------------------------------------------------------


def _ran(block: Callable[[Tensor], Tensor], fn: nn.Module, keep: float, steps: int) -> list[bool]:
    """For each training call: did the branch run (x + fn(x) / keep) or was it skipped (x)?"""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = x + fn(x) / keep
    seen = []
    for _ in range(steps):
        out = block(x).detach()
        if torch.equal(out, x):
            seen.append(False)
        else:
            torch.testing.assert_close(out, expected)
            seen.append(True)
    return seen


def _batch_block(seed: int) -> tuple[Residual, nn.Module]:
    torch.manual_seed(seed)
    fn = nn.Linear(4, 4)  # no buffers: the compiled path uses torch.cond
    return Residual(fn, drop_path=0.5, drop_mode="batch"), fn


@pytest.mark.parametrize("seed", [0, 7])
def test_batch_mode_sequence_is_reproducible_from_the_seed(seed: int) -> None:
    first = _ran(*_batch_block(seed), 0.5, 24)
    torch.manual_seed(1234)  # the draws do not read torch's RNG after construction
    again = _ran(*_batch_block(seed), 0.5, 24)
    assert first == again
    assert 0 < sum(first) < 24  # both outcomes occur
    other = _ran(*_batch_block(seed + 1), 0.5, 24)
    assert other != first


def test_batch_mode_compiled_draws_as_eager() -> None:
    block, fn = _batch_block(3)
    start = {k: v.clone() for k, v in block.state_dict().items()}
    eager = _ran(block, fn, 0.5, 12)
    block.load_state_dict(start)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        assert _ran(compiled, fn, 0.5, 12) == eager
    finally:
        torch._dynamo.reset()
    assert int(block.drop.step) == 12


def test_batch_mode_state_dict_resumes_the_sequence() -> None:
    block, fn = _batch_block(4)
    full = _ran(block, fn, 0.5, 20)
    block, fn = _batch_block(4)
    head = _ran(block, fn, 0.5, 8)
    saved = block.state_dict()
    assert int(saved["drop.step"]) == 8
    fresh, _ = _batch_block(99)  # another seed: the state dict must bring the draw state
    fresh.load_state_dict(saved)
    assert head + _ran(fresh, fn, 0.5, 12) == full


@pytest.mark.parametrize("mode", ["row", "subset"])
def test_row_and_subset_are_reproducible_from_manual_seed(mode: str) -> None:
    def run() -> list[Tensor]:
        torch.manual_seed(0)
        block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode=mode)
        x = torch.randn(8, 4)
        torch.manual_seed(21)
        return [block(x).detach() for _ in range(6)]

    a, b = run(), run()
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert any(not torch.equal(a[0], u) for u in a[1:])  # the draws do change per call


# --- 6. hooks see the identity shortcut ---------------------------------------------------------


def test_identity_shortcut_module_hooks() -> None:
    block = Residual(nn.Linear(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    forward: list[tuple[Tensor, Tensor]] = []
    backward: list[tuple[Tensor, Tensor]] = []
    block.shortcut.register_forward_hook(lambda m, i, o: forward.append((i[0], o)))
    block.shortcut.register_full_backward_hook(lambda m, gi, go: backward.append((gi[0], go[0])))
    (block(x) * w).sum().backward()
    assert len(forward) == 1 and len(backward) == 1
    torch.testing.assert_close(forward[0][0], x)
    torch.testing.assert_close(forward[0][1], x)
    torch.testing.assert_close(backward[0][1], w)  # dL/dS = dL/dH
    torch.testing.assert_close(backward[0][0], w)  # identity: passes it through
    torch.testing.assert_close(x.grad, w + w @ block.fn.weight)


def test_identity_shortcut_global_forward_hook() -> None:
    block = Residual(nn.Linear(4, 4))
    called: list[nn.Module] = []
    handle = register_module_forward_hook(lambda m, i, o: called.append(m))
    try:
        block(torch.randn(2, 4))
    finally:
        handle.remove()
    assert any(m is block.shortcut for m in called)
    assert [type(m).__name__ for m in called] == ["IdentityShortcut", "Linear", "Residual"]


# --- 7. checkpoint: kwargs pass through, norm statistics move once ------------------------------


class KwargsBranch(nn.Module):
    """A branch whose kwargs share their names with torch.utils.checkpoint's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.seen: list[dict[str, Any]] = []

    def forward(
        self,
        x: Tensor,
        *,
        use_reentrant: Any,
        context_fn: Any,
        preserve_rng_state: Any,
        determinism_check: Any,
        debug: Any,
    ) -> Tensor:
        self.seen.append(
            {
                "use_reentrant": use_reentrant,
                "context_fn": context_fn,
                "preserve_rng_state": preserve_rng_state,
                "determinism_check": determinism_check,
                "debug": debug,
            }
        )
        return self.lin(x) * preserve_rng_state + debug


def test_checkpoint_passes_every_branch_kwarg_through() -> None:
    sentinel = object()
    scale = torch.randn(3, 4, requires_grad=True)
    shift = torch.randn(4, requires_grad=True)
    kwargs = {
        "use_reentrant": "not a bool",
        "context_fn": sentinel,
        "preserve_rng_state": scale,
        "determinism_check": "branch's own",
        "debug": shift,
    }
    grads = []
    for ckpt in (True, False):
        torch.manual_seed(0)
        fn = KwargsBranch()
        block = Residual(fn, checkpoint=ckpt).train()
        x = torch.randn(3, 4, requires_grad=True)
        out = block(x, **kwargs)
        torch.testing.assert_close(out, x + fn.lin(x) * scale + shift)
        out.square().sum().backward()
        assert len(fn.seen) == (2 if ckpt else 1)  # the forward, and the recompute
        for seen in fn.seen:
            assert seen.keys() == kwargs.keys()
            assert all(seen[k] is v for k, v in kwargs.items())
        grads.append([x.grad, scale.grad, shift.grad, *(p.grad for p in fn.parameters())])
        scale.grad = shift.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


def _norm_state(bn: nn.BatchNorm1d) -> dict[str, Any]:
    """Every plain attribute (momentum, eps, training, ...) and every buffer, copied."""
    plain = (bool, int, float, str, type(None))
    state = {k: v for k, v in vars(bn).items() if isinstance(v, plain)}
    return {**state, **{k: v.clone() for k, v in bn.named_buffers()}}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, Tensor) else v == b[k] for k, v in a.items()
    )


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_checkpoint_recompute_leaves_norms_alone(momentum: float | None) -> None:
    def build() -> tuple[Residual, nn.BatchNorm1d]:
        torch.manual_seed(0)
        bn = nn.BatchNorm1d(4, momentum=momentum)
        return Residual(nn.Sequential(nn.Linear(4, 4), bn, nn.Tanh())), bn

    block, bn = build()
    block.checkpoint = True
    plain, plain_bn = build()
    calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    phase = ["forward"]
    before: list[dict[str, Any]] = []
    bn.register_forward_pre_hook(lambda m, i: before.append(_norm_state(m)))
    bn.register_forward_hook(lambda m, i, o: calls.append((phase[0], before[-1], _norm_state(m))))
    for step in range(2):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
        phase[0] = "forward"
        out = block(x)
        after_forward = _norm_state(bn)
        phase[0] = "recompute"
        out.sum().backward()
        plain(x).sum().backward()
        assert [c[0] for c in calls[-2:]] == ["forward", "recompute"]
        _, pre, post = calls[-1]
        assert _same_state(pre, after_forward) and _same_state(post, after_forward)
        assert bn.momentum == momentum
        assert _same_state(_norm_state(bn), _norm_state(plain_bn))  # moved exactly once
        assert int(bn.num_batches_tracked) == step + 1
    for a, b in zip(block.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


# --- 8. residual_in_fp32 -----------------------------------------------------------------------

FP32_CASES = {
    "bfloat16": (torch.bfloat16, torch.float32),
    "float16": (torch.float16, torch.float32),
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "complex64": (torch.complex64, torch.complex64),
}


@pytest.mark.parametrize(("dtype", "expected"), FP32_CASES.values(), ids=FP32_CASES.keys())
def test_residual_in_fp32_dtypes(dtype: torch.dtype, expected: torch.dtype) -> None:
    fn = nn.Linear(4, 4, dtype=dtype)
    x = torch.randn(3, 4, dtype=dtype)
    out = Residual(fn, residual_in_fp32=True)(x)
    assert out.dtype == expected
    torch.testing.assert_close(out, x.to(expected) + fn(x).to(expected), atol=0.0, rtol=0.0)


# --- 9. print(model) shows only the parts that exist --------------------------------------------


def test_repr_lists_only_existing_parts() -> None:
    assert repr(Residual(nn.Linear(4, 4))) == (
        "Residual(\n"
        "  (fn): Linear(in_features=4, out_features=4, bias=True)\n"
        "  (shortcut): IdentityShortcut()\n"
        ")"
    )
    block = Residual(nn.Linear(4, 4), post=nn.ReLU(), drop_path=0.1)
    assert "None" not in repr(block)
    assert "(post): ReLU()" in repr(block) and "(drop): RowDrop(p=0.1)" in repr(block)
    block.set_drop_path(0.0)
    assert "None" not in repr(block) and "drop" not in repr(block)
    assert block.drop is None and block.merge is None and block.pre is None


@pytest.mark.parametrize(
    "build",
    [
        lambda: Residual(nn.Linear(4, 4)),
        lambda: Residual(nn.Linear(4, 4), post=nn.ReLU(), drop_path=0.1),
        lambda: residual.PreActBlock(4, 8, stride=2),
        lambda: residual.models.cifar_resnet(8),
        lambda: residual.models.resnet18(),
        lambda: residual.models.CausalTransformerLM(10, 8, 2, 1, 8),
        lambda: residual.models.TransformerEncoderLayer(8, 2),
        lambda: residual.models.HyperPatchTransformer(2, 8, 1, 2),
        lambda: residual.hyper.hyper_residual(nn.Linear(4, 4), 2, 4, dynamic=False),
        lambda: residual.models.ResidualLSTM(4, 4, 2),
    ],
    ids=[
        "plain",
        "post-drop",
        "preact",
        "cifar",
        "resnet18",
        "gpt",
        "encoder",
        "hyper-model",
        "hyper-static",
        "lstm",
    ],
)
def test_print_model_lists_no_unset_parts(build) -> None:
    """``print(model)`` shows the parts that are set; unset ones (pre, merge, post) are absent."""
    text = repr(build())
    assert "None" not in text
    assert "(fn):" in text or "(blocks):" in text or "(layers):" in text


def test_removing_a_part_removes_it_from_the_printout_and_the_state_dict() -> None:
    block = Residual(nn.Linear(4, 4), post=nn.LayerNorm(4))
    assert "(post): LayerNorm" in repr(block) and "post.weight" in block.state_dict()
    block.post = None
    assert "post" not in repr(block) and "post.weight" not in block.state_dict()
    assert block.post is None
