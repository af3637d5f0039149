"""Transformer layers equal torch.nn's; residual LSTM, GPT block, residual MLP and MLP-Mixer."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from residual import Residual, ResidualError, ReZero
from residual.models import (
    CausalTransformerLM,
    MLPMixer,
    ResidualLSTM,
    ResidualMLP,
    TransformerEncoderLayer,
    gpt_block,
)


def _masks(n: int, length: int) -> dict[str, dict[str, torch.Tensor | bool]]:
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[0, -3:] = True
    padding[1, -1:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length)
    return {
        "none": {},
        "padding": {"src_key_padding_mask": padding},
        "causal": {"src_mask": causal, "is_causal": True},
        "bool-attn+padding": {"src_mask": causal == float("-inf"), "src_key_padding_mask": padding},
        "float-padding": {
            "src_key_padding_mask": torch.zeros(n, length).masked_fill(padding, -1e9)
        },
    }


def _layout(kwargs: dict, x: torch.Tensor, layout: str) -> tuple[dict, torch.Tensor]:
    """``x`` (N, L, E) and its masks in ``layout``: batch-first as given, sequence-first
    (L, N, E), or the first sequence alone, unbatched (L, E) with a 1-D padding mask."""
    if layout == "batch-first":
        return kwargs, x
    if layout == "seq-first":
        return kwargs, x.transpose(0, 1).contiguous()
    unbatched = dict(kwargs)
    if "src_key_padding_mask" in unbatched:
        unbatched["src_key_padding_mask"] = unbatched["src_key_padding_mask"][0]
    return unbatched, x[0]


@pytest.mark.parametrize("layout", ["batch-first", "seq-first", "unbatched"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("mask", list(_masks(3, 9)), ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_equals_torch(
    norm_first: bool, mask: str, activation: str, layout: str
) -> None:
    ref = nn.TransformerEncoderLayer(
        32,
        4,
        64,
        dropout=0.0,
        activation=activation,
        batch_first=layout == "batch-first",
        norm_first=norm_first,
    )
    ours = TransformerEncoderLayer.from_torch(ref)
    assert ours.batch_first == (layout == "batch-first")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    kwargs, x = _layout(_masks(3, 9)[mask], torch.randn(3, 9, 32), layout)
    # train (dropout 0): outputs and every gradient
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa, **kwargs), ours(xb, **kwargs)
    assert (ya - yb).abs().max() <= 1e-5
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    assert (xa.grad - xb.grad).abs().max() <= 1e-5
    theirs = {
        "in_proj.weight": ref.self_attn.in_proj_weight.grad,
        "out_proj.weight": ref.self_attn.out_proj.weight.grad,
        "linear1.weight": ref.linear1.weight.grad,
        "linear2.weight": ref.linear2.weight.grad,
        "norm1.weight": ref.norm1.weight.grad,
    }
    mine = {
        "in_proj.weight": ours.self_attn_block.fn.attention.in_proj.weight.grad,
        "out_proj.weight": ours.self_attn_block.fn.attention.out_proj.weight.grad,
        "linear1.weight": ours.ff_block.fn.linear1.weight.grad,
        "linear2.weight": ours.ff_block.fn.linear2.weight.grad,
        "norm1.weight": ours._norm(1).weight.grad,
    }
    for name, g in theirs.items():
        assert (g - mine[name]).abs().max() <= 1e-5, name
    # eval, against torch's fused inference fast path
    ref.eval()
    ours.eval()
    with torch.inference_mode():
        assert (ref(x, **kwargs) - ours(x, **kwargs)).abs().max() <= 1e-5


def test_encoder_layer_is_two_residuals_and_errors() -> None:
    layer = TransformerEncoderLayer(16, 4, 32, batch_first=True)
    assert [type(m).__name__ for m in layer.children()] == ["Residual", "Residual"]
    assert isinstance(layer.self_attn_block.post, nn.LayerNorm)  # post-norm: after the merge
    pre = TransformerEncoderLayer(16, 4, 32, norm_first=True)
    assert pre.self_attn_block.post is None and isinstance(
        pre.self_attn_block.fn.norm, nn.LayerNorm
    )
    with pytest.raises(ResidualError, match="nhead=3 must divide d_model=16"):
        TransformerEncoderLayer(16, 3)
    with pytest.raises(ResidualError, match=r"key_padding_mask of shape \(2, 4\) does not fit"):
        layer(torch.randn(2, 5, 16), src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ResidualError, match=r"expected input \(batch, length, 16\)"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(ResidualError, match=r"expected input \(length, batch, 16\)"):
        pre(torch.randn(2, 5, 8))
    with pytest.raises(ResidualError, match=r"expected \(length,\) = \(5,\)"):
        layer(torch.randn(5, 16), src_key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="expected torch.nn.TransformerEncoderLayer"):
        TransformerEncoderLayer.from_torch(nn.Linear(2, 2))


def test_gpt_block_is_causal_prenorm() -> None:
    block = gpt_block(16, 2).eval()
    assert all(isinstance(m, Residual) and m.post is None for m in block)
    x = torch.randn(1, 6, 16)
    y = block(x)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 16)  # changing the future leaves the past alone
    torch.testing.assert_close(block(x2)[:, :4], y[:, :4])


def test_causal_lm_shapes_and_errors() -> None:
    lm = CausalTransformerLM(30, d_model=16, nhead=2, num_layers=2, max_len=8).eval()
    idx = torch.randint(0, 30, (2, 8))
    logits = lm(idx)
    assert logits.shape == (2, 8, 30)
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % 30  # another token at position 5
    other = lm(changed)
    torch.testing.assert_close(other[:, :5], logits[:, :5])  # the past does not see it
    assert (other[:, 5:] - logits[:, 5:]).abs().amax(dim=-1).min() > 1e-4  # the rest does
    with pytest.raises(ResidualError, match="length <= 8"):
        lm(torch.randint(0, 30, (2, 9)))


def test_residual_lstm_matches_hand_written_stack() -> None:
    model = ResidualLSTM(8, 8, num_layers=3, residual_from=1)
    x = torch.randn(2, 5, 8)
    out, (h, c) = model(x)
    l0, l1, l2 = model.layers[0], model.layers[1].fn, model.layers[2].fn
    y0, (h0, c0) = l0(x)
    y1, (h1, c1) = l1(y0)
    y1 = y0 + y1
    y2, (h2, c2) = l2(y1)
    torch.testing.assert_close(out, y1 + y2)
    torch.testing.assert_close(h, torch.cat([h0, h1, h2]))
    torch.testing.assert_close(c, torch.cat([c0, c1, c2]))
    out2, (h2_all, _) = model(x, (h, c))  # an initial state in the same layout
    y0, (g0, _) = l0(x, (h[0:1], c[0:1]))
    y1, (g1, _) = l1(y0, (h[1:2], c[1:2]))
    y1 = y0 + y1
    y2, (g2, _) = l2(y1, (h[2:3], c[2:3]))
    torch.testing.assert_close(out2, y1 + y2)
    torch.testing.assert_close(h2_all, torch.cat([g0, g1, g2]))
    assert not torch.allclose(out2, out)  # the state was used


def test_residual_lstm_gnmt_layout() -> None:
    model = ResidualLSTM(
        10, 16, num_layers=4, residual_from=2, bidirectional_first=True, dropout=0.1
    )
    assert [type(m).__name__ for m in model.layers] == ["LSTM", "LSTM", "Residual", "Residual"]
    x = torch.randn(3, 7, 10)
    out, (h, c) = model.eval()(x)  # eval: no dropout between the layers
    # by hand: a bidirectional layer (2 state rows), a plain one, then two residual layers
    l0, l1, l2, l3 = model.layers[0], model.layers[1], model.layers[2].fn, model.layers[3].fn
    assert l0.bidirectional and not l1.bidirectional
    y0, (h0, c0) = l0(x)
    y1, (h1, c1) = l1(y0)
    y2, (h2, c2) = l2(y1)
    y2 = y1 + y2
    y3, (h3, c3) = l3(y2)
    torch.testing.assert_close(out, y2 + y3)
    torch.testing.assert_close(h, torch.cat([h0, h1, h2, h3]))
    torch.testing.assert_close(c, torch.cat([c0, c1, c2, c3]))
    assert out.shape == (3, 7, 16) and h.shape == (5, 3, 16)
    with pytest.raises(ResidualError, match="residual_from >= 2"):
        ResidualLSTM(10, 16, num_layers=3, residual_from=1, bidirectional_first=True)
    with pytest.raises(ResidualError, match="layer 0 maps 10 -> 16"):
        ResidualLSTM(10, 16, residual_from=0)


def _mlp(fn: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """A pre-norm MLP branch written with functional ops: LayerNorm, Linear, GELU, Linear."""
    norm, lin1, _, _, lin2 = fn
    h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.linear(F.gelu(F.linear(h, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)


def test_residual_mlp_and_mixer() -> None:
    mlp = ResidualMLP(64, 10, dim=32, depth=3)
    assert sum(isinstance(m, Residual) for m in mlp.modules()) == 3
    x = torch.randn(5, 64)
    h = F.linear(x, mlp.stem.weight, mlp.stem.bias)
    for block in mlp.blocks:
        h = h + _mlp(block.fn, h)
    h = F.layer_norm(h, (32,), mlp.norm.weight, mlp.norm.bias)
    torch.testing.assert_close(mlp(x), F.linear(h, mlp.head.weight, mlp.head.bias))

    mixer = MLPMixer(8, 2, 1, dim=32, depth=2, num_classes=10)
    assert sum(isinstance(m, Residual) for m in mixer.modules()) == 4
    images = torch.randn(5, 1, 8, 8)
    # patches of 2x2, row-major over the 4x4 grid, each flattened as (p1, p2, c)
    patches = images.view(5, 1, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(5, 16, 4)
    embed = mixer.patches[1]
    h = F.linear(patches, embed.weight, embed.bias)
    for token_mixing, channel_mixing in zip(mixer.blocks[0::2], mixer.blocks[1::2], strict=True):
        norm, _, lin1, _, _, lin2, _ = token_mixing.fn
        t = F.layer_norm(h, (32,), norm.weight, norm.bias).transpose(1, 2)  # (N, dim, tokens)
        t = F.linear(F.gelu(F.linear(t, lin1.weight, lin1.bias)), lin2.weight, lin2.bias)
        h = h + t.transpose(1, 2)
        h = h + _mlp(channel_mixing.fn, h)
    pooled = F.layer_norm(h, (32,), mixer.norm.weight, mixer.norm.bias).mean(dim=1)
    expected = F.linear(pooled, mixer.head.weight, mixer.head.bias)
    torch.testing.assert_close(mixer(images), expected)
    token_mixing = mixer.blocks[0]
    assert type(token_mixing.fn[1]).__name__ == "Rearrange"
    with pytest.raises(ResidualError, match=r"expected images \(N, 1, 8, 8\)"):
        mixer(torch.randn(5, 3, 8, 8))
    with pytest.raises(ResidualError, match="patch_size=3 must divide image_size=8"):
        MLPMixer(8, 3, 1)


class _Half(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


SUBSTITUTIONS = {
    "shortcut": lambda block: setattr(block, "shortcut", _Half()),
    "pre": lambda block: setattr(block, "pre", nn.Tanh()),
    "post": lambda block: setattr(block, "post", nn.Tanh()),
    "merge": lambda block: setattr(block, "merge", ReZero(0.5)),
}


@pytest.mark.parametrize("part", list(SUBSTITUTIONS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_inference_follows_every_substituted_part(norm_first: bool, part: str) -> None:
    """There is one path: under inference_mode a replaced part changes the answer exactly as
    the formula says (no fused kernel that would ignore it)."""
    layer = TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, norm_first=norm_first, batch_first=True
    ).eval()
    SUBSTITUTIONS[part](layer.self_attn_block)
    x = torch.randn(2, 6, 32)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    block = layer.self_attn_block
    with torch.no_grad():
        h = block.pre(x) if block.pre is not None else x
        branch = block.fn(h, key_padding_mask=padding)
        s = block.shortcut(h)
        y = s + branch if block.merge is None else block.merge(s, branch)
        y = block.post(y) if block.post is not None else y
        expected = layer.ff_block(y)
    with torch.inference_mode():
        got = layer(x, src_key_padding_mask=padding)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_from_torch_keeps_dtype_and_device() -> None:
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).double()
    ours = TransformerEncoderLayer.from_torch(ref)
    assert all(p.dtype == torch.float64 for p in ours.parameters())
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert (ours(x) - ref(x)).abs().max() < 1e-12


def _parameter_pairs(
    ref: nn.TransformerEncoderLayer, ours: TransformerEncoderLayer
) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Every parameter of torch's layer and its equal in ours, by torch's name."""
    attention = ours.self_attn_block.fn.attention
    ff = ours.ff_block.fn
    mine = {
        "self_attn.in_proj_weight": attention.in_proj.weight,
        "self_attn.in_proj_bias": attention.in_proj.bias,
        "self_attn.out_proj.weight": attention.out_proj.weight,
        "self_attn.out_proj.bias": attention.out_proj.bias,
        "linear1.weight": ff.linear1.weight,
        "linear1.bias": ff.linear1.bias,
        "linear2.weight": ff.linear2.weight,
        "linear2.bias": ff.linear2.bias,
        "norm1.weight": ours._norm(1).weight,
        "norm1.bias": ours._norm(1).bias,
        "norm2.weight": ours._norm(2).weight,
        "norm2.bias": ours._norm(2).bias,
    }
    return {name: (p, mine[name]) for name, p in ref.named_parameters()}


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "batch3"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_equals_torch_with_dropout(norm_first: bool, batch: int) -> None:
    """Train mode, dropout 0.3, same seed: the same masks in the same order as torch's layer."""
    ref = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.3, batch_first=True, norm_first=norm_first
    )
    ours = TransformerEncoderLayer.from_torch(ref)
    assert ref.training and ours.training
    x = torch.randn(batch, 9, 32)
    ya = _assert_seeded_equal(ref, ours, x)
    torch.manual_seed(2)
    assert (ref(x) - ya).abs().max() > 0.1  # dropout is live: another seed, another output


