"""The examples' small models, against the computation their docstrings describe, by value."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from residual import Residual
from residual.models import HyperPatchTransformer, LSTMLanguageModel, PatchTransformer, RowLSTM


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn at random, so that no zero or one init hides a wrong wiring."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def patch_reference(model: nn.Module, layers: list[nn.Module], x: Tensor) -> Tensor:
    """Patches (a 4x4 stride-2 conv, padding 1), positions, the layers, LN, token mean, head."""
    conv = model.patches[0]
    tokens = nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    tokens = tokens.flatten(2).transpose(1, 2) + model.pos
    for layer in layers:
        tokens = layer(tokens)
    return model.head(model.norm(tokens).mean(dim=1))


def torch_layers(model: PatchTransformer, d_model: int, nhead: int) -> list[nn.Module]:
    """torch's pre-norm encoder layers (FF width 2 d_model, ReLU, no dropout), same weights."""
    refs = []
    for ours in model.layers:
        ref = nn.TransformerEncoderLayer(
            d_model, nhead, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        ref.load_state_dict(ours.torch_state_dict())
        refs.append(ref.eval())
    return refs


@pytest.mark.parametrize(("image_size", "in_channels"), [(8, 1), (6, 3)])
def test_patch_transformer_is_torchs_pre_norm_encoder(image_size: int, in_channels: int) -> None:
    kwargs = {"image_size": image_size, "in_channels": in_channels, "num_classes": 7}
    model = randomised(PatchTransformer(d_model=16, layers=2, nhead=4, **kwargs)).eval()
    x = torch.randn(3, in_channels, image_size, image_size)
    want = patch_reference(model, torch_layers(model, 16, 4), x)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-4)
    assert model(x).shape == (3, 7)


def hyper_from_plain(plain: PatchTransformer, streams: int) -> HyperPatchTransformer:
    """A HyperPatchTransformer at init holding ``plain``'s weights, layer by layer."""
    d_model = plain.head.in_features
    hyper = HyperPatchTransformer(streams, d_model=d_model, layers=len(plain.layers), nhead=4)
    state = {k: v for k, v in plain.state_dict().items() if not k.startswith("layers.")}
    for i, layer in enumerate(plain.layers):
        for half, block in ((0, layer.self_attn_block), (1, layer.ff_block)):
            for k, v in block.fn.state_dict().items():
                state[f"blocks.{2 * i + half}.fn.fn.{k}"] = v
    missing, unexpected = hyper.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(".fn.fn." not in k for k in missing), missing  # only the connections' own
    return hyper


@pytest.mark.parametrize("streams", [1, 4])
def test_hyper_patch_transformer_at_init_is_the_plain_one(streams: int) -> None:
    # n = 1 is exactly the plain residual; at init n streams stay equal copies, and the final
    # LayerNorm does not see their sum's factor n (up to its eps)
    plain = randomised(PatchTransformer(d_model=16, layers=2, nhead=4)).eval()
    hyper = hyper_from_plain(plain, streams).eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(hyper(x), plain(x), atol=1e-4, rtol=1e-4)


def test_hyper_patch_transformer_layers_favour_their_own_stream() -> None:
    model = HyperPatchTransformer(3, d_model=8, layers=3, nhead=2)
    assert len(model.blocks) == 6  # attention, feed-forward per layer
    for k, block in enumerate(model.blocks):
        assert isinstance(block, Residual)
        assert int(block.fn.width.argmax()) == k % 3


def test_row_lstm_reads_rows_through_a_residual_lstm() -> None:
    model = randomised(RowLSTM(width=6, hidden=8, layers=3, num_classes=5)).eval()
    assert not isinstance(model.lstm.layers[0], Residual)
    assert all(isinstance(layer, Residual) for layer in model.lstm.layers[1:])
    x = torch.randn(4, 1, 7, 6)
    h = model.embed(x[:, 0])  # (N, rows, width) -> (N, rows, hidden)
    h, _ = model.lstm.layers[0](h)
    for layer in model.lstm.layers[1:]:
        h = h + layer.fn(h)[0]
    torch.testing.assert_close(model(x), model.head(h.mean(dim=1)))


def test_lstm_language_model_is_embedding_residual_lstm_head() -> None:
    model = randomised(LSTMLanguageModel(11, hidden_size=8, num_layers=2)).eval()
    assert not isinstance(model.lstm.layers[0], Residual)
    assert isinstance(model.lstm.layers[1], Residual)
    idx = torch.randint(0, 11, (3, 5))
    h, _ = model.lstm.layers[0](model.embed(idx))
    h = h + model.lstm.layers[1].fn(h)[0]
    torch.testing.assert_close(model(idx), model.head(h))
