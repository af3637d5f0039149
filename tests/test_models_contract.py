"""The model zoo's contract, piece by piece: every error message exactly (with the boundary
next to each check), every constructor default, and options away from their defaults
compared by value with torch's modules or a hand-written formula."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual import Residual, ResidualError
from residual.hyper import expand_streams, reduce_streams
from residual.models import (
    CausalTransformerLM,
    FeedForward,
    HyperPatchTransformer,
    LSTMLanguageModel,
    MLPMixer,
    PatchTransformer,
    ResidualLSTM,
    ResidualMLP,
    ResNet,
    RowLSTM,
    SelfAttention,
    TransformerEncoderLayer,
    ValueResidualAttention,
    ValueResidualGPTBlock,
    cifar_resnet,
    gpt_block,
    mlp_block,
)
from residual.shortcuts import IdentityShortcut, NoShortcut, ProjectionShortcut, ZeroPadShortcut

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

DROP_1 = (
    "drop_path must be in [0, 1), got 1.0; 0 disables stochastic depth and 1 would drop the "
    "branch for good (remove the block instead)"
)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def raises(error: type[Exception], message: str, build: Callable[[], object]) -> None:
    with pytest.raises(error, match=exactly(message)):
        build()


def close(a: Tensor, b: Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=tol, rtol=tol))


@pytest.fixture(scope="module")
def tiny_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet("basic", [1, 1, 1, 1], num_classes=3).eval()


# --- error messages, exactly ---------------------------------------------------------------

ATTN_X = torch.randn(2, 3, 8)

CONSTRUCTION_ERRORS: list[tuple[str, type[Exception], str, Callable[[], object]]] = [
    # attention.py
    ("nhead-divides", ResidualError,
     "SelfAttention: nhead=4 must divide d_model=34; try nhead in [1, 2]",
     lambda: SelfAttention(34, 4)),
    ("nhead-divides-16", ResidualError,
     "SelfAttention: nhead=3 must divide d_model=32; try nhead in [1, 2, 4, 8, 16]",
     lambda: SelfAttention(32, 3)),
    ("attn-d_model", ResidualError, "SelfAttention: d_model must be a positive int, got 0",
     lambda: SelfAttention(0, 1)),
    ("attn-nhead", ResidualError, "SelfAttention: nhead must be a positive int, got 0",
     lambda: SelfAttention(8, 0)),
    ("value-residual-seq-first", ResidualError,
     "ValueResidualAttention: needs a batch-first SelfAttention (batch_first=True)",
     lambda: ValueResidualAttention(SelfAttention(8, 2, batch_first=False))),
    ("activation-name", ResidualError,
     "unknown activation 'tanh'; use 'relu', 'gelu', a module or a function",
     lambda: FeedForward(4, 8, activation="tanh")),
    ("activation-type", TypeError,
     "activation must be a name, a module or a function, got 3",
     lambda: FeedForward(4, 8, activation=3)),  # type: ignore[arg-type]
    # cifar.py
    ("cifar-plain-drop", ResidualError,
     "cifar_resnet: a plain network has no shortcut to keep; drop_path=0",
     lambda: cifar_resnet(8, plain=True, drop_path=0.1)),
    ("cifar-depth-0", ResidualError, "cifar_resnet: depth must be a positive int, got 0",
     lambda: cifar_resnet(0)),
    ("cifar-drop", ResidualError, "cifar_resnet: " + DROP_1,
     lambda: cifar_resnet(8, drop_path=1.0)),
    # mlp.py
    ("mixer-divides", ResidualError, "MLPMixer: patch_size=3 must divide image_size=8",
     lambda: MLPMixer(8, 3, 1, dim=4, depth=1)),
    ("mixer-patch", ResidualError, "MLPMixer: patch_size must be a positive int, got 0",
     lambda: MLPMixer(8, 0, 1, dim=4, depth=1)),
    ("mixer-drop", ResidualError, "MLPMixer: " + DROP_1,
     lambda: MLPMixer(8, 4, 1, dim=4, depth=1, drop_path=1.0)),
    ("mlp-depth", ResidualError, "ResidualMLP: depth must be a positive int, got 0",
     lambda: ResidualMLP(4, 2, dim=4, depth=0)),
    ("mlp-drop", ResidualError, "ResidualMLP: " + DROP_1,
     lambda: ResidualMLP(4, 2, dim=4, depth=1, drop_path=1.0)),
    # recurrent.py
    ("lstm-input", ResidualError, "ResidualLSTM: input_size must be a positive int, got 0",
     lambda: ResidualLSTM(0, 4)),
    ("lstm-hidden", ResidualError, "ResidualLSTM: hidden_size must be a positive int, got 0",
     lambda: ResidualLSTM(4, 0)),
    ("lstm-layers", ResidualError, "ResidualLSTM: num_layers must be a positive int, got 0",
     lambda: ResidualLSTM(4, 4, 0)),
    ("lstm-from", ResidualError, "ResidualLSTM: residual_from must be >= 0, got -1",
     lambda: ResidualLSTM(4, 4, 2, residual_from=-1)),
    ("lstm-drop-no-residual", ResidualError,
     "ResidualLSTM: drop_path=0.1 needs a residual layer, but residual_from=2 >= num_layers=2; "
     "lower residual_from or drop_path=0",
     lambda: ResidualLSTM(4, 4, 2, residual_from=2, drop_path=0.1)),
    ("lstm-drop-rate", ResidualError, "ResidualLSTM: " + DROP_1,
     lambda: ResidualLSTM(4, 4, 2, drop_path=1.0)),
    ("lstm-layer0-width", ResidualError,
     "ResidualLSTM: layer 0 maps 4 -> 8 features and cannot be residual; use residual_from >= 1",
     lambda: ResidualLSTM(4, 8, 2, residual_from=0)),
    ("lstm-layer0-bidirectional", ResidualError,
     "ResidualLSTM: layer 0 maps 8 -> 16 features and cannot be residual; use residual_from >= 1",
     lambda: ResidualLSTM(8, 8, 2, residual_from=0, bidirectional_first=True)),
    ("lstm-layer1", ResidualError,
     "ResidualLSTM: layer 1 maps the bidirectional layer's 16 features to 8 and cannot be "
     "residual; use residual_from >= 2 (as GNMT)",
     lambda: ResidualLSTM(4, 8, 2, residual_from=1, bidirectional_first=True)),
    # resnet.py
    ("resnet-block", ResidualError, "ResNet: block must be 'basic' or 'bottleneck', got 'wide'",
     lambda: ResNet("wide", [1, 1, 1, 1])),  # type: ignore[arg-type]
    ("resnet-3-layers", ResidualError, "ResNet: layers must be 4 positive block counts, got [1, 1, 1]",
     lambda: ResNet("basic", [1, 1, 1])),
    ("resnet-5-layers", ResidualError,
     "ResNet: layers must be 4 positive block counts, got [1, 1, 1, 1, 1]",
     lambda: ResNet("basic", [1, 1, 1, 1, 1])),
    ("resnet-0-blocks", ResidualError,
     "ResNet: layers must be 4 positive block counts, got [1, 1, 1, 0]",
     lambda: ResNet("basic", [1, 1, 1, 0])),
    ("resnet-weights", ResidualError,
     "ResNet: weights='IMAGENET1K_V1': this library downloads nothing; build the model with "
     "weights=None, then load_torchvision(model, state_dict_or_path) with torchvision's file",
     lambda: ResNet("basic", [1, 1, 1, 1], weights="IMAGENET1K_V1")),  # type: ignore[arg-type]
    ("resnet-basic-groups", ResidualError,
     "ResNet: BasicBlock only supports groups=1 and base_width=64, got groups=2, "
     "width_per_group=64; use a bottleneck net (resnet50, resnext50_32x4d, wide_resnet50_2) "
     "for grouped or wider blocks",
     lambda: ResNet("basic", [1, 1, 1, 1], groups=2)),
    ("resnet-basic-width", ResidualError,
     "ResNet: BasicBlock only supports groups=1 and base_width=64, got groups=1, "
     "width_per_group=32; use a bottleneck net (resnet50, resnext50_32x4d, wide_resnet50_2) "
     "for grouped or wider blocks",
     lambda: ResNet("basic", [1, 1, 1, 1], width_per_group=32)),
    ("resnet-basic-dilation", NotImplementedError,
     "ResNet: Dilation > 1 not supported in BasicBlock (resnet18/34), as in torchvision; "
     "dilate a bottleneck net (resnet50, resnet101) instead",
     lambda: ResNet("basic", [1, 1, 1, 1], replace_stride_with_dilation=[False, True, True])),
    ("resnet-dilation-length", ResidualError,
     "ResNet: replace_stride_with_dilation should be None or a 3-element tuple, got [True]; "
     "one bool per stage 2-4, e.g. [False, True, True] (output stride 8)",
     lambda: ResNet("bottleneck", [1, 1, 1, 1], replace_stride_with_dilation=[True])),
    ("resnet-dilation-string", ResidualError,
     "ResNet: replace_stride_with_dilation should be None or a 3-element tuple, got 'ttt'; "
     "one bool per stage 2-4, e.g. [False, True, True] (output stride 8)",
     lambda: ResNet("bottleneck", [1, 1, 1, 1], replace_stride_with_dilation="ttt")),
    ("resnet-dilation-int", ResidualError,
     "ResNet: replace_stride_with_dilation should be None or a 3-element tuple, got 3; "
     "one bool per stage 2-4, e.g. [False, True, True] (output stride 8)",
     lambda: ResNet("bottleneck", [1, 1, 1, 1], replace_stride_with_dilation=3)),  # type: ignore[arg-type]
    ("resnet-dilation-bools", TypeError,
     "ResNet: replace_stride_with_dilation must hold bools, got [0, 1, 1]; "
     "e.g. [False, True, True]",
     lambda: ResNet("bottleneck", [1, 1, 1, 1], replace_stride_with_dilation=[0, 1, 1])),  # type: ignore[list-item]
    ("resnet-classes-float", TypeError, "ResNet: num_classes must be an int, got float",
     lambda: ResNet("basic", [1, 1, 1, 1], 2.0)),  # type: ignore[arg-type]
    ("resnet-classes-bool", TypeError, "ResNet: num_classes must be an int, got bool",
     lambda: ResNet("basic", [1, 1, 1, 1], True)),
    ("resnet-classes-negative", ResidualError,
     "ResNet: num_classes must be >= 0, got -1; 0 removes the classifier",
     lambda: ResNet("basic", [1, 1, 1, 1], -1)),
    ("resnet-in-channels", ResidualError, "ResNet: in_channels must be a positive int, got 0",
     lambda: ResNet("basic", [1, 1, 1, 1], in_channels=0)),
    ("resnet-drop", ResidualError, "ResNet: " + DROP_1,
     lambda: ResNet("basic", [1, 1, 1, 1], drop_path=1.0)),
    # small.py
    ("patch-odd", ResidualError, "PatchTransformer: image_size must be even and >= 2, got 7",
     lambda: PatchTransformer(8, 1, 2, image_size=7)),
    ("patch-zero", ResidualError, "PatchTransformer: image_size must be even and >= 2, got 0",
     lambda: PatchTransformer(8, 1, 2, image_size=0)),
    ("patch-layers", ResidualError, "PatchTransformer: layers must be a positive int, got 0",
     lambda: PatchTransformer(8, 0, 2)),
    ("hyper-odd", ResidualError,
     "HyperPatchTransformer: image_size must be even and >= 2, got 5",
     lambda: HyperPatchTransformer(2, 8, 1, 2, image_size=5)),
    ("hyper-streams", ResidualError,
     "HyperPatchTransformer: streams must be a positive int, got 0",
     lambda: HyperPatchTransformer(0, 8, 1, 2)),
    ("hyper-layers", ResidualError, "HyperPatchTransformer: layers must be a positive int, got 0",
     lambda: HyperPatchTransformer(2, 8, 0, 2)),
    # transformer.py
    ("encoder-ff", ResidualError,
     "TransformerEncoderLayer: dim_feedforward must be a positive int, got 0",
     lambda: TransformerEncoderLayer(8, 2, 0)),
    ("from-torch-type", TypeError,
     "from_torch: expected torch.nn.TransformerEncoderLayer, got Linear",
     lambda: TransformerEncoderLayer.from_torch(nn.Linear(2, 2))),  # type: ignore[arg-type]
    ("lm-max-len", ResidualError, "CausalTransformerLM: max_len must be a positive int, got 0",
     lambda: CausalTransformerLM(5, 8, 2, 1, max_len=0)),
    ("lm-drop", ResidualError, "CausalTransformerLM: " + DROP_1,
     lambda: CausalTransformerLM(5, 8, 2, 1, max_len=4, drop_path=1.0)),
]  # fmt: skip


def test_from_torch_refuses_separate_qkv_weights() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    layer.self_attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    raises(
        ResidualError,
        "from_torch: separate q/k/v projection weights are not supported",
        lambda: TransformerEncoderLayer.from_torch(layer),
    )


def test_the_boundary_next_to_each_construction_check_passes() -> None:
    # divisors, and the largest suggested head count (16) divides
    assert SelfAttention(34, 17).head_dim == 2 and SelfAttention(32, 16).head_dim == 2
    assert len(cifar_resnet(8).layer1) == 1 and len(cifar_resnet(14).layer1) == 2
    for depth, near in [(2, 8), (7, 8), (9, 8), (13, 14), (21, 20), (23, 26)]:
        raises(
            ResidualError,
            f"cifar_resnet: depth must be 6n + 2 (20, 32, 44, 56, 110, 1202, ...), got {depth}; "
            f"the nearest valid depth is {near}",
            lambda depth=depth: cifar_resnet(depth),  # type: ignore[misc]
        )
    assert cifar_resnet(8, plain=True).layer1[0].drop_path == 0.0
    assert MLPMixer(8, 8, 1, dim=4, depth=1).patches[1].in_features == 64
    # residual_from == num_layers is fine without drop_path; one residual layer is enough for it
    assert [type(m) for m in ResidualLSTM(4, 4, 2, residual_from=2).layers] == [nn.LSTM] * 2
    lstm = ResidualLSTM(4, 4, 2, residual_from=1, drop_path=0.1)
    assert lstm.layers[1].drop_path == pytest.approx(0.1)
    # layer 0 may be residual when it keeps the width and is unidirectional
    assert isinstance(ResidualLSTM(4, 4, 1, residual_from=0).layers[0], Residual)
    # a single bidirectional layer has no layer 1 to refuse
    assert ResidualLSTM(4, 8, 1, residual_from=1, bidirectional_first=True).layers[0].bidirectional
    assert isinstance(ResidualLSTM(4, 8, 2, residual_from=2, bidirectional_first=True), nn.Module)
    assert PatchTransformer(8, 1, 2, image_size=2).pos.shape == (1, 1, 8)
    assert isinstance(ResNet("basic", [1, 1, 1, 1], 0).fc, nn.Identity)
    assert ResNet("basic", [1, 1, 1, 1], in_channels=1).conv1.in_channels == 1


def test_reset_classifier_names_itself(tiny_resnet: ResNet) -> None:
    raises(
        ResidualError,
        "ResNet.reset_classifier: num_classes must be >= 0, got -2; 0 removes the classifier",
        lambda: tiny_resnet.reset_classifier(-2),
    )
    raises(
        TypeError,
        "ResNet.reset_classifier: num_classes must be an int, got str",
        lambda: tiny_resnet.reset_classifier("3"),  # type: ignore[arg-type]
    )


INT_MASK_FIX = (
    "; pass mask.bool() (True = may not attend) or an additive float mask (-inf = blocked)"
)

FORWARD_ERRORS: list[tuple[str, type[Exception], str, Callable[[], object]]] = [
    ("attn-rank", ResidualError,
     "SelfAttention: expected input (batch, length, 8) or unbatched (length, 8), got (2, 3, 4)",
     lambda: SelfAttention(8, 2)(torch.randn(2, 3, 4))),
    ("attn-rank-4", ResidualError,
     "SelfAttention: expected input (batch, length, 8) or unbatched (length, 8), got (1, 2, 3, 8)",
     lambda: SelfAttention(8, 2)(torch.randn(1, 2, 3, 8))),
    ("attn-rank-1", ResidualError,
     "SelfAttention: expected input (batch, length, 8) or unbatched (length, 8), got (8,)",
     lambda: SelfAttention(8, 2)(torch.randn(8))),
    ("attn-seq-first", ResidualError,
     "SelfAttention: expected input (length, batch, 8) or unbatched (length, 8), got (2, 3, 4)",
     lambda: SelfAttention(8, 2, batch_first=False)(torch.randn(2, 3, 4))),
    ("attn-nested", TypeError,
     "SelfAttention: nested tensor input is not supported; pass a padded tensor and mark the "
     "padding with src_key_padding_mask (e.g. x.to_padded_tensor(0.0))",
     lambda: SelfAttention(8, 2)(
         torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]))),
    ("attn-mask-int", TypeError,
     "SelfAttention: attn_mask must be bool or floating, got torch.int64" + INT_MASK_FIX,
     lambda: SelfAttention(8, 2)(ATTN_X, attn_mask=torch.zeros(3, 3, dtype=torch.long))),
    ("attn-mask-int-per-head", TypeError,
     "SelfAttention: attn_mask must be bool or floating, got torch.int64" + INT_MASK_FIX,
     lambda: SelfAttention(8, 2)(ATTN_X, attn_mask=torch.zeros(4, 3, 3, dtype=torch.long))),
    ("padding-int", TypeError,
     "SelfAttention: key_padding_mask must be bool or floating, got torch.int32" + INT_MASK_FIX,
     lambda: SelfAttention(8, 2)(ATTN_X, key_padding_mask=torch.zeros(2, 3, dtype=torch.int))),
    ("attn-mask-shape", ResidualError,
     "SelfAttention: attn_mask of shape (3, 4) does not fit; expected (3, 3) or (4, 3, 3)",
     lambda: SelfAttention(8, 2)(ATTN_X, attn_mask=torch.zeros(3, 4))),
    ("attn-mask-heads", ResidualError,
     "SelfAttention: attn_mask of shape (2, 3, 3) does not fit; expected (3, 3) or (4, 3, 3)",
     lambda: SelfAttention(8, 2)(ATTN_X, attn_mask=torch.zeros(2, 3, 3))),
    ("attn-mask-seq-first", ResidualError,
     "SelfAttention: attn_mask of shape (2, 2) does not fit; expected (3, 3) or (4, 3, 3)",
     lambda: SelfAttention(8, 2, batch_first=False)(
         ATTN_X.transpose(0, 1), attn_mask=torch.zeros(2, 2))),
    ("padding-shape", ResidualError,
     "SelfAttention: key_padding_mask of shape (3, 2) does not fit; "
     "expected (batch, length) = (2, 3)",
     lambda: SelfAttention(8, 2)(ATTN_X, key_padding_mask=torch.zeros(3, 2, dtype=torch.bool))),
    ("padding-unbatched", ResidualError,
     "SelfAttention: key_padding_mask of shape (1, 3) does not fit; expected (length,) = (3,)",
     lambda: SelfAttention(8, 2)(ATTN_X[0], key_padding_mask=torch.zeros(1, 3, dtype=torch.bool))),
    ("value-residual-rank", ResidualError,
     "ValueResidualAttention: expected input (batch, length, 8) or unbatched (length, 8), "
     "got (2, 3, 4)",
     lambda: ValueResidualAttention(SelfAttention(8, 2))(torch.randn(2, 3, 4))),
    ("value-residual-values", ResidualError,
     "ValueResidualAttention: first_values (1, 2, 3, 4) do not match this layer's values "
     "(2, 2, 3, 4); pass the values the first layer returned for the same batch",
     lambda: ValueResidualAttention(SelfAttention(8, 2))(ATTN_X, torch.zeros(1, 2, 3, 4))),
    ("encoder-rank", ResidualError,
     "TransformerEncoderLayer: expected input (length, batch, 8) or unbatched (length, 8), "
     "got (2, 3, 4)",
     lambda: TransformerEncoderLayer(8, 2, 16)(torch.randn(2, 3, 4))),
    ("cifar-unbatched", ResidualError,
     "CifarResNet: expected images of shape (N, 3, H, W), got (3, 8, 8); add a batch dim with "
     "x.unsqueeze(0)",
     lambda: cifar_resnet(8)(torch.randn(3, 8, 8))),
    ("cifar-channels", ResidualError,
     "CifarResNet: expected images of shape (N, 1, H, W), got (1, 3, 8, 8)",
     lambda: cifar_resnet(8, in_channels=1)(torch.randn(1, 3, 8, 8))),
    ("mixer-images", ResidualError, "MLPMixer: expected images (N, 1, 8, 8), got (2, 1, 8, 4)",
     lambda: MLPMixer(8, 4, 1, dim=4, depth=1)(torch.randn(2, 1, 8, 4))),
    ("mixer-channels", ResidualError, "MLPMixer: expected images (N, 1, 8, 8), got (2, 2, 8, 8)",
     lambda: MLPMixer(8, 4, 1, dim=4, depth=1)(torch.randn(2, 2, 8, 8))),
    ("lm-too-long", ResidualError,
     "CausalTransformerLM: expected token ids (batch, length <= 4), got (2, 5)",
     lambda: CausalTransformerLM(5, 8, 2, 1, max_len=4)(torch.zeros(2, 5, dtype=torch.long))),
    ("lm-rank", ResidualError,
     "CausalTransformerLM: expected token ids (batch, length <= 4), got (3,)",
     lambda: CausalTransformerLM(5, 8, 2, 1, max_len=4)(torch.zeros(3, dtype=torch.long))),
]  # fmt: skip


@pytest.mark.parametrize(
    ("error", "message", "call"),
    [case[1:] for case in (*CONSTRUCTION_ERRORS, *FORWARD_ERRORS)],
    ids=[case[0] for case in (*CONSTRUCTION_ERRORS, *FORWARD_ERRORS)],
)
def test_constructors_and_forwards_raise_exactly(
    error: type[Exception], message: str, call: Callable[[], object]
) -> None:
    raises(error, message, call)


def test_the_boundary_next_to_each_forward_check_passes() -> None:
    attn = SelfAttention(8, 2)
    assert attn(ATTN_X[0]).shape == (3, 8)  # rank 2 and 3 both pass
    assert attn(ATTN_X, attn_mask=torch.zeros(4, 3, 3)).shape == (2, 3, 8)
    assert attn(ATTN_X, key_padding_mask=torch.zeros(2, 3)).shape == (2, 3, 8)
    assert attn(ATTN_X[0], key_padding_mask=torch.zeros(3, dtype=torch.bool)).shape == (3, 8)
    lm = CausalTransformerLM(5, 8, 2, 1, max_len=4)
    assert lm(torch.zeros(2, 4, dtype=torch.long)).shape == (2, 4, 5)
    assert cifar_resnet(8, in_channels=1)(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_resnet_forwards_raise_exactly(tiny_resnet: ResNet) -> None:
    x = torch.randn(1, 3, 32, 32)
    for call in (lambda: tiny_resnet(x[0]), lambda: tiny_resnet.forward_intermediates(x[0])):
        raises(
            ResidualError,
            "ResNet: expected images of shape (N, 3, H, W), got (3, 32, 32); add a batch dim "
            "with x.unsqueeze(0)",
            call,
        )
    raises(
        ResidualError,
        "ResNet: expected images of shape (N, 3, H, W), got (1, 1, 32, 32)",
        lambda: tiny_resnet(torch.randn(1, 1, 32, 32)),
    )
    caller = "ResNet.forward_intermediates"
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (ResidualError, f"{caller}: output_fmt must be 'NCHW', got 'NHWC'", {"output_fmt": "NHWC"}),
        (TypeError, f"{caller}: indices must be None, an int or a list of ints, got bool",
         {"indices": True}),
        (ResidualError, f"{caller}: indices=0 must be in 1..5 (the last n)", {"indices": 0}),
        (ResidualError, f"{caller}: indices=6 must be in 1..5 (the last n)", {"indices": 6}),
        (ResidualError, f"{caller}: indices must be in -5..4 (0 is the stem, 1-4 the stages), "
         "got [5]", {"indices": [5]}),
        (ResidualError, f"{caller}: indices must be in -5..4 (0 is the stem, 1-4 the stages), "
         "got [1, -6]", {"indices": [1, -6]}),
        (ResidualError, f"{caller}: indices must be in -5..4 (0 is the stem, 1-4 the stages), "
         "got []", {"indices": []}),
    ]  # fmt: skip
    for error, message, kwargs in cases:
        raises(error, message, lambda kwargs=kwargs: tiny_resnet.forward_intermediates(x, **kwargs))
    # the boundaries: the last 1 and the last 5 outputs; -5 and 4 are the first and the last
    shapes = [f.shape[1] for f in tiny_resnet.forward_intermediates(x, 5, intermediates_only=True)]
    assert shapes == [64, 64, 128, 256, 512]
    last = tiny_resnet.forward_intermediates(x, 1, intermediates_only=True)
    assert [f.shape[1] for f in last] == [512]
    ends = tiny_resnet.forward_intermediates(x, [4, -5], intermediates_only=True)
    assert [f.shape[1] for f in ends] == [64, 512]


# --- defaults, by behaviour or by the built modules ---------------------------------------


def _dropouts(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


def _residuals(model: nn.Module) -> list[Residual]:
    return [m for m in model.modules() if isinstance(m, Residual)]


def _mha_like(attn: SelfAttention, batch_first: bool) -> nn.MultiheadAttention:
    """torch's attention with ``attn``'s weights."""
    ref = nn.MultiheadAttention(
        attn.d_model, attn.nhead, bias=attn.in_proj.bias is not None, batch_first=batch_first
    )
    ref.load_state_dict(
        {
            "in_proj_weight": attn.in_proj.weight,
            "out_proj.weight": attn.out_proj.weight,
            **(
                {}
                if attn.in_proj.bias is None
                else {"in_proj_bias": attn.in_proj.bias, "out_proj.bias": attn.out_proj.bias}
            ),
        }
    )
    return ref


def test_self_attention_defaults_are_torchs_batch_first_attention() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(8, 2)  # dropout 0, bias, not causal, batch-first, float32 on the CPU
    ref = _mha_like(attn, batch_first=True)
    x = torch.randn(2, 5, 8)
    assert attn.training and close(attn(x), ref(x, x, x, need_weights=False)[0])
    assert attn.in_proj.bias is not None and attn.out_proj.bias is not None
    assert attn.in_proj.weight.dtype == torch.float32 and attn.in_proj.weight.device.type == "cpu"
    assert repr(attn) == (
        "SelfAttention(\n  8, nhead=2, dropout=0.0, causal=False\n"
        "  (in_proj): Linear(in_features=8, out_features=24, bias=True)\n"
        "  (out_proj): Linear(in_features=8, out_features=8, bias=True)\n)"
    )
    seq_first = SelfAttention(8, 2, 0.25, causal=True, batch_first=False)
    assert seq_first.extra_repr() == "8, nhead=2, dropout=0.25, causal=True, batch_first=False"
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (8, 2, 4)
    assert attn.in_proj_weight is attn.in_proj.weight and attn.in_proj_bias is attn.in_proj.bias


def test_feed_forward_defaults_dropout_and_relu() -> None:
    ff = FeedForward(4, 8)
    assert _dropouts(ff) == [0.1, 0.1] and ff.norm is None and ff.linear1.bias is not None
    x = torch.randn(3, 4)
    expected = ff.linear2(torch.relu(ff.linear1(x)))
    assert close(ff.eval()(x), expected)


def _value_attention(
    attn: SelfAttention, x: Tensor, first: Tensor | None, lam: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """ResFormer's value residual, written out: softmax(q k^T / sqrt(d) + mask) V'."""
    n, length, d = x.shape
    h = attn.nhead
    q, k, v = attn.in_proj(x).view(n, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
    mixed = v if first is None else lam * v + (1 - lam) * first
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    out = (scores.softmax(-1) @ mixed).transpose(1, 2).reshape(n, length, d)
    return attn.out_proj(out), v


@pytest.mark.parametrize("causal", [False, True])
def test_value_residual_attention_default_lam_is_a_half(causal: bool) -> None:
    torch.manual_seed(0)
    branch = ValueResidualAttention(SelfAttention(8, 2, causal=causal))  # no norm, lam 0.5
    assert branch.norm is None and branch.extra_repr() == "lam=0.5" and _dropouts(branch) == [0.0]
    x, first = torch.randn(2, 5, 8), torch.randn(2, 2, 5, 4)
    out, values = branch(x, first_values=first)  # training mode: nothing is dropped
    want, want_values = _value_attention(branch.attention, x, first, 0.5, causal)
    assert close(out, want) and close(values, want_values)
    out, values = branch(x)  # the first layer attends with its own values
    assert close(out, _value_attention(branch.attention, x, None, 0.5, causal)[0])


def test_value_residual_attention_options_lam_norm_and_dropout() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    branch = ValueResidualAttention(SelfAttention(8, 2), norm, lam=0.2, dropout=0.5)
    x, first = torch.randn(2, 5, 8), torch.randn(2, 2, 5, 4)
    out, _ = branch.eval()(x, first_values=first)
    assert close(out, _value_attention(branch.attention, norm(x), first, 0.2, False)[0])
    assert _dropouts(branch) == [0.5]
    branch.train()
    torch.manual_seed(1)
    dropped, _ = branch(x, first_values=first)
    assert (dropped == 0).any() and not close(dropped, out)
    # the attention's own dropout acts on the weights in training only
    attn_dropout = ValueResidualAttention(SelfAttention(8, 2, dropout=0.9))
    attn_dropout.load_state_dict(branch.state_dict(), strict=False)
    eval_out, _ = attn_dropout.eval()(x)
    assert close(eval_out, _value_attention(attn_dropout.attention, x, None, 0.5, False)[0])
    torch.manual_seed(0)
    assert not close(attn_dropout.train()(x)[0], eval_out)


def _gpt_as_torch(attn_res: Residual, ff_res: Residual, causal: bool) -> Callable[[Tensor], Tensor]:
    """torch's pre-norm GELU encoder layer holding a GPT block's weights (+ its causal mask)."""
    attention = attn_res.fn.attention
    d, h, hidden = attention.d_model, attention.nhead, ff_res.fn.linear1.out_features
    ref = nn.TransformerEncoderLayer(
        d, h, hidden, 0.0, "gelu", batch_first=True, norm_first=True
    ).eval()
    ref.load_state_dict(
        {
            "self_attn.in_proj_weight": attention.in_proj.weight,
            "self_attn.in_proj_bias": attention.in_proj.bias,
            "self_attn.out_proj.weight": attention.out_proj.weight,
            "self_attn.out_proj.bias": attention.out_proj.bias,
            "linear1.weight": ff_res.fn.linear1.weight,
            "linear1.bias": ff_res.fn.linear1.bias,
            "linear2.weight": ff_res.fn.linear2.weight,
            "linear2.bias": ff_res.fn.linear2.bias,
            "norm1.weight": attn_res.fn.norm.weight,
            "norm1.bias": attn_res.fn.norm.bias,
            "norm2.weight": ff_res.fn.norm.weight,
            "norm2.bias": ff_res.fn.norm.bias,
        }
    )

    def run(x: Tensor) -> Tensor:
        if not causal:
            return ref(x)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return ref(x, src_mask=mask, is_causal=True)

    return run


def test_gpt_block_defaults_are_a_causal_prenorm_gelu_layer() -> None:
    torch.manual_seed(0)
    block = gpt_block(8, 2)  # hidden 4 * d_model, no dropout, biases, no drop_path
    assert block[1].fn.linear1.out_features == 32 and _dropouts(block) == [0.0] * 3
    assert all(r.drop_path == 0.0 for r in block) and block[0].fn.attention.causal
    assert block[0].fn.attention.dropout == 0.0
    x = torch.randn(2, 5, 8)
    assert close(block(x), _gpt_as_torch(block[0], block[1], causal=True)(x))  # training mode
    options = gpt_block(8, 2, 16, 0.25, bias=False, drop_path=0.1)
    assert options[1].fn.linear1.out_features == 16 and _dropouts(options) == [0.25] * 3
    assert [r.drop_path for r in options] == [0.1, 0.1]
    assert all(p.dim() == 2 for n, p in options.named_parameters() if "norm" not in n)
    assert options[0].fn.norm.bias is not None  # the norms keep their bias


def test_value_residual_gpt_block_defaults_and_lam_one_is_gpt_block() -> None:
    torch.manual_seed(0)
    block = ValueResidualGPTBlock(8, 2)
    assert block.attn.fn.lam == 0.5 and block.attn.fn.attention.causal
    assert block.ff.fn.linear1.out_features == 32 and _dropouts(block) == [0.0] * 3
    assert block.attn.drop_path == 0.0 and block.ff.drop_path == 0.0
    assert block.attn.fn.attention.in_proj.bias is not None
    x = torch.randn(2, 5, 8)
    out, values = block(x)  # the first block: its own values
    assert close(out, _gpt_as_torch(block.attn, block.ff, causal=True)(x))
    assert values.shape == (2, 2, 5, 4)
    for causal in (False, True):
        lam_one = ValueResidualGPTBlock(8, 2, 16, lam=1.0, causal=causal)
        reference = _gpt_as_torch(lam_one.attn, lam_one.ff, causal=causal)
        assert close(lam_one(x, first_values=torch.randn(2, 2, 5, 4))[0], reference(x))
    options = ValueResidualGPTBlock(8, 2, 12, 0.25, bias=False, drop_path=0.2)
    assert options.ff.fn.linear1.out_features == 12 and _dropouts(options) == [0.25] * 3
    assert options.attn.fn.attention.in_proj.bias is None and options.ff.fn.linear2.bias is None
    assert options.attn.drop_path == options.ff.drop_path == 0.2


def test_encoder_layer_extras_default_off() -> None:
    layer = TransformerEncoderLayer(8, 2, 16)
    for block in (layer.self_attn_block, layer.ff_block):
        assert block.drop_path == 0.0 and not block.checkpoint
    layer = TransformerEncoderLayer(8, 2, 16, drop_path=0.3, checkpoint=True)
    for block in (layer.self_attn_block, layer.ff_block):
        assert block.drop_path == 0.3 and block.checkpoint


def test_causal_lm_defaults_and_forward_by_hand() -> None:
    lm = CausalTransformerLM(5)
    assert (lm.tok.num_embeddings, lm.tok.embedding_dim, lm.pos.num_embeddings) == (5, 128, 256)
    assert len(lm.blocks) == 4 and lm.blocks[0][0].fn.attention.nhead == 4
    assert lm.max_len == 256 and lm.head.bias is None and lm.head.out_features == 5
    assert set(_dropouts(lm)) == {0.0} and all(r.drop_path == 0.0 for r in _residuals(lm))
    torch.manual_seed(0)
    small = CausalTransformerLM(7, 8, 2, 2, max_len=6, dropout=0.25, drop_path=0.4)
    assert set(_dropouts(small)) == {0.25}
    rates = [r.drop_path for r in _residuals(small)]
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert {r.drop_mode for r in _residuals(small)} == {"row"}
    batch = CausalTransformerLM(7, 8, 2, 1, max_len=6, drop_path=0.2, drop_mode="batch")
    assert {r.drop_mode for r in _residuals(batch)} == {"batch"}
    small.eval()
    idx = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 1]])
    h = small.blocks(small.tok(idx) + small.pos.weight[:4])
    assert close(small(idx), small.head(small.norm(h)))


def test_residual_lstm_defaults() -> None:
    lstm = ResidualLSTM(4, 4)
    assert [type(m) for m in lstm.layers] == [nn.LSTM, Residual, Residual, Residual]
    assert all(
        m.batch_first and not m.bidirectional for m in lstm.modules() if isinstance(m, nn.LSTM)
    )
    assert _dropouts(lstm) == [0.0] and all(r.drop_path == 0.0 for r in _residuals(lstm))
    assert not lstm.bidirectional_first and lstm.batch_first


def test_residual_lstm_dropout_between_layers_only() -> None:
    torch.manual_seed(0)
    lstm = ResidualLSTM(4, 4, 3, dropout=0.5)
    x = torch.randn(2, 5, 4)
    torch.manual_seed(1)
    out, _ = lstm(x)
    torch.manual_seed(1)
    l0, l1, l2 = lstm.layers[0], lstm.layers[1].fn, lstm.layers[2].fn
    y = F.dropout(l0(x)[0], 0.5)
    y = F.dropout(y + l1(y)[0], 0.5)
    assert close(out, y + l2(y)[0])  # no dropout after the last layer
    y = l0(x)[0]
    y = y + l1(y)[0]
    assert close(lstm.eval()(x)[0], y + l2(y)[0])  # eval: nothing is dropped


def test_residual_lstm_sequence_first_and_a_bidirectional_state() -> None:
    torch.manual_seed(0)
    first = ResidualLSTM(4, 6, 3, residual_from=2, bidirectional_first=True)
    seq = ResidualLSTM(4, 6, 3, residual_from=2, bidirectional_first=True, batch_first=False)
    seq.load_state_dict(first.state_dict())
    x = torch.randn(2, 5, 4)
    hx = (torch.randn(4, 2, 6), torch.randn(4, 2, 6))
    out, (h, c) = first(x, hx)
    out_seq, (h_seq, c_seq) = seq(x.transpose(0, 1), hx)
    assert close(out_seq.transpose(0, 1), out) and close(h_seq, h) and close(c_seq, c)
    l0, l1, l2 = first.layers[0], first.layers[1], first.layers[2].fn
    y0, (h0, c0) = l0(x, (hx[0][0:2], hx[1][0:2]))
    y1, (h1, c1) = l1(y0, (hx[0][2:3], hx[1][2:3]))
    y2, (h2, c2) = l2(y1, (hx[0][3:4], hx[1][3:4]))
    assert (
        close(out, y1 + y2)
        and close(h, torch.cat([h0, h1, h2]))
        and close(c, torch.cat([c0, c1, c2]))
    )


def test_residual_lstm_drop_path_schedule_covers_the_residual_layers() -> None:
    lstm = ResidualLSTM(4, 4, 3, residual_from=1, drop_path=0.2)
    assert [r.drop_path for r in _residuals(lstm)] == pytest.approx([0.1, 0.2])
    assert {r.drop_mode for r in _residuals(lstm)} == {"row"}


def test_mlp_mixer_defaults_and_hidden_widths() -> None:
    mixer = MLPMixer(8, 4, 1)
    assert len(mixer.blocks) == 8 and mixer.patches[1].out_features == 128
    assert mixer.blocks[0].fn[2].out_features == 64 and mixer.blocks[1].fn[1].out_features == 512
    assert mixer.head.out_features == 10 and set(_dropouts(mixer)) == {0.0}
    assert all(r.drop_path == 0.0 for r in _residuals(mixer))
    assert MLPMixer(8, 4, 1, dim=2, depth=1).blocks[0].fn[2].out_features == 1
    assert MLPMixer(8, 4, 1, dim=1, depth=1).blocks[0].fn[2].out_features == 1
    options = MLPMixer(8, 4, 2, dim=4, depth=2, token_hidden=5, channel_hidden=7, dropout=0.25,
                       drop_path=0.4, drop_mode="batch", num_classes=3)  # fmt: skip
    assert options.blocks[0].fn[2].out_features == 5 and options.blocks[1].fn[1].out_features == 7
    assert options.patches[1].in_features == 32 and set(_dropouts(options)) == {0.25}
    assert [r.drop_path for r in _residuals(options)] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert {r.drop_mode for r in _residuals(options)} == {"batch"}
    x = torch.randn(2, 2, 8, 8)
    assert options.eval()(x).shape == (2, 3)


def test_residual_mlp_defaults_and_options() -> None:
    mlp = ResidualMLP(6, 3)
    assert mlp.stem.out_features == 256 and len(mlp.blocks) == 4
    assert mlp.blocks[0].fn[1].out_features == 1024 and set(_dropouts(mlp)) == {0.0}
    assert all(r.drop_path == 0.0 for r in _residuals(mlp)) and mlp.extra_repr() == ""
    x = torch.randn(2, 5, 6)
    assert mlp(x).shape == (2, 5, 3)  # not flattened: the last dimension is the features
    flat = ResidualMLP(6, 3, dim=4, depth=2, expansion=2, dropout=0.25, drop_path=0.4,
                       drop_mode="batch", flatten=True)  # fmt: skip
    assert flat.extra_repr() == "flatten=True" and flat.blocks[0].fn[1].out_features == 8
    assert set(_dropouts(flat)) == {0.25}
    assert [r.drop_path for r in _residuals(flat)] == pytest.approx([0.2, 0.4])
    assert {r.drop_mode for r in _residuals(flat)} == {"batch"}
    images = torch.randn(2, 1, 2, 3)
    assert close(flat.eval()(images), flat(images.reshape(2, 6)))
    block = mlp_block(4, 8)
    assert _dropouts(block) == [0.0] and block.drop_path == 0.0
    assert mlp_block(4, 8, 0.25, 0.5).drop_path == 0.5
    assert _dropouts(mlp_block(4, 8, 0.25)) == [0.25]


def _patch_forward(model: PatchTransformer | HyperPatchTransformer, x: Tensor) -> Tensor:
    conv = model.patches[0]
    tokens = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1).flatten(2).transpose(1, 2)
    return tokens + model.pos


def test_patch_transformer_defaults_and_forward_by_hand() -> None:
    model = PatchTransformer()
    assert model.pos.shape == (1, 16, 64) and len(model.layers) == 3 and not model.pos.any()
    assert model.patches[0].in_channels == 1 and model.head.out_features == 10
    layer = model.layers[0]
    assert layer.norm_first and layer.batch_first and layer.linear1.out_features == 128
    assert layer.self_attn.nhead == 4 and set(_dropouts(model)) == {0.0}
    torch.manual_seed(0)
    small = PatchTransformer(8, 2, 2, image_size=4, in_channels=2, num_classes=3).eval()
    with torch.no_grad():
        small.pos.normal_()
    x = torch.randn(2, 2, 4, 4)
    tokens = small.layers(_patch_forward(small, x))
    assert close(small(x), small.head(small.norm(tokens).mean(dim=1)))


def test_hyper_patch_transformer_defaults() -> None:
    model = HyperPatchTransformer(2)
    assert model.streams == 2 and model.pos.shape == (1, 16, 64) and len(model.blocks) == 6
    assert model.patches[0].in_channels == 1 and model.head.out_features == 10
    assert set(_dropouts(model)) == {0.0}
    attention = [m for m in model.modules() if isinstance(m, SelfAttention)]
    ffs = [m for m in model.modules() if isinstance(m, FeedForward)]
    assert len(attention) == 3 and attention[0].nhead == 4
    assert len(ffs) == 3 and ffs[0].linear1.out_features == 128
    assert isinstance(ffs[0].activation, nn.ReLU) and isinstance(ffs[0].norm, nn.LayerNorm)
    torch.manual_seed(0)
    small = HyperPatchTransformer(4, 8, 2, 2, image_size=4, in_channels=2, num_classes=3)
    assert small.pos.shape == (1, 4, 8) and not small.pos.any()
    # the layers take turns: layer k starts reading stream k mod 4
    assert [int(block.fn.width.argmax()) for block in small.blocks] == [0, 1, 2, 3]
    with torch.no_grad():
        small.pos.normal_()
    x = torch.randn(2, 2, 4, 4)
    h = reduce_streams(small.blocks(expand_streams(_patch_forward(small, x), 4)), 4)
    assert close(small(x), small.head(small.norm(h).mean(dim=1)))


def test_row_lstm_and_lstm_language_model_defaults_and_forward() -> None:
    row = RowLSTM()
    assert (row.embed.in_features, row.embed.out_features, row.head.out_features) == (8, 128, 10)
    assert [type(m) for m in row.lstm.layers] == [nn.LSTM, Residual, Residual]
    lm = LSTMLanguageModel(5)
    assert lm.embed.embedding_dim == 256 and len(lm.lstm.layers) == 3
    assert [type(m) for m in lm.lstm.layers] == [nn.LSTM, Residual, Residual]
    torch.manual_seed(0)
    small = RowLSTM(3, 4, 2, num_classes=2)
    x = torch.randn(2, 1, 5, 3)
    out, _ = small.lstm(small.embed(x[:, 0]))
    assert close(small(x), small.head(out.mean(dim=1)))
    tokens = LSTMLanguageModel(5, 4, 2)
    idx = torch.tensor([[0, 4, 2], [1, 1, 3]])
    assert close(tokens(idx), tokens.head(tokens.lstm(tokens.embed(idx))[0]))
    assert [type(m) for m in tokens.lstm.layers] == [nn.LSTM, Residual]


def test_cifar_resnet_defaults() -> None:
    net = cifar_resnet(8)
    assert net.fc.out_features == 10 and net.conv1.in_channels == 3
    assert isinstance(net.layer2[0].shortcut, ZeroPadShortcut)  # option A
    assert isinstance(net.bn1, nn.BatchNorm2d) and isinstance(net.relu, nn.ReLU)  # not preact
    assert isinstance(net.bn_final, nn.Identity) and isinstance(net.relu_final, nn.Identity)
    blocks = _residuals(net)
    assert len(blocks) == 3 and not any(isinstance(b.shortcut, NoShortcut) for b in blocks)
    assert all(b.drop_path == 0.0 and not b.checkpoint for b in blocks)
    assert all(bool((m.weight == 1).all()) for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_cifar_resnet_options() -> None:
    net = cifar_resnet(14, 3, "projection", in_channels=2, drop_path=0.3, drop_mode="batch",
                       checkpoint=True, zero_init_residual=True)  # fmt: skip
    assert net.fc.out_features == 3 and net.conv1.in_channels == 2
    assert isinstance(net.layer2[0].shortcut, ProjectionShortcut)
    assert isinstance(net.layer1[0].shortcut, IdentityShortcut)
    blocks = _residuals(net)
    assert [b.drop_path for b in blocks] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
    assert all(b.drop_mode == "batch" and b.checkpoint for b in blocks)
    zeroed = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert len(zeroed) == 6  # the last norm of each branch
    plain = cifar_resnet(8, plain=True)
    assert all(isinstance(b.shortcut, NoShortcut) for b in _residuals(plain))


def test_cifar_preact_forward_by_hand() -> None:
    torch.manual_seed(0)
    net = cifar_resnet(8, 4, preact=True, in_channels=1).eval()
    assert isinstance(net.bn1, nn.Identity) and isinstance(net.relu, nn.Identity)
    assert isinstance(net.bn_final, nn.BatchNorm2d) and net.bn_final.num_features == 64
    with torch.no_grad():
        net.bn_final.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 1, 8, 8)
    h = net.layer3(net.layer2(net.layer1(net.conv1(x))))
    h = torch.relu(net.bn_final(h)).mean(dim=(2, 3))
    assert close(net(x), net.fc(h))


def test_resnet_defaults() -> None:
    net = ResNet("basic", [1, 1, 1, 1])
    assert net.fc.out_features == 1000 and net.num_classes == 1000 and net.conv1.in_channels == 3
    assert isinstance(net.layer2[0].shortcut, ProjectionShortcut)  # not avg_down
    assert isinstance(net.bn1, nn.BatchNorm2d) and net.num_features == net.inplanes == 512
    blocks = _residuals(net)
    assert all(b.drop_path == 0.0 and not b.checkpoint for b in blocks)
    assert all(bool(m.weight.all()) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16, 32]
    assert [f["num_chs"] for f in net.feature_info] == [64, 64, 128, 256, 512]
    bottleneck = ResNet("bottleneck", [1, 1, 1, 1], 2)
    conv2 = bottleneck.layer1[0].fn.conv2  # groups 1, width 64: the 3x3 conv is 64 wide
    assert (conv2.groups, conv2.in_channels) == (1, 64)
    assert [f["num_chs"] for f in bottleneck.feature_info] == [64, 256, 512, 1024, 2048]


def test_resnet_options() -> None:
    net = ResNet("bottleneck", [1, 1, 1, 1], 3, groups=2, width_per_group=16, avg_down=True,
                 drop_path=0.4, drop_mode="batch", checkpoint=True, zero_init_residual=True,
                 in_channels=2)  # fmt: skip
    conv2 = net.layer1[0].fn.conv2
    assert (conv2.groups, conv2.in_channels) == (2, 32)  # 64 * 16 / 64 * 2
    assert type(net.layer2[0].shortcut).__name__ == "PooledProjectionShortcut"
    blocks = _residuals(net)
    assert [b.drop_path for b in blocks] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert all(b.drop_mode == "batch" and b.checkpoint for b in blocks)
    zeroed = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert len(zeroed) == 4 and net.conv1.in_channels == 2


def test_resnet_convs_get_kaiming_normal_fan_out() -> None:
    torch.manual_seed(0)
    net = ResNet("basic", [1, 1, 1, 1], 2)
    for conv in (net.conv1, net.layer4[0].fn.conv1):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)


def test_forward_intermediates_stop_early_and_the_final_features(tiny_resnet: ResNet) -> None:
    x = torch.randn(1, 3, 32, 32)
    final, feats = tiny_resnet.forward_intermediates(x, [0, 2], norm=True)
    assert close(final, tiny_resnet.forward_features(x))
    stem = tiny_resnet.relu(tiny_resnet.bn1(tiny_resnet.conv1(x)))
    layer2 = tiny_resnet.layer2(tiny_resnet.layer1(tiny_resnet.maxpool(stem)))
    assert close(feats[0], stem) and close(feats[1], layer2)
    early, early_feats = tiny_resnet.forward_intermediates(x, [0, 2], stop_early=True)
    assert close(early, layer2) and len(early_feats) == 2 and close(early_feats[1], layer2)
    assert len(tiny_resnet.forward_intermediates(x, [-1, 4], intermediates_only=True)) == 1


# --- SelfAttention options against torch's MultiheadAttention ------------------------------


def test_self_attention_sequence_first_and_per_head_masks_equal_torchs() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(8, 2, batch_first=False)
    ref = _mha_like(attn, batch_first=False)
    x = torch.randn(5, 3, 8)  # (L, N, E)
    per_head = torch.randn(6, 5, 5)
    padding = torch.zeros(3, 5)
    padding[0, -2:] = float("-inf")
    ours = attn(x, attn_mask=per_head, key_padding_mask=padding)
    theirs = ref(x, x, x, attn_mask=per_head, key_padding_mask=padding, need_weights=False)[0]
    assert close(ours, theirs)
    assert close(attn(x[:, 0]), ref(x[:, 0], x[:, 0], x[:, 0], need_weights=False)[0])
    # unbatched: the first sequence alone, with its (length,) padding mask
    alone = attn(x[:, 0], key_padding_mask=padding[0])
    assert close(alone, attn(x[:, :1], key_padding_mask=padding[:1])[:, 0])
    first = SelfAttention(8, 2)
    first.load_state_dict(attn.state_dict())
    batch = x.transpose(0, 1)
    assert close(first(batch[0], key_padding_mask=padding[0].bool()), alone)
    assert close(
        first(batch, key_padding_mask=padding.bool()),
        attn(x, key_padding_mask=padding).transpose(0, 1),
    )


def test_self_attention_causal_with_padding_equals_torchs_masks() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(8, 2, causal=True)
    ref = _mha_like(attn, batch_first=True)
    x = torch.randn(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.zeros(2, 5)
    padding[1, 3:] = float("-inf")
    want = ref(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)[0]
    assert close(attn(x, key_padding_mask=padding), want)
    assert close(attn(x), ref(x, x, x, attn_mask=causal, need_weights=False)[0])
    plain = SelfAttention(8, 2)
    plain.load_state_dict(attn.state_dict())
    assert close(plain(x, is_causal=True), attn(x))  # the hint alone makes it causal
    assert not close(plain(x), attn(x))


def test_self_attention_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(8, 2, 0.5, bias=False)
    assert attn.in_proj.bias is None and attn.out_proj.bias is None
    assert attn.in_proj_bias is None
    ref = _mha_like(attn, batch_first=True)
    x = torch.randn(2, 5, 8)
    assert close(attn.eval()(x), ref(x, x, x, need_weights=False)[0])
    torch.manual_seed(0)
    assert not close(attn.train()(x), ref(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize(
    "activation", [torch.tanh, nn.GELU(approximate="tanh"), F.gelu, "relu"], ids=str
)
def test_encoder_layer_activations_round_trip_through_torch(activation: Any) -> None:
    torch.manual_seed(0)
    ours = TransformerEncoderLayer(8, 2, 16, 0.0, activation, batch_first=True).eval()
    ref = ours.to_torch()
    x = torch.randn(2, 5, 8)
    assert close(ours(x), ref(x)) and not ref.training
    back = TransformerEncoderLayer.from_torch(ref)
    assert close(back(x), ref(x)) and not back.training
    assert back.activation_relu_or_gelu == ours.activation_relu_or_gelu


def test_self_attention_factory_kwargs() -> None:
    attn = SelfAttention(8, 2, device="meta", dtype=torch.float64)
    assert {(p.device.type, p.dtype) for p in attn.parameters()} == {("meta", torch.float64)}
    ff = FeedForward(4, 8, device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in ff.parameters()} == {("meta", torch.float16)}


def test_feed_forward_options_by_hand() -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(4)
    ff = FeedForward(4, 6, 0.5, torch.tanh, False, norm).eval()
    assert ff.linear1.bias is None and ff.linear2.bias is None and _dropouts(ff) == [0.5, 0.5]
    x = torch.randn(3, 4)
    assert close(ff(x), ff.linear2(torch.tanh(ff.linear1(norm(x)))))
    gelu = FeedForward(4, 6, 0.0, "gelu").eval()
    assert close(gelu(x), gelu.linear2(F.gelu(gelu.linear1(x))))
    module = FeedForward(4, 6, 0.0, nn.SiLU()).eval()
    assert close(module(x), module.linear2(F.silu(module.linear1(x))))
    torch.manual_seed(0)
    assert (ff.train()(x) == 0).any()


@pytest.mark.parametrize("dropout", [-0.1, 1.5])
def test_encoder_layer_dropout_is_checked_as_a_probability(dropout: float) -> None:
    """The check names ``dropout`` (not ``drop_path``), and 1 is a valid rate, as torch's."""
    raises(
        ResidualError,
        f"TransformerEncoderLayer: dropout must be in [0, 1], got {dropout}",
        lambda: TransformerEncoderLayer(8, 2, 16, dropout),
    )


