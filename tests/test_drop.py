"""Stochastic depth: the three modes, their compute savings, eval behaviour and compile."""

from __future__ import annotations

import re

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

from conftest import MySelfAttention
from residual import Residual, ResidualError, ScaledAdd, apply_drop_schedule, drop_path
from residual.drop import (
    BatchDrop,
    RowDrop,
    SubsetDrop,
    linear_drop_rates,
    make_drop_policy,
)
from residual.models import CausalTransformerLM, MLPMixer, ResidualLSTM, ResidualMLP


class Counting(nn.Module):
    """A linear branch that records the batch size of every call."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        return self.lin(x)


def test_row_mode_masks_whole_samples_and_rescales() -> None:
    fn = Counting()
    block = Residual(fn, drop_path=0.5, drop_mode="row")
    x = torch.randn(4000, 4)
    y = block(x)
    full = x + fn(x) / 0.5
    kept = torch.isclose(y, full).all(dim=1)
    dropped = torch.isclose(y, x).all(dim=1)
    assert torch.all(kept | dropped)
    assert 0.45 < kept.float().mean() < 0.55
    assert fn.calls[0] == 4000  # row mode computes everything


def test_batch_mode_skips_forward_and_backward() -> None:
    torch.manual_seed(0)
    fn = Counting()
    block = Residual(fn, drop_path=0.5, drop_mode="batch")
    x = torch.randn(8, 4, requires_grad=True)
    ran = 0
    for _ in range(200):
        fn.lin.zero_grad(set_to_none=True)
        before = len(fn.calls)
        y = block(x)
        y.sum().backward()
        if len(fn.calls) > before:
            ran += 1
            torch.testing.assert_close(y, x + fn.lin(x) / 0.5)
            # d/dW sum(x + (W x + b) / 0.5): every row is 2 * the sum of the samples
            torch.testing.assert_close(fn.lin.weight.grad, 2 * x.detach().sum(0).expand(4, 4))
        else:
            torch.testing.assert_close(y, x, atol=0, rtol=0)
            # no backward through the branch either: only a zero tie, so the parameters get
            # zero gradients, the same with or without torch.distributed
            assert torch.all(fn.lin.weight.grad == 0)
    assert 70 < ran < 130


def test_batch_mode_draws_are_reproducible_with_the_shared_seed() -> None:
    def pattern(global_seed: int) -> list[int]:
        torch.manual_seed(123)  # the block's drop seed is drawn from torch's RNG at build time
        fn = Counting()
        block = Residual(fn, drop_path=0.5, drop_mode="batch")
        torch.manual_seed(global_seed)  # other draws later on (data order on another rank)
        seen = []
        for _ in range(30):
            before = len(fn.calls)
            block(torch.randn(2, 4))
            seen.append(len(fn.calls) - before)
        return seen

    first = pattern(1)
    assert pattern(2) == first
    assert 0 < sum(first) < 30


def test_subset_mode_computes_a_share_and_every_parameter_learns() -> None:
    fn = Counting()
    block = Residual(fn, drop_path=0.25, drop_mode="subset")
    x = torch.randn(16, 4)
    y = block(x)
    assert fn.calls == [12]
    full = x + fn.lin(x) * (16 / 12)
    computed = torch.isclose(y, full, atol=1e-6).all(dim=1)
    untouched = torch.isclose(y, x, atol=0).all(dim=1)
    assert computed.sum() == 12 and untouched.sum() == 4
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fn.parameters())


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_eval_is_the_expected_value(mode: str) -> None:
    fn = nn.Linear(4, 4)
    block = Residual(fn, drop_path=0.3, drop_mode=mode).eval()
    x = torch.randn(6, 4)
    torch.testing.assert_close(block(x), x + fn(x), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_training_mean_matches_eval(mode: str) -> None:
    torch.manual_seed(0)
    fn = nn.Linear(4, 4)
    block = Residual(fn, drop_path=0.3, drop_mode=mode)
    x = torch.randn(10, 4)
    with torch.no_grad():
        mean = torch.stack([block(x) for _ in range(3000)]).mean(0)
        torch.testing.assert_close(mean, x + fn(x), atol=0.06, rtol=0.0)


def test_merge_and_post_apply_in_every_mode() -> None:
    for mode in ("row", "batch", "subset"):
        fn = nn.Linear(4, 4)
        block = Residual(fn, drop_path=0.5, drop_mode=mode, post=nn.ReLU(), merge=ScaledAdd(2.0))
        x = torch.randn(8, 4)
        y = block(x)
        with torch.no_grad():
            kept, dropped = torch.relu(2 * x + fn(x) / 0.5), torch.relu(2 * x)
        # each sample: post(merge(S, F / keep)) if its branch ran, else post(merge(S, 0))
        rows = torch.isclose(y, kept).all(1) | torch.isclose(y, dropped).all(1)
        assert rows.all(), mode


class _Pair(nn.Module):
    """A user's branch returning a tuple, which no reading of the module can know."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


