"""torchvision's own tests of ``ops.StochasticDepth``, run on ours.

Source: pytorch/vision ``test/test_ops.py``, class ``TestStochasticDepth`` (each test names
it). torchvision's ``StochasticDepth(p, mode)`` is a module applied to a branch's output before
the user's add (``result = self.stochastic_depth(result); result += input``); ours is the same
drop inside ``Residual(branch, drop_path=p, drop_mode=mode)``, with the same modes ``"row"`` and
``"batch"``. torchvision cannot be imported here, so two stand-ins (the smallest ones) replace
its names: ``StochasticDepth`` reads our drop back as torchvision's module
(``Residual(nn.Identity(), ...)(x) - x`` is the dropped branch output), and
``get_graph_node_names`` lists the nodes of a ``torch.fx`` trace. The statistical test keeps
torchvision's seeds, sizes and threshold; it calls ``scipy.stats.binomtest`` (torchvision's
current spelling; older releases called the removed ``binom_test``).

Deliberate differences (each test below is marked with the reason):

* ``LEAF``: torchvision registers ``StochasticDepth`` as a leaf of its FX feature-extraction
  tracer, so a model's graph shows one node for it. ``Residual`` is traced through on purpose:
  its parts (branch, shortcut, merge, the drop) are graph nodes, so feature extraction can tap
  the branch output or the merge (see tests/test_fx.py).
* ``SKIP_TRACE``: a training-mode ``"batch"`` drop decides at run time whether the branch
  runs; a ``torch.fx`` trace through it would freeze that draw into the graph, so tracing it
  raises an error naming the fixes (trace in eval mode, ``"row"``, or ``torch.compile`` /
  ``torch.export``, which record the skip as a ``torch.cond``). torchvision's leaf node draws
  at run time; ours is traced through (``LEAF``), so the train-mode graph is refused.
* ``STREAM``: mode ``"batch"`` draws from a counter-based hash of a seed that
  ``torch.manual_seed`` sets, not from ``torch.bernoulli``: the same pattern eager and compiled
  and on every DDP rank, but not torchvision's numbers. torchvision's fixed seeds were checked
  against its own stream; on ours one of its 30 batch cases is an unlucky draw: seed 2 at
  p = 0.8 drops 219 of 250 steps where 200 are expected (binomial p-value 0.0009, the test asks
  > 0.01). Not a bias: over 2000 seeds per rate (p = 0.2, 0.5, 0.8) our draws fail this test
  for 0.5%, 0.85% and 0.9% of the seeds, within the 1% its threshold allows (measured with
  ``residual.drop._uniform``; tests/test_drop.py checks it on 300 seeds). Mode ``"row"`` draws
  with torchvision's own ops in eager mode and gives its masks, bit for bit.

Not ported: ``test_stochastic_depth_inplace`` does not exist in torchvision (the op has no
``inplace``); ``TestDropBlock`` (no DropBlock in residual).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from residual import Residual

STREAM = (
    "batch mode draws from a seeded hash (the same eager, compiled and on every rank), not "
    "torchvision's bernoulli stream: its seed 2 at p=0.8 is an unlucky draw there (219 of 250 "
    "dropped, p-value 0.0009); over 2000 seeds the test fails for <1% as its threshold allows"
)
LEAF = (
    "Residual is traced through by torch.fx on purpose (its branch, shortcut, merge and drop are "
    "nodes that feature extraction can tap); torchvision makes StochasticDepth one leaf node"
)


class StochasticDepth(nn.Module):
    """Stand-in for ``torchvision.ops.StochasticDepth``: ``Residual``'s drop, read back."""

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.block = Residual(nn.Identity(), drop_path=p, drop_mode=mode)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) - x


def get_graph_node_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Stand-in for torchvision's ``get_graph_node_names``: FX node names, train and eval."""
    names = []
    for training in (True, False):
        graph = torch.fx.symbolic_trace(model.train(training)).graph
        names.append([node.name for node in graph.nodes if node.op != "output"])
    return names[0], names[1]