def test_encoder_layer_dropout_type_is_checked() -> None:
    for bad, name in [("0.1", "str"), (True, "bool")]:
        raises(
            TypeError,
            f"TransformerEncoderLayer: dropout must be a float in [0, 1], got {name}",
            lambda bad=bad: TransformerEncoderLayer(8, 2, 16, bad),  # type: ignore[misc]
        )


def test_encoder_layer_dropout_bounds_are_accepted_and_one_equals_torch() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 2, 8)
    for norm_first in (False, True):
        ours = TransformerEncoderLayer(8, 2, 16, 1, norm_first=norm_first)  # an int rate too
        ref = nn.TransformerEncoderLayer(8, 2, 16, 1.0, norm_first=norm_first)
        ref.load_state_dict(ours.torch_state_dict())
        assert _dropouts(ours) == [1, 1, 1] and ours.self_attn.dropout == 1
        assert close(ours(x), ref(x))  # training: every branch output is dropped
    assert _dropouts(TransformerEncoderLayer(8, 2, 16, 0.0)) == [0.0] * 3


def test_masks_take_the_input_dtype() -> None:
    """Bool masks become additive masks, and float masks are cast, in the input's dtype."""
    torch.manual_seed(0)
    attn = SelfAttention(8, 2, dtype=torch.float64)
    ref = _mha_like(attn, batch_first=True).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    want = ref(x, x, x, key_padding_mask=padding, need_weights=False)[0]
    assert close(attn(x, key_padding_mask=padding), want)
    as_float = torch.zeros(2, 5, dtype=torch.float32).masked_fill(padding, float("-inf"))
    assert close(attn(x, key_padding_mask=as_float), want)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    want = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
    assert close(attn(x, attn_mask=causal), want)
    causal_attn = SelfAttention(8, 2, causal=True, dtype=torch.float64)
    causal_attn.load_state_dict(attn.state_dict())
    both = ref(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=False)[0]
    assert close(causal_attn(x, key_padding_mask=padding), both)
    single = SelfAttention(8, 2)
    single.load_state_dict(attn.state_dict())  # float32 now: the float64 mask is cast down
    out = single(x.float(), key_padding_mask=as_float.double(), attn_mask=causal.double() * -1e9)
    both32 = ref.float()(
        x.float(), x.float(), x.float(), attn_mask=causal, key_padding_mask=padding
    )
    assert out.dtype == torch.float32 and close(out, both32[0])


