"""Stand-ins for the torchvision utilities that torchvision's tests call (torchvision cannot be
imported beside the torch wheel used here).

Written from torchvision's documented behaviour (``torchvision/models/feature_extraction.py``,
``torchvision/models/_utils.py``, ``test/common_utils.py``), in our own code and only as far as
the ported tests need it:

* :func:`set_rng_seed`: seeds torch's, Python's and numpy's generators.
* :class:`IntermediateLayerGetter`: the direct children of a model, run in registration order
  up to the last one asked for, returning ``{new_name: output}``.
* :func:`get_graph_node_names` / :func:`create_feature_extractor`: ``torch.fx`` tracing with
  torchvision's node names (a ``.`` path from the top module down to the leaf op or leaf module;
  a repeated name within one parent gets ``_1``, ``_2``, ...); a query ``"layer1"`` picks the
  last node whose name is ``layer1`` or starts with ``layer1.``; the train and eval graphs are
  traced separately and ``train()`` / ``eval()`` switch between them. Errors are torchvision's
  current ones (``ValueError``). Not reproduced: the train/eval difference warning (the tests
  pass ``suppress_diff_warning=True``) and ``concrete_args``.
"""

from __future__ import annotations

import random
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import fx, nn

ReturnNodes = list[str] | Mapping[str, str]


def set_rng_seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class IntermediateLayerGetter(nn.ModuleDict):
    """``model``'s direct children up to the last of ``return_layers``, run in order."""

    def __init__(self, model: nn.Module, return_layers: Mapping[str, str]) -> None:
        names = [name for name, _ in model.named_children()]
        if not set(return_layers).issubset(names):
            raise ValueError("return_layers are not present in model")
        wanted = set(return_layers)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            wanted.discard(name)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class NodePathTracer(fx.Tracer):
    """An FX tracer that names every node by its module path (torchvision's node names)."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.leaf_types = tuple(leaf_modules)
        self.current_path = ""
        self.node_to_qualname: OrderedDict[fx.Node, str] = OrderedDict()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        outer, self.current_path = self.current_path, self.path_of_module(m)
        try:
            if self.is_leaf_module(m, self.current_path):
                return self.create_proxy("call_module", self.current_path, args, kwargs)
            return forward(*args, **kwargs)
        finally:
            self.current_path = outer

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any
    ) -> Any:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        self.node_to_qualname[proxy.node] = self._name(proxy.node)
        return proxy

    def _name(self, node: fx.Node) -> str:
        name = self.current_path
        if node.op != "call_module":  # a function or method: append the op's name
            name = f"{name}.{node}" if name else str(node)
            name = re.sub(r"_[0-9]+$", "", name)  # fx numbers globally; number per parent
        for seen in reversed(self.node_to_qualname.values()):
            match = re.fullmatch(rf"{re.escape(name)}(?:_([0-9]+))?", seen)
            if match:
                return f"{name}_{int(match.group(1) or 0) + 1}"
        return name


def _trace(model: nn.Module, tracer_kwargs: Mapping[str, Any]) -> tuple[NodePathTracer, fx.Graph]:
    tracer = NodePathTracer(**tracer_kwargs)
    return tracer, tracer.trace(model)


def get_graph_node_names(
    model: nn.Module,
    tracer_kwargs: Mapping[str, Any] | None = None,
    suppress_diff_warning: bool = False,
) -> tuple[list[str], list[str]]:
    """Node names of the train-mode and the eval-mode graph, in execution order."""
    was_training = model.training
    names = []
    for mode in (True, False):
        tracer, _ = _trace(model.train(mode), tracer_kwargs or {})
        names.append(list(tracer.node_to_qualname.values()))
    model.train(was_training)
    return names[0], names[1]


def _copy_attr(root: nn.Module, into: nn.Module, target: str) -> None:
    """Put ``root``'s submodule / parameter / buffer ``target`` at the same path in ``into``."""
    *path, field = target.split(".")
    src, dst = root, into
    for item in path:
        src_child, dst_child = getattr(src, item), getattr(dst, item, None)
        if dst_child is src_child:  # a parent was copied whole
            return
        if dst_child is None:
            dst_child = nn.Module()
            setattr(dst, item, dst_child)
        src, dst = src_child, dst_child
    value = getattr(src, field)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        dst.register_buffer(field, value)
    else:
        setattr(dst, field, value)


