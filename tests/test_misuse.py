"""The misuse catalogue: each mistake a user can make, the exception it raises and what the
message must say (the problem and the fix). ``docs/errors.md`` is generated from this table:

    python tests/test_misuse.py > docs/errors.md
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from conftest import MySelfAttention
from residual import (
    HighwayGate,
    LayerScale,
    ProjectionShortcut,
    Residual,
    ResidualBlock,
    ResidualError,
    ReZero,
    ZeroPadShortcut,
    apply_drop_schedule,
)
from residual.drop import linear_drop_rates
from residual.hyper import hyper_residual
from residual.merges import deepnorm_scales
from residual.models import (
    MLPMixer,
    ResidualLSTM,
    ResNet,
    TransformerEncoderLayer,
    cifar_resnet,
    load_torchvision,
    resnet18,
    resnet50,
)
from residual.reversible import Reversible
from residual.shortcuts import resolve_shortcut


@dataclass(frozen=True)
class Misuse:
    id: str
    mistake: str
    run: Callable[[], object]
    exc: type[Exception]
    match: str


class ReturnsDict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x}


class ReturnsNone(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class ReturnsList(nn.Module):
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]


class ConvNeXtLike(nn.Module):
    """A conv branch with its own forward: its output layout cannot be read."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(x)


class Squeeze(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)


def _lstm_batch_drop() -> object:
    block = Residual(nn.LSTM(4, 4, batch_first=True), drop_path=0.5, drop_mode="batch")
    for _ in range(50):  # the first kept draw runs the branch and finds the tuple
        block(torch.randn(2, 3, 4))
    return None