def test_function_activations_are_named_in_the_repr() -> None:
    assert FeedForward(4, 8, activation=torch.tanh).activation.extra_repr() == "tanh"
    leaky = functools.partial(F.leaky_relu, negative_slope=0.2)
    assert FeedForward(4, 8, activation=leaky).activation.extra_repr() == repr(leaky)


def test_to_torch_keeps_the_dtype_and_lstm_keeps_its_width() -> None:
    layer = TransformerEncoderLayer(8, 2, 16, dtype=torch.float64, bias=False)
    ref = layer.to_torch()
    assert ref.linear1.weight.dtype == torch.float64 and ref.linear1.bias is None
    assert ResidualLSTM(4, 6, 2).hidden_size == 6


def _leaves(model: nn.Module) -> tuple[torch.fx.GraphModule, set[str]]:
    gm = torch.fx.symbolic_trace(model)
    calls = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
    return gm, calls


def test_the_shape_dependent_helpers_are_fx_leaves() -> None:
    """Each helper that reads a shape or an optional input is one call in a traced graph."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    attn = SelfAttention(8, 2).eval()
    gm, calls = _leaves(attn)
    assert {"check_sequence", "split_heads", "sdpa_mask", "merge_heads", "restore_layout"} <= calls
    assert close(gm(x), attn(x))
    value = ValueResidualAttention(SelfAttention(8, 2)).eval()
    gm, calls = _leaves(value)
    first = torch.randn(2, 2, 5, 4)
    assert "_check_values" in calls and close(gm(x, first)[0], value(x, first)[0])
    layer = TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    gm, calls = _leaves(layer)
    assert "_check_src" in calls and close(gm(x), layer(x))
    lm = CausalTransformerLM(5, 8, 2, 1, max_len=6).eval()
    gm, calls = _leaves(lm)
    idx = torch.tensor([[1, 2, 3], [4, 0, 1]])
    assert "_check_token_ids" in calls and close(gm(idx), lm(idx))
    net = cifar_resnet(8).eval()
    gm, calls = _leaves(net)
    images = torch.randn(1, 3, 8, 8)
    assert "check_images" in calls and close(gm(images), net(images))
    mixer = MLPMixer(8, 4, 1, dim=4, depth=1).eval()
    gm, calls = _leaves(mixer)
    images = torch.randn(2, 1, 8, 8)
    assert {"_rearrange", "_reduce", "_check_mixer_images"} <= calls
    assert close(gm(images), mixer(images))
    lstm = ResidualLSTM(4, 4, 2)
    gm, calls = _leaves(lstm)
    seq = torch.randn(2, 3, 4)
    assert "_layer_state" in calls and close(gm(seq)[0], lstm(seq)[0])


TORCHVISION_ARCHITECTURES = {
    "resnet18": ("basic", [2, 2, 2, 2], {}),
    "resnet34": ("basic", [3, 4, 6, 3], {}),
    "resnet50": ("bottleneck", [3, 4, 6, 3], {}),
    "resnet101": ("bottleneck", [3, 4, 23, 3], {}),
    "resnet152": ("bottleneck", [3, 8, 36, 3], {}),
    "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "wide_resnet50_2": ("bottleneck", [3, 4, 6, 3], {"width_per_group": 128}),
}


@pytest.mark.parametrize("name", list(TORCHVISION_ARCHITECTURES))
def test_factories_build_torchvisions_architectures(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each factory asks for torchvision's block, stage depths and widths, 1000 classes by
    default, and passes the options on (recorded instead of building the big nets)."""
    from residual.models import resnet as resnet_module

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(resnet_module, "ResNet", lambda *args, **kw: calls.append((args, kw)))
    factory = getattr(resnet_module, name)
    block, layers, options = TORCHVISION_ARCHITECTURES[name]
    factory()
    factory(7, drop_path=0.1)
    assert calls == [
        ((block, layers, 1000), options),
        ((block, layers, 7), {**options, "drop_path": 0.1}),
    ]