def _assert_seeded_equal(
    ref: nn.TransformerEncoderLayer, ours: TransformerEncoderLayer, x: torch.Tensor
) -> torch.Tensor:
    """Same seed, same input: equal outputs, input gradients and parameter gradients."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    ya = ref(xa)
    torch.manual_seed(1)
    yb = ours(xb)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for name, (theirs, mine) in _parameter_pairs(ref, ours).items():
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5, msg=name)
    return ya.detach()


class _RecordDropout(TorchFunctionMode):
    """Records each dropout a forward applies, in order, whatever module or import calls it:
    ("attention", p) for attention-weight dropout, ("dropout", p) for ``F.dropout``; p is 0.0
    where it is not applied (not training)."""

    def __init__(self) -> None:
        super().__init__()
        self.drops: list[tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # a builtin: dropout_p is its 5th argument
            p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            self.drops.append(("attention", p))
        elif func in (F.dropout, F.multi_head_attention_forward):
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            kind, rate = ("dropout", "p") if func is F.dropout else ("attention", "dropout_p")
            applied = bound.arguments["training"]
            self.drops.append((kind, bound.arguments[rate] if applied else 0.0))
        return func(*args, **kwargs)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_drops_where_torch_does(norm_first: bool) -> None:
    """Each dropout torch's layer applies in training (attention weights, after attention,
    after the activation, after linear2), ours applies too, in the same order, at the same p."""
    ref = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.3, batch_first=True, norm_first=norm_first
    )
    ours = TransformerEncoderLayer.from_torch(ref)
    x = torch.randn(2, 5, 16)
    with _RecordDropout() as theirs:
        ref(x)
    with _RecordDropout() as mine:
        ours(x)
    assert theirs.drops == [("attention", 0.3)] + [("dropout", 0.3)] * 3
    assert mine.drops == theirs.drops


def test_encoder_layer_signature_is_torchs() -> None:
    """Positional parameters, names and defaults as torch's; our extras keyword-only after."""
    theirs = inspect.signature(nn.TransformerEncoderLayer.__init__).parameters
    ours = inspect.signature(TransformerEncoderLayer.__init__).parameters
    shared = [(p.name, p.default, p.kind) for p in theirs.values()]
    assert [(p.name, p.default, p.kind) for p in ours.values()][: len(shared)] == shared
    extras = list(ours.values())[len(shared) :]
    assert [(p.name, p.kind) for p in extras] == [
        ("drop_path", inspect.Parameter.KEYWORD_ONLY),
        ("checkpoint", inspect.Parameter.KEYWORD_ONLY),
    ]
    fwd = inspect.signature(nn.TransformerEncoderLayer.forward).parameters
    assert [
        (p.name, p.default)
        for p in inspect.signature(TransformerEncoderLayer.forward).parameters.values()
    ] == [(p.name, p.default) for p in fwd.values()]