x4 = torch.randn(2, 4)
CATALOGUE: list[Misuse] = [
    Misuse(
        "fn-none",
        "a branch that is not a module (None)",
        lambda: Residual(None),
        TypeError,
        "fn must be a torch.nn.Module, got NoneType",
    ),
    Misuse(
        "fn-lambda",
        "a plain function or lambda as the branch",
        lambda: Residual(lambda x: x),
        TypeError,
        "wrap a function in an nn.Module",
    ),
    Misuse(
        "fn-class",
        "a module class instead of an instance as the branch",
        lambda: Residual(nn.Linear),
        TypeError,
        r"fn must be a module instance, got the class nn.Linear; create one first: Residual\(nn.Linear\(\.\.\.\)\)",
    ),
    Misuse(
        "post-class",
        "a module class as post",
        lambda: Residual(nn.Linear(4, 4), post=nn.ReLU),
        TypeError,
        r"create one first: Residual\(\.\.\., post=nn.ReLU\(\.\.\.\)\)",
    ),
    Misuse(
        "shortcut-class",
        "a module class as the shortcut",
        lambda: Residual(nn.Linear(4, 4), shortcut=nn.Identity),
        TypeError,
        r"shortcut must be a module instance, got the class nn.Identity",
    ),
    Misuse(
        "hyper-class",
        "a module class as a hyper-connected branch",
        lambda: hyper_residual(nn.Linear, 2, 4),
        TypeError,
        r"create one first: hyper_residual\(nn.Linear\(\.\.\.\)\)",
    ),
    Misuse(
        "reversible-class",
        "a module class as one of a reversible block's functions",
        lambda: Reversible(nn.Linear(2, 2), nn.Linear),
        TypeError,
        r"Reversible: g must be a module instance, got the class nn.Linear",
    ),
    Misuse(
        "post-function",
        "a function as post",
        lambda: Residual(nn.Linear(4, 4), post=torch.relu),
        TypeError,
        "post must be a torch.nn.Module",
    ),
    Misuse(
        "merge-function",
        "a function as merge",
        lambda: Residual(nn.Linear(4, 4), merge=torch.add),
        TypeError,
        "merge must be a torch.nn.Module",
    ),
    Misuse(
        "unknown-shortcut",
        "a misspelt shortcut name",
        lambda: Residual(nn.Linear(4, 4), "projektion"),
        ResidualError,
        "unknown shortcut 'projektion'; valid names are identity, projection, zero_pad",
    ),
    Misuse(
        "shortcut-type",
        "a shortcut that is neither a name nor a module",
        lambda: Residual(nn.Linear(4, 4), 3),
        TypeError,
        "shortcut must be a name",
    ),
    Misuse(
        "identity-on-widening",
        "an identity shortcut beside a branch that changes channels",
        lambda: Residual(nn.Linear(4, 8))(torch.randn(2, 4)),
        ResidualError,
        r"\(2, 8\) does not match shortcut output \(2, 4\).*\"projection\".*"
        r"ProjectionShortcut\(4, 8, stride=1, layout='channels_last'\)",
    ),
    Misuse(
        "identity-on-stride",
        "an identity shortcut beside a strided conv",
        lambda: Residual(nn.Conv2d(4, 4, 3, stride=2, padding=1))(torch.randn(2, 4, 8, 8)),
        ResidualError,
        "stride=2",
    ),
    Misuse(
        "projection-unknown-dims",
        "a named shortcut beside a branch whose channels cannot be read",
        lambda: Residual(nn.ReLU(), "projection"),
        ResidualError,
        "needs the branch's channels and stride.*ProjectionShortcut",
    ),
    Misuse(
        "zero-pad-shrinks",
        "zero-padding asked to reduce channels",
        lambda: ZeroPadShortcut(32, 16),
        ResidualError,
        "cannot shrink 32 channels to 16.*projection",
    ),
    Misuse(
        "zero-pad-shrinks-inferred",
        "zero_pad beside a branch that reduces channels",
        lambda: Residual(nn.Linear(8, 4), "zero_pad"),
        ResidualError,
        "cannot shrink 8 channels to 4",
    ),
    Misuse(
        "zero-channels",
        "a channel count of 0",
        lambda: ResidualBlock(0, 16),
        ResidualError,
        "in_channels must be a positive int, got 0",
    ),
    Misuse(
        "negative-channels",
        "a negative channel count",
        lambda: ResidualBlock(16, -4),
        ResidualError,
        "out_channels must be a positive int, got -4",
    ),
    Misuse(
        "zero-stride",
        "a stride of 0",
        lambda: ResidualBlock(16, 16, stride=0),
        ResidualError,
        "stride must be a positive int, got 0",
    ),
    Misuse(
        "float-stride",
        "a fractional stride",
        lambda: ResidualBlock(16, 16, stride=1.5),
        TypeError,
        "stride must be an int, got float",
    ),
    Misuse(
        "bad-layout",
        "an unknown layout name",
        lambda: ProjectionShortcut(4, 8, layout="NHWC"),
        ResidualError,
        "unknown layout 'NHWC'; use 'channels_first'",
    ),
    Misuse(
        "bad-spatial-dims",
        "a 4-d convolution asked of a shortcut",
        lambda: ProjectionShortcut(4, 8, spatial_dims=4),
        ResidualError,
        "spatial_dims must be 1, 2 or 3",
    ),
    Misuse(
        "resolver-no-dims",
        "resolving 'projection' without channel counts",
        lambda: resolve_shortcut("projection"),
        ResidualError,
        "needs in_channels and out_channels",
    ),
    Misuse(
        "pooled-channels-last",
        "the ResNet-D shortcut on a channel-last stream",
        lambda: resolve_shortcut(
            "pooled_projection", in_channels=2, out_channels=4, layout="channels_last"
        ),
        ResidualError,
        "channel-first only; use 'projection'",
    ),
    Misuse(
        "rate-above-one",
        "a drop rate above 1",
        lambda: Residual(nn.Linear(4, 4), drop_path=1.5),
        ResidualError,
        r"drop_path must be in \[0, 1\], got 1.5; 0 disables stochastic depth and 1 drops",
    ),
    Misuse(
        "rate-negative",
        "a negative drop rate",
        lambda: Residual(nn.Linear(4, 4), drop_path=-0.1),
        ResidualError,
        r"must be in \[0, 1\]",
    ),
    Misuse(
        "scale-by-keep-string",
        "scale_by_keep given as a string",
        lambda: Residual(nn.Linear(4, 4), drop_path=0.1, scale_by_keep="False"),  # type: ignore[arg-type]
        TypeError,
        "scale_by_keep must be True or False, got 'False'",
    ),
    Misuse(
        "rate-string",
        "a drop rate given as a string",
        lambda: Residual(nn.Linear(4, 4), drop_path="0.1"),
        TypeError,
        "drop_path must be a float",
    ),
    Misuse(
        "bad-drop-mode",
        "an unknown drop mode",
        lambda: Residual(nn.Linear(4, 4), drop_path=0.1, drop_mode="rows"),
        ResidualError,
        "unknown drop_mode 'rows'; valid modes are row, batch, subset",
    ),
    Misuse(
        "layerscale-dim",
        "a LayerScale built for other channels than the branch outputs",
        lambda: Residual(nn.Linear(4, 8), "projection", merge=LayerScale(4)),
        ResidualError,
        r"^Residual: merge LayerScale was built for 4 channels \(channels_last\) but the "
        r"branch outputs 8 \(channels_last\); build it with LayerScale\(8, "
        r"layout='channels_last'\)$",
    ),
    Misuse(
        "gate-dim-at-call",
        "a gate whose channels differ from the stream's",
        lambda: Residual(nn.Identity(), merge=HighwayGate(8))(torch.randn(2, 6)),
        ResidualError,
        r"^HighwayGate: built for 8 channels \(layout not set: read as channels_last\), got a "
        r"branch output of shape \(2, 6\); if its channels are last \(\.\.\., C\), build it as "
        r"HighwayGate\(6, layout='channels_last'\)$",
    ),
    Misuse(
        "layerscale-layout",
        "LayerScale on a channel-first tensor its block cannot read the layout of",
        lambda: Residual(nn.Identity(), merge=LayerScale(4))(torch.randn(2, 4, 3, 3)),
        ResidualError,
        r"if its channels are at dim 1 \(N, C, \*spatial: a conv branch\), build it as "
        r"LayerScale\(4, layout='channels_first'\); if its channels are last",
    ),
    Misuse(
        "layerscale-opaque-conv",
        "a LayerScale without a layout beside a conv branch with a custom forward",
        lambda: Residual(ConvNeXtLike(), merge=LayerScale(4)),
        ResidualError,
        r"^Residual: merge LayerScale\(4\) has no layout, and the branch ConvNeXtLike holds "
        r"convolutions but its output layout cannot be read \(a custom forward\); build it with "
        r"LayerScale\(4, layout='channels_first'\) for \(N, C, \*spatial\) outputs, or "
        r"LayerScale\(4, layout='channels_last'\) for \(\.\.\., C\)$",
    ),
    Misuse(
        "merge-no-channel-dim",
        "a channel-first LayerScale on a branch output with no channel dim 1",
        lambda: LayerScale(4, layout="channels_first")(torch.randn(4), torch.randn(4)),
        ResidualError,
        r"^LayerScale: built for 4 channels \(channels_first\), got a branch output of shape "
        r"\(4,\); give it a channel dim or fix the layout$",
    ),
    Misuse(
        "call-with-list",
        "calling a block with a list instead of a tensor",
        lambda: Residual(nn.Linear(4, 4))([1.0, 2.0]),
        TypeError,
        "first argument must be the main tensor, got list",
    ),
    Misuse(
        "call-with-none",
        "calling a block with no tensor",
        lambda: Residual(nn.Linear(4, 4))(None),
        TypeError,
        "got NoneType",
    ),
    Misuse(
        "integer-input",
        "integer inputs (token ids) into a residual",
        lambda: Residual(nn.Identity())(torch.arange(4)),
        TypeError,
        "must be floating point, got torch.int64",
    ),
    Misuse(
        "branch-returns-dict",
        "a branch returning a dict",
        lambda: Residual(ReturnsDict())(x4),
        TypeError,
        "returned dict; it must return a tensor, or a tuple",
    ),
    Misuse(
        "branch-returns-none",
        "a branch returning None",
        lambda: Residual(ReturnsNone())(x4),
        TypeError,
        "returned NoneType",
    ),
    Misuse(
        "checkpoint-returns-list",
        "checkpoint=True with a branch returning a list",
        lambda: Residual(ReturnsList(), checkpoint=True)(x4.requires_grad_()),
        TypeError,
        "returned list",
    ),
    Misuse(
        "shape-mismatch",
        "a branch that changes the shape beside an explicit identity",
        lambda: Residual(nn.Conv2d(8, 16, 3, stride=2, padding=1), shortcut=nn.Identity())(
            torch.randn(2, 8, 8, 8)
        ),
        ResidualError,
        r"branch output \(2, 16, 4, 4\) does not match shortcut output \(2, 8, 8, 8\).*stride=2",
    ),
    Misuse(
        "broadcast",
        "a branch whose output would broadcast against the input",
        lambda: Residual(Squeeze())(torch.randn(4, 3)),
        ResidualError,
        r"\(4, 1\) does not match shortcut output \(4, 3\)",
    ),
    Misuse(
        "wrong-layout-at-call",
        "a channel-last tensor into a channel-first shortcut",
        lambda: ProjectionShortcut(8, 16)(torch.randn(2, 5, 5, 8)),
        ResidualError,
        r"expected 8 channels at dim 1 \(channels_first\), got input of shape \(2, 5, 5, 8\)",
    ),
    Misuse(
        "subset-with-args",
        "drop_mode='subset' with extra per-call arguments",
        lambda: Residual(MySelfAttention(4, 1), drop_path=0.2, drop_mode="subset")(
            torch.randn(2, 3, 4), key_padding_mask=torch.zeros(2, 3, dtype=torch.bool)
        ),
        ResidualError,
        "subset.*use drop_mode='row' or 'batch'",
    ),
    Misuse(
        "batch-drop-tuple-branch",
        "drop_mode='batch' around a branch returning a tuple",
        _lstm_batch_drop,
        TypeError,
        "returns a tuple.*use drop_mode='row'",
    ),
    Misuse(
        "schedule-no-residual",
        "a drop schedule on a model with no Residual",
        lambda: apply_drop_schedule(nn.Linear(2, 2), 0.1),
        ResidualError,
        "holds no Residual",
    ),
    Misuse(
        "schedule-no-blocks",
        "linear drop rates for zero blocks",
        lambda: linear_drop_rates(0.1, 0),
        ResidualError,
        "num_blocks must be >= 1",
    ),
    Misuse(
        "deepnorm-no-layers",
        "DeepNorm scales for no layers",
        lambda: deepnorm_scales(),
        ResidualError,
        "give a positive encoder_layers",
    ),
    Misuse(
        "cifar-depth",
        "a CIFAR depth not of the form 6n + 2",
        lambda: cifar_resnet(51),
        ResidualError,
        r"depth must be 6n \+ 2 .* got 51; the nearest valid depth is 50",
    ),
    Misuse(
        "unknown-architecture",
        "an unknown ResNet block kind",
        lambda: ResNet("basik", [2, 2, 2, 2]),
        ResidualError,
        "block must be 'basic' or 'bottleneck', got 'basik'",
    ),
    Misuse(
        "bad-layers",
        "a ResNet with the wrong number of stages",
        lambda: ResNet("basic", [2, 2, 2]),
        ResidualError,
        "layers must be 4 positive block counts",
    ),
    Misuse(
        "basic-groups",
        "groups or a width on a basic-block ResNet (resnet18/34)",
        lambda: resnet18(groups=2),
        ResidualError,
        "BasicBlock only supports groups=1 and base_width=64, got groups=2.*use a bottleneck",
    ),
    Misuse(
        "basic-dilation",
        "a dilated stage of basic blocks",
        lambda: ResNet("basic", [2, 2, 2, 2], replace_stride_with_dilation=[False, False, True]),
        NotImplementedError,
        r"Dilation > 1 not supported in BasicBlock .*dilate a bottleneck net",
    ),
    Misuse(
        "dilation-length",
        "replace_stride_with_dilation for all four stages",
        lambda: resnet50(replace_stride_with_dilation=[False, False, True, True]),
        ResidualError,
        r"3-element tuple, got \[False, False, True, True\]; one bool per stage 2-4",
    ),
    Misuse(
        "other-architecture-weights",
        "resnet50 weights loaded into a resnet18",
        lambda: load_torchvision(resnet18(), _tv_state(resnet50)),
        ResidualError,
        "unexpected keys: .*same architecture",
    ),
    Misuse(
        "missing-weights",
        "a torchvision state_dict with a key missing",
        lambda: load_torchvision(resnet18(), _drop_key(_tv_state(resnet18), "fc.bias")),
        ResidualError,
        r"missing keys: fc\.bias",
    ),
    Misuse(
        "image-channels",
        "an image of the wrong channel count",
        lambda: resnet18()(torch.randn(1, 1, 32, 32)),
        ResidualError,
        r"expected images of shape \(N, 3, H, W\), got \(1, 1, 32, 32\)",
    ),
    Misuse(
        "image-rank",
        "an image without its batch dimension",
        lambda: cifar_resnet(20)(torch.randn(3, 32, 32)),
        ResidualError,
        "add a batch dim with x.unsqueeze",
    ),
    Misuse(
        "nhead",
        "a head count that does not divide d_model",
        lambda: TransformerEncoderLayer(16, 3),
        ResidualError,
        "nhead=3 must divide d_model=16",
    ),
    Misuse(
        "nested-tensor-input",
        "a nested tensor given to the Transformer layer",
        lambda: TransformerEncoderLayer(16, 4, 32, batch_first=True)(
            torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
        ),
        TypeError,
        "src_key_padding_mask",
    ),
    Misuse(
        "padding-mask-shape",
        "a key padding mask of the wrong shape",
        lambda: TransformerEncoderLayer(16, 4, 32)(
            torch.randn(2, 5, 16), src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)
        ),
        ResidualError,
        r"key_padding_mask of shape \(2, 4\) does not fit; expected",
    ),
    Misuse(
        "attn-mask-shape",
        "an attention mask of the wrong shape",
        lambda: TransformerEncoderLayer(16, 4, 32, batch_first=True)(
            torch.randn(2, 5, 16), src_mask=torch.zeros(4, 4)
        ),
        ResidualError,
        r"attn_mask of shape \(4, 4\) does not fit; expected \(5, 5\)",
    ),
    Misuse(
        "lstm-residual-from",
        "a residual on an LSTM layer that changes width",
        lambda: ResidualLSTM(10, 16, residual_from=0),
        ResidualError,
        "layer 0 maps 10 -> 16",
    ),
    Misuse(
        "lstm-drop-path-no-residual",
        "stochastic depth on an LSTM stack with no residual layer",
        lambda: ResidualLSTM(8, 8, num_layers=2, residual_from=2, drop_path=0.1),
        ResidualError,
        "drop_path=0.1 needs a residual layer, but residual_from=2 >= num_layers=2",
    ),
    Misuse(
        "zoo-drop-path-range",
        "a zoo model's drop_path outside [0, 1)",
        lambda: MLPMixer(8, 2, 1, drop_path=1.5),
        ResidualError,
        r"MLPMixer: drop_path must be in \[0, 1\), got 1.5",
    ),
    Misuse(
        "mixer-patch",
        "a patch size that does not divide the image",
        lambda: MLPMixer(8, 3, 1),
        ResidualError,
        "patch_size=3 must divide image_size=8",
    ),
    Misuse(
        "rezero-on-mismatch",
        "ReZero beside a widening branch with no shortcut to match",
        lambda: Residual(nn.Linear(4, 8), merge=ReZero())(torch.randn(2, 4)),
        ResidualError,
        r"\(2, 8\) does not match shortcut output \(2, 4\)",
    ),
]