class DualGraphModule(fx.GraphModule):
    """A GraphModule holding a train graph and an eval graph; ``train(mode)`` picks one."""

    def __init__(
        self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph, class_name: str
    ) -> None:
        super().__init__(root, train_graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("get_attr", "call_module"):
                _copy_attr(root, self, str(node.target))
        self.train_graph, self.eval_graph = train_graph, eval_graph
        super().train(True)  # the train graph is in place (GraphModule copied root's mode)

    def train(self, mode: bool = True) -> DualGraphModule:
        if mode != self.training:
            self.graph = self.train_graph if mode else self.eval_graph
        return super().train(mode)


def _as_dict(nodes: ReturnNodes) -> dict[str, str]:
    if isinstance(nodes, list):
        return {str(n): str(n) for n in nodes}
    return {str(k): str(v) for k, v in nodes.items()}


def create_feature_extractor(
    model: nn.Module,
    return_nodes: ReturnNodes | None = None,
    train_return_nodes: ReturnNodes | None = None,
    eval_return_nodes: ReturnNodes | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    suppress_diff_warning: bool = False,
) -> fx.GraphModule:
    """``model`` traced and cut so that it returns ``{output name: node output}``."""
    if return_nodes is None and train_return_nodes is None and eval_return_nodes is None:
        raise ValueError(
            "Either `return_nodes` or `train_return_nodes` and `eval_return_nodes` together, "
            "should be specified"
        )
    if (train_return_nodes is None) != (eval_return_nodes is None):
        raise ValueError(
            "If any of `train_return_nodes` and `eval_return_nodes` are specified, then both "
            "should be specified"
        )
    if (return_nodes is None) == (train_return_nodes is None):
        raise ValueError(
            "If `train_return_nodes` and `eval_return_nodes` are specified, then "
            "`return_nodes` should not be specified"
        )
    if return_nodes is not None:
        wanted = {True: _as_dict(return_nodes), False: _as_dict(return_nodes)}
    else:
        assert train_return_nodes is not None and eval_return_nodes is not None
        wanted = {True: _as_dict(train_return_nodes), False: _as_dict(eval_return_nodes)}
    was_training = model.training
    graphs = {}
    for mode in (True, False):
        tracer, graph = _trace(model.train(mode), tracer_kwargs or {})
        fx.GraphModule(tracer.root, graph, type(model).__name__)  # owns graph (for the DCE)
        names = tracer.node_to_qualname
        for query in wanted[mode]:
            if not any(re.match(rf"^{query}(\.|$)", n) for n in names.values()):
                raise ValueError(
                    f"node: '{query}' is not present in model. Hint: use "
                    "`get_graph_node_names` to make sure the `return_nodes` you specified are "
                    "present. It may even be that you need to specify `train_return_nodes` and "
                    "`eval_return_nodes` separately."
                )
        picks: dict[str, fx.Node] = {}
        for node in graph.nodes:  # the last node inside each query's scope wins
            name = names.get(node)
            for query, out_name in wanted[mode].items():
                if name is not None and (name == query or name.startswith(query + ".")):
                    picks[out_name] = node
        for node in [n for n in graph.nodes if n.op == "output"]:
            graph.erase_node(node)
        position = {node: i for i, node in enumerate(graph.nodes)}
        graph.output(dict(sorted(picks.items(), key=lambda item: position[item[1]])))
        graph.eliminate_dead_code()
        graphs[mode] = graph
    name = type(model).__name__
    extractor = DualGraphModule(model, graphs[True], graphs[False], class_name=name)
    model.train(was_training)
    extractor.train(was_training)
    return extractor