def test_encoder_layer_factory_kwargs() -> None:
    layer = TransformerEncoderLayer(16, 2, 32, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in layer.parameters())
    layer = TransformerEncoderLayer(16, 2, 32, dtype=torch.float64, norm_first=True)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(3, 2, 16, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_state_dicts_load_both_ways(norm_first: bool, bias: bool) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=norm_first, bias=bias)
    ours = TransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=norm_first, bias=bias)
    own_keys = list(ours.state_dict())
    assert not set(own_keys) & set(ref.state_dict())  # our own layout is unchanged
    assert (
        str(ours.load_state_dict(ref.state_dict(), strict=True))
        == "<All keys matched successfully>"
    )
    x = torch.randn(5, 3, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    theirs = ours.torch_state_dict()
    assert list(theirs) == list(ref.state_dict())
    fresh = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=norm_first, bias=bias)
    fresh.load_state_dict(theirs, strict=True)
    torch.testing.assert_close(fresh(x), ref(x), atol=0, rtol=0)
    back = ours.to_torch()
    assert back.norm_first == norm_first and not back.self_attn.batch_first
    torch.testing.assert_close(back(x), ref(x), atol=0, rtol=0)
    assert list(ours.state_dict()) == own_keys
    # our own keys still load, and a mix of prefixes (a torch encoder's) too
    ours.load_state_dict(TransformerEncoderLayer.from_torch(ref).state_dict(), strict=True)
    stack = nn.Sequential(copy.deepcopy(ours), copy.deepcopy(ours))
    stack.load_state_dict({f"{i}.{k}": v for i in (0, 1) for k, v in ref.state_dict().items()})