def _tv_state(build: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    from residual.models import to_torchvision_state_dict

    return to_torchvision_state_dict(build())


def _drop_key(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    state.pop(key)
    return state


def test_catalogue_is_large_and_ids_are_unique() -> None:
    assert len(CATALOGUE) >= 30
    assert len({m.id for m in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("misuse", CATALOGUE, ids=lambda m: m.id)
def test_misuse_raises_a_teaching_error(misuse: Misuse) -> None:
    with pytest.raises(misuse.exc, match=misuse.match):
        misuse.run()


def test_docs_list_every_misuse() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    missing = [m.id for m in CATALOGUE if f"`{m.id}`" not in doc]
    assert not missing, f"docs/errors.md lacks {missing}; regenerate: python tests/test_misuse.py"


def render() -> str:
    lines = [
        "# Errors: the misuse catalogue",
        "",
        "Every mistake below raises early, with a message that names the problem and the fix.",
        "`ResidualError` subclasses `ValueError`. Generated from `tests/test_misuse.py`",
        "(`python tests/test_misuse.py > docs/errors.md`), where each row is also a test.",
        "",
        "| id | mistake | exception | message |",
        "| --- | --- | --- | --- |",
    ]
    for m in CATALOGUE:
        try:
            m.run()
            message = "(no error)"
        except Exception as e:  # the message as users see it
            message = str(e).replace("|", "\\|").replace("\n", " ")
            name = type(e).__name__
        lines.append(f"| `{m.id}` | {m.mistake} | {name} | {message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