# --- conversions to and from torch's layer ------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "want"),
    [(F.relu, F.relu), ("relu", F.relu), (nn.ReLU(), F.relu), ("gelu", F.gelu), (F.gelu, F.gelu)],
    ids=["F.relu", "relu", "ReLU", "gelu", "F.gelu"],
)
def test_to_torch_gives_torchs_own_activation(activation: Any, want: Any) -> None:
    ref = TransformerEncoderLayer(8, 2, 16, activation=activation).to_torch()
    assert ref.activation is want  # what torch's constructor stores for these
    assert ref.activation_relu_or_gelu == (1 if want is F.relu else 2)


def test_to_torch_keeps_an_approximate_gelu() -> None:
    ref = TransformerEncoderLayer(8, 2, 16, activation=nn.GELU(approximate="tanh")).to_torch()
    assert isinstance(ref.activation, nn.GELU) and ref.activation.approximate == "tanh"
    x = torch.randn(3, 8)
    torch.testing.assert_close(ref.activation(x), F.gelu(x, approximate="tanh"))


def test_to_torch_and_from_torch_build_on_the_weights_device() -> None:
    ours = TransformerEncoderLayer(8, 2, 16, device="meta")
    assert {p.device.type for p in ours.to_torch().parameters()} == {"meta"}
    ref = nn.TransformerEncoderLayer(8, 2, 16, device="meta")
    assert {p.device.type for p in TransformerEncoderLayer.from_torch(ref).parameters()} == {"meta"}