def test_mode_errors() -> None:
    block = Residual(MySelfAttention(4, 1), drop_path=0.2, drop_mode="subset")
    x = torch.randn(2, 3, 4)
    with pytest.raises(ResidualError, match="subset.*use drop_mode='row' or 'batch'"):
        block(x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    torch.manual_seed(0)
    pair = Residual(_Pair(), drop_path=0.2, drop_mode="batch")
    with pytest.raises(
        TypeError, match="needs a branch that returns a tensor.*use drop_mode='row'"
    ):
        for _ in range(20):
            pair(x)


def test_row_mode_passes_tuples_through() -> None:
    lstm = nn.LSTM(4, 4, batch_first=True)
    x = torch.randn(3, 5, 4)
    y, (h, c) = Residual(lstm, drop_path=0.2)(x)
    out, (h_ref, c_ref) = lstm(x)
    # the state passes through untouched; each sample's output is x + out / keep, or x
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(c, c_ref, atol=0, rtol=0)
    kept = torch.isclose(y, x + out / 0.8).flatten(1).all(1)
    dropped = torch.isclose(y, x).flatten(1).all(1)
    assert (kept | dropped).all()


def test_schedule_helpers() -> None:
    assert linear_drop_rates(0.5, 2) == [0.25, 0.5]
    net = nn.Sequential(*(Residual(nn.Linear(2, 2)) for _ in range(4)))
    rates = apply_drop_schedule(net, 0.2, drop_mode="subset")
    assert [b.drop_path for b in net] == rates == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert all(b.drop_mode == "subset" for b in net)
    assert [1 - float(b.drop.keep) for b in net] == pytest.approx(rates)
    with pytest.raises(ResidualError, match="holds no Residual"):
        apply_drop_schedule(nn.Linear(2, 2), 0.1)
    with pytest.raises(ResidualError, match="num_blocks must be >= 1"):
        linear_drop_rates(0.1, 0)


ZOO_DROP = {
    "ResidualMLP": (lambda **o: ResidualMLP(12, 3, dim=16, depth=3, **o), (5, 12), 3),
    "MLPMixer": (lambda **o: MLPMixer(8, 4, 1, dim=16, depth=2, **o), (5, 1, 8, 8), 4),
    "CausalTransformerLM": (
        lambda **o: CausalTransformerLM(30, 16, 2, num_layers=2, max_len=8, **o),
        (5, 8),
        4,
    ),
}


@pytest.mark.parametrize("name", list(ZOO_DROP))
@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_zoo_builders_decay_the_deepest_rate_linearly(name: str, mode: str) -> None:
    build, shape, blocks = ZOO_DROP[name]
    torch.manual_seed(0)
    model = build(drop_path=0.4, drop_mode=mode)
    plain = build()
    plain.load_state_dict(model.state_dict())
    residuals = [m for m in model.modules() if isinstance(m, Residual)]
    assert [b.drop_path for b in residuals] == pytest.approx(linear_drop_rates(0.4, blocks))
    assert {b.drop_mode for b in residuals} == {mode}
    x = torch.randint(0, 30, shape) if name == "CausalTransformerLM" else torch.randn(shape)
    model.train()(x).sum().backward()
    branch_params = {id(p) for b in residuals for p in b.fn.parameters()}
    assert all(p.grad is not None for p in model.parameters() if id(p) not in branch_params)
    for b in residuals:
        ran = {p.grad is not None for p in b.fn.parameters()}
        # "batch" runs or skips a whole branch (no gradient that step); the others reach all
        assert ran == {True} or (mode == "batch" and ran == {False})
    torch.testing.assert_close(model.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_residual_lstm_drop_path_reaches_its_residual_layers_only() -> None:
    torch.manual_seed(0)
    lstm = ResidualLSTM(8, 8, num_layers=4, residual_from=1, drop_path=0.3)
    rates = [m.drop_path if isinstance(m, Residual) else None for m in lstm.layers]
    assert rates == [None, *linear_drop_rates(0.3, 3)]
    out, (h, _) = lstm.train()(torch.randn(3, 5, 8))
    out.sum().backward()
    assert h.shape == (4, 3, 8)
    plain = ResidualLSTM(8, 8, num_layers=4, residual_from=1)
    plain.load_state_dict(lstm.state_dict())
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(lstm.eval()(x)[0], plain.eval()(x)[0], rtol=0, atol=0)


def test_rate_is_a_buffer_outside_the_state_dict() -> None:
    block = Residual(nn.Linear(2, 2), drop_path=0.1)
    assert "drop.keep" in dict(block.named_buffers())
    assert "drop.keep" not in block.state_dict()


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_compile_fullgraph_no_frozen_draw_and_no_recompile_on_rate_change(mode: str) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    branch = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8) if mode == "row" else nn.Tanh())
    block = Residual(branch, drop_path=0.5, drop_mode=mode)
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    x = torch.randn(16, 8, requires_grad=True)
    outs = []
    for _ in range(16):
        y = compiled(x)
        y.sum().backward()
        outs.append(y.detach())
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "the draw was frozen"
    assert counter.frame_count == 1
    block.set_drop_path(0.3)
    compiled(x)
    if mode != "subset":  # the subset's sample count is a shape: it must recompile
        assert counter.frame_count == 1
    block.eval()
    torch.testing.assert_close(compiled(x), x + branch(x))


def test_ddp_style_anchor_gives_every_parameter_a_gradient(tmp_path) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        fn = Counting()
        block = Residual(fn, drop_path=0.5, drop_mode="batch")
        for _ in range(20):
            fn.lin.zero_grad(set_to_none=True)
            before = len(fn.calls)
            block(torch.randn(2, 4)).sum().backward()
            if len(fn.calls) == before:  # dropped, yet DDP sees every parameter used
                assert fn.lin.weight.grad is not None
                assert torch.all(fn.lin.weight.grad == 0)
                break
        else:
            pytest.fail("no step dropped the branch")
    finally:
        dist.destroy_process_group()


# p = 1 (torchvision's StochasticDepth(1.0)), scale_by_keep (timm's DropPath), reproducibility.