def test_encoder_layer_torch_attribute_views() -> None:
    layer = TransformerEncoderLayer(16, 2, 32, activation="gelu", batch_first=True)
    assert layer.self_attn.batch_first and layer.self_attn._qkv_same_embed_dim
    assert layer.self_attn.num_heads == 2 and layer.self_attn.embed_dim == 16
    assert layer.self_attn.in_proj_weight is layer.self_attn.in_proj.weight
    assert layer.self_attn.in_proj_bias is layer.self_attn.in_proj.bias
    assert layer.linear1 is layer.ff_block.fn.linear1 and layer.norm2 is layer.ff_block.post
    assert layer.dropout1.p == layer.dropout.p == layer.dropout2.p == 0.1
    assert layer.activation_relu_or_gelu == 2
    assert TransformerEncoderLayer(16, 2).activation_relu_or_gelu == 1
    assert TransformerEncoderLayer(16, 2, activation=torch.tanh).activation_relu_or_gelu == 0
    assert len(layer.state_dict()) == 12


@pytest.mark.parametrize("nested", [True, False], ids=["enable_nested", "no_nested"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_encoder_layer_inside_torch_encoder(batch_first: bool, nested: bool) -> None:
    torch.manual_seed(0)
    ref_layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    ref = nn.TransformerEncoder(ref_layer, 2, enable_nested_tensor=nested)
    ours_layer = TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    if nested:
        with pytest.warns(UserWarning, match="was not TransformerEncoderLayer"):
            ours = nn.TransformerEncoder(ours_layer, 2, enable_nested_tensor=True)
    else:
        ours = nn.TransformerEncoder(ours_layer, 2, enable_nested_tensor=False)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, -2:] = True
    if not batch_first:
        x = x.transpose(0, 1)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    causal = nn.Transformer.generate_square_subsequent_mask(6) == float("-inf")
    torch.testing.assert_close(
        ours(x, mask=causal, src_key_padding_mask=padding),
        ref(x, mask=causal, src_key_padding_mask=padding),
        atol=1e-5,
        rtol=1e-5,
    )
    ref.eval()
    ours.eval()
    with torch.no_grad():
        got = ours(x, src_key_padding_mask=padding)
        want = ref(x, src_key_padding_mask=padding)  # torch: nested fast path, padding -> 0
    keep = ~padding if batch_first else ~padding.T
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


def test_encoder_layer_ignores_the_mha_fastpath_switch() -> None:
    """There is no fast path here: the switch changes nothing (torch's own numbers agree)."""
    ref = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True).eval()
    ours = TransformerEncoderLayer.from_torch(ref).eval()
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        with torch.no_grad():
            outs = []
            for enabled in (True, False):
                torch.backends.mha.set_fastpath_enabled(enabled)
                outs.append(ours(x, src_key_padding_mask=padding))
                want = ref(x, src_key_padding_mask=padding)
                keep = ~padding
                torch.testing.assert_close(outs[-1][keep], want[keep], atol=1e-5, rtol=1e-5)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_encoder_layer_refuses_nested_tensors() -> None:
    layer = TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True)
    nt = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
    with pytest.raises(TypeError, match="pass a padded tensor .*src_key_padding_mask"):
        layer(nt)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_seq_first_draws_torchs_dropout_masks(norm_first: bool) -> None:
    """Sequence-first runs in (S, N, E) memory order, as torch's: the same dropout masks with
    no contiguity hook, and the same gradients."""
    ref = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.3, norm_first=norm_first)
    ours = TransformerEncoderLayer.from_torch(ref)
    _assert_seeded_equal(ref, ours, torch.randn(9, 3, 32))