class ScaledLayer(nn.TransformerEncoderLayer):
    """A subclass of torch's layer with one more parameter, which ours has no place for."""

    def __init__(self) -> None:
        super().__init__(8, 2, 16)
        self.scale = nn.Parameter(torch.ones(()))


def test_conversions_refuse_to_drop_or_invent_weights() -> None:
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*\"scale\""):
        TransformerEncoderLayer.from_torch(ScaledLayer())
    ours = TransformerEncoderLayer(8, 2, 16, norm_first=True)
    ours.self_attn_block.fn.norm = nn.LayerNorm(8, bias=False)  # torch's layer has a norm1 bias
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*\"norm1.bias\""):
        ours.to_torch()


@pytest.mark.parametrize("preact", [False, True], ids=["original", "preact"])
def test_cifar_resnet_relus_outside_the_blocks_run_in_place(preact: bool) -> None:
    # as torchvision's stem: the activation overwrites the norm's output, no second buffer
    model = cifar_resnet(8, preact=preact)
    relu = model.relu_final if preact else model.relu
    assert isinstance(relu, nn.ReLU) and relu.inplace


def test_bool_masks_become_additive_in_the_layers_dtype_and_device() -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=torch.double)
    ours = TransformerEncoderLayer.from_torch(ref).eval()
    x = torch.randn(2, 5, 8, dtype=torch.double)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = ours(x, src_mask=mask, src_key_padding_mask=padding)
    assert out.dtype == torch.double
    torch.testing.assert_close(out, ref.eval()(x, src_mask=mask, src_key_padding_mask=padding))
    meta = TransformerEncoderLayer(8, 2, 16, batch_first=True, device="meta")
    out = meta(x.to("meta"), src_mask=mask.to("meta"), src_key_padding_mask=padding.to("meta"))
    assert out.device.type == "meta"


