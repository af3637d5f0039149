"""Residual: H(x) = post(merge(S(x), F(x))), checked against hand-written references."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import MySelfAttention
from residual import (
    IdentityShortcut,
    PooledProjectionShortcut,
    ProjectionShortcut,
    Residual,
    ResidualError,
    ZeroPadShortcut,
)

CHANNEL_FIRST = {
    "identity": (lambda: nn.Conv2d(8, 8, 3, padding=1), IdentityShortcut, (2, 8, 7, 7)),
    "projection": (
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1),
        lambda: ProjectionShortcut(8, 16, stride=2),
        (2, 8, 7, 7),
    ),
    "zero_pad": (
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1),
        lambda: ZeroPadShortcut(8, 16, stride=2),
        (2, 8, 7, 7),
    ),
    "pooled_projection": (
        lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1),
        lambda: PooledProjectionShortcut(8, 16, stride=2),
        (2, 8, 7, 7),
    ),
}
CHANNEL_LAST = {
    "identity": (lambda: nn.Linear(8, 8), IdentityShortcut, (3, 5, 8)),
    "projection": (
        lambda: nn.Linear(8, 16),
        lambda: ProjectionShortcut(8, 16, layout="channels_last"),
        (3, 5, 8),
    ),
    "zero_pad": (
        lambda: nn.Linear(8, 16),
        lambda: ZeroPadShortcut(8, 16, layout="channels_last"),
        (3, 5, 8),
    ),
}
CASES = [pytest.param(*v, id=f"channels_first-{k}") for k, v in CHANNEL_FIRST.items()] + [
    pytest.param(*v, id=f"channels_last-{k}") for k, v in CHANNEL_LAST.items()
]


@pytest.mark.parametrize(("make_fn", "make_shortcut", "shape"), CASES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_equals_shortcut_plus_branch(make_fn, make_shortcut, shape, train) -> None:
    fn, shortcut = make_fn(), make_shortcut()
    block = Residual(fn, shortcut).train(train)
    x = torch.randn(shape)
    expected_s = copy.deepcopy(shortcut).train(train)(x)
    expected = expected_s + fn(x)
    torch.testing.assert_close(block(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("name", "fn", "shape", "out_shape"),
    [
        ("projection", nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 7, 7), (2, 16, 4, 4)),
        ("zero_pad", nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 7, 7), (2, 16, 4, 4)),
        (
            "pooled_projection",
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            (2, 8, 7, 7),
            (2, 16, 4, 4),
        ),
        ("auto", nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 7, 7), (2, 16, 4, 4)),
        ("auto", nn.Conv2d(8, 8, 3, padding=1), (2, 8, 5, 5), (2, 8, 5, 5)),
        ("projection", nn.Linear(256, 512), (4, 256), (4, 512)),
        ("zero_pad", nn.Linear(6, 10), (4, 3, 6), (4, 3, 10)),
        ("auto", nn.Linear(6, 6), (4, 6), (4, 6)),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_shortcut_names_read_dims_from_branch(name, fn, shape, out_shape) -> None:
    block = Residual(fn, shortcut=name)
    x = torch.randn(shape)
    y = block(x)
    assert y.shape == out_shape
    torch.testing.assert_close(y, block.shortcut(x) + fn(x), atol=0, rtol=0)


def test_auto_picks_identity_or_projection() -> None:
    assert isinstance(Residual(nn.Linear(4, 4), "auto").shortcut, IdentityShortcut)
    assert isinstance(Residual(nn.Linear(4, 8), "auto").shortcut, ProjectionShortcut)


def test_auto_parameters_exist_before_first_forward_for_optimizer_and_state_dict() -> None:
    block = Residual(nn.Linear(16, 32), shortcut="auto")
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = block.shortcut.linear.weight.detach().clone()
    block(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    assert not torch.equal(before, block.shortcut.linear.weight)
    fresh = Residual(nn.Linear(16, 32), shortcut="auto")
    fresh.load_state_dict(block.state_dict())  # strict, before any forward
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), block(x), atol=0, rtol=0)


def test_lstm_and_gru_tuple_outputs_pass_through() -> None:
    lstm = nn.LSTM(12, 12, batch_first=True)
    x = torch.randn(2, 5, 12)
    y, (h, c) = Residual(lstm)(x)
    out, (h_ref, c_ref) = lstm(x)
    torch.testing.assert_close(y, x + out, atol=0, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(c, c_ref, atol=0, rtol=0)
    gru = nn.GRU(12, 12, batch_first=True)
    h0 = torch.randn(1, 2, 12)
    y, h = Residual(gru)(x, h0)
    out, h_ref = gru(x, h0)
    torch.testing.assert_close(y, x + out, atol=0, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)


def test_extra_args_and_kwargs_reach_the_branch() -> None:
    attn = MySelfAttention(16, 4).eval()
    block = Residual(attn).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, -2:] = True
    y = block(x, key_padding_mask=mask)
    torch.testing.assert_close(y, x + attn(x, key_padding_mask=mask), atol=0, rtol=0)
    assert not torch.allclose(y, block(x))  # the mask changed the result


def test_add_is_out_of_place_and_input_untouched() -> None:
    block = Residual(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), post=nn.ReLU(inplace=True)
    )
    x = torch.randn(3, 4)
    x_copy = x.clone()
    y = block(x)
    assert torch.equal(x, x_copy)
    assert y.data_ptr() != x.data_ptr()


def test_post_and_pre() -> None:
    fn = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(Residual(fn, post=nn.Tanh())(x), torch.tanh(x + fn(x)))
    pre = nn.Softsign()
    torch.testing.assert_close(Residual(fn, pre=pre)(x), pre(x) + fn(pre(x)))


def test_gradients_reach_every_parameter_and_input() -> None:
    block = Residual(nn.Linear(8, 16), shortcut="projection")
    x = torch.randn(4, 8, requires_grad=True)
    block(x).sum().backward()
    # d/dx sum(W_s x + W_f x + b) = column sums of W_s + W_f, for every sample
    weights = block.shortcut.linear.weight + block.fn.weight
    torch.testing.assert_close(x.grad, weights.sum(0).expand(4, 8))
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_identity_gradient_contains_identity_path() -> None:
    fn = nn.Linear(5, 5)
    x = torch.randn(5)
    jac_h = torch.autograd.functional.jacobian(Residual(fn), x)
    jac_f = torch.autograd.functional.jacobian(fn, x)
    torch.testing.assert_close(jac_h - jac_f, torch.eye(5))


def test_pickle_deepcopy_and_state_dict_round_trip() -> None:
    block = Residual(
        nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8)), "projection", post=nn.ReLU()
    )
    block(torch.randn(2, 4, 6, 6))  # move BN stats
    block.eval()
    x = torch.randn(2, 4, 6, 6)
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), block(x), atol=0, rtol=0)
    torch.testing.assert_close(copy.deepcopy(block)(x), block(x), atol=0, rtol=0)
    fresh = Residual(
        nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8)), "projection", post=nn.ReLU()
    ).eval()
    fresh.load_state_dict(block.state_dict())
    torch.testing.assert_close(fresh(x), block(x), atol=0, rtol=0)


def test_state_dict_keys_are_short_and_stable() -> None:
    block = Residual(nn.Linear(4, 8), "projection", post=nn.ReLU())
    assert list(block.state_dict()) == ["fn.weight", "fn.bias", "shortcut.linear.weight"]


def test_repr_shows_shortcut_kind_and_options() -> None:
    text = repr(Residual(nn.Conv2d(4, 8, 1, stride=2), "zero_pad", drop_path=0.1))
    assert "ZeroPadShortcut(4, 8, stride=2, layout='channels_first', placement='end')" in text
    assert "drop_path=0.1, drop_mode='row'" in text


def _shortcut_by_hand(name: str, shortcut: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ResNet's stride-2 shortcuts written out (eval: the norm uses its running statistics)."""
    if name == "zero_pad":  # option A: every other pixel, zero channels appended
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 3))
    if name == "pooled_projection":  # ResNet-D: mean of each 2x2 window, clipped at the border
        h, w = x.shape[2:]
        padded = F.pad(x, (0, w % 2, 0, h % 2))
        counts = F.pad(torch.ones(1, 1, h, w), (0, w % 2, 0, h % 2))
        summed = padded.unfold(2, 2, 2).unfold(3, 2, 2).sum((-2, -1))
        sub = summed / counts.unfold(2, 2, 2).unfold(3, 2, 2).sum((-2, -1))
    else:  # option B: a 1x1 conv of stride 2 reads every other pixel
        sub = x[:, :, ::2, ::2]
    projected = torch.einsum("oc,nchw->nohw", shortcut.conv.weight[:, :, 0, 0], sub)
    norm = shortcut.norm
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return projected * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)