class Exploding(nn.Module):
    """A branch whose output is inf: a dropped branch that runs would turn the block into nan."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * self.scale / 0.0


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_rate_one_trains_the_block_as_its_shortcut(mode: str) -> None:
    fn = Counting()
    block = Residual(fn, drop_path=1.0, drop_mode=mode, post=nn.Tanh())
    x = torch.randn(8, 4, requires_grad=True)
    for _ in range(5):
        y = block(x)
        torch.testing.assert_close(y, torch.tanh(x), atol=0, rtol=0)
    y.sum().backward()
    assert torch.all(fn.lin.weight.grad == 0) and torch.all(fn.lin.bias.grad == 0)
    torch.testing.assert_close(x.grad, 1 - torch.tanh(x) ** 2)
    # the modes that skip compute never run the branch; row mode masks its output (all zero)
    assert fn.calls == ([8] * 5 if mode == "row" else [])
    block.eval()
    torch.testing.assert_close(block(x), torch.tanh(x + fn.lin(x)), atol=0, rtol=0)
    assert repr(block.drop) == f"{type(block.drop).__name__}(p=1.0)"


@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_rate_one_never_runs_the_branch(mode: str) -> None:
    fn = Exploding()
    block = Residual(fn, drop_path=1.0, drop_mode=mode)
    x = torch.randn(4, 3)
    torch.testing.assert_close(block(x), x, atol=0, rtol=0)
    assert fn.calls == 0


def test_rate_one_merges_with_zero() -> None:
    """The block is merge(S(x), 0): a gate still weighs the shortcut (HighwayGate: (1 - T) S)."""
    from residual import HighwayGate

    torch.manual_seed(0)
    gate = HighwayGate(4)
    block = Residual(nn.Linear(4, 4), drop_path=1.0, drop_mode="batch", merge=gate)
    x = torch.randn(3, 4)
    torch.testing.assert_close(block(x), gate(x, torch.zeros_like(x)), atol=0, rtol=0)


def test_rate_one_row_mode_keeps_tuples() -> None:
    lstm = nn.LSTM(4, 4, batch_first=True)
    x = torch.randn(2, 3, 4)
    y, (h, _) = Residual(lstm, drop_path=1.0)(x)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert h.shape == (1, 2, 4)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "batchnorm"])
def test_compiled_rate_one_is_exact_and_rates_do_not_recompile(mode: str, norm: bool) -> None:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    layers = [nn.Linear(8, 8)] + ([nn.BatchNorm1d(8)] if norm else [])
    block = Residual(nn.Sequential(*layers), drop_path=0.5, drop_mode=mode)
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    x = torch.randn(16, 8, requires_grad=True)
    compiled(x)
    for rate in (1.0, 0.3, 1.0):
        block.set_drop_path(rate)
        y = compiled(x)
        if rate == 1.0:
            torch.testing.assert_close(y, x, atol=0, rtol=0)  # no nan from 0 / 0 or inf * 0
            y.sum().backward()
            assert all(torch.all(p.grad == 0) for p in block.fn.parameters())
            block.zero_grad(set_to_none=True)
    assert counter.frame_count == 1


def test_functional_rate_one_as_a_tensor_gives_zeros() -> None:
    x = torch.randn(4, 3)
    out = drop_path(x, torch.tensor(1.0))
    assert torch.equal(out, torch.zeros_like(x))
    assert torch.equal(drop_path(x, 1.0, scale_by_keep=False), torch.zeros_like(x))


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_scale_by_keep_false_leaves_kept_outputs_unscaled(mode: str) -> None:
    torch.manual_seed(0)
    fn = nn.Linear(4, 4)
    block = Residual(fn, drop_path=0.5, drop_mode=mode, scale_by_keep=False)
    assert "scale_by_keep=False" in repr(block) and "scale_by_keep=False" in repr(block.drop)
    x = torch.randn(64, 4)
    outcomes = set()
    for _ in range(8):
        y = block(x)
        kept = torch.isclose(y, x + fn(x), atol=1e-6).all(dim=1)
        dropped = torch.isclose(y, x, atol=0).all(dim=1)
        assert torch.all(kept | dropped)
        outcomes.update(kept.tolist())
    assert outcomes == {True, False}
    block.eval()
    torch.testing.assert_close(block(x), x + fn(x), atol=0, rtol=0)


def test_set_drop_path_changes_scaling_in_place() -> None:
    torch.manual_seed(0)
    block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode="batch")
    policy, seed = block.drop, block.drop.seed.clone()
    block.set_drop_path(0.3, scale_by_keep=False)
    assert block.drop is policy and torch.equal(block.drop.seed, seed)  # draw state kept
    assert (
        block.scale_by_keep is False and repr(block.drop) == "BatchDrop(p=0.3, scale_by_keep=False)"
    )
    block.set_drop_path(0.0)
    block.set_drop_path(0.2)  # a new policy keeps the block's scaling
    assert block.drop.scale_by_keep is False
    block.set_drop_path(0.2, scale_by_keep=True)
    assert "scale_by_keep" not in repr(block)


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_manual_seed_reproduces_training_eager(mode: str) -> None:
    def run() -> list[Tensor]:
        torch.manual_seed(7)
        block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode=mode)
        x = torch.randn(6, 4)
        return [block(x) for _ in range(6)]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert any(not torch.equal(first[0], o) for o in first[1:])


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_manual_seed_reproduces_training_compiled(mode: str) -> None:
    """Compiled runs repeat under one seed; batch mode also draws the same as eager."""

    # inductor has RNG of its own (row mode's masks); the batch draws are a hash, the same on
    # every backend, and inductor's torch.cond compiles slowly: aot_eager keeps the test short.
    backend = "inductor" if mode == "row" else "aot_eager"

    def run(compiled: bool) -> list[Tensor]:
        torch.manual_seed(3)
        block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode=mode)
        step = torch.compile(block, fullgraph=True, backend=backend) if compiled else block
        x = torch.randn(6, 4)
        with torch.no_grad():
            return [step(x) for _ in range(8)]

    torch._dynamo.reset()
    first, second = run(True), run(True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert any(not torch.equal(first[0], o) for o in first[1:])
    if mode == "batch":
        eager = run(False)
        assert all(torch.allclose(a, b) for a, b in zip(first, eager, strict=True))


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_batch_draws_pass_a_binomial_test_as_often_as_chance_allows(p: float) -> None:
    """torchvision's statistical test (250 draws, p-value > 0.01) over many seeds: ~1% fail."""
    stats = pytest.importorskip("scipy.stats")
    from residual.drop import _uniform

    steps = torch.arange(250)
    fails = 0
    for seed in range(300):
        dropped = int((_uniform(torch.tensor(seed * 7919 + 12345), steps) >= 1 - p).sum())
        fails += stats.binomtest(dropped, 250, p=p).pvalue <= 0.01
    assert fails <= 9  # 3%: the chance of more under a fair stream is about 0.1%


