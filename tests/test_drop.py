"""Stochastic depth: the three modes, their compute savings, eval behaviour and compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor, nn

from residual import Residual, ResidualError, ScaledAdd, apply_drop_schedule
from residual.drop import linear_drop_rates
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


def test_mode_errors() -> None:
    block = Residual(
        nn.MultiheadAttention(4, 1, batch_first=True), drop_path=0.2, drop_mode="subset"
    )
    x = torch.randn(2, 3, 4)
    with pytest.raises(ResidualError, match="subset.*use drop_mode='row' or 'batch'"):
        block(x, x, x)
    torch.manual_seed(0)
    lstm = Residual(nn.LSTM(4, 4, batch_first=True), drop_path=0.2, drop_mode="batch")
    with pytest.raises(
        TypeError, match="needs a branch that returns a tensor.*use drop_mode='row'"
    ):
        for _ in range(20):
            lstm(x)


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
