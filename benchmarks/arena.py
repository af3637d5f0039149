"""The arena: every residual-connection variant trained on the same two tasks, same budget.

Two tasks, a fixed number of optimizer steps each (not a wall-clock budget, so the numbers do not
depend on the machine's speed):

- ``char``: a small pre-norm GPT body on the character-level corpus of ``examples/char_lm.py``
  (standard-library docstrings); metric: validation bits per character (all of the validation
  split, non-overlapping windows).
- ``digits``: a small Transformer encoder over overlapping 4x4 patches of scikit-learn's digits
  (as ``examples/train_digits.py``); metrics: test accuracy and test cross-entropy.

Every variant changes only the residual connection of the same body (width, depth, heads, MLP,
optimizer, schedule, batches and seeds are shared). The train-step time of each is measured
interleaved with the plain pre-norm body in one process (median of paired rounds), after the
training runs. ``stochastic-depth`` is the best variant of each task (lowest mean metric) again,
with a linear stochastic-depth schedule up to ``--drop-path``.

    python benchmarks/arena.py                       # 3 seeds, the full budget (~25 min, 2 cores)
    python benchmarks/arena.py --quick --json /tmp/arena.json    # one seed, few steps (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _timing import ROOT, interleaved, machine, print_table, write_json
from einops.layers.torch import Rearrange
from torch import Tensor, nn

sys.path.insert(0, str(ROOT / "examples"))
from char_lm import batches, stdlib_text
from train_digits import load_data

import residual.hyper
from residual import GRUGate, HighwayGate, LayerScale, Residual, ReZero, ScaledAdd
from residual.depth import DepthStack, denseformer
from residual.drop import apply_drop_schedule
from residual.hyper import expand_streams, hyper_residual, reduce_streams
from residual.merges import LaurelRW, deepnorm_scales
from residual.models import (
    AttentionBranch,
    FeedForward,
    SelfAttention,
    ValueResidualGPTBlock,
)
from residual.resi_dual import ResiDualOutput, resi_dual_residual
from residual.shortcuts import LowRankShortcut


@dataclass(frozen=True)
class Config:
    d_model: int = 64
    nhead: int = 4
    layers: int = 4
    context: int = 64
    batch: int = 16  # char windows per step (digits: 64 images, 16 tokens each)
    char_steps: int = 200
    digits_steps: int = 250
    lr: float = 2e-3
    evals: int = 8  # validation points on each curve
    streams: int = 4
    seeds: int = 3
    drop_path: float = 0.1
    timing_rounds: int = 7
    timing_calls: int = 3


FULL = Config()
QUICK = Config(
    d_model=32,
    layers=2,
    char_steps=40,
    digits_steps=40,
    evals=2,
    seeds=1,
    timing_rounds=2,
    timing_calls=2,
)


# Bodies: (N, L, d) -> (N, L, d); each variant changes only the residual connection. -------------


def _attention(cfg: Config, causal: bool, norm: bool) -> AttentionBranch:
    attn = SelfAttention(cfg.d_model, cfg.nhead, causal=causal)
    return AttentionBranch(attn, 0.0, nn.LayerNorm(cfg.d_model) if norm else None)


def _mlp(cfg: Config, norm: bool) -> FeedForward:
    d = cfg.d_model
    return FeedForward(d, 4 * d, 0.0, "gelu", True, nn.LayerNorm(d) if norm else None)


def _branches(cfg: Config, causal: bool, norm: bool) -> list[nn.Module]:
    """Attention, MLP, attention, MLP, ...: the 2 * layers sublayers of the body."""
    out: list[nn.Module] = []
    for _ in range(cfg.layers):
        out += [_attention(cfg, causal, norm), _mlp(cfg, norm)]
    return out


def _residuals(
    cfg: Config,
    causal: bool,
    *,
    norm: bool = True,
    merge: Callable[[], nn.Module] | None = None,
    shortcut: Callable[[], nn.Module] | None = None,
    post: bool = False,
) -> nn.Sequential:
    """One ``Residual`` per sublayer: pre-norm (LN in the branch) or post-norm (LN as post)."""
    return nn.Sequential(
        *(
            Residual(
                fn,
                shortcut=shortcut() if shortcut else "identity",
                merge=merge() if merge else None,
                post=nn.LayerNorm(cfg.d_model) if post else None,
            )
            for fn in _branches(cfg, causal, norm)
        )
    )


def _deepnorm(cfg: Config, causal: bool) -> nn.Module:
    """Post-norm, ``LN(alpha x + F(x))``, and the FFN / value / output projections initialised
    Xavier with gain beta (Wang et al. 2022, an encoder of ``layers`` layers)."""
    enc, _ = deepnorm_scales(encoder_layers=cfg.layers)
    assert enc is not None
    body = _residuals(cfg, causal, norm=False, post=True, merge=lambda: ScaledAdd(alpha=enc.alpha))
    d = cfg.d_model
    for m in body.modules():
        if isinstance(m, FeedForward):
            nn.init.xavier_normal_(m.linear1.weight, gain=enc.beta)
            nn.init.xavier_normal_(m.linear2.weight, gain=enc.beta)
        if isinstance(m, SelfAttention):
            with torch.no_grad():
                for part, gain in ((slice(0, 2 * d), 1.0), (slice(2 * d, 3 * d), enc.beta)):
                    nn.init.xavier_normal_(m.in_proj.weight[part], gain=gain)
            nn.init.xavier_normal_(m.out_proj.weight, gain=enc.beta)
    return body


class Streams(nn.Module):
    """``expand_streams(x, n)``, the layers, then ``out`` (default: ``reduce_streams``)."""

    def __init__(self, layers: list[nn.Module], streams: int, out: nn.Module | None = None):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.streams = streams
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(expand_streams(x, self.streams))
        return reduce_streams(h, self.streams) if self.out is None else self.out(h)


def _multi_stream(builder: Callable[..., nn.Module], **kw: Any) -> Callable[[Config, bool], Any]:
    def build(cfg: Config, causal: bool) -> nn.Module:
        fns = _branches(cfg, causal, norm=True)
        layers = [
            builder(fn, cfg.streams, cfg.d_model, layer_index=i, **kw) for i, fn in enumerate(fns)
        ]
        return Streams(layers, cfg.streams)

    return build


def _frac(cfg: Config, causal: bool) -> nn.Module:
    frac_residual = residual.hyper.frac_residual  # type: ignore[attr-defined]
    fns = _branches(cfg, causal, norm=True)
    return nn.Sequential(
        *(frac_residual(fn, cfg.streams, cfg.d_model, layer_index=i) for i, fn in enumerate(fns))
    )


def _layer_pairs(cfg: Config, causal: bool) -> list[nn.Module]:
    res = list(_residuals(cfg, causal))
    return [nn.Sequential(res[2 * i], res[2 * i + 1]) for i in range(cfg.layers)]


def _resi_dual(cfg: Config, causal: bool) -> nn.Module:
    layers = [resi_dual_residual(fn, cfg.d_model) for fn in _branches(cfg, causal, norm=False)]
    return Streams(layers, 2, ResiDualOutput(cfg.d_model))


def _value_residual(cfg: Config, causal: bool) -> nn.Module:
    blocks = [
        ValueResidualGPTBlock(cfg.d_model, cfg.nhead, 4 * cfg.d_model, causal=causal)
        for _ in range(cfg.layers)
    ]
    return DepthStack(blocks, values=True)


Body = Callable[[Config, bool], nn.Module]

VARIANTS: dict[str, Body] = {
    "pre-norm": lambda c, causal: _residuals(c, causal),
    "post-norm": lambda c, causal: _residuals(c, causal, norm=False, post=True),
    "deepnorm": _deepnorm,
    "rezero": lambda c, causal: _residuals(c, causal, norm=False, merge=ReZero),
    "layerscale": lambda c, causal: _residuals(c, causal, merge=lambda: LayerScale(c.d_model, 0.1)),
    "highway-gate": lambda c, causal: _residuals(c, causal, merge=lambda: HighwayGate(c.d_model)),
    "gru-gate": lambda c, causal: _residuals(c, causal, merge=lambda: GRUGate(c.d_model)),
    "hyper-static": _multi_stream(hyper_residual, dynamic=False),
    "hyper-dynamic": _multi_stream(hyper_residual, dynamic=True),
    "mhc": lambda c, causal: _multi_stream(residual.hyper.mhc_residual)(c, causal),  # type: ignore[attr-defined]
    "frac": _frac,
    "laurel-rw": lambda c, causal: _residuals(c, causal, merge=LaurelRW),
    "laurel-lr": lambda c, causal: _residuals(
        c, causal, shortcut=lambda: LowRankShortcut(c.d_model, max(1, c.d_model // 8))
    ),
    "denseformer": lambda c, causal: denseformer(_layer_pairs(c, causal)),
    "value-residual": _value_residual,
    "resi-dual": _resi_dual,
}
"""The variants, by name: a body builder ``(config, causal) -> module``."""

NEEDS = {"mhc": "mhc_residual", "frac": "frac_residual"}  # built by another branch
STREAM_VARIANTS = {"hyper-static", "hyper-dynamic", "mhc", "resi-dual"}  # rows = stream copies


def available(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """The variants that can be built here, and why the others cannot."""
    skipped = {
        n: f"residual.hyper.{NEEDS[n]} is not in this checkout"
        for n in names
        if n in NEEDS and getattr(residual.hyper, NEEDS[n], None) is None
    }
    return [n for n in names if n not in skipped], skipped


# Models and tasks -------------------------------------------------------------------------------


class CharModel(nn.Module):
    """Token + position embeddings, the body (causal), LayerNorm, a linear head."""

    def __init__(self, vocab: int, cfg: Config, body: nn.Module) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.body = body
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.norm(self.body(self.tok(idx) + self.pos(pos))))


class DigitsModel(nn.Module):
    """Overlapping 4x4 patches (16 tokens), positions, the body (bidirectional), LN, mean, head."""

    def __init__(self, cfg: Config, body: nn.Module) -> None:
        super().__init__()
        d = cfg.d_model
        self.patches = nn.Sequential(
            nn.Conv2d(1, d, 4, stride=2, padding=1), Rearrange("b d h w -> b (h w) d")
        )
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.body = body
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.body(self.patches(x) + self.pos)).mean(dim=1))


class Task:
    """Data, a model builder, batches and the validation metrics of one task."""

    name: str
    metric: str  # the key of ``evaluate`` that ranks variants (lower is better)
    causal: bool

    def build(self, cfg: Config, body: nn.Module) -> nn.Module:
        raise NotImplementedError

    def batch(self, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, cfg: Config, final: bool) -> dict[str, float]:
        raise NotImplementedError


class CharTask(Task):
    name, metric, causal = "char", "val_bpc", True

    def __init__(self) -> None:
        text = stdlib_text()
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.vocab, self.train, self.val = len(chars), data[:split], data[split:]

    def build(self, cfg: Config, body: nn.Module) -> nn.Module:
        return CharModel(self.vocab, cfg, body)

    def batch(self, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return batches(self.train, cfg.context, cfg.batch, gen)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, cfg: Config, final: bool) -> dict[str, float]:
        """Bits per character over non-overlapping windows: all of the validation split when
        ``final``, else its first 64 windows (4,096 characters: the curves)."""
        model.eval()
        n = (len(self.val) - 1) // cfg.context
        n = n if final else min(n, 64)
        x = self.val[: n * cfg.context].view(n, cfg.context)
        y = self.val[1 : n * cfg.context + 1].view(n, cfg.context)
        total = 0.0
        for xb, yb in zip(x.split(128), y.split(128), strict=True):
            logits = model(xb).flatten(0, 1)
            total += F.cross_entropy(logits, yb.flatten(), reduction="sum").item()
        model.train()
        return {"val_bpc": total / (n * cfg.context) / math.log(2)}


class DigitsTask(Task):
    name, metric, causal = "digits", "val_loss", False

    def __init__(self) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = load_data(0)

    def build(self, cfg: Config, body: nn.Module) -> nn.Module:
        return DigitsModel(cfg, body)

    def batch(self, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """64 training images at random, each moved by up to one pixel (zero fill)."""
        idx = torch.randint(0, len(self.y_train), (64,), generator=gen)
        i, j = torch.randint(0, 3, (2,), generator=gen).tolist()
        padded = F.pad(self.x_train[idx], (1, 1, 1, 1))
        return padded[:, :, i : i + 8, j : j + 8], self.y_train[idx]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=0.1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, cfg: Config, final: bool) -> dict[str, float]:
        model.eval()
        logits = model(self.x_test)
        model.train()
        return {
            "val_loss": F.cross_entropy(logits, self.y_test).item(),
            "accuracy": (logits.argmax(1) == self.y_test).float().mean().item(),
        }


# Training ----------------------------------------------------------------------------------------


def _schedule(steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10% of the steps, then cosine decay to 10%."""
    warm = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    return factor