@pytest.mark.parametrize("name", ["projection", "zero_pad", "pooled_projection"])
def test_odd_sizes_follow_the_padded_conv(name: str) -> None:
    fn = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    block = Residual(fn, shortcut=name).eval()
    if name != "zero_pad":
        with torch.no_grad():  # statistics that say something
            block.shortcut.norm.running_mean.uniform_(-0.5, 0.5)
            block.shortcut.norm.running_var.uniform_(0.5, 1.5)
    for shape, out in (((1, 3, 7, 7), (4, 4)), ((2, 3, 9, 5), (5, 3))):
        x = torch.randn(shape)
        y = block(x)
        assert y.shape == (shape[0], 6, *out), name
        torch.testing.assert_close(y, _shortcut_by_hand(name, block.shortcut, x) + fn(x))


def test_shape_mismatch_names_both_shapes_and_the_fix() -> None:
    block = Residual(nn.Conv2d(64, 128, 3, stride=2, padding=1), shortcut=IdentityShortcut())
    with pytest.raises(
        ResidualError,
        match=r"\(8, 128, 16, 16\) does not match shortcut output "
        r"\(8, 64, 32, 32\).*projection.*zero_pad.*stride=2",
    ):
        block(torch.randn(8, 64, 32, 32))


def test_no_broadcasting_ever() -> None:
    class Squeeze(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=1, keepdim=True)  # (N, 1): would broadcast against (N, C)

    with pytest.raises(ResidualError, match=r"\(4, 1\) does not match shortcut output \(4, 3\)"):
        Residual(Squeeze())(torch.randn(4, 3))