@pytest.mark.parametrize("layout", ["batch-first", "seq-first", "unbatched-bf", "unbatched-sf"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_training_draws_torchs_dropout_masks_in_every_layout(norm_first: bool, layout: str) -> None:
    """Same seed, same weights, dropout 0.1: the same outputs and gradients as torch's layer
    (its attention output reaches dropout1 in (L, N, E) memory order, batch-first too), with
    a padding mask, and through a two-layer ``nn.TransformerEncoder``."""
    batch_first = layout in ("batch-first", "unbatched-bf")
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first
    )
    ours = TransformerEncoderLayer.from_torch(ref)
    x = torch.randn(3, 7, 16)
    if layout == "seq-first":
        x = x.transpose(0, 1).contiguous()
    elif layout.startswith("unbatched"):
        x = x[0]
    _assert_seeded_equal(ref, ours, x)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, -2:] = True
    pad = pad[0] if layout.startswith("unbatched") else pad
    torch.manual_seed(4)
    want = ref(x, src_key_padding_mask=pad)
    torch.manual_seed(4)
    torch.testing.assert_close(ours(x, src_key_padding_mask=pad), want, atol=1e-6, rtol=1e-6)
    if layout.startswith("unbatched"):
        return
    stack_ref = nn.TransformerEncoder(ref, 2, enable_nested_tensor=False)
    stack_ours = nn.TransformerEncoder(ours, 2, enable_nested_tensor=False)
    torch.manual_seed(5)
    want = stack_ref(x, src_key_padding_mask=pad)
    torch.manual_seed(5)
    got = stack_ours(x, src_key_padding_mask=pad)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_is_causal_without_src_mask_applies_the_causal_mask() -> None:
    """torch raises ("Need attn_mask if specifying the is_causal hint"); ours applies it."""
    layer = TransformerEncoderLayer(16, 2, 32, dropout=0.0).eval()
    x = torch.randn(6, 2, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    torch.testing.assert_close(layer(x, is_causal=True), layer(x, src_mask=causal))
    with pytest.raises(TypeError, match="must be bool or floating"):
        layer(x, src_key_padding_mask=torch.zeros(2, 6, dtype=torch.uint8))


# --- is_causal=True means causal with every other mask (issue 24, item 2) ------------------


def _causal_cases(n: int, length: int, heads: int) -> dict[str, dict[str, torch.Tensor]]:
    """Masks that are not themselves causal, to combine with ``is_causal=True``. No query loses
    every key: the padding is at the end, and key 0 stays open in every attention mask."""
    gen = torch.Generator().manual_seed(3)
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[0, -3:] = True
    padding[1, -1:] = True
    holes = torch.rand(length, length, generator=gen) < 0.3
    holes[:, 0] = False
    per_head = torch.rand(n * heads, length, length, generator=gen) < 0.3
    per_head[..., 0] = False
    bias = torch.randn(length, length, generator=gen)
    return {
        "padding": {"src_key_padding_mask": padding},
        "float-padding": {
            "src_key_padding_mask": torch.zeros(n, length).masked_fill(padding, -1e9)
        },
        "bool-attn": {"src_mask": holes},
        "float-attn": {"src_mask": bias},
        "per-head-bool": {"src_mask": per_head},
        "per-head-float": {"src_mask": torch.randn(n * heads, length, length, generator=gen)},
        "float-attn+padding": {"src_mask": bias, "src_key_padding_mask": padding},
        "per-head+float-padding": {
            "src_mask": per_head,
            "src_key_padding_mask": torch.zeros(n, length).masked_fill(padding, float("-inf")),
        },
    }


def _with_causal(mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """``mask`` with the causal mask written in by hand (the explicit reference)."""
    above = torch.ones(length, length, dtype=torch.bool).triu(1)
    if mask is None:
        return above
    if mask.dtype == torch.bool:
        return mask | above
    return mask.masked_fill(above, float("-inf"))


def _first_heads(kwargs: dict[str, torch.Tensor], heads: int) -> dict[str, torch.Tensor]:
    """An unbatched sequence's per-head mask: the first sequence's (heads, L, L)."""
    out = dict(kwargs)
    if "src_mask" in out and out["src_mask"].dim() == 3:
        out["src_mask"] = out["src_mask"][:heads]
    return out


@pytest.mark.parametrize("layout", ["batch-first", "seq-first", "unbatched"])
@pytest.mark.parametrize("case", list(_causal_cases(3, 7, 2)))
def test_is_causal_combines_the_causal_mask_with_every_other_mask(case: str, layout: str) -> None:
    """``is_causal=True`` with a padding mask, a non-causal bool or float ``src_mask`` or a
    per-head one: the same as torch's layer given the causal mask explicitly, combined by hand
    with the same masks (torch treats ``is_causal`` as a hint and drops one of the masks)."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=layout == "batch-first")
    ours = TransformerEncoderLayer.from_torch(ref)
    kwargs, x = _layout(_causal_cases(3, 7, 2)[case], torch.randn(3, 7, 16), layout)
    if layout == "unbatched":
        kwargs = _first_heads(kwargs, 2)
    explicit = dict(kwargs, src_mask=_with_causal(kwargs.get("src_mask"), 7))
    for mode in (True, False):
        ref.train(mode)
        ours.train(mode)
        want = ref(x, **explicit)
        got = ours(x, **kwargs, is_causal=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the future does not leak: changing the last position leaves the others alone
    later = x.clone()
    if layout == "unbatched":
        later[-1] = torch.randn(16)
    elif layout == "batch-first":
        later[:, -1] = torch.randn(3, 16)
    else:
        later[-1] = torch.randn(3, 16)
    past = (slice(None, -1),) if layout != "batch-first" else (slice(None), slice(None, -1))
    torch.testing.assert_close(
        ours(later, **kwargs, is_causal=True)[past], ours(x, **kwargs, is_causal=True)[past]
    )


@pytest.mark.parametrize("how", ["is_causal", "causal=True", "both"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_attention_branch_is_causal_with_padding_and_masks(batch_first: bool, how: str) -> None:
    """``Residual(AttentionBranch(SelfAttention(...)))`` with ``is_causal=True`` (or a causal
    layer) and a padding mask, alone or with a float mask: ``x + MHA(x)`` with the causal mask
    given explicitly."""
    from residual.models import AttentionBranch, SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(16, 2, causal=how != "is_causal", batch_first=batch_first)
    block = Residual(AttentionBranch(attn, 0.0, None))
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first)
    mha.load_state_dict(
        {
            "in_proj_weight": attn.in_proj.weight,
            "in_proj_bias": attn.in_proj.bias,
            "out_proj.weight": attn.out_proj.weight,
            "out_proj.bias": attn.out_proj.bias,
        }
    )
    x = torch.randn(3, 6, 16) if batch_first else torch.randn(6, 3, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, -2:] = True
    bias = torch.randn(6, 6)
    hint = how != "causal=True"
    for mask in (None, bias):
        explicit = _with_causal(mask, 6)
        want = x + mha(x, x, x, attn_mask=explicit, key_padding_mask=pad, need_weights=False)[0]
        got = block(x, attn_mask=mask, key_padding_mask=pad, is_causal=hint)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("float_masks", [False, True], ids=["bool", "float"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_a_query_with_no_key_left_is_zero_as_torchs(batch_first: bool, float_masks: bool) -> None:
    """Padding the first position + causal leaves query 0 of that sequence no key. torch's
    layer (its SDPA path: training, or eval with the fast path off) gives that query a zero
    attention output, finite, with finite gradients; so does ours. (torch's fused eval fast
    path gives NaN there instead; ours has no fast path.)"""
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
    ours = TransformerEncoderLayer.from_torch(ref)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 0] = True
    if float_masks:
        pad = torch.zeros(3, 5).masked_fill(pad, float("-inf"))
    causal = _with_causal(None, 5)
    if float_masks:
        causal = torch.zeros(5, 5).masked_fill(causal, float("-inf"))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = ref(xa, src_mask=causal, src_key_padding_mask=pad)
    got = ours(xb, src_key_padding_mask=pad, is_causal=True)
    assert want.isfinite().all() and got.isfinite().all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.sum().backward()
    got.sum().backward()
    assert xb.grad.isfinite().all()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            want = ref.eval()(x, src_mask=causal, src_key_padding_mask=pad)
            got = ours.eval()(x, src_key_padding_mask=pad, is_causal=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_is_causal_with_padding_on_meta() -> None:
    layer = TransformerEncoderLayer(8, 2, 16, batch_first=True, device="meta")
    pad = torch.zeros(2, 5, dtype=torch.bool, device="meta")
    out = layer(torch.randn(2, 5, 8, device="meta"), src_key_padding_mask=pad, is_causal=True)
    assert out.device.type == "meta" and out.shape == (2, 5, 8)


# --- empty batches and empty sequences (issue 24, item 10) ----------------------------------


@pytest.mark.parametrize("mask", ["none", "causal", "is_causal", "padding", "causal+padding"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=["N=0", "L=0", "N=L=0"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
def test_encoder_layer_on_an_empty_batch_or_sequence(
    batch_first: bool, shape: tuple[int, int], mask: str
) -> None:
    """Empty output of the input's shape, in training and eval, and zero gradients, as torch's
    layer. (torch's own layer raises "cannot reshape tensor of 0 elements" once it is given a
    padding mask on an empty input; ours still gives the empty output: nothing is padded.)"""
    n, length = shape
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=batch_first)
    ours = TransformerEncoderLayer.from_torch(ref)
    x = torch.randn((n, length, 16) if batch_first else (length, n, 16))
    causal = nn.Transformer.generate_square_subsequent_mask(length)
    pad = torch.zeros(n, length, dtype=torch.bool)
    kwargs = {
        "none": {},
        "causal": {"src_mask": causal, "is_causal": True},
        "is_causal": {"is_causal": True},
        "padding": {"src_key_padding_mask": pad},
        "causal+padding": {"src_mask": causal, "src_key_padding_mask": pad},
    }[mask]
    theirs = {k: v for k, v in kwargs.items() if k != "src_key_padding_mask"}
    if mask == "is_causal":
        theirs["src_mask"] = causal  # torch needs the mask with the hint
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        want, got = ref(xa, **theirs), ours(xb, **kwargs)
        assert got.shape == want.shape == x.shape
        want.sum().backward()
        got.sum().backward()
        assert xb.grad is not None and xb.grad.shape == x.shape
        for name, (t, o) in _parameter_pairs(ref, ours).items():
            torch.testing.assert_close(o.grad, t.grad, msg=name)  # zeros
        ref.zero_grad()
        ours.zero_grad()


def test_attention_blocks_and_models_on_empty_inputs() -> None:
    """SelfAttention, AttentionBranch in a Residual, ValueResidualAttention, gpt_block and
    CausalTransformerLM give empty outputs of the right shape, with gradients, as torch's
    attention does."""
    from residual.models import (
        AttentionBranch,
        SelfAttention,
        ValueResidualAttention,
        ValueResidualGPTBlock,
    )

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    for shape in ((0, 5, 16), (2, 0, 16), (0, 0, 16), (0, 16)):
        x = torch.randn(shape, requires_grad=True)
        want = mha(x, x, x, need_weights=False)[0]
        pad = torch.zeros(shape[:-1], dtype=torch.bool)
        for causal in (False, True):
            attn = SelfAttention(16, 2, 0.1, causal=causal)
            assert attn(x).shape == want.shape == x.shape
            assert attn(x, key_padding_mask=pad, is_causal=True).shape == x.shape
            block = Residual(AttentionBranch(attn, 0.1, nn.LayerNorm(16)))
            y = block(x, key_padding_mask=pad)
            assert y.shape == x.shape
            y.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
            assert torch.count_nonzero(attn.in_proj.weight.grad) == 0
        if len(shape) == 3:
            value = ValueResidualAttention(SelfAttention(16, 2, causal=True))
            out, v = value(x)
            assert out.shape == x.shape and v.shape == (shape[0], 2, shape[1], 8)
            assert value(x, first_values=v)[0].shape == x.shape
            assert gpt_block(16, 2, dropout=0.1)(x).shape == x.shape
            assert ValueResidualGPTBlock(16, 2)(x)[0].shape == x.shape
    lm = CausalTransformerLM(30, d_model=16, nhead=2, num_layers=2, max_len=8, dropout=0.1)
    for shape in ((0, 5), (2, 0), (0, 0)):
        logits = lm(torch.zeros(shape, dtype=torch.long))
        assert logits.shape == (*shape, 30)
        logits.sum().backward()
        assert lm.tok.weight.grad is not None and torch.count_nonzero(lm.tok.weight.grad) == 0


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_an_integer_mask_error_names_the_fix_and_the_fix_works(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    ours = TransformerEncoderLayer.from_torch(ref)
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=dtype)
    causal = torch.ones(5, 5, dtype=dtype).triu(1)
    with pytest.raises(
        TypeError, match=r"key_padding_mask must be bool or floating.*mask\.bool\(\)"
    ):
        ours(x, src_key_padding_mask=pad)
    with pytest.raises(TypeError, match=r"attn_mask must be bool or floating.*mask\.bool\(\)"):
        ours(x, src_mask=causal)
    got = ours(x, src_mask=causal.bool(), src_key_padding_mask=pad.bool())  # the advised fix
    want = ref(x, src_mask=causal.bool(), src_key_padding_mask=pad.bool())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