def test_eager_row_masks_are_the_peers_masks_bit_for_bit() -> None:
    """After the same manual_seed: torchvision's row-mode ops (timm's are the same) vs ours."""

    def peers(x: Tensor, p: float) -> Tensor:  # torchvision.ops.stochastic_depth, mode="row"
        survival_rate = 1.0 - p
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype)
        noise = noise.bernoulli_(survival_rate)
        if survival_rate > 0.0:
            noise.div_(survival_rate)
        return x * noise

    x = torch.randn(64, 3, 2)
    block = Residual(nn.Identity(), drop_path=0.3)
    for ours in (lambda: drop_path(x, 0.3), lambda: block(x) - x):
        torch.manual_seed(11)
        expected = peers(x, 0.3)
        torch.manual_seed(11)
        torch.testing.assert_close(ours(), expected, atol=1e-6, rtol=0)


# The contract, pinned exactly: messages, defaults, dtypes, devices, draws (mutation testing).

RANGE_HINT = "0 disables stochastic depth and "
ONE_ALLOWED = RANGE_HINT + "1 drops the branch in every training step"
ONE_REFUSED = RANGE_HINT + "1 would drop the branch for good (remove the block instead)"


def _exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: drop_path(torch.ones(2), 1.5),
            ResidualError,
            f"drop_path: drop_path must be in [0, 1], got 1.5; {ONE_ALLOWED}",
        ),
        (
            lambda: drop_path(torch.ones(2), "0.1"),
            TypeError,
            "drop_path: drop_path must be a float in [0, 1], got str",
        ),
        (
            lambda: make_drop_policy(-0.5, "row"),
            ResidualError,
            f"drop_path: drop_path must be in [0, 1], got -0.5; {ONE_ALLOWED}",
        ),
        (
            lambda: Residual(nn.Linear(2, 2), drop_path=True),
            TypeError,
            "drop_path: drop_path must be a float in [0, 1], got bool",
        ),
        (
            lambda: make_drop_policy(0.1, "rows"),
            ResidualError,
            "unknown drop_mode 'rows'; valid modes are row, batch, subset",
        ),
        (
            lambda: RowDrop(1.5),
            ResidualError,
            f"RowDrop: drop_path must be in [0, 1], got 1.5; {ONE_ALLOWED}",
        ),
        (
            lambda: SubsetDrop(None),  # type: ignore[arg-type]
            TypeError,
            "SubsetDrop: drop_path must be a float in [0, 1], got NoneType",
        ),
        (
            lambda: BatchDrop(0.5).set_rate(2.0),
            ResidualError,
            f"BatchDrop: drop_path must be in [0, 1], got 2.0; {ONE_ALLOWED}",
        ),
        (
            lambda: linear_drop_rates(1.0, 3),
            ResidualError,
            f"linear_drop_rates: drop_path must be in [0, 1), got 1.0; {ONE_REFUSED}",
        ),
        (
            lambda: linear_drop_rates("0.1", 3),  # type: ignore[arg-type]
            TypeError,
            "linear_drop_rates: drop_path must be a float in [0, 1), got str",
        ),
        (
            lambda: apply_drop_schedule(nn.Sequential(Residual(nn.Linear(2, 2))), 1.0),
            ResidualError,
            f"linear_drop_rates: drop_path must be in [0, 1), got 1.0; {ONE_REFUSED}",
        ),
        (
            lambda: linear_drop_rates(0.1, 2.0),  # type: ignore[arg-type]
            ResidualError,
            "linear_drop_rates: num_blocks must be >= 1 (an int), got 2.0",
        ),
        (
            lambda: linear_drop_rates(0.1, True),
            ResidualError,
            "linear_drop_rates: num_blocks must be >= 1 (an int), got True",
        ),
        (
            lambda: linear_drop_rates(0.1, 0),
            ResidualError,
            "linear_drop_rates: num_blocks must be >= 1 (an int), got 0",
        ),
        (
            lambda: apply_drop_schedule(nn.Linear(2, 2), 0.1),
            ResidualError,
            "apply_drop_schedule: Linear holds no Residual block to drop",
        ),
    ],
    ids=[
        "functional-range",
        "functional-type",
        "policy-range",
        "block-bool",
        "mode",
        "policy-class-range",
        "policy-class-type",
        "set-rate-range",
        "schedule-rate-one",
        "schedule-type",
        "apply-schedule-rate-one",
        "num-blocks-float",
        "num-blocks-bool",
        "num-blocks-zero",
        "no-blocks",
    ],
)
def test_every_refusal_says_exactly_what_and_who(call, error, message: str) -> None:
    with pytest.raises(error, match=_exactly(message)):
        call()