# -- The combinator's contract, pinned exactly (each test kills mutants of Residual.forward and
#    the checks it calls; see .ci/mutation.py --quick) ------------------------------------------


class _Weighted(nn.Module):
    """A merge that tells its arguments apart: 2 * shortcut + 3 * branch."""

    def forward(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return 2 * shortcut + 3 * branch


def test_merge_gets_shortcut_then_branch() -> None:
    fn = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    block = Residual(fn, merge=_Weighted())
    torch.testing.assert_close(block(x), 2 * x + 3 * fn(x), atol=0, rtol=0)


class _Pair(nn.Module):
    def forward(self, x: Tensor) -> Any:
        return ["not", "a tensor"] if x.sum() > 1e9 else ("first", x)


def test_main_input_errors_name_the_fix_exactly() -> None:
    block = Residual(nn.Linear(4, 4))
    with pytest.raises(TypeError) as err:
        block([1.0, 2.0])
    assert str(err.value) == (
        "Residual: the first argument must be the main tensor, got list; "
        "call block(x, *args, **kwargs)"
    )
    with pytest.raises(TypeError) as err:
        block(torch.ones(2, 4, dtype=torch.int64))
    assert str(err.value) == (
        "Residual: the main tensor must be floating point, got torch.int64; convert it "
        "(x.float()) or embed token ids first (nn.Embedding) and wrap what follows"
    )


def test_branch_output_errors_name_the_branch_exactly() -> None:
    with pytest.raises(TypeError) as err:
        Residual(_Pair())(torch.randn(2, 4))
    assert str(err.value) == (
        "Residual: branch _Pair returned a tuple not led by a tensor; it must return a tensor, "
        "or a tuple whose first element is the tensor to add (the rest is passed through)"
    )
    with pytest.raises(TypeError, match=r"^Residual: branch _Pair returned list; it must"):
        Residual(_Pair())(torch.full((2, 4), 1e9))


def test_shape_mismatch_names_the_shortcut() -> None:
    with pytest.raises(ResidualError, match=r"\(IdentityShortcut\); "):
        Residual(nn.Linear(4, 5))(torch.randn(2, 4))


def test_a_block_traced_alone_runs_and_refuses_extra_args_exactly() -> None:
    fn = nn.Linear(4, 4)
    traced = torch.fx.symbolic_trace(Residual(fn))
    x = torch.randn(2, 4)
    torch.testing.assert_close(traced(x), x + fn(x), atol=0, rtol=0)
    message = (
        "Residual: this block was traced with torch.fx.symbolic_trace on its own, which records "
        "the branch called with the main tensor only, but it got {} extra positional and {} "
        "keyword argument(s); trace a module that passes them to the block instead"
    )
    with pytest.raises(TypeError) as err:
        traced(x, torch.ones(2))
    assert str(err.value) == message.format(1, 0)
    with pytest.raises(TypeError) as err:
        traced(x, mask=torch.ones(2))
    assert str(err.value) == message.format(0, 1)


def test_shapes_are_checked_under_jit_trace_too() -> None:
    fn = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    traced = torch.jit.trace(Residual(fn), (x,))  # matching shapes trace without an error
    torch.testing.assert_close(traced(x), x + fn(x))
    with pytest.raises(ResidualError, match="does not match shortcut output"):
        torch.jit.trace(Residual(nn.Linear(4, 5)), (x,))


@pytest.mark.parametrize("mode", ["row", "subset"])
def test_the_block_drops_along_its_sample_axis(mode: str) -> None:
    from residual.drop import SampleAxis

    block = Residual(nn.Linear(4, 4), drop_path=0.5, drop_mode=mode, sample_axis=SampleAxis(1))
    x = torch.randn(3, 64, 4)  # (L, N, E): the samples are on dim 1
    delta, full = block(x) - x, 2 * block.fn(x)
    kept = torch.isclose(delta, full, atol=1e-6).all(-1).all(0)
    dropped = (delta == 0).all(-1).all(0)
    assert bool((kept | dropped).all()) and 0 < int(kept.sum()) < 64
    assert repr(block).startswith(
        f"Residual(\n  drop_path=0.5, drop_mode={mode!r}, sample_axis=SampleAxis(dim=1,"
    )


def test_residual_in_fp32_hands_a_half_precision_post_its_own_dtype() -> None:
    # found by tests/test_seams.py: a bfloat16 post-norm block with residual_in_fp32 raised
    # "mixed dtype (CPU): expect parameter to have scalar type of Float"
    fn, post = nn.Linear(4, 4).bfloat16(), nn.LayerNorm(4).bfloat16()
    block = Residual(fn, post=post, residual_in_fp32=True)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    merged = x.float() + fn(x).float()
    assert torch.equal(block(x), post(merged.bfloat16()).float())
    relu = Residual(fn, post=nn.ReLU(), residual_in_fp32=True)  # no parameters: float32 out
    assert torch.equal(relu(x), torch.relu(merged))
    plain = Residual(fn, post=post)  # without the flag: all in bfloat16
    assert plain(x).dtype == torch.bfloat16 and torch.equal(plain(x), post(x + fn(x)))
