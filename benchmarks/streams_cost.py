"""The cost of multi-stream residuals: train-step time and activation memory against a plain
residual stack, ours and lucidrains' ``hyper-connections`` side by side.

8 pre-norm FFN blocks (d=256, hidden 1024), batch 16 x 64 tokens, n = 4 streams (fractions for
frac-connections). Train step = forward + backward + AdamW step, all variants interleaved in one
process (medians of rounds, ratios to plain per round). Activation memory: the bytes of the
tensors autograd saves in one forward (``saved_tensors_hooks``, each storage once, parameters
left out). lucidrains' rows need ``pip install hyper-connections`` (the ``peers`` extra).
``--compile NAME ...`` adds those variants under ``torch.compile`` (copies of the eager models),
timed in the same rounds, each compiled row's ratio taken to compiled plain. ``--floor`` adds the
dynamic variants with their coefficient projections made free (a zero tensor in place of
``norm(H) W``; the gradients of everything else unchanged): what the rest of a dynamic layer
costs, the floor that a faster projection could reach.

    python benchmarks/streams_cost.py --quick
    python benchmarks/streams_cost.py --json benchmarks/results/streams_cost_cpu.json
    python benchmarks/streams_cost.py --only "hyper dynamic" "mHC dynamic" --floor
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from collections.abc import Callable

import torch
from _timing import interleaved, ms, print_header, print_table, write_json
from torch import Tensor, nn

from residual import Residual, hyper
from residual.hyper import (
    expand_streams,
    frac_residual,
    hyper_residual,
    mhc_residual,
    reduce_streams,
)
from residual.models import FeedForward
from residual.streams import mhc


class Streams(nn.Module):
    """expand -> blocks -> reduce, with the expand/reduce of the implementation."""

    def __init__(
        self, blocks: list[nn.Module], expand: Callable[[Tensor], Tensor], reduce: nn.Module
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.expand, self.reduce = expand, reduce

    def forward(self, x: Tensor) -> Tensor:
        return self.reduce(self.blocks(self.expand(x)))


class Fn(nn.Module):
    """A function as a module (our expand/reduce)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class FreeProjections(nn.Module):
    """Runs ``model`` with the dynamic coefficients' projections replaced by zeros of their
    shape (plus ``0 * W.sum()``, so the weights stay in the graph): a what-if, for ``--floor``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        def free(s: Tensor, w: Tensor) -> Tensor:
            return s.new_zeros(*s.shape[int(w.dim() == 3) : -1], w.shape[-1]) + 0 * w.sum()

        saved = hyper.layer_normed_matmul, mhc._flat_rms_projection
        hyper.layer_normed_matmul = mhc._flat_rms_projection = free
        try:
            out: Tensor = self.model(x)
        finally:
            hyper.layer_normed_matmul, mhc._flat_rms_projection = saved
        return out


def ffn(d: int) -> nn.Module:
    return FeedForward(d, 4 * d, dropout=0.0, norm=nn.LayerNorm(d))


def variants(blocks: int, d: int, n: int) -> dict[str, nn.Module]:
    def ours(layer: Callable[[nn.Module, int], nn.Module]) -> nn.Module:
        return Streams(
            [layer(ffn(d), i) for i in range(blocks)],
            Fn(lambda x: expand_streams(x, n)),
            Fn(lambda h: reduce_streams(h, n)),
        )

    models: dict[str, nn.Module] = {
        "plain": nn.Sequential(*(Residual(ffn(d)) for _ in range(blocks))),
        "hyper static": ours(lambda f, i: hyper_residual(f, n, d, layer_index=i, dynamic=False)),
        "hyper dynamic": ours(lambda f, i: hyper_residual(f, n, d, layer_index=i)),
        "mHC static": ours(lambda f, i: mhc_residual(f, n, d, layer_index=i, dynamic=False)),
        "mHC dynamic": ours(lambda f, i: mhc_residual(f, n, d, layer_index=i)),
        "frac dynamic": nn.Sequential(*(frac_residual(ffn(d), n, d) for _ in range(blocks))),
    }
    if importlib.util.find_spec("hyper_connections") is not None:
        from hyper_connections import HyperConnections, get_expand_reduce_stream_functions, mHC

        expand, reduce = get_expand_reduce_stream_functions(n)
        models["lucidrains hyper"] = Streams(
            [HyperConnections(n, dim=d, branch=ffn(d), layer_index=i) for i in range(blocks)],
            expand,
            reduce,
        )
        models["lucidrains mHC"] = Streams(
            [mHC(n, dim=d, branch=ffn(d), layer_index=i) for i in range(blocks)], expand, reduce
        )
        models["lucidrains frac"] = nn.Sequential(
            *(HyperConnections(1, dim=d, branch=ffn(d), num_fracs=n) for _ in range(blocks))
        )
    return models


def saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 step")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    parser.add_argument(
        "--compile", nargs="*", default=[], help="variants also run under torch.compile"
    )
    parser.add_argument(
        "--floor", action="store_true", help="add the dynamic rows with free projections"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = print_header(
        f"streams cost: {args.blocks} pre-norm FFN blocks, d={args.dim}, n={args.streams}, "
        f"batch {args.batch}x{args.tokens}, train step (AdamW)"
    )
    models = variants(args.blocks, args.dim, args.streams)
    if args.only:
        models = {k: v for k, v in models.items() if k == "plain" or k in args.only}
    if args.floor:
        for name in [k for k in models if k in ("hyper dynamic", "mHC dynamic")]:
            models[f"{name}, projections free"] = FreeProjections(copy.deepcopy(models[name]))
    x = torch.randn(args.batch, args.tokens, args.dim)
    memory = {name: saved_bytes(m, x) for name, m in models.items()}  # eager only
    if args.compile:
        for name in ["plain", *(k for k in args.compile if k != "plain")]:
            models[f"{name} (compiled)"] = torch.compile(copy.deepcopy(models[name]))
    timings = interleaved(
        {name: train_step(m, x) for name, m in models.items()},
        rounds=3 if args.quick else args.rounds,
        calls=1,
        warmup=1 if args.quick else 2,
    )

    def baseline(name: str) -> str:
        return "plain (compiled)" if name.endswith("(compiled)") else "plain"

    rows = []
    for name in models:
        t = timings[name]
        rows.append(
            [
                name,
                ms(t.median),
                f"{t.paired_ratio(timings[baseline(name)]):.3f}",
                f"{memory[name] / 2**20:.1f}" if name in memory else "-",
                f"{memory[name] / memory['plain']:.2f}" if name in memory else "-",
                f"{sum(p.numel() for p in models[name].parameters()):,}",
            ]
        )
    print_table(
        ["variant", "step ms", "time / plain", "activations MiB", "memory / plain", "params"],
        rows,
    )
    write_json(
        args.json,
        {
            "machine": info,
            "config": vars(args),
            "step_s": {k: v.median for k, v in timings.items()},
            "time_ratio_to_plain": {
                k: v.paired_ratio(timings[baseline(k)]) for k, v in timings.items()
            },
            "activation_bytes": memory,
            "rounds": {k: v.rounds for k, v in timings.items()},
        },
    )


if __name__ == "__main__":
    main()