def test_per_head_bool_masks_in_double() -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=torch.double)
    ours = TransformerEncoderLayer.from_torch(ref).eval()
    x = torch.randn(2, 5, 8, dtype=torch.double)
    mask = torch.rand(4, 5, 5) < 0.3  # (N * nhead, L, L)
    mask[..., 0] = False  # every query keeps a key
    out = ours(x, src_mask=mask)
    assert out.dtype == torch.double
    torch.testing.assert_close(out, ref.eval()(x, src_mask=mask))


def test_a_causal_attention_adds_the_causal_mask_to_the_given_masks() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(8, 2, causal=True).eval()
    x = torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False, False, True, False, True]])
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    mha = _mha_like(attn, True).eval()
    want = mha(x, x, x, key_padding_mask=padding, attn_mask=causal)[0]
    torch.testing.assert_close(attn(x, key_padding_mask=padding), want)
    extra = torch.zeros(5, 5).index_fill_(1, torch.tensor([1]), -2.0)  # a float mask too
    want = mha(x, x, x, attn_mask=extra.masked_fill(causal, float("-inf")))[0]
    torch.testing.assert_close(attn(x, attn_mask=extra), want)
    meta = SelfAttention(8, 2, causal=True, device="meta")
    out = meta(x.to("meta"), key_padding_mask=padding.to("meta"))
    assert out.device.type == "meta"


