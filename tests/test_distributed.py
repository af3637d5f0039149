"""DDP and FSDP2 with real worker processes (2 ranks, gloo, CPU): parameters after N steps equal
single-process training on the same global batch; stochastic depth needs no special settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from _dist_workers import reference, worker

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)
TIMEOUT_S = 240


def run_workers(jobs: list[dict[str, Any]], tmp_path: Path) -> list[list[dict[str, Any]]]:
    """Spawn 2 ranks, wait at most TIMEOUT_S, always clean up, return each rank's results.

    Each rank exits with status 0 (a crash at exit fails the test) and reports the gloo threads
    still running after its teardown.
    """
    return [r["results"] for r in spawn_ranks(jobs, tmp_path)]


def spawn_ranks(jobs: list[dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    ctx = mp.start_processes(
        worker,
        args=(2, str(tmp_path / "store"), jobs, str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    try:
        deadline = TIMEOUT_S
        while not ctx.join(timeout=5):
            deadline -= 5
            if deadline <= 0:
                pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(5)
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


KINDS = ["cifar_resnet20", "transformer", "mlp"]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_matches_single_process_training(wrapper: str, tmp_path: Path) -> None:
    jobs = [{"kind": k, "wrapper": wrapper} for k in KINDS]
    jobs.append({"kind": "cifar_resnet20", "wrapper": wrapper, "checkpoint": True})
    ranks = run_workers(jobs, tmp_path)
    for i, job in enumerate(jobs):
        expected = reference(job["kind"], checkpoint=job.get("checkpoint", False))
        for rank in ranks:
            assert "error" not in rank[i], rank[i].get("trace")
            got = rank[i]["params"]
            assert got.keys() == expected.keys()
            for name, value in expected.items():
                torch.testing.assert_close(
                    got[name], value, atol=1e-5, rtol=1e-4, msg=f"{job} {name}"
                )


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_every_drop_mode_trains_without_unused_parameter_settings(
    wrapper: str, tmp_path: Path
) -> None:
    jobs = [
        {"kind": k, "wrapper": wrapper, "drop_mode": m}
        for m in ("row", "batch", "subset")
        for k in ("mlp", "cifar_resnet20")
    ]
    ranks = run_workers(jobs, tmp_path)
    for i, job in enumerate(jobs):
        a, b = ranks[0][i], ranks[1][i]
        assert "error" not in a and "error" not in b, (job, a.get("trace"), b.get("trace"))
        for name, value in a["params"].items():  # the ranks stayed in sync
            torch.testing.assert_close(b["params"][name], value, atol=1e-6, rtol=1e-5)


def test_ranks_with_different_drop_seeds_get_an_error_not_a_hang(tmp_path: Path) -> None:
    """FSDP keeps each rank's buffers: the explicit check finds the disagreement on every rank.
    DDP broadcasts rank 0's buffers when it wraps the model: the same ranks then agree."""
    jobs = [
        {"kind": "mlp", "wrapper": "ddp", "drop_mode": "batch", "mismatch": True},
        {"kind": "mlp", "wrapper": "fsdp2", "drop_mode": "batch", "mismatch": True},
    ]
    ranks = run_workers(jobs, tmp_path)
    for rank in ranks:
        assert "error" not in rank[0], rank[0].get("trace")
        assert "error" in rank[1]
        assert "check_drop_agreement" in rank[1]["error"]
        assert "torch.manual_seed(seed) on every rank" in rank[1]["error"]


def test_fsdp2_mixed_precision_keeps_the_fp32_stream(tmp_path: Path) -> None:
    ranks = run_workers([{"kind": "mixed_precision", "wrapper": "fsdp2"}], tmp_path)
    for rank in ranks:
        assert "error" not in rank[0], rank[0].get("trace")
        assert rank[0]["stream_dtypes"] == ["torch.float32"] * 3
        assert rank[0]["plain_dtypes"] == ["torch.bfloat16"] * 3


def test_ddp_workers_free_the_process_group_and_its_threads(tmp_path: Path) -> None:
    """The teardown leaves no gloo thread behind (nothing pins the group after DDP)."""
    ranks = spawn_ranks([{"kind": "mlp", "wrapper": "ddp"}], tmp_path)
    for rank in ranks:
        assert "error" not in rank["results"][0], rank["results"][0].get("trace")
        assert rank["gloo_threads_left"] == []
