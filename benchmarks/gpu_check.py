"""One-shot GPU check: parity with the real torchvision and torch.nn on CUDA, compile on CUDA,
and the overhead / stochastic depth / checkpointing benchmarks on the GPU.

Run on a machine with a CUDA GPU (and, for the torchvision parity, torchvision installed):

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_results.json

Each section is timed and guarded; a failing section is reported and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from residual import ResidualBlock
from residual.models import (
    TransformerEncoderLayer,
    load_torchvision,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    to_torchvision_state_dict,
    wide_resnet50_2,
)

HERE = Path(__file__).resolve().parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script itself
RESULTS: dict[str, Any] = {}


def section(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            start = time.perf_counter()
            try:
                RESULTS[name] = fn()
            except Exception as e:  # report and go on: one run, many checks
                RESULTS[name] = {
                    "error": f"{type(e).__name__}: {e}",
                    "trace": traceback.format_exc(),
                }
            took = time.perf_counter() - start
            print(
                f"== {name} ({took:.1f} s): {json.dumps(RESULTS[name], default=str)[:2000]}",
                flush=True,
            )

        return run

    return wrap


@section("torchvision_parity")
def torchvision_parity() -> dict[str, Any]:
    import torchvision

    out: dict[str, Any] = {"torchvision": torchvision.__version__}
    builders = {
        "resnet18": resnet18,
        "resnet34": resnet34,
        "resnet50": resnet50,
        "resnet101": resnet101,
        "resnet152": resnet152,
        "resnext50_32x4d": resnext50_32x4d,
        "wide_resnet50_2": wide_resnet50_2,
    }
    x = torch.randn(4, 3, 128, 128, device=DEVICE)
    for name, build in builders.items():
        theirs = getattr(torchvision.models, name)().to(DEVICE)
        with torch.no_grad():
            for m in theirs.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
        ours = build().to(DEVICE)
        load_torchvision(ours, theirs.state_dict())
        same_keys = to_torchvision_state_dict(ours).keys() == theirs.state_dict().keys()
        row: dict[str, Any] = {
            "params_ours": sum(p.numel() for p in ours.parameters()),
            "params_torchvision": sum(p.numel() for p in theirs.parameters()),
            "same_state_dict_keys": same_keys,
        }
        torch.backends.cudnn.deterministic = True
        for train in (False, True):
            ours.train(train)
            theirs.train(train)
            with torch.no_grad():
                row[f"max_abs_diff_{'train' if train else 'eval'}"] = (
                    (ours(x) - theirs(x)).abs().max().item()
                )
        out[name] = row
    return out


@section("transformer_parity_cuda")
def transformer_parity() -> dict[str, Any]:
    out = {}
    x = torch.randn(8, 33, 64, device=DEVICE)
    padding = torch.zeros(8, 33, dtype=torch.bool, device=DEVICE)
    padding[:4, -5:] = True
    for norm_first in (False, True):
        ref = nn.TransformerEncoderLayer(
            64, 8, 128, dropout=0.0, batch_first=True, norm_first=norm_first
        ).to(DEVICE)
        ours = TransformerEncoderLayer.from_torch(ref)
        torch.backends.cuda.matmul.allow_tf32 = False
        ya = ref(x, src_key_padding_mask=padding)
        yb = ours(x, src_key_padding_mask=padding)
        ref.eval()
        ours.eval()
        with torch.inference_mode():
            ea = ref(x, src_key_padding_mask=padding)
            eb = ours(x, src_key_padding_mask=padding)
        out[f"norm_first={norm_first}"] = {
            "train_max_abs_diff": (ya - yb).abs().max().item(),
            "eval_fastpath_max_abs_diff": (ea - eb)[~padding].abs().max().item(),
        }
    return out


@section("compile_cuda")
def compile_cuda() -> dict[str, Any]:
    out = {}
    for mode in ("row", "batch", "subset"):
        torch._dynamo.reset()
        block = ResidualBlock(32, 32, drop_path=0.5, drop_mode=mode).to(DEVICE)
        compiled = torch.compile(block, fullgraph=True)
        x = torch.randn(16, 32, 16, 16, device=DEVICE, requires_grad=True)
        outs = []
        for _ in range(12):
            y = compiled(x)
            y.sum().backward()
            outs.append(y.detach())
        out[mode] = {"draws_differ": any(not torch.equal(outs[0], o) for o in outs[1:])}
    return out


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_script(args: list[str], timeout: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=HERE.parent
    )
    print(result.stdout[-6000:], result.stderr[-2000:], flush=True)
    return {"returncode": result.returncode, "stdout": result.stdout[-6000:]}


@section("overhead_cuda")
def overhead() -> dict[str, Any]:
    return run_script(["benchmarks/overhead.py", "--rounds", "10"], 400)


@section("overhead_cuda_compiled")
def overhead_compiled() -> dict[str, Any]:
    return run_script(
        ["benchmarks/overhead.py", "--compile", "--rounds", "6", "--cases", "transformer", "micro"],
        240,
    )


@section("stochastic_depth_cuda")
def stochastic_depth() -> dict[str, Any]:
    return run_script(["benchmarks/stochastic_depth.py", "--depth", "110", "--batch", "64"], 300)


@section("checkpointing_cuda")
def checkpointing() -> dict[str, Any]:
    return run_script(["benchmarks/checkpointing.py", "--batch", "128"], 300)


@section("reversible_cuda")
def reversible() -> dict[str, Any]:
    return run_script(["benchmarks/reversible.py", "--batch", "64"], 300)


@section("bf16_channels_last_cuda")
def mixed_precision() -> dict[str, Any]:
    model = resnet50().to(DEVICE)
    x = torch.randn(64, 3, 224, 224, device=DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(cl: bool, bf16: bool) -> float:
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        inp = x.to(memory_format=torch.channels_last) if cl else x.contiguous()
        times = []
        for i in range(8):
            sync()
            t = time.perf_counter()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
                loss = m(inp).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            if i >= 3:
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    base = step(False, False)
    return {
        "resnet50_b64_224_fp32_ms": base * 1e3,
        "channels_last_ratio": step(True, False) / base,
        "bf16_ratio": step(False, True) / base,
        "bf16_channels_last_ratio": step(True, True) / base,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_results.json")
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(torch.__version__, name, flush=True)
    RESULTS["device"] = name
    RESULTS["torch"] = torch.__version__
    for name, fn in [
        ("torchvision_parity", torchvision_parity),
        ("transformer_parity_cuda", transformer_parity),
        ("compile_cuda", compile_cuda),
        ("bf16_channels_last_cuda", mixed_precision),
        ("checkpointing_cuda", checkpointing),
        ("reversible_cuda", reversible),
        ("stochastic_depth_cuda", stochastic_depth),
        ("overhead_cuda", overhead),
        ("overhead_cuda_compiled", overhead_compiled),
    ]:
        if name not in args.skip:
            fn()
            Path(args.out).write_text(json.dumps(RESULTS, indent=2, default=str))


if __name__ == "__main__":
    main()