class Pair(nn.Module):
    """A branch that returns a tuple (the tensor and a side output)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * 2, x


class Listing(nn.Module):
    """A branch that returns a list: neither a tensor nor a tuple."""

    def forward(self, x: Tensor) -> list[Tensor]:
        return [x]


def _running_step(policy: BatchDrop) -> None:
    """Move a BatchDrop to a step whose draw runs the branch."""
    policy.step.fill_(next(s for s in range(64) if policy.draw(s) < 1 - policy.p))


@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_tuple_branches_are_refused_exactly_by_the_modes_that_skip(mode: str) -> None:
    block = Residual(Pair(), drop_path=0.5, drop_mode=mode)
    if mode == "batch":
        _running_step(block.drop)
    message = (
        f"Residual: drop_mode={mode!r} needs a branch that returns a tensor, got tuple from "
        "Pair; use drop_mode='row' for branches returning tuples (their other outputs cannot "
        "be skipped or subset)"
    )
    with pytest.raises(TypeError, match=_exactly(message)):
        block(torch.randn(4, 3))


def test_row_mode_names_a_branch_that_returns_no_tensor() -> None:
    message = (
        "Residual: branch Listing returned list; it must return a tensor, or a tuple whose first "
        "element is the tensor to add (the rest is passed through)"
    )
    with pytest.raises(TypeError, match=_exactly(message)):
        Residual(Listing(), drop_path=0.5)(torch.randn(4, 3))


def test_subset_mode_refuses_extra_arguments_exactly() -> None:
    block = Residual(MySelfAttention(4, 1), drop_path=0.5, drop_mode="subset")
    message = (
        "Residual: drop_mode='subset' runs the branch on a subset of the samples and cannot "
        "know which extra arguments are per-sample; use drop_mode='row' or 'batch' for branches "
        "that take extra arguments"
    )
    x = torch.randn(2, 3, 4)
    with pytest.raises(ResidualError, match=_exactly(message)):
        block(x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_rates_at_the_edges_of_their_intervals() -> None:
    assert linear_drop_rates(0.3, 1) == [0.3]
    policy = BatchDrop(0.5)
    policy.set_rate(1.0)  # 1 is a valid rate for a policy
    assert policy.p == 1.0 and float(policy.keep) == 0.0
    block = Residual(nn.Linear(2, 2), drop_path=0.5, drop_mode="subset")
    block.set_drop_path(1.0)
    assert block.drop.p == 1.0


def test_functional_default_rate_drops_nothing() -> None:
    x = torch.randn(5, 3)
    assert torch.equal(drop_path(x), x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RowDrop(0.5),
        lambda: BatchDrop(0.5),
        lambda: SubsetDrop(0.5),
        lambda: make_drop_policy(0.5, "row"),
        lambda: make_drop_policy(0.5, "batch"),
        lambda: make_drop_policy(0.5, "subset"),
    ],
    ids=["RowDrop", "BatchDrop", "SubsetDrop", "make-row", "make-batch", "make-subset"],
)
def test_policies_rescale_by_default(build) -> None:
    policy = build()
    branch = nn.Linear(3, 3)
    x = torch.randn(8, 3)
    if isinstance(policy, BatchDrop):
        _running_step(policy)
    with torch.no_grad():
        out, full = policy(branch, x, x, (), {}, False), branch(x) / 0.5
    kept = (out != 0).all(1)
    assert int(kept.sum()) > 0 and torch.all(out[~kept] == 0)
    torch.testing.assert_close(out[kept], full[kept], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("n", "p", "k"), [(4, 0.9, 1), (3, 0.5, 1), (1, 0.5, 1), (5, 0.5, 2)])
def test_subset_mode_runs_at_least_one_sample_scaled_by_n_over_k(n: int, p: float, k: int) -> None:
    fn = Counting(3)
    block = Residual(fn, drop_path=p, drop_mode="subset")
    x = torch.randn(n, 3)
    y = block(x)
    assert fn.calls == [k]
    with torch.no_grad():
        ran = x + fn.lin(x) * (n / k)
    computed = torch.isclose(y, ran, atol=1e-6, rtol=1e-6).all(1)
    assert int(computed.sum()) == k and torch.equal(y[~computed], x[~computed])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_row_masks_are_in_the_input_dtype(dtype: torch.dtype) -> None:
    """The mask is x's dtype: 1 / 0.7 rounded as x is, and a half input stays half."""
    x = torch.randn(64, 3, dtype=dtype)
    scale = torch.tensor(1 / 0.7, dtype=dtype)
    block = Residual(nn.Identity(), drop_path=0.3)
    for y, shortcut in ((drop_path(x, 0.3), torch.zeros_like(x)), (block(x), x)):
        assert y.dtype == dtype
        kept = (y != shortcut).all(1)
        assert 0 < int(kept.sum()) < 64 and torch.equal(y[~kept], shortcut[~kept])
        assert torch.equal(y[kept], shortcut[kept] + x[kept] * scale)


def test_functional_rate_tensor_takes_the_input_dtype() -> None:
    """A float64 rate of 1 on a float32 input: the float32 keep of 0 divides no zero by zero."""
    x = torch.randn(4, 3)
    out = drop_path(x, torch.tensor(1.0, dtype=torch.float64))
    assert out.dtype == torch.float32 and torch.equal(out, torch.zeros_like(x))


def test_row_masks_are_made_on_the_input_device() -> None:
    x = torch.empty(4, 3, device="meta")
    assert drop_path(x, 0.3).device == x.device
    block = Residual(nn.Linear(3, 3), drop_path=0.3).to("meta")
    assert block(x).device == x.device