def test_encoder_layer_defaults_are_torchs() -> None:
    ours, ref = TransformerEncoderLayer(8, 2), nn.TransformerEncoderLayer(8, 2)
    assert ours.linear1.out_features == ref.linear1.out_features == 2048
    assert (ours.dropout1.p, ours.dropout.p, ours.dropout2.p) == (0.1, 0.1, 0.1)
    assert (ours.batch_first, ours.norm_first, ours.activation_relu_or_gelu) == (False, False, 1)
    assert ours.norm1.eps == ours.norm2.eps == ref.norm1.eps
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours.to_torch().state_dict(), ref.state_dict())


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_eps_reaches_both_norms(norm_first: bool) -> None:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"dropout": 0.0, "layer_norm_eps": 0.5, "norm_first": norm_first}
    ref = nn.TransformerEncoderLayer(8, 2, 16, **kwargs).eval()
    ours = TransformerEncoderLayer.from_torch(ref).eval()
    assert ours.norm1.eps == ours.norm2.eps == 0.5
    x = torch.randn(5, 2, 8) * 0.3  # small activations: eps 0.5 changes the norms' outputs
    torch.testing.assert_close(ours(x), ref(x))
    fresh = TransformerEncoderLayer(8, 2, 16, **kwargs).eval()
    fresh.load_state_dict(ref.state_dict())
    torch.testing.assert_close(fresh(x), ref(x))


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_avg_down_pools_every_downsampling_shortcut(block: str) -> None:
    # timm's avg_down ("-d" nets): the first block of every stage whose shape changes gets
    # pool -> 1x1 conv -> norm, an identity pool at stride 1 (layer1 of a bottleneck net)
    model = ResNet(block, [1, 1, 1, 1], avg_down=True)
    firsts = [model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0]]
    first = "IdentityShortcut" if block == "basic" else "PooledProjectionShortcut"
    assert [type(b.shortcut).__name__ for b in firsts] == [first] + ["PooledProjectionShortcut"] * 3


def test_resnet_stem_relu_runs_in_place() -> None:
    model = ResNet("basic", [1, 1, 1, 1])
    assert isinstance(model.relu, nn.ReLU) and model.relu.inplace  # as torchvision's
