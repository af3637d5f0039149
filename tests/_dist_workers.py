"""Worker processes for tests/test_distributed.py (spawned; importable by the children)."""

from __future__ import annotations

import gc
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Before any process group exists: DDP imports torch.distributed.nn, whose functions take
# `group=group.WORLD` as a default argument. Imported after init_process_group, those defaults pin
# the world group for the life of the process, so destroy_process_group cannot free it and its
# gloo threads are still running when the interpreter shuts down (see `teardown`).
import torch.distributed.nn  # before the first init_process_group
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from residual import Residual
from residual.distributed import check_drop_agreement, shard_residual_blocks
from residual.drop import BatchDrop
from residual.models import ResidualMLP, TransformerEncoderLayer, cifar_resnet

STEPS = 3
GLOBAL_BATCH = 8


def build(kind: str, drop_mode: str | None = None, checkpoint: bool = False) -> nn.Module:
    torch.manual_seed(0)
    drop = {"drop_path": 0.3, "drop_mode": drop_mode} if drop_mode else {}
    if kind == "cifar_resnet20":
        return cifar_resnet(20, num_classes=10, in_channels=1, checkpoint=checkpoint, **drop)
    if kind == "transformer":
        return nn.Sequential(
            TransformerEncoderLayer(
                16,
                4,
                32,
                dropout=0.0,
                batch_first=True,
                drop_path=drop.get("drop_path", 0.0),
                checkpoint=checkpoint,
            ),
            nn.Flatten(),
            nn.Linear(5 * 16, 10),
        )
    if kind == "mlp":
        model = ResidualMLP(16, 10, dim=32, depth=3, drop_path=drop.get("drop_path", 0.0))
        if drop_mode:
            for m in model.modules():
                if isinstance(m, Residual):
                    m.set_drop_path(m.drop_path, drop_mode=drop_mode)
        return model
    raise ValueError(kind)


def batches(kind: str) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = {"cifar_resnet20": (1, 8, 8), "transformer": (5, 16), "mlp": (16,)}[kind]
    return [
        (
            torch.randn(GLOBAL_BATCH, *shape, generator=g),
            torch.randint(0, 10, (GLOBAL_BATCH,), generator=g),
        )
        for _ in range(STEPS)
    ]


def reference(kind: str, checkpoint: bool = False) -> dict[str, Tensor]:
    """One process, the same global batches, split in two as the two ranks see them."""
    model = build(kind, checkpoint=checkpoint)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(kind):
        opt.zero_grad()
        for part in range(2):
            half = slice(part * GLOBAL_BATCH // 2, (part + 1) * GLOBAL_BATCH // 2)
            (nn.functional.cross_entropy(model(x[half]), y[half]) / 2).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _full(value: Tensor) -> Tensor:
    full = value.full_tensor() if hasattr(value, "full_tensor") else value
    return full.detach().clone()


def _mixed_precision() -> dict[str, Any]:
    """FSDP2 with bf16 parameters: blocks built residual_in_fp32 keep a float32 stream."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    result: dict[str, Any] = {}
    for fp32, key in ((True, "stream_dtypes"), (False, "plain_dtypes")):
        torch.manual_seed(0)
        model = nn.Sequential(*(Residual(nn.Linear(8, 8), residual_in_fp32=fp32) for _ in range(3)))
        seen: list[str] = []
        for block in model:
            block.register_forward_hook(lambda m, a, out, seen=seen: seen.append(str(out.dtype)))
        shard_residual_blocks(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        model(torch.randn(4, 8)).float().sum().backward()
        result[key] = seen
    return result


def _train(rank: int, job: dict[str, Any]) -> dict[str, Any]:
    kind, wrapper = job["kind"], job["wrapper"]
    if kind == "mixed_precision":
        return _mixed_precision()
    model = build(kind, job.get("drop_mode"), job.get("checkpoint", False))
    if job.get("mismatch"):  # as if each rank had built its model after its own seed
        for m in model.modules():
            if isinstance(m, BatchDrop):
                m.seed.fill_(1000 + rank)
    if wrapper == "ddp":
        model = DistributedDataParallel(model)  # find_unused_parameters stays False
    else:
        shard_residual_blocks(model)
    check_drop_agreement(model)  # the explicit check: one collective, outside the step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    half = slice(rank * GLOBAL_BATCH // 2, (rank + 1) * GLOBAL_BATCH // 2)
    for x, y in batches(kind):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[half]), y[half]).backward()
        opt.step()
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    return {"params": {k: _full(v) for k, v in inner.named_parameters()}}


def gloo_threads() -> list[str]:
    """Names of this process's native gloo threads (Linux names them; elsewhere: empty)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we listed it
            continue
    return sorted(n for n in names if "gloo" in n)


def teardown() -> list[str]:
    """Drain and destroy the process group before the worker returns; the gloo threads left.

    Why: a gloo worker thread drops its reference to a finished collective *after* the caller's
    ``wait()`` returns; when that collective captured Python thread-local state, the drop takes the
    GIL. A process that exits right after its last collective can reach interpreter shutdown
    first, and then that thread is killed inside a C++ destructor: SIGABRT, "terminate called
    without an active exception" (torch issue 190489). So: a barrier (every rank's collectives
    have completed; it raises instead of hanging if a rank never arrives), destroy the group
    while the interpreter is fully alive (its destructor joins its threads once nothing else
    holds it), then collect what still referenced it.
    """
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=60))
    finally:
        dist.destroy_process_group()
        gc.collect()
    return gloo_threads()


def worker(rank: int, world: int, store: str, jobs: list[dict[str, Any]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results: list[dict[str, Any]] = []
    try:
        for job in jobs:
            try:
                results.append(_train(rank, job))
            except Exception as e:  # reported to the parent, which asserts on it
                results.append(
                    {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
                )
                break
    finally:
        left = teardown()
        torch.save(
            {"results": results, "gloo_threads_left": left, "pid": os.getpid()},
            Path(out) / f"rank{rank}.pt",
        )