class GlobalFilter(nn.Module):
    """A real-to-real branch with a complex parameter (an FFT filter, as in GFNet)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n // 2 + 1, dtype=torch.complex64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.fft.irfft(torch.fft.rfft(x) * self.weight, n=x.shape[-1])


@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_a_dropped_branch_with_complex_parameters_stays_real(mode: str) -> None:
    fn = GlobalFilter(6)
    block = Residual(fn, drop_path=1.0, drop_mode=mode)
    x = torch.randn(3, 6, requires_grad=True)
    y = block(x)
    assert y.dtype == torch.float32 and torch.equal(y, x)
    y.sum().backward()
    assert fn.weight.grad is not None and torch.all(fn.weight.grad == 0)


def _lowbias32(v: int) -> int:
    """The reference hash, in Python integers."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        v ^= v >> shift
        v = (v * mult) & 0xFFFFFFFF
    return v ^ (v >> 16)


def _reference_draw(seed: int, step: int) -> float:
    return _lowbias32(seed ^ _lowbias32(step & 0xFFFFFFFF)) / 2**32


def test_batch_draws_are_the_lowbias32_hash_in_float64() -> None:
    torch.manual_seed(5)
    fn = Counting()
    block = Residual(fn, drop_path=0.5, drop_mode="batch")
    policy, seed = block.drop, int(block.drop.seed)
    for step in (0, 1, 2, 1000, 2**32 + 3):
        assert policy.draw(step) == _reference_draw(seed, step)
    with torch.device("meta"):  # the step is made on the policy's device, not the default
        assert policy.draw(7) == _reference_draw(seed, 7)
    x = torch.randn(2, 4)
    for step in range(12):  # draw() is the next step's; forward runs the branch iff < keep
        assert int(policy.step) == step and policy.draw() == _reference_draw(seed, step)
        before = len(fn.calls)
        block(x)
        assert (len(fn.calls) > before) == (_reference_draw(seed, step) < 0.5)


def test_batch_branch_runs_only_below_one_minus_p() -> None:
    """A draw equal to 1 - p drops: P(run) = P(u < 1 - p) = 1 - p for u uniform in [0, 1)."""
    fn = Counting()
    block = Residual(fn, drop_path=0.5, drop_mode="batch")
    seed = int(block.drop.seed)
    hashes = ((s, _lowbias32(seed ^ _lowbias32(s))) for s in range(100_000))
    # a step whose draw is a float32 above 1/2: the float32 keep of some rate equals it
    step, h = next((s, h) for s, h in hashes if h % 256 == 0 and h > 2**31)
    u = h / 2**32
    above = float(torch.tensor(u).nextafter(torch.tensor(1.0)))  # the next float32
    x = torch.randn(2, 4)
    for keep, runs in ((u, False), (above, True)):
        block.set_drop_path(1.0 - keep)
        assert float(block.drop.keep) == keep
        block.drop.step.fill_(step)
        before = len(fn.calls)
        block(x)
        assert (len(fn.calls) > before) == runs


@pytest.mark.parametrize("mode", ["row", "batch", "subset"])
def test_checkpoint_recomputes_the_branch_in_every_mode(mode: str) -> None:
    fn = Counting()
    block = Residual(fn, drop_path=0.5, drop_mode=mode, checkpoint=True)
    if mode == "batch":
        _running_step(block.drop)
    x = torch.randn(6, 4, requires_grad=True)
    block(x).sum().backward()
    rows = 3 if mode == "subset" else 6
    assert fn.calls == [rows, rows]  # the forward, and its recomputation in backward
    assert fn.lin.weight.grad is not None and fn.lin.weight.grad.abs().sum() > 0


# --- The sample axis: stochastic depth keeps or drops whole samples in every layout ---------


