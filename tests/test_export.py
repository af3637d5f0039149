"""torch.export for every zoo model and the Residual kinds; ONNX through onnxruntime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import MySelfAttention
from residual import Residual, ResidualBlock
from residual.models import (
    CausalTransformerLM,
    MLPMixer,
    ResidualLSTM,
    ResidualMLP,
    TransformerEncoderLayer,
    cifar_resnet,
    gpt_block,
    resnet18,
    resnet50,
)

PADDING = torch.tensor([[False] * 5, [False, False, False, True, True]])


def _export_cases() -> list:
    return [
        pytest.param(
            lambda: cifar_resnet(20), (torch.randn(2, 3, 32, 32),), {}, id="cifar_resnet20"
        ),
        pytest.param(
            lambda: cifar_resnet(20, preact=True),
            (torch.randn(2, 3, 32, 32),),
            {},
            id="cifar_preact20",
        ),
        pytest.param(resnet18, (torch.randn(1, 3, 64, 64),), {}, id="resnet18"),
        pytest.param(
            lambda: resnet50(avg_down=True), (torch.randn(1, 3, 64, 64),), {}, id="resnet50-D"
        ),
        pytest.param(
            lambda: TransformerEncoderLayer(32, 4, 64, batch_first=True),
            (torch.randn(2, 5, 32),),
            {"src_key_padding_mask": PADDING},
            id="TransformerEncoderLayer",
        ),
        pytest.param(lambda: gpt_block(16, 2), (torch.randn(2, 5, 16),), {}, id="gpt_block"),
        pytest.param(
            lambda: CausalTransformerLM(20, 16, 2, 2, 8),
            (torch.randint(0, 20, (2, 8)),),
            {},
            id="CausalTransformerLM",
        ),
        pytest.param(lambda: ResidualLSTM(8, 8, 3), (torch.randn(2, 5, 8),), {}, id="ResidualLSTM"),
        pytest.param(
            lambda: ResidualMLP(16, 4, dim=16, depth=2), (torch.randn(3, 16),), {}, id="ResidualMLP"
        ),
        pytest.param(
            lambda: MLPMixer(8, 2, 1, dim=16, depth=2),
            (torch.randn(2, 1, 8, 8),),
            {},
            id="MLPMixer",
        ),
        pytest.param(
            lambda: Residual(
                nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            ),
            (torch.randn(3, 16),),
            {},
            id="Residual-mlp",
        ),
        pytest.param(
            lambda: Residual(MySelfAttention(16, 4)),
            (torch.randn(2, 5, 16),),
            {"key_padding_mask": PADDING},
            id="Residual-attention-mask-kwarg",
        ),
        pytest.param(
            lambda: Residual(nn.LSTM(8, 8, batch_first=True)),
            (torch.randn(2, 5, 8),),
            {},
            id="Residual-lstm-tuple",
        ),
        pytest.param(
            lambda: ResidualBlock(8, 16, 2, shortcut="zero_pad"),
            (torch.randn(2, 8, 7, 7),),
            {},
            id="ResidualBlock-zero-pad",
        ),
    ]


@pytest.mark.parametrize(("build", "args", "kwargs"), _export_cases())
def test_torch_export_in_eval(build, args, kwargs) -> None:
    model = build().eval()
    program = torch.export.export(model, args, kwargs)
    with torch.no_grad():
        expected = model(*args, **kwargs)
        got = program.module()(*args, **kwargs)
    # the whole output: for the LSTM, the passed-through states (h and c) survive export too
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        pytest.param(resnet18, (1, 3, 64, 64), id="resnet18"),
        pytest.param(lambda: cifar_resnet(20), (2, 3, 32, 32), id="cifar_resnet20"),
        pytest.param(
            lambda: TransformerEncoderLayer(32, 4, 64, batch_first=True),
            (2, 5, 32),
            id="TransformerEncoderLayer",
        ),
    ],
)
def test_onnx_export_runs_in_onnxruntime(build, shape, tmp_path) -> None:
    pytest.importorskip("onnx", reason="needs the 'onnx' extra: pip install -e '.[onnx]'")
    pytest.importorskip("onnxscript", reason="needs the 'onnx' extra: pip install -e '.[onnx]'")
    ort = pytest.importorskip(
        "onnxruntime", reason="needs the 'onnx' extra: pip install -e '.[onnx]'"
    )
    model = build().eval()
    x = torch.randn(shape)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert abs(torch.from_numpy(out) - expected).max() <= 1e-4


def _randomised(block: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and non-zero, so that the export is checked off the init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return block


def _stream_cases() -> list:
    from residual.hyper import frac_residual, hyper_residual, mhc_residual
    from residual.models import HyperPatchTransformer

    cases = []
    for dynamic in (False, True):
        kind = "dynamic" if dynamic else "static"
        for name, make in (("hyper", hyper_residual), ("mhc", mhc_residual)):
            cases.append(
                pytest.param(
                    lambda make=make, dynamic=dynamic: make(nn.Linear(8, 8), 3, 8, dynamic=dynamic),
                    (3 * 2, 5, 8),
                    id=f"{name}-{kind}",
                )
            )
            cases.append(
                pytest.param(
                    lambda make=make, dynamic=dynamic: make(
                        nn.Conv2d(8, 8, 1), 2, 8, dynamic=dynamic, layout="channels_first"
                    ),
                    (2 * 2, 8, 3, 3),
                    id=f"{name}-{kind}-channels_first",
                )
            )
        cases.append(
            pytest.param(
                lambda dynamic=dynamic: frac_residual(nn.Linear(8, 8), 4, 8, dynamic=dynamic),
                (2, 5, 8),
                id=f"frac-{kind}",
            )
        )
    cases.append(
        pytest.param(
            lambda: HyperPatchTransformer(2, d_model=16, layers=1), (2, 1, 8, 8), id="HyperPatch"
        )
    )
    return cases


@pytest.mark.parametrize(("build", "shape"), _stream_cases())
def test_torch_export_of_stream_layers_with_grad_enabled(build, shape) -> None:
    """``torch.export.export`` outside ``torch.no_grad`` (its default): a dynamic hyper-/mHC
    layer and HyperPatchTransformer failed with "mul(): functions with out=... arguments don't
    support automatic differentiation" (the token mix wrote its first product with ``out=``).
    The exported program computes what eager computes, and its gradients too."""
    model = _randomised(build())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.is_grad_enabled()
    program = torch.export.export(model, (x,))
    exported = program.module()
    torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)
    xe, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    exported(xe).square().sum().backward()
    model(xm).square().sum().backward()
    torch.testing.assert_close(xe.grad, xm.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["hyper", "mhc", "frac"])
def test_torch_export_of_stream_layers_with_a_padding_mask(kind: str) -> None:
    """The branch passes the mask on to fn (per sample, (N, L)), in the exported program too."""
    from residual.hyper import frac_residual, hyper_residual, mhc_residual

    make = {"hyper": hyper_residual, "mhc": mhc_residual, "frac": frac_residual}[kind]
    model = _randomised(make(MySelfAttention(16, 4), 2, 16))
    rows = 2 if kind == "frac" else 2 * 2
    x = torch.randn(rows, 5, 16, generator=torch.Generator().manual_seed(2))
    program = torch.export.export(model, (x,), {"key_padding_mask": PADDING})
    got = program.module()(x, key_padding_mask=PADDING)
    torch.testing.assert_close(got, model(x, key_padding_mask=PADDING), atol=1e-5, rtol=1e-5)