def make_model(task: Task, name: str, cfg: Config, seed: int, drop_path: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    model = task.build(cfg, VARIANTS[name](cfg, task.causal))
    if drop_path:
        mode = "batch" if name in STREAM_VARIANTS else "row"
        apply_drop_schedule(model.body, drop_path, mode)  # type: ignore[arg-type]
    return model


def _step_fn(
    task: Task, model: nn.Module, cfg: Config, steps: int
) -> tuple[torch.optim.Optimizer, Callable[[Tensor, Tensor], float]]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps))

    def step(x: Tensor, y: Tensor) -> float:
        loss = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return opt, step


def train_one(
    task: Task, name: str, cfg: Config, seed: int, drop_path: float = 0.0
) -> dict[str, Any]:
    """Train one variant with one seed; the batches depend on the seed only.

    ``initial`` / ``final``: the metrics on the whole validation set before and after training;
    ``curve``: (step, metric) on the curve's subset (the same points throughout, from step 0).
    """
    steps = cfg.char_steps if task.name == "char" else cfg.digits_steps
    model = make_model(task, name, cfg, seed, drop_path).train()
    _, step = _step_fn(task, model, cfg, steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    at = sorted({round(steps * (k + 1) / cfg.evals) for k in range(cfg.evals)})
    initial = task.evaluate(model, cfg, final=True)
    curve = [(0, task.evaluate(model, cfg, final=False)[task.metric])]
    losses: list[float] = []
    start = time.perf_counter()
    for i in range(1, steps + 1):
        losses.append(step(*task.batch(cfg, gen)))
        if i in at:
            curve.append((i, task.evaluate(model, cfg, final=False)[task.metric]))
    seconds = time.perf_counter() - start
    final = task.evaluate(model, cfg, final=True)
    return {
        "seed": seed,
        "initial": initial,
        "final": final,
        "curve": curve,
        "train_loss_first": losses[0],
        "train_loss_last": statistics.fmean(losses[-max(1, steps // 20) :]),
        "finite": all(math.isfinite(v) for v in losses),
        "seconds": seconds,
    }


def step_time_ratios(task: Task, names: list[str], cfg: Config) -> dict[str, dict[str, float]]:
    """Train-step milliseconds of each variant, timed in pairs with pre-norm in this process
    (alternating within each pair, :func:`_timing.interleaved`); the ratio is the median over
    rounds of the per-round ratios to pre-norm, so drifts of the machine cancel."""
    x, y = task.batch(cfg, torch.Generator().manual_seed(0))
    steps: dict[str, Callable[[], object]] = {}
    for name in names:
        drop = cfg.drop_path if name.startswith("stochastic-depth") else 0.0
        model = make_model(task, name.split(":")[-1], cfg, 0, drop).train()
        _, step = _step_fn(task, model, cfg, 10**6)
        steps[name] = lambda step=step: step(x, y)  # type: ignore[misc]
    out: dict[str, dict[str, float]] = {}
    plain_rounds: list[float] = []
    for name in names:
        if name == "pre-norm":
            continue
        pair = {"pre-norm": steps["pre-norm"], name: steps[name]}
        t = interleaved(pair, rounds=cfg.timing_rounds, calls=cfg.timing_calls, warmup=1)
        plain_rounds += t["pre-norm"].rounds
        out[name] = {"step_ms": t[name].median * 1e3, "ratio": t[name].paired_ratio(t["pre-norm"])}
    plain_ms = statistics.median(plain_rounds) * 1e3 if plain_rounds else float("nan")
    return {"pre-norm": {"step_ms": plain_ms, "ratio": 1.0}, **out}


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = runs[0]["final"].keys()
    out: dict[str, dict[str, float]] = {"mean": {}, "std": {}}
    for k in keys:
        vals = [r["final"][k] for r in runs]
        out["mean"][k] = statistics.fmean(vals)
        out["std"][k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def run_task(
    task: Task, names: list[str], cfg: Config, log: Callable[[str], None]
) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for name in names:
        runs = [train_one(task, name, cfg, seed) for seed in range(cfg.seeds)]
        params = sum(p.numel() for p in make_model(task, name, cfg, 0).parameters())
        variants[name] = {"params": params, "runs": runs, **summarise(runs)}
        seconds = sum(r["seconds"] for r in runs)
        log(f"{task.name:>6} {name:<16} {variants[name]['mean']}  ({seconds:.0f} s training)")
    best = min(variants, key=lambda n: variants[n]["mean"][task.metric])
    sd_name = f"stochastic-depth:{best}"
    runs = [train_one(task, best, cfg, seed, cfg.drop_path) for seed in range(cfg.seeds)]
    params = variants[best]["params"]
    variants[sd_name] = {"params": params, "runs": runs, "base": best, **summarise(runs)}
    log(f"{task.name:>6} {sd_name:<16} {variants[sd_name]['mean']}")
    for name, timing in step_time_ratios(task, list(variants), cfg).items():
        variants[name].update(timing)
    return {"metric": task.metric, "best": best, "variants": variants}


def merge_into(path: Path, result: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The results file at ``path`` with ``names`` replaced (or added) from ``result``.

    Both runs must share the configuration; the step-time ratios of the merged variants are to
    the pre-norm timed beside them in ``result``'s process. Each merge is recorded under
    ``"added"`` with its command, machine and both pre-norm results (training is seeded, so
    the two should agree). A merged variant that would become a task's best is refused: that
    task's stochastic-depth row was trained on the old best.
    """
    saved: dict[str, Any] = json.loads(path.read_text())
    if saved["config"] != result["config"]:
        raise SystemExit(
            f"--merge-into: {path} was trained with {saved['config']}, this run with "
            f"{result['config']}; use the same configuration"
        )
    for task_name, res in result["tasks"].items():
        kept = saved["tasks"][task_name]
        metric, best = kept["metric"], kept["best"]
        for name in names:
            if res["variants"][name]["mean"][metric] < kept["variants"][best]["mean"][metric]:
                raise SystemExit(
                    f"--merge-into: {name} would beat {best} on {task_name}, whose stochastic "
                    "depth row was trained on it; run every variant again instead"
                )
            kept["variants"][name] = res["variants"][name]
    added = saved.get("added", [])
    saved["added"] = [*([added] if isinstance(added, dict) else added)]
    saved["added"].append(
        {
            "variants": names,
            "command": result["command"],
            "machine": result["machine"],
            "wall_seconds": result["wall_seconds"],
            "pre-norm": {
                task: {
                    "then": saved["tasks"][task]["variants"]["pre-norm"]["mean"],
                    "now": res["variants"]["pre-norm"]["mean"],
                }
                for task, res in result["tasks"].items()
            },
        }
    )
    return saved


# Output -------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> None:
    for task_name, res in result["tasks"].items():
        print(f"\n## {task_name} (ranked by {res['metric']}, lower is better)")
        metrics = list(next(iter(res["variants"].values()))["mean"])
        header = ["variant", *(f"{m} (mean ± std)" for m in metrics), "params", "step time"]
        rows = []
        order = sorted(res["variants"], key=lambda n: res["variants"][n]["mean"][res["metric"]])
        for name in order:
            v = res["variants"][name]
            cells = [f"{v['mean'][m]:.4f} ± {v['std'][m]:.4f}" for m in metrics]
            rows.append([name, *cells, f"{v['params']:,}", f"{v['ratio']:.2f}x"])
        print_table(header, rows)


def plot(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install residual[examples]); no figure")
        return
    tasks = result["tasks"]
    # Results written before every curve point was on the subset end on the whole split: drop it.
    last = None if "curves" in result else -1
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    for ax, (task_name, res) in zip(axes[0], tasks.items(), strict=True):
        order = sorted(res["variants"], key=lambda n: res["variants"][n]["mean"][res["metric"]])
        cmap = plt.get_cmap("tab20")
        for k, name in enumerate(order):
            runs = res["variants"][name]["runs"]
            steps = [s for s, _ in runs[0]["curve"][1:last]]
            mean = [
                statistics.fmean(v for _, v in points)
                for points in zip(*(r["curve"][1:last] for r in runs), strict=True)
            ]
            style = "-" if k < 10 else "--"
            ax.plot(steps, mean, style, color=cmap(k % 20), label=name, linewidth=1.4)
        ax.set_title(f"{task_name}: validation {res['metric']} (mean of seeds)")
        ax.set_xlabel("step")
        ax.set_ylabel(res["metric"])
        finals = [res["variants"][n]["mean"][res["metric"]] for n in order]
        ax.set_ylim(min(finals) * 0.97, max(finals) * 1.25)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, few steps (CI)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="write the validation curves here")
    parser.add_argument("--tasks", default="char,digits")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--char-steps", type=int, default=None)
    parser.add_argument("--digits-steps", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--from-json", default=None, help="print and plot saved results only")
    parser.add_argument(
        "--merge-into",
        default=None,
        help="put the variants trained (pre-norm aside) into this results file, same config",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved: dict[str, Any] = json.loads(Path(args.from_json).read_text())
        table(saved)
        if args.png:
            plot(saved, args.png)
        return saved
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    overrides = {
        "seeds": args.seeds,
        "char_steps": args.char_steps,
        "digits_steps": args.digits_steps,
        "d_model": args.d_model,
        "layers": args.layers,
        "context": args.context,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown or "pre-norm" not in wanted:
        parser.error(f"unknown variants {unknown}; pre-norm (the baseline) is always needed")
    names, skipped = available(wanted)
    for name, why in skipped.items():
        print(f"note: skipping {name}: {why}")
    task_types: dict[str, Callable[[], Task]] = {"char": CharTask, "digits": DigitsTask}
    start = time.perf_counter()
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "machine": machine(),
        "command": "python benchmarks/arena.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "skipped": skipped,
        "curves": "validation metric on the first 4,096 characters (char) / the test set (digits)",
        "tasks": {},
    }
    for task_name in args.tasks.split(","):
        task = task_types[task_name]()
        result["tasks"][task_name] = run_task(task, names, cfg, print)
    result["wall_seconds"] = time.perf_counter() - start
    table(result)
    print(f"\nwall time {result['wall_seconds']:.0f} s")
    write_json(args.json, result)
    if args.merge_into:
        result = merge_into(Path(args.merge_into), result, [n for n in names if n != "pre-norm"])
        write_json(args.merge_into, result)
    if args.png:
        plot(result, args.png)
    return result


if __name__ == "__main__":
    main()