class Ones(nn.Module):
    """A branch whose output is 1 everywhere: ``y - x`` shows the mask (0 or 1 / keep)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.ones_like(x)


def _whole_samples(delta: Tensor, branch: Tensor, dim: int) -> Tensor:
    """Per sample (along ``dim``): True if kept whole, False if dropped whole; else fail."""
    delta, branch = delta.movedim(dim, 0).flatten(1), branch.movedim(dim, 0).flatten(1)
    kept = torch.isclose(delta, branch, atol=1e-5, rtol=1e-5).all(1)
    dropped = (delta == 0).all(1)
    assert bool((kept | dropped).all()), "a sample was partly dropped"
    assert 0 < int(kept.sum()) < len(kept), "expected some samples kept and some dropped"
    return kept


@pytest.mark.parametrize("mode", ["row", "subset"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_layer_drops_whole_samples_in_both_layouts(
    mode: str, batch_first: bool
) -> None:
    from residual.models import TransformerEncoderLayer

    layer = TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=True)
    block = layer.self_attn_block
    block.set_drop_path(0.5, drop_mode=mode)
    x = torch.randn(64, 5, 8) if batch_first else torch.randn(5, 64, 8)
    full = block.fn(x)  # no dropout: the branch of every sample
    kept = _whole_samples(block(x) - x, 2 * full, 0 if batch_first else 1)
    assert kept.shape == (64,)


def test_sequence_first_lstm_drops_whole_samples() -> None:
    model = ResidualLSTM(8, 8, num_layers=2, batch_first=False, drop_path=0.5)
    block = model.layers[1]
    assert block.sample_axis.dim == 1
    x = torch.randn(5, 64, 8)
    out, _ = block.fn(x)
    y, _ = block(x)
    _whole_samples(y - x, 2 * out, 1)


def test_an_unbatched_input_is_one_sample() -> None:
    from residual.models import TransformerEncoderLayer

    layer = TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=True, drop_path=0.5)
    x = torch.randn(5, 8)  # (L, E): one sequence
    outcomes = set()
    for _ in range(20):
        delta = layer.self_attn_block(x) - x
        full = 2 * layer.self_attn_block.fn(x)
        kept = torch.allclose(delta, full, atol=1e-5)
        assert kept or bool((delta == 0).all()), "positions of one sequence dropped apart"
        outcomes.add(kept)
    assert outcomes == {True, False}


def test_the_sample_axis_is_read_from_the_branch() -> None:
    from residual.drop import SampleAxis

    assert Residual(nn.LSTM(4, 4)).sample_axis == SampleAxis(1, batched_ndim=3)
    assert Residual(nn.GRU(4, 4, batch_first=True)).sample_axis == SampleAxis(0, batched_ndim=3)
    assert Residual(nn.Conv2d(4, 4, 3, padding=1)).sample_axis == SampleAxis(0, batched_ndim=4)
    assert Residual(nn.Linear(4, 4)).sample_axis == SampleAxis()
    assert Residual(nn.Linear(4, 4), sample_axis=1).sample_axis == SampleAxis(1)
    conv = Residual(nn.Conv2d(4, 4, 3, padding=1), drop_path=0.5)
    x = torch.randn(4, 6, 6)  # (C, H, W): nn.Conv2d takes it unbatched, so it is one sample
    for _ in range(10):
        delta = conv(x) - x
        assert bool((delta == 0).all()) or torch.allclose(delta, 2 * conv.fn(x), atol=1e-5)


def test_sample_axis_errors_name_the_fix() -> None:
    from residual.drop import SampleAxis

    with pytest.raises(ResidualError, match="batched_ndim must be an int above dim=1"):
        SampleAxis(1, batched_ndim=1)
    with pytest.raises(ResidualError, match="dim must be >= 0"):
        SampleAxis(-1)
    with pytest.raises(ResidualError, match="streams must be >= 1"):
        SampleAxis(streams=0)
    block = Residual(nn.Linear(4, 4), drop_path=0.5, sample_axis=1)
    with pytest.raises(ResidualError, match=r"pass sample_axis=SampleAxis\(dim=\.\.\.\)"):
        block(torch.randn(4))
    fixed = Residual(nn.Linear(4, 4), drop_path=0.5, sample_axis=SampleAxis(1, batched_ndim=2))
    assert fixed(torch.randn(4)).shape == (4,)  # the fix: a 1-D input is one sample
    streams = Residual(Ones(), drop_path=0.5, sample_axis=SampleAxis(streams=4))
    with pytest.raises(ResidualError, match=r"expand_streams\(x, 4\)"):
        streams(torch.randn(6, 4))


@pytest.mark.parametrize("kind", ["hyper", "mhc"])
@pytest.mark.parametrize("mode", ["row", "subset"])
def test_a_sample_keeps_or_drops_all_its_streams_together(kind: str, mode: str) -> None:
    from residual.hyper import expand_streams, hyper_residual, mhc_residual

    make = hyper_residual if kind == "hyper" else mhc_residual
    block = make(nn.Linear(8, 8), streams=4, dim=8, drop_path=0.5)
    block.set_drop_path(0.5, drop_mode=mode)
    nn.init.normal_(block.shortcut.dynamic.weight if kind == "hyper" else block.fn.weight, 0, 0.5)
    h = expand_streams(torch.randn(32, 8), 4) + 0.1 * torch.randn(128, 8)  # streams differ
    branch = block.fn(h)  # per token: a subset of samples gives these rows
    delta = block(h) - block.shortcut(h)
    # (4 * 32, 8) -> (32, 4 * 8): every stream of a sample in one row
    kept = _whole_samples(
        delta.unflatten(0, (4, 32)).transpose(0, 1),
        2 * branch.unflatten(0, (4, 32)).transpose(0, 1),
        0,
    )
    assert kept.shape == (32,)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_batch_drop_leaves_norm_statistics_alone_on_skipped_steps(backend: str) -> None:
    torch._dynamo.reset()

    def build() -> Residual:
        torch.manual_seed(0)
        return Residual(
            nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), drop_path=0.5, drop_mode="batch"
        )

    eager, ours = build(), build()
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    x = torch.randn(16, 8)
    for _ in range(6):
        for block in (eager, compiled):
            block(x.clone().requires_grad_()).sum().backward()
    runs = [eager.drop.draw(s) < 0.5 for s in range(6)].count(True)
    assert 0 < runs < 6
    bn_eager, bn_ours = eager.fn[1], ours.fn[1]
    assert int(bn_ours.num_batches_tracked) == int(bn_eager.num_batches_tracked) == runs
    torch.testing.assert_close(bn_ours.running_mean, bn_eager.running_mean)
    torch.testing.assert_close(bn_ours.running_var, bn_eager.running_var)
    for a, b in zip(eager.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    eager.eval(), ours.eval()
    torch.testing.assert_close(ours(x), eager(x))


def test_vmap_ensembles_draw_a_mask_per_member() -> None:
    from torch.func import functional_call, stack_module_state, vmap

    members = [Residual(Ones(), drop_path=0.5) for _ in range(8)]
    params, buffers = stack_module_state(members)

    def run(params: dict, buffers: dict, x: Tensor) -> Tensor:
        return functional_call(members[0], (params, buffers), (x,))

    x = torch.zeros(16, 4)
    out = vmap(run, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
    assert out.shape == (8, 16, 4)
    per_sample = out[..., 0]
    assert bool((out == per_sample.unsqueeze(-1)).all())  # whole samples
    assert len({tuple(m.tolist()) for m in per_sample}) > 1  # members draw apart
    drawn = vmap(lambda t: drop_path(t, 0.5), randomness="different")(torch.ones(8, 16, 4))
    assert len({tuple(m[:, 0].tolist()) for m in drawn}) > 1


def test_drop_path_refuses_integer_tensors_and_takes_complex_numpy_and_tensor_rates() -> None:
    np = pytest.importorskip("numpy")
    for bad in (torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.bool)):
        with pytest.raises(TypeError, match=r"floating point tensor.*x\.float\(\)"):
            drop_path(bad, 0.5)
        drop_path(bad.float(), 0.5)  # the fix works
    z = torch.randn(64, 3, dtype=torch.complex64)
    out = drop_path(z, 0.5)
    assert out.dtype == torch.complex64
    _whole_samples(out, 2 * z, 0)
    torch.manual_seed(3)
    a = drop_path(torch.ones(32, 2), np.float32(0.25))
    torch.manual_seed(3)
    assert torch.equal(a, drop_path(torch.ones(32, 2), 0.25))
    assert Residual(nn.Linear(2, 2), drop_path=np.float64(0.25)).drop_path == 0.25
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(8, 3, dtype=dtype, requires_grad=True)
        y = drop_path(x, torch.tensor(1.0))
        y.sum().backward()
        assert torch.equal(y, torch.zeros_like(y)) and not torch.isnan(x.grad).any()
        half = drop_path(x, torch.tensor(0.5, dtype=torch.float64))
        assert set(torch.unique(half / x.detach()).tolist()) <= {0.0, 2.0}
    with pytest.raises(ResidualError, match=r"drop_path must be in \[0, 1\]"):
        drop_path(torch.ones(2, 2), torch.tensor(1.5))
    with pytest.raises(TypeError, match="one floating point value"):
        drop_path(torch.ones(2, 2), torch.tensor([0.1, 0.2]))


def test_subset_drop_names_a_branch_that_does_not_keep_the_samples() -> None:
    class Pool(nn.Module):  # collapses the batch: (N, C) -> (1, C)
        def forward(self, x: Tensor) -> Tensor:
            return x.mean(0, keepdim=True)

    block = Residual(Pool(), drop_path=0.5, drop_mode="subset")
    with pytest.raises(ResidualError, match="must keep the sample axis.*drop_mode='row'"):
        block(torch.randn(6, 4))
    block.set_drop_path(0.5, drop_mode="row")  # the fix named: a per-sample mask
    with pytest.raises(ResidualError, match=r"does not match shortcut output \(6, 4\)"):
        block(torch.randn(6, 4))  # and the combinator's own check then names the shapes


def test_a_traced_block_draws_what_the_block_draws() -> None:
    from residual.drop import SampleAxis

    block = Residual(nn.Linear(8, 8), drop_path=0.5, sample_axis=SampleAxis(1, batched_ndim=3))
    traced = torch.fx.symbolic_trace(block)
    x = torch.randn(5, 16, 8)
    torch.manual_seed(0)
    ours = block(x)
    torch.manual_seed(0)
    assert torch.equal(traced(x), ours)
    _whole_samples(ours - x, 2 * block.fn(x), 1)


@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_skipping_modes_refuse_a_branch_that_returns_a_tuple_when_set(mode: str) -> None:
    from residual.models import ValueResidualGPTBlock

    block = ValueResidualGPTBlock(8, 2)
    with pytest.raises(TypeError, match=r"returns a tuple.*use drop_mode='row'"):
        block.attn.set_drop_path(1.0, drop_mode=mode)  # before: a tensor for a skipped step
    with pytest.raises(TypeError, match="returns a tuple"):
        Residual(nn.LSTM(4, 4), drop_path=0.5, drop_mode=mode)
    with pytest.raises(TypeError, match="returns a tuple"):  # pre-norm: a Sequential's last
        Residual(nn.Sequential(nn.LayerNorm(4), nn.LSTM(4, 4)), drop_path=0.5, drop_mode=mode)
    block.attn.set_drop_path(1.0, drop_mode="row")  # the fix: the tuple passes through
    x = torch.randn(3, 5, 8)
    y, values = block(x)
    assert y.shape == x.shape and values.shape == (3, 2, 5, 4)


@pytest.mark.parametrize("mode", ["batch", "subset"])
def test_fx_refuses_a_training_skip_and_names_the_fixes(mode: str) -> None:
    block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode=mode)
    with pytest.raises(TypeError, match=r"symbolic_trace cannot record.*model\.eval\(\)"):
        torch.fx.symbolic_trace(block)
    traced = torch.fx.symbolic_trace(block.eval())  # the fix: trace for inference
    x = torch.randn(3, 4)
    assert torch.equal(traced(x), x + block.fn(x))


@pytest.mark.parametrize("mode", ["row", "subset"])
def test_resi_dual_keeps_or_drops_a_samples_two_streams_together(mode: str) -> None:
    from residual.hyper import expand_streams
    from residual.resi_dual import resi_dual_residual

    layer = resi_dual_residual(nn.Linear(8, 8), 8)
    layer.set_drop_path(0.5, drop_mode=mode)
    layer.post = None  # compare the merge itself: x + drop(F(x_a)) on both streams
    h = expand_streams(torch.randn(32, 8), 2) + 0.1 * torch.randn(64, 8)
    delta = layer(h) - h
    branch = layer.fn(h)
    _whole_samples(
        delta.unflatten(0, (2, 32)).transpose(0, 1),
        2 * branch.unflatten(0, (2, 32)).transpose(0, 1),
        0,
    )
