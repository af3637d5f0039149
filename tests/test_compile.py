"""torch.compile(fullgraph=True): no graph break, same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import MySelfAttention
from residual import Bottleneck, Residual, ResidualBlock


def _cases() -> list:
    return [
        pytest.param(lambda: ResidualBlock(8, 16, stride=2), (2, 8, 7, 7), {}, id="ResidualBlock"),
        pytest.param(lambda: Bottleneck(16, 4), (2, 16, 6, 6), {}, id="Bottleneck"),
        pytest.param(
            lambda: Residual(
                nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
            ),
            (4, 16),
            {},
            id="mlp",
        ),
        pytest.param(
            lambda: Residual(MySelfAttention(16, 4)), (2, 5, 16), {"mask": True}, id="attention"
        ),
    ]


@pytest.mark.parametrize(("build", "shape", "opts"), _cases())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_forward_backward(build, shape, opts, train) -> None:
    torch._dynamo.reset()
    eager = build().train(train)
    compiled = torch.compile(eager, fullgraph=True)
    x = torch.randn(shape)
    kwargs = {}
    if opts.get("mask"):
        mask = torch.zeros(shape[0], shape[1], dtype=torch.bool)
        mask[:, -1] = True
        kwargs["key_padding_mask"] = mask
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_model = copy.deepcopy(eager)  # own parameters and BatchNorm statistics
    ya = ref_model(xa, **kwargs)
    yb = compiled(xb, **kwargs)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(ref_model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-4, msg=name)


def _zoo() -> list:
    from residual.models import (
        MLPMixer,
        ResidualMLP,
        TransformerEncoderLayer,
        cifar_resnet,
        gpt_block,
        resnet18,
        resnet50,
    )

    return [
        pytest.param(lambda: cifar_resnet(20), (2, 3, 16, 16), id="cifar_resnet20"),
        pytest.param(
            lambda: cifar_resnet(20, preact=True, drop_path=0.1),
            (2, 3, 16, 16),
            id="cifar_preact-drop",
        ),
        pytest.param(resnet18, (2, 3, 64, 64), id="resnet18"),
        pytest.param(lambda: resnet50(avg_down=True), (2, 3, 64, 64), id="resnet50-D"),
        pytest.param(
            lambda: TransformerEncoderLayer(16, 4, 32, batch_first=True),
            (2, 5, 16),
            id="TransformerEncoderLayer",
        ),
        pytest.param(lambda: gpt_block(16, 2), (2, 5, 16), id="gpt_block"),
        pytest.param(lambda: ResidualMLP(16, 4, dim=16, depth=2), (3, 16), id="ResidualMLP"),
        pytest.param(lambda: MLPMixer(8, 2, 1, dim=16, depth=2), (2, 1, 8, 8), id="MLPMixer"),
    ]


@pytest.mark.parametrize(("build", "shape"), _zoo())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_every_zoo_model_traces_without_graph_breaks(build, shape, train) -> None:
    """fullgraph=True with dynamo alone (backend="eager"): a graph break raises here."""
    torch._dynamo.reset()
    model = build().train(train)
    x = torch.randn(shape)
    out = torch.compile(model, fullgraph=True, backend="eager")(x)
    if train:
        out.float().sum().backward()
    else:  # the traced graph computes what eager does
        torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)


def test_causal_lm_traces_without_graph_breaks() -> None:
    from residual.models import CausalTransformerLM

    torch._dynamo.reset()
    lm = CausalTransformerLM(20, 16, 2, 2, 8)
    idx = torch.randint(0, 20, (2, 8))
    out = torch.compile(lm, fullgraph=True, backend="eager")(idx)
    out.sum().backward()
    lm.eval()
    compiled = torch.compile(lm, fullgraph=True, backend="eager")(idx)
    torch.testing.assert_close(compiled, lm(idx), atol=1e-6, rtol=1e-5)


def test_lstm_models_break_the_graph_by_design() -> None:
    """Dynamo refuses nn.LSTM with fullgraph=True; ResidualLSTM says so in its docs."""
    from residual.models import ResidualLSTM

    torch._dynamo.reset()
    model = ResidualLSTM(4, 4, 2)
    try:
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(2, 3, 4))
    except Exception as e:  # the refusal this test documents
        assert "LSTM" in str(e) or "RNN" in str(e) or "graph break" in str(e).lower()
    else:  # a torch that learns to trace LSTMs: then the docs' caveat can go
        pytest.skip("this torch traces nn.LSTM without graph breaks")
    assert "fullgraph=True" in (ResidualLSTM.__doc__ or "")


def _checkpointed_mlp(p: float) -> Residual:
    branch = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(p), nn.Tanh())
    return Residual(branch, checkpoint=True)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "breaks-allowed"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_checkpointed_branch_compiles_and_matches_eager(backend: str, fullgraph: bool) -> None:
    """Outputs, gradients and BatchNorm statistics equal the plain (unchecked) eager block's.

    Dropout is on where the compiled graph draws eager's random numbers (inductor draws its own).
    Before: "eager" raised autograd's in-place error (the counter), inductor refused the context.
    """
    torch._dynamo.reset()
    model = _checkpointed_mlp(0.0 if backend == "inductor" else 0.3)
    plain = copy.deepcopy(model)
    plain.checkpoint = False
    compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)
    for step in range(3):
        x = torch.randn(8, 6)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)
        ya = plain(xa)
        ya.square().sum().backward()
        torch.manual_seed(step)
        yb = compiled(xb)
        yb.square().sum().backward()
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), b in zip(plain.named_buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=name)
    assert int(model.fn[1].num_batches_tracked) == 3  # once per step, not twice


def test_checkpointed_branch_is_one_recomputed_region_when_compiled() -> None:
    """Dynamo keeps the checkpoint: the branch is a region AOTAutograd recomputes in backward."""
    torch._dynamo.reset()
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    model = _checkpointed_mlp(0.0)
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(8, 6, requires_grad=True))
    (graph,) = graphs
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert any("tag_activation_checkpoint" in t for t in targets), targets


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_checkpoint_replays_the_dropout_mask(backend: str) -> None:
    """The recomputation uses the forward's mask: the gradient of ``x + drop(W x)`` by hand."""
    torch._dynamo.reset()
    block = Residual(nn.Sequential(nn.Linear(6, 6, bias=False), nn.Dropout(0.5)), checkpoint=True)
    x = torch.randn(16, 6, requires_grad=True)
    y = torch.compile(block, backend=backend, fullgraph=True)(x)
    y.sum().backward()
    kept = ((y - x) != 0).detach().to(x.dtype)  # the mask the forward drew (times 1 / keep)
    weight = block.fn[0].weight
    torch.testing.assert_close(x.grad, 1 + (2 * kept) @ weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, (2 * kept).T @ x.detach(), atol=1e-5, rtol=1e-5)