class StochasticDepthWrapper(nn.Module):
    # Source: pytorch/vision test/test_ops.py, StochasticDepthWrapper
    def __init__(self, obj: nn.Module) -> None:
        super().__init__()
        self.layer = obj
        self.n_inputs = 1

    def forward(self, a: Tensor) -> None:
        self.layer(a)


class TestStochasticDepth:
    @pytest.mark.parametrize("seed", range(10))
    @pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
    @pytest.mark.parametrize("mode", ["batch", "row"])
    def test_stochastic_depth_random(
        self, seed: int, mode: str, p: float, request: pytest.FixtureRequest
    ) -> None:
        # Source: pytorch/vision test/test_ops.py, TestStochasticDepth.test_stochastic_depth_random
        if (mode, p, seed) == ("batch", 0.8, 2):
            request.applymarker(
                pytest.mark.xfail(strict=True, raises=AssertionError, reason=STREAM)
            )
        torch.manual_seed(seed)
        stats = pytest.importorskip("scipy.stats")
        batch_size = 5
        x = torch.ones(size=(batch_size, 3, 4, 4))
        layer = StochasticDepth(p=p, mode=mode)
        layer.__repr__()

        trials = 250
        num_samples = 0
        counts = 0
        for _ in range(trials):
            out = layer(x)
            non_zero_count = out.sum(dim=(1, 2, 3)).nonzero().size(0)
            if mode == "batch":
                if non_zero_count == 0:
                    counts += 1
                num_samples += 1
            elif mode == "row":
                counts += batch_size - non_zero_count
                num_samples += batch_size

        p_value = stats.binomtest(counts, num_samples, p=p).pvalue
        assert p_value > 0.01

    @pytest.mark.parametrize("seed", range(10))
    @pytest.mark.parametrize("p", (0, 1))
    @pytest.mark.parametrize("mode", ["batch", "row"])
    def test_stochastic_depth(self, seed: int, mode: str, p: float) -> None:
        # Source: pytorch/vision test/test_ops.py, TestStochasticDepth.test_stochastic_depth
        torch.manual_seed(seed)
        batch_size = 5
        x = torch.ones(size=(batch_size, 3, 4, 4))
        layer = StochasticDepth(p=p, mode=mode)

        out = layer(x)
        if p == 0:
            assert out.equal(x)
        elif p == 1:
            assert out.equal(torch.zeros_like(x))

    def test_is_leaf_node_batch_mode_refuses_the_training_trace(self) -> None:
        # test_is_leaf_node at p = 1, mode "batch" (SKIP_TRACE): the train-mode trace is refused
        op_obj = self.make_obj(1, "batch", wrap=True)
        with pytest.raises(TypeError, match=r"symbolic_trace cannot record.*model\.eval\(\)"):
            get_graph_node_names(op_obj)

    def make_obj(self, p: float, mode: str, wrap: bool = False) -> nn.Module:
        # Source: pytorch/vision test/test_ops.py, TestStochasticDepth.make_obj
        obj = StochasticDepth(p, mode)
        return StochasticDepthWrapper(obj) if wrap else obj

    @pytest.mark.xfail(strict=True, raises=AssertionError, reason=LEAF)
    @pytest.mark.parametrize("p, mode", [(0, "batch"), (0, "row"), (1, "row")])
    def test_is_leaf_node(self, p: float, mode: str) -> None:
        # Source: pytorch/vision test/test_ops.py, TestStochasticDepth.test_is_leaf_node
        op_obj = self.make_obj(p, mode, wrap=True)
        graph_node_names = get_graph_node_names(op_obj)

        assert len(graph_node_names) == 2
        assert len(graph_node_names[0]) == len(graph_node_names[1])
        assert len(graph_node_names[0]) == 1 + op_obj.n_inputs
